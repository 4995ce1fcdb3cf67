"""Bad models, texts, fit configs and interruptions: one clear line, never a silently wrong run.

The companion of test_bad_inputs.py (same helpers: a tiny random LLaMA saved with
``save_pretrained``, the CLI run in-process) for the model-loading, data and fit-CLI cases of
docs/bad_inputs.md: damaged or incomplete checkpoints, non-UTF-8 text, an unreachable hub,
overflowing weights, config values only the loader or the model can check, the output folder's
lock, and real signals.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import smoothrot.job
from smoothrot.data.sources import load_documents
from smoothrot.io.lock import folder_lock
from smoothrot.models import ModelLoadError, embedded_gguf_path, load_model, model_fingerprint
from smoothrot.schema.config import TrainConfig
from smoothrot.schema.quant import get_scheme
from smoothrot.training.checkpoints import LAST_CKPT, ResumeError
from smoothrot.training.fit import TrainProblem, fit_scales
from tests.conftest import tiny_llama
from tests.unit.distributed_worker import training_problem
from tests.unit.test_bad_inputs import assert_words, cli_error, save_tiny_model, small_config
from train.fit_scales import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def copy_model(source: Path, folder: Path, tensors: dict[str, torch.Tensor] | None = None,
               **config: object) -> Path:
    """A copy of a saved model, with other weights and config.json entries if given."""
    shutil.copytree(source, folder)
    if tensors is not None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if config:
        data = json.loads((folder / "config.json").read_text())
        data.update(config)
        (folder / "config.json").write_text(json.dumps(data))
    return folder


def only_line(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
              *argv: str) -> str:
    """Run the CLI quietly; exit code 2 and nothing on stderr but one ``error:`` line, counting
    what transformers logs through its own handler (made at import, so pointed at the capture)."""
    for handler in logging.getLogger("transformers").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers
            monkeypatch.setattr(handler, "stream", sys.stderr)
    capfd.readouterr()
    code = main([*argv, "--quiet"])
    err = capfd.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def never(what: str):
    """A stand-in that fails the test if the step it replaces is reached."""
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} must not be reached")
    return fail


# --------------------------------------------------------------------------------------------
# Checkpoints that do not hold their architecture's weights, damaged files
# --------------------------------------------------------------------------------------------


def test_checkpoint_missing_a_tensor_is_refused(capsys, tmp_path, tiny_model) -> None:
    """transformers would random-initialise the layer and the run would report on it."""
    tensors = load_file(tiny_model / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    folder = copy_model(tiny_model, tmp_path / "missing", tensors)
    line = cli_error(capsys, "--config", str(small_config(tmp_path, folder)))
    assert_words(line, str(folder), "lacks model.layers.1.mlp.down_proj.weight", "re-download")


@pytest.mark.parametrize("case", ["unexpected", "mis-shaped"])
def test_checkpoint_with_foreign_tensors_is_refused(capfd, monkeypatch, tmp_path, tiny_model,
                                                    case) -> None:
    """An extra tensor would be dropped, a mis-shaped one re-initialised (after a log table)."""
    tensors = load_file(tiny_model / "model.safetensors")
    if case == "unexpected":
        tensors["model.layers.9.mlp.down_proj.weight"] = torch.zeros(64, 96)
        words = ["does not use", "model.layers.9.mlp.down_proj.weight"]
    else:
        tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 50)
        words = ["model.layers.0.mlp.down_proj.weight of shape (64, 50)", "(64, 96)"]
    folder = copy_model(tiny_model, tmp_path / case, tensors)
    line = only_line(capfd, monkeypatch, "--config", str(small_config(tmp_path, folder)))
    assert_words(line, "does not match its config", *words)


def test_tied_lm_head_is_not_missing(tmp_path) -> None:
    """With tie_word_embeddings the checkpoint stores the embedding once: that is complete."""
    def tie(model: torch.nn.Module) -> None:
        model.config.tie_word_embeddings = True
        model.tie_weights()

    folder = save_tiny_model(tmp_path / "tied", edit=tie)
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "lm_head.weight" not in header
    model, _ = load_model(str(folder))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fingerprint_covers_every_weight() -> None:
    """A re-initialised last layer changes the id; the same weights in another dtype do not."""
    model = tiny_llama()
    fp = model_fingerprint(model)
    assert model_fingerprint(tiny_llama(dtype=torch.float64)) == fp
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.normal_()
    assert model_fingerprint(model) != fp


@pytest.mark.parametrize("damage", ["truncated", "zeros"])
def test_damaged_safetensors_is_one_line(capsys, tmp_path, tiny_model, damage) -> None:
    folder = copy_model(tiny_model, tmp_path / damage)
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else bytes(len(raw)))
    line = cli_error(capsys, "--config", str(small_config(tmp_path, folder)))
    assert_words(line, str(weights), "damaged or truncated", "re-download")


@pytest.mark.parametrize("cut", [1000, 4_000_000])
def test_cut_gguf_is_one_line(tmp_path, cut) -> None:
    """Cut in the header (metadata) or in the tensor data (which starts at 1.79 MB)."""
    path = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        path.write_bytes(f.read(cut))
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(path))
    assert "\n" not in str(exc.value)
    assert_words(str(exc.value), str(path), "damaged or truncated", "re-download")


def test_custom_code_names_the_flag(capsys, tmp_path, tiny_model) -> None:
    marker = tmp_path / "code_ran"
    folder = copy_model(tiny_model, tmp_path / "remote", model_type="evil",
                        auto_map={"AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    line = cli_error(capsys, "--config", str(small_config(tmp_path, folder)))
    assert_words(line, "custom code", "--trust-remote-code")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["bert", "no tokenizer"])
def test_quiet_means_one_line(capfd, monkeypatch, tmp_path, tiny_model, case) -> None:
    """transformers' own advice (is_decoder, tokenizer backends) stays out of a -q run."""
    if case == "bert":
        from transformers import BertConfig, BertForMaskedLM

        folder = tmp_path / "bert"
        BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=300)).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_model / name, folder / name)
        words = ["BertLMHeadModel", "no smoothing table"]
    else:
        folder = copy_model(tiny_model, tmp_path / "no_tokenizer")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
        words = ["tokenizer", "tokenizer.json"]
    line = only_line(capfd, monkeypatch, "--config", str(small_config(tmp_path, folder)))
    assert_words(line, *words)


