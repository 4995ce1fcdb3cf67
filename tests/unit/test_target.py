"""Deployment targets: each target's activation arithmetic is the backend's own (compressed-tensors'
fake_quantize, vLLM's max/127 and max/7 kernels), and the config refuses what a target cannot
serve (per-site clips outside research, exports with clips)."""

from __future__ import annotations

import pytest
import torch
import yaml

from smoothrot.core.quantizers import Quantizer, quantize_activation_spec
from smoothrot.schema.config import (
    FitConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import ACT_GRIDS, QuantScheme, get_scheme
from smoothrot.schema.target import TARGETS


def _activations(seed: int = 0) -> torch.Tensor:
    """[batch, tokens, channels] with one outlier channel; half the tokens have their abs-max at
    a negative value (where the compressed-tensors grid reaches code -2^(b-1))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 64, generator=gen)
    x[..., 5] = 40.0 * x[..., 5].abs()
    x[:, ::2, 5] *= -1.0
    return x


def _ct_fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' own dynamic per-token symmetric int fake quantization."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token",
                            dynamic=True)
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale, zero = calculate_qparams(-amax, amax, args)
    return fake_quantize(x, scale, zero, args)


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_grid_is_compressed_tensors_fake_quantize(bits):
    x = _activations()
    half = (2**bits - 1) / 2
    x[1, 1] = torch.linspace(-half, 3.0, 64)  # scale exactly 1: -7.5 (-127.5) is a true tie
    theirs = _ct_fake_quantize(x, bits)
    ours = Quantizer(bits=bits, grid="compressed-tensors")(x)
    assert torch.equal(ours, theirs)
    # Through the scheme, as every evaluation under target compressed-tensors quantizes.
    scheme = TARGETS["compressed-tensors"].scheme(get_scheme(f"w{bits}a{bits}"))
    assert torch.equal(quantize_activation_spec(x, scheme), theirs)
    # The grid really is different from the vLLM one: it reaches -2^(b-1) (the negative maxima).
    step = x.abs().amax(dim=-1, keepdim=True) / ((2**bits - 1) / 2)
    codes = theirs / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() == -(2 ** (bits - 1))
    assert theirs[1, 1, 0] == -(2 ** (bits - 1))  # the tie rounds to even: -8 (-128)
    assert codes.round().max() == 2 ** (bits - 1) - 1
    maxgrid = Quantizer(bits=bits, grid="max")(x)
    assert not torch.equal(maxgrid, theirs)
    assert not torch.equal(quantize_activation_spec(x, get_scheme(f"w{bits}a{bits}")), theirs)


def test_compressed_tensors_grid_zero_rows_stay_zero():
    x = _activations()
    x[0, 3] = 0.0
    out = Quantizer(bits=4, grid="compressed-tensors")(x)
    assert torch.equal(out[0, 3], torch.zeros(64))
    assert torch.equal(out, _ct_fake_quantize(x, 4))


def test_max_grid_int4_codes_are_within_7():
    """vLLM's int4 W4A4 (Humming): scale max|x|/7, codes ±7, round half to even."""
    x = _activations()
    out = Quantizer(bits=4, grid="max")(x)
    scale = x.abs().amax(dim=-1, keepdim=True) / 7
    codes = out / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    codes = codes.round()
    assert codes.abs().max() == 7 and codes.min() == -7  # never -8
    # every token's abs-max element maps to ±7 exactly (no clamp at the top)
    assert torch.equal(codes.abs().amax(dim=-1), torch.full((2, 16), 7.0))
    # ties round to even: with max 7, scale 1, so 0.5 → 0, 1.5 → 2, 2.5 → 2, -3.5 → -4
    ties = torch.tensor([[7.0, 0.5, 1.5, 2.5, -3.5, -0.5]])
    assert Quantizer(bits=4, grid="max")(ties).tolist() == [[7.0, 0.0, 2.0, 2.0, -4.0, -0.0]]


def test_max_grid_int8_scale_is_absmax_over_127():
    """vLLM's CUTLASS dynamic_scaled_int8: scale max|x|/127."""
    x = _activations(1)
    quant = Quantizer(bits=8, grid="max")
    qp = quant.params(quant.grouped(x))
    amax = x.abs().amax(dim=-1, keepdim=True)
    assert torch.equal(qp.scale.squeeze(-1), amax / 127)
    ct = Quantizer(bits=8, grid="compressed-tensors")
    assert torch.equal(ct.params(ct.grouped(x)).scale.squeeze(-1), amax / 127.5)
    codes = (quant(x) / (amax / 127)).round()
    assert codes.abs().max() == 127 and codes.min() == -127


def test_target_scheme_sets_and_keeps_the_activation_grid():
    w4a4 = get_scheme("w4a4")
    assert w4a4.a_grid == "max"
    ct = TARGETS["compressed-tensors"].scheme(w4a4)
    assert ct.a_grid == "compressed-tensors"
    assert (ct.name, ct.w_bits, ct.a_bits, ct.w_clip, ct.a_clip) == ("w4a4", 4, 4, 1.0, 1.0)
    assert TARGETS["vllm"].scheme(w4a4) is w4a4  # already its grid: unchanged
    assert TARGETS["compressed-tensors"].scheme(ct) is ct
    assert TARGETS["vllm"].scheme(ct).a_grid == "max"
    assert TARGETS["research"].scheme(ct).a_grid == "max"
    for fp4 in ("nvfp4", "mxfp4"):  # FP4 has no int grid: left alone by every target
        scheme = get_scheme(fp4)
        for target in TARGETS.values():
            assert target.scheme(scheme) is scheme
    assert [t.act_clips for t in TARGETS.values()] == [False, False, True]
    assert {t.act_grid for t in TARGETS.values()} <= set(ACT_GRIDS)


def test_bad_grids_are_refused():
    with pytest.raises(ConfigError, match="a_grid='nearest'"):
        QuantScheme("x", w_bits=4, a_bits=4, a_grid="nearest")
    with pytest.raises(ConfigError, match="int activations only"):
        QuantScheme("x", w_bits=4, a_bits=4, w_format="nvfp4", a_format="nvfp4",
                    w_group_size=16, a_group_size=16, a_grid="compressed-tensors")
    with pytest.raises(ValueError, match="grid='ct'"):
        Quantizer(grid="ct")


@pytest.mark.parametrize(("data", "message"), [
    ({"search": {"act_clips": [0.9, 1.0]}}, "needs target: research"),
    ({"target": "vllm", "search": {"act_clips": [0.8]}}, "needs target: research"),
    ({"target": "compressed-tensors", "search": {"act_clips": [0.9, 1.0]}},
     "compressed-tensors's dynamic activation quantization has no clip"),
    ({"target": "research", "search": {"act_clips": [0.9, 1.0]}, "export": {"formats": ["w4a4"]}},
     "export.formats with search.act_clips"),
    ({"target": "tgi"}, "target='tgi' is not one of"),
    ({"target": 3}, "target=3 must be a string"),
    ({"rotation": {"block_size": 1}}, "rotation.block_size=1 must be null or a power of two"),
    ({"rotation": {"block_size": 48}}, "rotation.block_size=48 must be null or a power of two"),
    ({"rotation": {"block_size": True}}, "rotation.block_size=True must be an integer"),
    ({"rotation": {"block_size": "512"}}, "rotation.block_size='512' must be an integer"),
    ({"rotation": {"size": 512}}, r"unknown key\(s\) \['size'\] in rotation"),
    ({"export": {"formats": ["int3"]}}, "export.formats has"),
    ({"export": {"dtype": "int8"}}, "export.dtype='int8'"),
])
def test_config_errors(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(data)
    assert "\n" not in str(info.value)


def test_clips_are_allowed_for_research_without_export():
    cfg = config_from_dict({"target": "research", "search": {"act_clips": [0.9, 1.0]}})
    assert cfg.search.act_clips == [0.9, 1.0]
    assert cfg.target == "research" and cfg.export.formats == []
    # no clips: every target takes an export
    for target in TARGETS:
        assert config_from_dict({"target": target,
                                 "export": {"formats": ["fused"]}}).target == target


def test_config_round_trip_with_target_rotation_and_export(tmp_path):
    data = {
        "target": "compressed-tensors",
        "rotation": {"block_size": 32},
        "export": {"formats": ["w4a4", "fused"], "method": "joint", "scheme": "w4a4",
                   "dtype": "bfloat16", "dir": None, "overwrite": True},
        "methods": ["rtn", "joint"],
        "output_dir": str(tmp_path / "run"),
    }
    cfg = config_from_dict(data)
    assert cfg.target == "compressed-tensors" and cfg.rotation.block_size == 32
    assert cfg.export.formats == ["w4a4", "fused"] and cfg.export.overwrite is True
    assert cfg.export.dtype == "bfloat16" and cfg.export.method == "joint"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert cfg != FitConfig()
    defaults = FitConfig()
    assert (defaults.target, defaults.rotation.block_size, defaults.export.formats) == (
        "vllm", None, [])
