"""The transformed float model computes the same function (docs/equivalence.md)."""

import pytest
import torch

from smoothrot.config import get_scheme
from smoothrot.mappings import UnsupportedArchitectureError, resolve_sites
from smoothrot.surgery import SitePlan, apply_plans, transformed
from tests.conftest import tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("rotate", [False, True])
def test_transform_preserves_logits_float64(rotate):
    model = tiny_llama(dtype=torch.float64)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    sites = resolve_sites(model, ["down_proj"])
    gen = torch.Generator().manual_seed(2)
    plans = {
        rs.name: SitePlan(torch.exp(torch.randn(rs.linear.in_features, generator=gen,
                                                dtype=torch.float64) * 1.5), rotate)
        for rs in sites
    }
    with transformed(sites, plans):
        out = _logits(model, ids)
    assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert torch.equal(_logits(model, ids), ref), "weights and hooks restored on exit"


def test_apply_plans_is_persistent_and_changes_weights(llama):
    ids = torch.randint(0, 128, (1, 8))
    ref = _logits(llama, ids)
    sites = resolve_sites(llama, ["model.layers.1.mlp.down_proj"])
    before = sites[0].linear.weight.clone()
    handles = apply_plans(sites, {sites[0].name: SitePlan(torch.full((96,), 3.0), True)})
    assert len(handles) == 1
    assert not torch.allclose(sites[0].linear.weight, before)
    out = _logits(llama, ids)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_quantized_forward_is_finite_and_differs(llama):
    ids = torch.randint(0, 128, (1, 8))
    ref = _logits(llama, ids)
    sites = resolve_sites(llama, ["down_proj"])
    with transformed(sites, {rs.name: SitePlan(None, True) for rs in sites}, get_scheme("w4a4")):
        out = _logits(llama, ids)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ref)


def test_scales_of_wrong_size_are_rejected(llama):
    sites = resolve_sites(llama, ["down_proj"])
    with pytest.raises(ValueError, match="another model"), \
            transformed(sites, {sites[0].name: SitePlan(torch.ones(7), True)}):
        pass


def test_layers_matching_nothing(llama):
    with pytest.raises(ValueError, match=r"matched no smoothing site"):
        resolve_sites(llama, ["o_proj"])


def test_unsupported_architecture():
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        resolve_sites(torch.nn.Linear(2, 2), ["down_proj"])


def test_resolve_patterns(llama):
    assert [rs.layer_index for rs in resolve_sites(llama, ["down_proj"])] == [0, 1]
    assert [rs.layer_index for rs in resolve_sites(llama, [r"re:.*\.1\.mlp\.down_proj"])] == [1]