# --------------------------------------------------------------------------------------------
# An unreachable hub fails at once
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, refused_connections: list[object]
               ) -> list[object]:
    """No offline switch set and every connection refused: the hub clients alone would retry
    with back-off. Returns the refused attempts."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return refused_connections


@pytest.mark.parametrize("source", ["model", "data"])
def test_unreachable_hub_fails_fast(capsys, tmp_path, tiny_model, no_network, source) -> None:
    if source == "model":
        argv = ["--config", str(small_config(tmp_path, "someone/not-cached"))]
        words = ["'someone/not-cached'", "unreachable", "embedded:smollm2"]
    else:
        argv = ["--config", str(small_config(tmp_path, tiny_model)), "--data",
                "hf:someone/not-cached:train"]
        words = ["'someone/not-cached'", "unreachable", "'pydoc'"]
    line = cli_error(capsys, *argv)
    # One refused connection is the end of it: no retries with back-off (a timed bound here
    # failed on a loaded machine, where the run itself took a minute).
    assert 1 <= len(no_network) <= 2
    assert_words(line, *words)


# --------------------------------------------------------------------------------------------
# Text that is not UTF-8 text
# --------------------------------------------------------------------------------------------

_TEXT = "A paragraph of plain text about quantization.\n\nAnother one, with more words.\n" * 40


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (_TEXT.encode("utf-16"), ["UTF-16", "iconv"]),
        (_TEXT.encode("utf-16-le"), ["NUL bytes", "UTF-16"]),
        (bytes(4096), ["NUL bytes"]),
        (bytes(range(128, 256)) * 16, ["not UTF-8", "byte 0x80 at 0"]),
        (("text\x01\x02\x1b" * 200).encode(), ["looks binary", "control"]),
    ],
    ids=["utf16", "utf16-no-bom", "nul", "binary", "control"],
)
def test_text_that_is_not_utf8_is_refused(capsys, tmp_path, tiny_model, raw, words) -> None:
    text = tmp_path / "data.txt"
    text.write_bytes(raw)
    line = cli_error(capsys, "--config", str(small_config(tmp_path, tiny_model)),
                     "--data", str(text))
    assert_words(line, str(text), *words, "'pydoc'")


def test_utf8_text_with_bom_and_accents_loads(tmp_path) -> None:
    text = tmp_path / "fr.txt"
    text.write_bytes(b"\xef\xbb\xbf" + "Café crème, déjà vu.\n\nSecond §.\tTab.\n".encode())
    assert load_documents(str(text)) == ["Café crème, déjà vu.", "Second §.\tTab."]


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def test_nan_in_a_site_weight_fails_before_calibration(capsys, tmp_path, monkeypatch) -> None:
    def poison(model: torch.nn.Module) -> None:
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")

    folder = save_tiny_model(tmp_path / "nan_w", edit=poison)
    monkeypatch.setattr(smoothrot.job, "_calibrate", never("calibration"))
    line = cli_error(capsys, "--config", str(small_config(tmp_path, folder)))
    assert_words(line, "model.layers.1.mlp.down_proj.weight", "row 3, input channel 5", "NaN")


def test_inf_in_lm_head_names_it(capsys, tmp_path, monkeypatch) -> None:
    def poison(model: torch.nn.Module) -> None:
        model.lm_head.weight[2, 4] = float("-inf")

    folder = save_tiny_model(tmp_path / "inf_head", edit=poison)
    monkeypatch.setattr(smoothrot.job, "_calibrate", never("calibration"))
    line = cli_error(capsys, "--config", str(small_config(tmp_path, folder)))
    assert_words(line, "lm_head.weight", "-inf at row 2, input channel 4", "inf or NaN")


def test_weight_that_overflows_names_the_layer(capsys, tmp_path) -> None:
    """3e38 is finite, but the layer's output is not: no 'inf' error and '+nan%' in a report."""
    def huge(model: torch.nn.Module) -> None:
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 3e38

    folder = save_tiny_model(tmp_path / "huge", edit=huge)
    line = cli_error(capsys, "--config", str(small_config(tmp_path, folder)))
    assert_words(line, "model.layers.1.mlp.down_proj", "overflow float32", "3e+38")
    assert not (tmp_path / "out" / "report.json").exists()


