"""The cache of converted GGUF checkpoints (smoothrot.io.gguf_cache, used by load_model).

Every test points ``SMOOTHROT_CACHE`` at a temporary folder, never the user's cache. The embedded
SmolLM2 GGUF is converted once for the module (``loads``: a miss, then a hit); the tests of damaged,
unwritable or disabled caches replace the conversion (``models._from_pretrained`` on a GGUF) by a
copy of that converted model, so they take a second, not ~20 s each.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smoothrot import models
from smoothrot.io import gguf_cache
from smoothrot.models import embedded_gguf_path, load_model, model_fingerprint

SAMPLE = "Smoothing and rotation <|im_start|>user\nmake 4-bit activations tractable<|im_end|>"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


def _counting(mp: pytest.MonkeyPatch, convert=None) -> list[str]:
    """Count (and with ``convert``, replace) the GGUF conversions of load_model."""
    calls: list[str] = []
    real = models._from_pretrained

    def wrapped(name, target, gguf_name, is_local, dtype, *rest):
        if gguf_name is None:
            return real(name, target, gguf_name, is_local, dtype, *rest)
        calls.append(gguf_name)
        if convert is None:
            return real(name, target, gguf_name, is_local, dtype, *rest)
        assert dtype == torch.float32
        return convert()

    mp.setattr(models, "_from_pretrained", wrapped)
    return calls


@pytest.fixture(scope="module")
def loads(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The embedded model loaded twice into an empty cache: converted (miss), then read (hit)."""
    root = tmp_path_factory.mktemp("gguf_cache")
    records = _Records()
    package = logging.getLogger("smoothrot")
    level = package.level
    package.addHandler(records)
    package.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(gguf_cache.ENV, str(root))
            calls = _counting(mp)
            miss = load_model()
            miss_log, miss_calls = list(records.messages), len(calls)
            records.messages.clear()
            hit = load_model()
            hit_calls = len(calls) - miss_calls
    finally:
        package.removeHandler(records)
        package.setLevel(level)
    key = gguf_cache.cache_key(embedded_gguf_path())
    return SimpleNamespace(root=root, key=key, entry=root / "gguf" / key, miss=miss, hit=hit,
                           miss_calls=miss_calls, hit_calls=hit_calls,
                           miss_log=miss_log, hit_log=records.messages)


@pytest.fixture
def converted(loads: SimpleNamespace):
    """A stand-in for the GGUF conversion: a copy of the model and tokenizer it made."""
    return lambda: copy.deepcopy(loads.miss)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("smoothrot")]


def _log(records: list[tuple[int, str]], text: str, level: int = logging.INFO) -> list[str]:
    return [m for lvl, m in records if text in m and lvl == level]


@pytest.mark.integration
def test_miss_then_hit_gives_the_same_model(loads: SimpleNamespace) -> None:
    (model, tok), (cached, ctok) = loads.miss, loads.hit
    assert (loads.miss_calls, loads.hit_calls) == (1, 0)  # the hit converts nothing
    assert _log(loads.miss_log, f"converted GGUF cached at {loads.entry}")
    assert not _log(loads.miss_log, "GGUF cache hit")
    assert _log(loads.hit_log, f"GGUF cache hit: loading embedded:smollm2 from {loads.entry}")

    assert type(cached) is type(model) and type(ctok) is type(tok)
    weights, stored = model.state_dict(), cached.state_dict()
    assert weights.keys() == stored.keys()
    for name, tensor in weights.items():
        assert stored[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(stored[name], tensor), name
    assert model_fingerprint(cached) == model_fingerprint(model)
    assert not cached.training and not any(p.requires_grad for p in cached.parameters())

    # SmolLM2 ties lm_head to the embedding: one tensor, in the file and in the model.
    assert cached.config.tie_word_embeddings is True
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()
    config, cached_config = model.config.to_dict(), cached.config.to_dict()
    config.pop("quantization_config")  # the GGUF marker of the converted model
    assert cached_config == config  # sizes, rope, tie, special ids, _name_or_path, ...
    assert cached.name_or_path == model.name_or_path == str(embedded_gguf_path().parent)

    for special in (True, False):
        assert ctok(SAMPLE, add_special_tokens=special)["input_ids"] == \
            tok(SAMPLE, add_special_tokens=special)["input_ids"]
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id",
                 "eos_token_id", "pad_token_id", "padding_side", "name_or_path"):
        assert getattr(ctok, attr) == getattr(tok, attr), attr
    assert len(ctok) == len(tok) and ctok.chat_template == tok.chat_template


@pytest.mark.integration
def test_entry_is_complete(monkeypatch, loads: SimpleNamespace) -> None:
    marker = json.loads((loads.entry / gguf_cache.MARKER).read_text())
    assert marker["key"] == loads.key and marker["source"] == str(embedded_gguf_path())
    assert marker["files"]["model.safetensors"] == \
        (loads.entry / "model.safetensors").stat().st_size
    assert {"config.json", "tokenizer.json"} <= set(marker["files"])
    assert "quantization_config" not in json.loads((loads.entry / "config.json").read_text())
    assert os.listdir(loads.root / "gguf") == [loads.key]  # no temporaries left
    monkeypatch.setenv(gguf_cache.ENV, str(loads.root))
    assert gguf_cache.cached_folder(loads.key) == loads.entry


