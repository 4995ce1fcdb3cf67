"""Bad inputs end in one clear line (what is wrong, how to fix it) or in a correct result.

Most cases go through the CLI, ``train.fit_scales.main``: exit code 2 and a single
``error: ...`` line on stderr, no traceback. Cases that need a model use a tiny random LLaMA
saved with ``save_pretrained`` (plus a small BPE tokenizer), so they load in about a second.
The table of cases is docs/bad_inputs.md.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothrot.arch.sites import resolve_sites
from smoothrot.calibrate.capture import capture_sites, run_model
from smoothrot.core.policies import smoothing_scales
from smoothrot.core.stats import AbsMaxObserver, AbsQuantileObserver, weight_absmax
from smoothrot.core.transform import FULL
from smoothrot.evaluate import layer_error
from smoothrot.models import ModelLoadError, load_model
from smoothrot.schema.config import config_from_dict, load_config
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import QuantScheme
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan
from tests.conftest import tiny_llama
from train.fit_scales import main

W4A4 = QuantScheme("w4a4", w_bits=4, a_bits=4)


# --------------------------------------------------------------------------------------------
# Helpers: a tiny saved model, a small config, running the CLI
# --------------------------------------------------------------------------------------------


@cache
def _tokenizer():
    """A 300-token byte-level BPE trained on pydoc text (well under a second, offline)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def save_tiny_model(
    folder: Path,
    *,
    intermediate: int = 96,
    edit: Callable[[torch.nn.Module], None] | None = None,
    arch: str = "llama",
) -> Path:
    """Save a random-init 2-layer model and the tokenizer with ``save_pretrained`` (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
            max_position_embeddings=256))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                           vocab_size=len(tokenizer), bos_token_id=1,
                                           eos_token_id=1))
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def small_config(tmp_path: Path, model: Path | str, **overrides: object) -> Path:
    """A YAML config with a tiny budget; ``overrides`` replace top-level sections."""
    data: dict[str, object] = {
        "model": {"name": str(model)},
        "data": {"seq_len": 32, "calibration_samples": 4, "selection_samples": 2,
                 "heldout_samples": 2, "evaluation_samples": 2, "train_tokens": 64},
        "search": {"alphas": [0.5], "quantiles": [1.0]},
        "train": {"steps": 2, "batch_tokens": 32, "val_every": 1},
        "layers": ["down_proj"],
        "schemes": ["w4a4"],
        "methods": ["smoothrot_max"],
        "perplexity": False,
        "output_dir": str(tmp_path / "out"),
    }
    data.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI quietly; assert exit code 2 and exactly one ``error:`` line; return it."""
    capsys.readouterr()  # drop what the test's own setup printed
    code = main([*argv, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def assert_words(line: str, *words: str) -> None:
    for word in words:
        assert word in line, (word, line)


# --------------------------------------------------------------------------------------------
# Model and architecture
# --------------------------------------------------------------------------------------------


def test_model_path_that_does_not_exist(capsys, tmp_path) -> None:
    missing = tmp_path / "no_such_model"
    line = cli_error(capsys, "--config", str(small_config(tmp_path, missing)))
    assert_words(line, "model path does not exist", str(missing), "embedded:smollm2")


def test_hub_id_while_offline(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = cli_error(capsys, "--config", str(small_config(tmp_path, "someone/not-cached")),
                     "--output-dir", str(tmp_path / "o"))
    assert_words(line, "'someone/not-cached'", "unreachable", "embedded:smollm2")


def test_unsupported_architecture(capsys, tmp_path) -> None:
    gpt2 = save_tiny_model(tmp_path / "gpt2", arch="gpt2")
    line = cli_error(capsys, "--config", str(small_config(tmp_path, gpt2)))
    assert_words(line, "GPT2LMHeadModel", "supported", "LlamaForCausalLM")


def test_layers_matching_nothing(capsys, tmp_path, tiny_model) -> None:
    line = cli_error(capsys, "--config", str(small_config(tmp_path, tiny_model)),
                     "--layers", "down_projj")
    assert_words(line, "down_projj", "matched no", "re:")


def test_hidden_size_without_hadamard(capsys, tmp_path) -> None:
    """156 has no Hadamard construction: the error names the first site and a way out."""
    model = save_tiny_model(tmp_path / "m156", intermediate=156)
    line = cli_error(capsys, "--config", str(small_config(tmp_path, model)))
    assert_words(line, "model.layers.0.mlp.down_proj", "n=156", "block")


def test_no_network_for_a_local_model(tiny_model, monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a local model must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model, tokenizer = load_model(str(tiny_model))
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) == 300


def test_pickled_weights_are_never_loaded(tmp_path, tiny_model, monkeypatch) -> None:
    """A folder with only pytorch_model.bin is refused without unpickling it."""
    folder = tmp_path / "bin_only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load called on a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(folder))
    assert str(folder) in str(exc.value) and "\n" not in str(exc.value)


def test_remote_code_does_not_run_unless_asked(tmp_path, tiny_model) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    marker = tmp_path / "code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "evil.EvilConfig",
                            "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(folder))
    assert "\n" not in str(exc.value)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def test_text_shorter_than_the_requested_samples(capsys, tmp_path, tiny_model) -> None:
    text = tmp_path / "short.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: a few words of text." * 3 for i in range(40)))
    budget = {"seq_len": 32, "calibration_samples": 500, "selection_samples": 2,
              "heldout_samples": 2, "evaluation_samples": 2, "train_tokens": 64}
    cfg = small_config(tmp_path, tiny_model, data=budget)
    line = cli_error(capsys, "--config", str(cfg), "--data", str(text))
    assert_words(line, "calibration text has", "data.calibration_samples", "larger text")


def test_empty_text_file(capsys, tmp_path, tiny_model) -> None:
    text = tmp_path / "empty.txt"
    text.write_text("\n  \n\n")
    line = cli_error(capsys, "--config", str(small_config(tmp_path, tiny_model)),
                     "--data", str(text))
    assert_words(line, str(text), "contains no text", "'pydoc'")


# --------------------------------------------------------------------------------------------
# Non-finite and degenerate numbers
# --------------------------------------------------------------------------------------------


def test_nan_in_a_site_weight_names_layer_and_channel(capsys, tmp_path) -> None:
    """NaN in the last site's own weight (which no activation check sees)."""
    def poison(model: torch.nn.Module) -> None:
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")

    model = save_tiny_model(tmp_path / "nan_w", edit=poison)
    line = cli_error(capsys, "--config", str(small_config(tmp_path, model)))
    assert_words(line, "model.layers.1.mlp.down_proj", "channel 5", "inf or NaN")


def test_inf_activations_name_layer_and_channel(capsys, tmp_path) -> None:
    """A finite but huge up_proj row 7 (3e38; inf is refused at load) overflows, making input
    channel 7 of down_proj non-finite during calibration."""
    def poison(model: torch.nn.Module) -> None:
        model.model.layers[0].mlp.up_proj.weight[7, :] = 3e38

    model = save_tiny_model(tmp_path / "inf_a", edit=poison)
    line = cli_error(capsys, "--config", str(small_config(tmp_path, model)))
    assert_words(line, "model.layers.0.mlp.down_proj", "non-finite", "channel index 7",
                 "float32")


def test_zero_and_constant_channels_give_finite_results() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 24, generator=g)
    x[:, 0] = 0.0  # a dead channel
    x[:, 1] = 3.0  # a constant channel
    w = torch.randn(8, 24, generator=g)
    w[:, 2] = 0.0  # a zero weight column
    mx, qo = AbsMaxObserver(24), AbsQuantileObserver(24, [0.99], 512)
    mx.update(x)
    qo.update(x)
    for stat in (mx.value(), qo.value(0.99)):
        for alpha in (0.0, 0.5, 1.0):
            s = smoothing_scales(stat, weight_absmax(w), alpha)
            assert torch.isfinite(s).all() and (s > 0).all()
            err = layer_error(x, w, s, FULL, W4A4)
            assert torch.isfinite(torch.tensor([err.mse, err.relative])).all()
    zero = layer_error(torch.zeros(16, 24), w, None, FULL, W4A4)  # all-zero tokens
    assert zero.mse == 0.0