# --------------------------------------------------------------------------------------------
# Fit configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_seed_outside_numpys_range(capsys, tmp_path, seed) -> None:
    line = cli_error(capsys, "--config", str(small_config(tmp_path, "x")), "--seed", str(seed))
    assert_words(line, f"seed={seed}", "[0, 2**32)")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--output-dir", ""], ["output_dir is empty", "--output-dir"]),
        (["--schemes", "w4a4", "w8a8", "w4a4"], ["schemes lists ['w4a4'] more than once"]),
        (["--layers", "re:("], ["'re:('", "not a valid regex", "missing )"]),
    ],
    ids=["empty-output-dir", "repeated-scheme", "bad-regex"],
)
def test_config_values_refused_before_loading(capsys, tmp_path, tiny_model, monkeypatch,
                                              argv, words) -> None:
    monkeypatch.setattr(smoothrot.job, "load_model", never("loading the model"))
    line = cli_error(capsys, "--config", str(small_config(tmp_path, tiny_model)), *argv)
    assert_words(line, *words)


def test_duplicate_yaml_key(capsys, tmp_path) -> None:
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("seed: 1\ntrain:\n  steps: 3\n  lr: 0.1\n  steps: 40\n")
    line = cli_error(capsys, "--config", str(cfg))
    assert_words(line, str(cfg), "'steps' appears twice", "line 5")


def test_yaml_python_tags_fail_at_config_load(capsys, tmp_path, monkeypatch) -> None:
    """Refused by the loader itself: no job starts, no model loads, the payload never runs."""
    marker = tmp_path / "executed"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    monkeypatch.setattr(smoothrot.job, "run_fit", never("the job"))
    monkeypatch.setattr(smoothrot.job, "load_model", never("loading the model"))
    line = cli_error(capsys, "--config", str(cfg))
    assert_words(line, str(cfg), "not valid YAML", "python/object", "refused")
    assert not marker.exists()


def test_seq_len_beyond_the_models_positions(capsys, tmp_path, tiny_model, monkeypatch) -> None:
    budget = {"seq_len": 300, "calibration_samples": 1, "selection_samples": 1,
              "heldout_samples": 1, "evaluation_samples": 1, "train_tokens": 64}
    monkeypatch.setattr(smoothrot.job, "_calibrate", never("calibration"))
    line = cli_error(capsys, "--config", str(small_config(tmp_path, tiny_model, data=budget)))
    assert_words(line, "data.seq_len=300", "max_position_embeddings=256", "at most 256")


_BUDGET = {"seq_len": 32, "calibration_samples": 4, "selection_samples": 2, "heldout_samples": 2,
           "evaluation_samples": 2, "train_tokens": 64}