@pytest.mark.integration
def test_hit_in_another_dtype(monkeypatch, loads: SimpleNamespace) -> None:
    """The float32 entry read in bfloat16: the cast a GGUF load in bfloat16 makes."""
    monkeypatch.setenv(gguf_cache.ENV, str(loads.root))
    calls = _counting(monkeypatch)
    model, _ = load_model(dtype="bfloat16")
    assert calls == []
    reference = loads.miss[0].state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith("model.rotary_emb."):  # computed at construction, float32
            assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name])
        else:
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_key_follows_contents_and_converter(tmp_path: Path) -> None:
    source = embedded_gguf_path()
    same, edited = tmp_path / "same.gguf", tmp_path / "edited.gguf"
    shutil.copyfile(source, same)
    shutil.copyfile(source, edited)
    with open(edited, "r+b") as f:  # one byte of tensor data (which starts at 1.79 MB)
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 1]))
    key = gguf_cache.cache_key(source)
    assert len(key) == 64 and gguf_cache.cache_key(same) == key  # contents, not the path
    assert gguf_cache.cache_key(edited) != key
    versions = gguf_cache.converter_versions()
    assert gguf_cache.cache_key(source, versions) == key
    assert gguf_cache.cache_key(source, {**versions, "transformers": "0.0.1"}) != key
    assert gguf_cache.cache_key(source, {**versions, "gguf": "0.0.1"}) != key


def test_cache_root(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "c"))
    assert gguf_cache.cache_root() == tmp_path / "c"
    for off in ("off", "OFF", ""):
        monkeypatch.setenv(gguf_cache.ENV, off)
        assert gguf_cache.cache_root() is None and gguf_cache.entry_path("k") is None
    monkeypatch.delenv(gguf_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "smoothrot"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache.cache_root() == tmp_path / "home" / ".cache" / "smoothrot"


@pytest.mark.integration
def test_incomplete_entry_is_not_used(monkeypatch, tmp_path, loads, converted) -> None:
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path))
    folder = tmp_path / "gguf" / loads.key
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # no complete.json: a writer that never finished
    assert gguf_cache.cached_folder(loads.key) is None
    calls = _counting(monkeypatch, converted)
    model, _ = load_model()
    assert len(calls) == 1
    assert gguf_cache.cached_folder(loads.key) == folder  # replaced by a complete entry
    assert model_fingerprint(model) == model_fingerprint(loads.miss[0])


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["truncated", "zeros"])
def test_damaged_entry_is_replaced(monkeypatch, tmp_path, caplog, loads, converted,
                                   damage) -> None:
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path))
    folder = tmp_path / "gguf" / loads.key
    shutil.copytree(loads.entry, folder, copy_function=os.link)  # hard links: no 540 MB copy
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.unlink()  # a new file, not the linked one
    with open(weights, "wb") as f:
        if damage == "truncated":
            with open(loads.entry / "model.safetensors", "rb") as src:
                f.write(src.read(size // 2))
        else:
            f.truncate(size)  # the right size, all zeros (sparse)
    calls = _counting(monkeypatch, converted)
    with caplog.at_level(logging.INFO, logger="smoothrot"):
        model, _ = load_model()
    assert len(calls) == 1
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and f"GGUF cache entry {folder} is damaged" in warnings[0]
    assert "converted GGUF cached at" in caplog.text
    assert model_fingerprint(model) == model_fingerprint(loads.miss[0])
    assert weights.stat().st_size == (loads.entry / "model.safetensors").stat().st_size
    assert gguf_cache.cached_folder(loads.key) == folder
    assert (loads.entry / "model.safetensors").stat().st_size == size  # the original is intact


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["read-only folder", "a file"])
def test_unwritable_cache_still_loads(monkeypatch, tmp_path, caplog, loads, converted,
                                      kind) -> None:
    root = tmp_path / "cache"
    if kind == "a file":
        root.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        root.mkdir()
        root.chmod(0o500)
    monkeypatch.setenv(gguf_cache.ENV, str(root))
    calls = _counting(monkeypatch, converted)
    try:
        with caplog.at_level(logging.INFO, logger="smoothrot"):
            model, tokenizer = load_model()
    finally:
        if root.is_dir():
            root.chmod(0o700)
    assert len(calls) == 1 and tokenizer.pad_token is not None
    assert model_fingerprint(model) == model_fingerprint(loads.miss[0])
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "could not write the GGUF cache entry" in warnings[0]
    assert "SMOOTHROT_CACHE" in warnings[0]


@pytest.mark.integration
@pytest.mark.parametrize("how", ["env", "argument"])
def test_cache_can_be_switched_off(monkeypatch, tmp_path, loads, converted, how) -> None:
    """Off: the GGUF is converted even though an entry exists, and nothing is written."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if how == "env":
        monkeypatch.setenv(gguf_cache.ENV, "off")
    else:
        monkeypatch.setenv(gguf_cache.ENV, str(loads.root))
    calls = _counting(monkeypatch, converted)
    load_model(cache=how != "argument")
    assert len(calls) == 1
    assert not (tmp_path / "home").exists() and not (tmp_path / "xdg").exists()
    assert os.listdir(loads.root / "gguf") == [loads.key]


def test_broken_gguf_is_never_cached(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(models.ModelLoadError, match="damaged or truncated"):
        load_model(str(path))
    assert not (tmp_path / "cache").exists()