F32_MAX = torch.finfo(torch.float32).max
_FLOAT32 = st.floats(min_value=0.0, max_value=F32_MAX, allow_nan=False, allow_subnormal=True,
                     width=32)


@settings(max_examples=200, deadline=None)
@given(
    act=st.lists(_FLOAT32 | st.sampled_from([0.0, 1e-38, 1.4e-45, F32_MAX]), min_size=1,
                 max_size=16),
    data=st.data(),
    alpha=st.floats(min_value=0.0, max_value=1.0),
)
def test_scales_are_finite_for_any_finite_statistics(act, data, alpha) -> None:
    """For any finite float32 stats (zero, subnormal, huge): s, 1/s, W·s and X/s stay finite."""
    weight = data.draw(st.lists(_FLOAT32, min_size=len(act), max_size=len(act)))
    a, w = torch.tensor(act, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32)
    s = smoothing_scales(a, w, alpha)
    assert s.dtype == torch.float64 and torch.isfinite(s).all() and (s > 0).all()
    assert torch.isfinite(1.0 / s).all()
    assert torch.isfinite(w.double() * s).all() and torch.isfinite(a.double() / s).all()


@pytest.mark.parametrize("patterns", [["down_proj"], ["qkv", "o_proj", "gate_up", "down_proj"]])
def test_zero_and_negative_norm_gamma_still_transform_exactly(patterns) -> None:
    """RMSNorm γ with zeros and negatives: smoothing + rotation leave the float model unchanged."""
    model = tiny_llama(dtype=torch.float64)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[::3] = 0.0
                norm.weight[1::3] *= -2.0
    sites = resolve_sites(model, patterns)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with capture_sites(sites, total_tokens=ids.numel(), keep_rows=False, quantiles=[1.0]) as rec:
        run_model(model, ids, 2, "calib")
    plans = {}
    for rs in sites:
        tie = rs.transform.tied_max
        s = smoothing_scales(tie(rec[rs.name].max_abs()), tie(weight_absmax(rs.weight)), 0.5)
        plans[rs.name] = SitePlan(s, rs.rotation)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with transformed(sites, plans):
            out = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.isfinite(out).all()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-10
    assert torch.equal(after, ref)  # restored on exit