def test_fractions_for_a_subset_of_splits(capsys, tmp_path, tiny_model) -> None:
    """docs/configuration.md allows a subset: without perplexity the run needs no evaluation
    split; with perplexity its absence is one line naming the key."""
    subset = {**_BUDGET, "fractions": {"calibration": 0.6, "selection": 0.2, "heldout": 0.2}}
    cfg = small_config(tmp_path, tiny_model, data=subset)
    assert main(["--config", str(cfg), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["data_hash"]) == {"calibration", "selection", "heldout"}
    cfg = small_config(tmp_path, tiny_model, data=subset, perplexity=True)
    line = cli_error(capsys, "--config", str(cfg))
    assert_words(line, "data.fractions has no share for ['evaluation']", "perplexity: false")


# --------------------------------------------------------------------------------------------
# The output folder's lock
# --------------------------------------------------------------------------------------------


def test_second_run_on_a_locked_output_dir_is_refused(capsys, tmp_path, tiny_model) -> None:
    cfg = str(small_config(tmp_path, tiny_model))
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out):  # another run holds it (flock: per open file, so even this process)
        line = cli_error(capsys, "--config", cfg)
        assert_words(line, str(out), "in use by another run", f"pid {os.getpid()}",
                     "--output-dir")
        assert not (out / "report.json").exists()
    assert main(["--config", cfg, "--quiet"]) == 0  # released: the next run proceeds
    assert (out / "report.json").is_file()


# --------------------------------------------------------------------------------------------
# Real signals, and a checkpoint that is a real malicious pickle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_real_run_with_the_resume_hint(tmp_path, tiny_model, signum) -> None:
    """A subprocess in training gets the signal: exit 130, the --resume hint alone on stderr,
    a loadable last.ckpt and a released lock."""
    train = {"steps": 100_000, "batch_tokens": 32, "val_every": 5}
    cfg = small_config(tmp_path, tiny_model, train=train, methods=["trained"],
                       layers=["model.layers.0.mlp.down_proj"])
    # A child inherits an ignored SIGINT, and Python then installs no Ctrl-C handler. In full
    # runs the suite's process had SIGINT ignored by the time this test ran (which earlier test
    # leaves it so is not found yet), so the run starts with the default disposition, as from a
    # shell.
    proc = subprocess.Popen([sys.executable, "train/fit_scales.py", "--config", str(cfg), "-q"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "out").rglob(LAST_CKPT)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "interrupted; rerun with --resume to continue training from the last checkpoint"], err
    (ckpt,) = (tmp_path / "out").rglob(LAST_CKPT)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] % train["val_every"] == 0 and state["global_step"] > 0
    with folder_lock(tmp_path / "out"):
        pass


def test_sigterm_outside_training_ends_like_ctrl_c(tmp_path) -> None:
    """Lightning turns SIGTERM into an interrupt only while it trains; elsewhere (here: as the
    job starts) Python's default would end the process silently, mid-write."""
    script = (
        "import os, signal, sys, time, smoothrot.job\n"
        "from train.fit_scales import main\n"
        "def job(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        "smoothrot.job.run_fit = job\n"
        f"sys.exit(main(['--config', {str(small_config(tmp_path, 'x'))!r}, '-q']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "interrupted; rerun with --resume to continue training from the last checkpoint"]


class _Payload:
    """Pickles as a call to Path.touch(marker): what unpickling a tampered checkpoint runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def test_malicious_checkpoint_pickle_never_runs(tmp_path) -> None:
    """``last.ckpt`` is read with weights_only=True: a pickle that runs code on load is refused
    in one line, and its code does not run."""
    proof, marker = tmp_path / "proof", tmp_path / "pwned"
    torch.save({"state_dict": _Payload(proof)}, tmp_path / "probe.ckpt")
    torch.load(tmp_path / "probe.ckpt", weights_only=False)  # the payload is live ...
    assert proof.exists()
    torch.save({"state_dict": _Payload(marker), "global_step": 5}, tmp_path / LAST_CKPT)
    p = training_problem()
    problem = TrainProblem(p["w"], p["init"], get_scheme("w4a4"), p["x"], p["val"], seed=1)
    with pytest.raises(ResumeError) as exc:
        fit_scales(problem, TrainConfig(steps=13, batch_tokens=64, val_every=5),
                   checkpoint_dir=tmp_path, resume=True)
    assert "\n" not in str(exc.value)
    assert_words(str(exc.value), str(tmp_path / LAST_CKPT), "unreadable", "delete it")
    assert not marker.exists()  # ... but not here
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / LAST_CKPT, weights_only=True)

