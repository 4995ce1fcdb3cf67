"""Sequential (layer-at-a-time) calibration records exactly what the whole-model pass records."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from smoothrot.arch.sites import resolve_sites
from smoothrot.calibrate.capture import CaptureSpec, SiteRecord, capture_splits, token_subset
from smoothrot.calibrate.sequential import (
    capture_sequential,
    gptq_sequential,
    round_layer,
    walk_layers,
)
from smoothrot.calibrate.weights import CheckpointError, ResidentWeights, SafetensorsWeights
from smoothrot.job import _calibrate
from smoothrot.methods.gptq import gptq_fused_weight_selected
from smoothrot.models import empty_model
from smoothrot.schema.config import FitConfig, config_from_dict
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import get_scheme
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan
from smoothrot.timer import Timer
from tests.arch.tiny import tiny_model
from tests.conftest import tiny_llama

QUANTILES = (0.9, 0.99, 1.0)


def _specs(vocab: int, seq_len: int = 8) -> dict[str, CaptureSpec]:
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (5, seq_len), generator=gen)
    return {
        "calibration": CaptureSpec(calib, token_subset(calib.numel(), 13, seed=1), QUANTILES),
        "selection": CaptureSpec(torch.randint(0, vocab, (3, seq_len), generator=gen)),
    }


def _assert_same(a: dict[str, dict[str, SiteRecord]], b: dict[str, dict[str, SiteRecord]]):
    assert a.keys() == b.keys()
    for split in a:
        assert list(a[split]) == list(b[split])
        for site, rec in a[split].items():
            other = b[split][site]
            assert torch.equal(rec.tokens(), other.tokens()), (split, site)
            assert rec.tokens().numel() > 0
            if rec.quantiles is not None:
                assert torch.equal(rec.max_abs(), other.max_abs())
                for q in QUANTILES[:-1]:
                    assert torch.equal(rec.quantiles.value(q), other.quantiles.value(q))


def test_sequential_equals_whole_model():
    model = tiny_llama(layers=3)
    sites = resolve_sites(model, ["all"])
    specs = _specs(model.config.vocab_size)
    whole = capture_splits(model, sites, specs, batch_size=2)
    seq = capture_sequential(model, sites, specs, batch_size=2)
    _assert_same(whole, seq)
    assert seq["calibration"][sites[0].name].tokens().shape == (13, 64)
    assert seq["selection"][sites[-1].name].tokens().shape == (24, 96)


def test_pipeline_calibrate_same_data_either_way():
    model = tiny_llama(layers=2)
    sites = resolve_sites(model, ["down_proj", "qkv"])
    gen = torch.Generator().manual_seed(3)
    windows = {k: torch.randint(0, 128, (n, 8), generator=gen)
               for k, n in (("calibration", 4), ("selection", 2), ("heldout", 2))}
    cfg = config_from_dict({"data": {"seq_len": 8, "train_tokens": 10},
                            "search": {"quantiles": [0.9, 1.0]}})
    seq_cfg = config_from_dict({**{"data": {"seq_len": 8, "train_tokens": 10},
                                   "search": {"quantiles": [0.9, 1.0]}},
                                "calibration": {"sequential": True}})
    a = _calibrate(model, sites, windows, cfg, Timer())
    b = _calibrate(model, sites, windows, seq_cfg, Timer())
    for site in a:
        for q in (0.9, 1.0):
            assert torch.equal(a[site].act_stats[q], b[site].act_stats[q])
        for split in ("train_x", "selection_x", "heldout_x"):
            assert torch.equal(getattr(a[site], split), getattr(b[site], split))
        assert a[site].train_x.shape[0] == 10


def test_calibration_config_rejects_unknown_key_and_round_trips():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['sequentail'\] in calibration"):
        config_from_dict({"calibration": {"sequentail": True}})
    with pytest.raises(ConfigError, match=r"calibration\.sequential='yes' must be true or false"):
        config_from_dict({"calibration": {"sequential": "yes"}})
    assert FitConfig().calibration.sequential is False


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny tied-embedding llama saved as 3+ safetensors shards with an index."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    return tmp_path


def test_disk_streamed_weights_same_statistics_and_released(checkpoint):
    assert (checkpoint / "model.safetensors.index.json").is_file()
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    specs = _specs(reference.config.vocab_size)
    expected = capture_splits(reference, resolve_sites(reference, ["all"]), specs, batch_size=2)

    model = empty_model(checkpoint)
    layers = model.model.layers
    on_device: list[list[bool]] = []  # per layer run: which layers hold real weights
    for layer in layers:
        layer.register_forward_pre_hook(
            lambda *_: on_device.append([not next(m.parameters()).is_meta for m in layers]))
    got = capture_sequential(model, resolve_sites(model, ["all"]), specs, batch_size=2,
                             weights=SafetensorsWeights(checkpoint))
    _assert_same(expected, got)
    # 3 + 2 batches: caught before layer 0 with no layer loaded, then through each layer with
    # only the running layer materialized.
    assert on_device == [[False, False]] * 5 + [[True, False]] * 5 + [[False, True]] * 5
    assert all(p.is_meta for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_resident_weights_go_back_home():
    model = tiny_llama(layers=2)
    sites = resolve_sites(model, ["down_proj"])
    weights = ResidentWeights(torch.device("cpu"))
    capture_sequential(model, sites, _specs(128), batch_size=4, weights=weights)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_missing_tensor_is_one_line_error(tmp_path):
    model = tiny_llama(layers=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k != "model.layers.1.mlp.down_proj.weight"}
    save_file(state, tmp_path / "model.safetensors")
    empty = empty_model(model.config)
    with pytest.raises(CheckpointError) as err:
        capture_sequential(empty, resolve_sites(empty, ["down_proj"]), _specs(128), 2,
                           weights=SafetensorsWeights(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg
    assert "has no tensor 'model.layers.1.mlp.down_proj.weight'" in msg
    assert "save_pretrained" in msg


def test_wrong_shape_and_bad_paths(tmp_path):
    model = tiny_llama(layers=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(state, tmp_path / "model.safetensors")
    empty = empty_model(model.config)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' has shape "
                                              r"\[95, 64\] but the model expects \[96, 64\]"):
        capture_sequential(empty, resolve_sites(empty, ["down_proj"]), _specs(128), 2,
                           weights=SafetensorsWeights(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SafetensorsWeights(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no \*.safetensors file"):
        SafetensorsWeights(tmp_path / "empty")


def test_mixed_attention_types_refused_when_masks_differ():
    model = tiny_model("gemma2")  # alternating sliding (window 8) / full attention
    sites = resolve_sites(model, ["down_proj"])
    with pytest.raises(ValueError, match="seq_len=12 exceeds sliding_window=8"):
        capture_sequential(model, sites, _specs(96, seq_len=12), batch_size=2)
    whole = capture_splits(model, sites, _specs(96, seq_len=8), batch_size=2)
    seq = capture_sequential(model, sites, _specs(96, seq_len=8), batch_size=2)
    _assert_same(whole, seq)


@pytest.mark.parametrize("float_target", [False, True])
def test_gptq_sequential_rounds_each_site_on_the_quantized_model_inputs(float_target):
    """Site k's GPTQ inputs are exactly those of the whole model with sites < k quantized; with
    ``float_target`` the float model's inputs at the same tokens come with them."""
    model = tiny_llama(layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sites = resolve_sites(model, ["all"])
    scheme = get_scheme("w4a4")
    specs = {k: replace(v, quantiles=None) for k, v in _specs(model.config.vocab_size).items()}
    plans = {rs.name: SitePlan(scales=None, rotation=rs.rotation) for rs in sites}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    seen_float: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def round_site(rs, x, x_selection, float_inputs, token_weights):
        seen[rs.name] = (x, x_selection)
        seen_float[rs.name] = float_inputs
        return gptq_fused_weight_selected(rs.weight.detach(), None, rs.transform, x,
                                          x_selection, scheme, float_inputs=float_inputs)

    choices = gptq_sequential(model, sites, plans, scheme, specs, 2, round_site,
                              float_target=float_target)
    assert list(choices) == [rs.name for rs in sites]
    float_rows = capture_splits(model, sites, specs, batch_size=2)
    for k, rs in enumerate(sites):
        done = {s.name: replace(plans[s.name], weight_q=choices[s.name].weight_q)
                for s in sites[:k]}
        with transformed(sites, done, scheme):
            ref = capture_splits(model, [rs], specs, batch_size=2)
        for i, split in enumerate(("calibration", "selection")):
            torch.testing.assert_close(seen[rs.name][i], ref[split][rs.name].tokens(),
                                       rtol=1e-6, atol=1e-6)
        moved = (seen[rs.name][0] - float_rows["calibration"][rs.name].tokens()).abs().max()
        assert (moved == 0) == (k == 0), (rs.name, float(moved))  # only site 0 sees float inputs
        if not float_target:
            assert seen_float[rs.name] is None
            continue
        for i, split in enumerate(("calibration", "selection")):
            torch.testing.assert_close(seen_float[rs.name][i],
                                       float_rows[split][rs.name].tokens(), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_residual_token_weights_go_to_the_sites_that_keep_to_their_token():
    """``token_weights``: every site but q/k/v (attention mixes tokens) gets one weight per
    kept row, 1 / the squared norm of the layer's output at that token, mean 1 over the split."""
    model = tiny_llama(layers=2)
    sites = resolve_sites(model, ["all"])
    scheme = get_scheme("w4a4")
    specs = {k: replace(v, quantiles=None) for k, v in _specs(model.config.vocab_size).items()}
    plans = {rs.name: SitePlan(scales=None, rotation=rs.rotation) for rs in sites}
    got: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def round_site(rs, x, x_selection, float_inputs, token_weights):
        got[rs.name] = token_weights
        if token_weights is not None:
            assert [t.shape[0] for t in token_weights] == [x.shape[0], x_selection.shape[0]]
        return gptq_fused_weight_selected(rs.weight.detach(), None, rs.transform, x,
                                          x_selection, scheme, token_weights=token_weights)

    for step in walk_layers(model, sites, scheme, specs, 2, "t"):
        outputs = {split: torch.cat([step.run(b).pow(2).sum(-1).reshape(-1)
                                     for b in step.inputs[split]]) for split in specs}
        round_layer(step, plans, scheme, specs, round_site, token_weights=True)
        for rs in step.sites:
            if rs.site.mixes_tokens:
                assert got[rs.name] is None, rs.name
                continue
            for (split, spec), weights in zip(specs.items(), got[rs.name], strict=True):
                full = outputs[split].reciprocal() / outputs[split].reciprocal().mean()
                want = full if spec.keep_index is None else full[spec.keep_index]
                torch.testing.assert_close(weights, want, rtol=1e-5, atol=0)
    assert {rs.site.name for rs in sites if got[rs.name] is None} == {"qkv"}
    with pytest.raises(ConfigError, match=r"gptq\.weighting='sink' is not one of"):
        config_from_dict({"gptq": {"weighting": "sink"}})
    with pytest.raises(ConfigError, match=r"gptq\.weighting='residual' needs gptq\.sequential"):
        config_from_dict({"gptq": {"weighting": "residual", "sequential": False}})
    with pytest.raises(ConfigError, match=r"gptq\.all_tokens needs gptq\.sequential"):
        config_from_dict({"gptq": {"all_tokens": True, "sequential": False}})