# --------------------------------------------------------------------------------------------
# Configuration values and files
# --------------------------------------------------------------------------------------------


def test_bits_outside_the_supported_set(capsys, tmp_path) -> None:
    line = cli_error(capsys, "--config", str(small_config(tmp_path, "x")), "--schemes", "w3a3")
    assert_words(line, "unknown scheme 'w3a3'", "w4a4", "w8a8")
    with pytest.raises(ConfigError, match=r"a_bits=5 is not supported; use one of \(4, 8\)"):
        QuantScheme("custom", w_bits=4, a_bits=5)


@pytest.mark.parametrize(
    ("search", "words"),
    [
        ({"alphas": [0.5, 1.5]}, ["search.alphas contains 1.5", "[0, 1]"]),
        ({"alphas": [-0.1]}, ["search.alphas contains -0.1", "[0, 1]"]),
        ({"quantiles": [0.0]}, ["search.quantiles contains 0.0", "(0, 1]"]),
        ({"quantiles": [1.2]}, ["search.quantiles contains 1.2", "(0, 1]"]),
    ],
)
def test_alpha_and_q_outside_their_ranges(capsys, tmp_path, search, words) -> None:
    line = cli_error(capsys, "--config", str(small_config(tmp_path, "x", search=search)))
    assert_words(line, str(tmp_path / "config.yaml"), *words)


def test_unknown_config_key(capsys, tmp_path) -> None:
    cfg = small_config(tmp_path, "x", train={"stepz": 3})
    line = cli_error(capsys, "--config", str(cfg))
    assert_words(line, "unknown key(s) ['stepz'] in train", "allowed:", "'steps'")


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"train": {"steps": "ten"}}, ["train.steps='ten' must be an integer"]),
        ({"train": {"lr": "1e-3"}}, ["train.lr='1e-3' must be a number", "1.0e-3"]),
        ({"layers": "down_proj"}, ["layers='down_proj' must be a list of strings"]),
    ],
)
def test_wrong_value_types_name_the_key(capsys, tmp_path, section, words) -> None:
    line = cli_error(capsys, "--config", str(small_config(tmp_path, "x", **section)))
    assert_words(line, *words)


def test_yaml_python_tags_are_rejected_not_executed(capsys, tmp_path) -> None:
    marker = tmp_path / "executed"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    line = cli_error(capsys, "--config", str(cfg))
    assert_words(line, str(cfg), "not valid YAML", "python/object", "refused")
    assert not marker.exists()
    with pytest.raises(ConfigError):
        load_config(cfg)


def test_missing_config_file(capsys, tmp_path) -> None:
    line = cli_error(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert_words(line, "nope.yaml", "does not exist")


def test_output_dir_that_is_a_file(capsys, tmp_path) -> None:
    """Checked before the model loads, so a bad path costs seconds, not a whole run."""
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    line = cli_error(capsys, "--config", str(small_config(tmp_path, "x")),
                     "--output-dir", str(blocker / "out"))
    assert_words(line, "cannot create output dir", str(blocker / "out"), "--output-dir")


def test_scales_from_another_model_are_refused(llama) -> None:
    """Scales fitted on SmolLM2 (1536 channels) applied to a 96-channel model: one line, no edit."""
    sites = resolve_sites(llama, ["down_proj"])
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    plans = {rs.name: SitePlan(torch.ones(1536, dtype=torch.float64), rs.rotation)
             for rs in sites}
    with pytest.raises(ValueError) as exc, transformed(sites, plans):
        pass
    message = str(exc.value)
    assert "\n" not in message
    assert_words(message, "model.layers.0.mlp.down_proj", "1536", "96", "another model")
    assert all(torch.equal(p, before[n]) for n, p in llama.named_parameters())


# --------------------------------------------------------------------------------------------
# The CLI's own surface
# --------------------------------------------------------------------------------------------


def test_every_flag_has_help(capsys) -> None:
    from train.fit_scales import build_parser

    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert_words(out, "--config", "docs/configuration.md", "--resume", "--quiet", "--verbose",
                 "exit codes")
    assert "(default: None)" not in out


def test_verbose_keeps_the_traceback(tmp_path) -> None:
    """--verbose is for debugging: the original exception propagates."""
    with pytest.raises(ConfigError):
        main(["--config", str(small_config(tmp_path, "x", search={"alphas": [2.0]})), "-v"])


def test_config_errors_are_config_errors(capsys, tmp_path) -> None:
    """Every YAML-level mistake is a ConfigError, which the CLI reports in one line."""
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict({"train": [1, 2]})
    line = cli_error(capsys, "--config", str(small_config(tmp_path, "x", train=[1, 2])))
    assert_words(line, "train", "must be a mapping")
