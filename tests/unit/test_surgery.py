"""The transformed float model computes the same function (docs/equivalence.md)."""

import pytest
import torch

from smoothrot.arch.sites import UnsupportedArchitectureError, resolve_sites
from smoothrot.schema.quant import QuantScheme, get_scheme
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.hooks import apply_plans, transformed
from smoothrot.surgery.plan import SitePlan
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
                                                dtype=torch.float64) * 1.5),
                          rs.rotation if rotate else Rotation.none())
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
    plan = SitePlan(torch.full((96,), 3.0), sites[0].rotation)
    handles = apply_plans(sites, {sites[0].name: plan})
    assert len(handles) == 1
    assert not torch.allclose(sites[0].linear.weight, before)
    out = _logits(llama, ids)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_quantized_forward_is_finite_and_differs(llama):
    ids = torch.randint(0, 128, (1, 8))
    ref = _logits(llama, ids)
    sites = resolve_sites(llama, ["down_proj"])
    plans = {rs.name: SitePlan(None, rs.rotation) for rs in sites}
    with transformed(sites, plans, get_scheme("w4a4")):
        out = _logits(llama, ids)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ref)


def test_scales_of_wrong_size_are_rejected(llama):
    sites = resolve_sites(llama, ["down_proj"])
    with pytest.raises(ValueError, match="another model"), \
            transformed(sites, {sites[0].name: SitePlan(torch.ones(7), sites[0].rotation)}):
        pass


def test_layers_matching_nothing(llama):
    with pytest.raises(ValueError, match=r"matched no smoothing site.*'all', 'qkv', 'o_proj'"):
        resolve_sites(llama, ["lm_head"])


def test_unsupported_architecture():
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"Linear has no .*Gemma2ForCausalLM.*LlamaForCausalLM.*Phi3ForCausalLM"
                             r".*docs/adding_an_architecture.md"):
        resolve_sites(torch.nn.Linear(2, 2), ["down_proj"])


def test_resolve_patterns(llama):
    assert [rs.layer_index for rs in resolve_sites(llama, ["down_proj"])] == [0, 1]
    assert [rs.layer_index for rs in resolve_sites(llama, [r"re:.*\.1\.mlp\.down_proj"])] == [1]


def test_resolve_all_groups_and_member_names(llama):
    sites = resolve_sites(llama, ["all"])
    assert [rs.name for rs in sites[:4]] == [
        "model.layers.0.self_attn.qkv", "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_up", "model.layers.0.mlp.down_proj"]
    qkv = sites[0]
    assert [lin.out_features for lin in qkv.linears] == [64, 32, 32]
    assert qkv.weight.shape == (128, 64) and qkv.in_features == 64 and qkv.n_scales == 64
    assert torch.equal(qkv.weight[64:96], llama.model.layers[0].self_attn.k_proj.weight)
    assert qkv.smooth_from is llama.model.layers[0].input_layernorm
    o_proj = sites[1]  # 4 heads of 16 on 2 kv heads: one scale per v_proj row
    assert o_proj.n_scales == 32 and o_proj.smooth_from is llama.model.layers[0].self_attn.v_proj
    by_member = resolve_sites(llama, ["model.layers.1.self_attn.k_proj"])
    assert [rs.name for rs in by_member] == ["model.layers.1.self_attn.qkv"]
    assert [rs.name for rs in resolve_sites(llama, ["qkv", "gate_up"])] == [
        "model.layers.0.self_attn.qkv", "model.layers.0.mlp.gate_up",
        "model.layers.1.self_attn.qkv", "model.layers.1.mlp.gate_up"]


def test_gqa_tie_index_matches_attention(llama):
    """o_proj input channel (h, d) comes from v_proj row (h // group, d): zeroing one kv head's
    rows zeroes exactly the channels the tie index maps to it."""
    from smoothrot.core.transform import ScaleTie, _tie_index

    attn = llama.model.layers[0].self_attn
    captured = []
    handle = attn.o_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            attn.v_proj.weight[16:32] = 0.0  # kv head 1
            llama(input_ids=torch.randint(0, 128, (1, 8)))
    finally:
        handle.remove()
    zero = (captured[0].abs().amax(dim=(0, 1)) == 0).nonzero().flatten()
    index = _tie_index(ScaleTie(4, 2, 16))
    assert torch.equal(zero, ((index >= 16) & (index < 32)).nonzero().flatten())
    assert zero.tolist() == list(range(32, 64))  # query heads 2 and 3


@pytest.mark.parametrize("kind, gamma, expected", [
    ("norm", [-2.0, 0.0, 3.0], [-1.0, 0.0, 0.75]),
    ("offset_norm", [-3.0, -1.0, 1.0], [-2.0, -1.0, -0.5]),  # (1+γ)/s − 1
])
def test_fold_into_norm_divides_effective_gamma(llama, kind, gamma, expected):
    from smoothrot.arch.sites import ResolvedSite
    from smoothrot.arch.tables import SmoothingSite
    from smoothrot.surgery.fuse import fold_into_source

    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.tensor(gamma, dtype=torch.float64))
    site = SmoothingSite("qkv", ("q",), "norm", kind)
    rs = ResolvedSite("x", site, 0, (torch.nn.Linear(3, 2),), norm, None,
                      resolve_sites(llama, ["qkv"])[0].transform)
    fold_into_source(rs, torch.tensor([2.0, 5.0, 4.0], dtype=torch.float64), Rotation.none())
    assert norm.weight.tolist() == expected


def test_site_table_validation():
    from smoothrot.arch.tables import SmoothingSite

    with pytest.raises(ValueError, match="smooth_from_kind"):
        SmoothingSite("x", ("a",), "b", "layernorm")
    with pytest.raises(ValueError, match="rotation must be a Rotation"):
        SmoothingSite("x", ("a",), "b", rotation="offline")
    with pytest.raises(ValueError, match="block rotations are a fit option"):
        SmoothingSite("x", ("a",), "b", rotation=Rotation.block(32))
    with pytest.raises(ValueError, match="smooth_from_rows"):
        SmoothingSite("x", ("a",), "norm", "norm", smooth_from_rows="fused_qkv.v")
    with pytest.raises(ValueError, match="an offline rotation folds H into rows"):
        SmoothingSite("x", ("a",), "norm", "norm", rotation=Rotation.head("offline"))
    SmoothingSite("x", ("a",), "b", rotation=Rotation.head("offline"))  # into a linear's rows


def test_table_that_does_not_fit_the_model(llama, monkeypatch):
    from smoothrot.arch import tables as mappings

    bad = mappings.ArchitectureMap("model.layers", (mappings.SmoothingSite(
        "o_proj", ("self_attn.o_proj",), "self_attn.q_proj", rotation=Rotation.head(),
        tie="kv_heads"),))
    monkeypatch.setitem(mappings.ARCHITECTURES, "LlamaForCausalLM", bad)
    with pytest.raises(ValueError, match=r"q_proj gives 64 channels but the site needs 32"):
        resolve_sites(llama, ["o_proj"])


def test_group_weight_q_is_split_over_the_linears(llama):
    sites = resolve_sites(llama, ["model.layers.0.self_attn.qkv"])
    rs = sites[0]
    weight_q = torch.arange(128 * 64, dtype=torch.float32).reshape(128, 64)
    with transformed(sites, {rs.name: SitePlan(None, rs.rotation, weight_q)}, get_scheme("w4a4")):
        assert torch.equal(rs.weight, weight_q)
        assert torch.equal(rs.linears[2].weight, weight_q[96:])
    with pytest.raises(ValueError, match=r"weight_q has shape \(64, 64\), expected \(128, 64\)"), \
            transformed(sites, {rs.name: SitePlan(None, rs.rotation, weight_q[:64])}):
        pass


def test_rotation_round_trip_and_transform_validation():
    from smoothrot.core.transform import FULL, IDENTITY, ScaleTie

    for r in (Rotation.head(block_size=16), Rotation.head("offline", 16), Rotation.head(),
              Rotation.block(512), Rotation.full(), Rotation.none()):
        assert Rotation.from_dict(r.to_dict()) == r
    assert FULL.rotation.is_online() and not FULL.rotation.is_identity
    assert IDENTITY.rotation.is_identity and not IDENTITY.rotation.is_online()
    assert Rotation.head("offline").is_offline() and not Rotation.head("offline").is_online()
    with pytest.raises(ValueError, match="bad rotation"):
        Rotation.from_dict({"kind": "diagonal"})
    with pytest.raises(ValueError, match="unknown rotation key"):
        Rotation.from_dict({"kind": "full", "size": 4})
    with pytest.raises(ValueError, match="cannot be offline"):
        Rotation("full", "offline")
    with pytest.raises(ValueError, match="needs block_size"):
        Rotation("block")
    with pytest.raises(ValueError, match="divisible"):
        ScaleTie(4, 3, 16)


def test_residual_rotation_matrices_are_orthogonal():
    from smoothrot.surgery.residual import OnlineResidualRotation, rotation_matrix

    for kind in ("hadamard", "random"):
        q, signs = rotation_matrix(96, seed=1, kind=kind)
        assert torch.allclose(q @ q.T, torch.eye(96, dtype=torch.float64), atol=1e-12)
        x = torch.randn(3, 5, 96, dtype=torch.float64)
        online = OnlineResidualRotation(q, signs)(torch.nn.Identity(), (x,), x)
        assert torch.allclose(online, x @ q, atol=1e-12)
    assert not torch.equal(rotation_matrix(96, 1)[0], rotation_matrix(96, 2)[0])


def test_capture_every_site_of_every_layer(llama):
    """Grouped sites are captured once per batch, and the pass stops after the last site."""
    from smoothrot.calibrate.capture import capture_sites, run_model

    sites = resolve_sites(llama, ["all"])
    windows = torch.randint(0, 128, (3, 8))
    with capture_sites(list(reversed(sites)), total_tokens=24) as records:
        run_model(llama, windows, 2, "test")
    for rs in sites:
        assert records[rs.name].tokens().shape == (24, rs.in_features)
    norm_out = []
    layer = llama.model.layers[1]
    handle = layer.input_layernorm.register_forward_hook(lambda *a: norm_out.append(a[2]))
    try:
        with torch.no_grad():
            llama(input_ids=windows)
    finally:
        handle.remove()
    assert torch.equal(records["model.layers.1.self_attn.qkv"].tokens(),
                       norm_out[0].reshape(-1, 64))


def test_capture_keeps_the_indexed_rows_across_batches(llama):
    """Kept rows land in one buffer in stream order; more tokens than announced is refused."""
    from smoothrot.calibrate.capture import capture_sites, run_model, token_subset

    sites = resolve_sites(llama, ["down_proj"])
    windows = torch.randint(0, 128, (5, 8))
    keep = token_subset(40, 11, seed=2)
    with capture_sites(sites, total_tokens=40) as every:
        run_model(llama, windows, 2, "test")
    with capture_sites(sites, total_tokens=40, keep_index=keep) as kept:
        run_model(llama, windows, 2, "test")
    for rs in sites:
        assert torch.equal(kept[rs.name].tokens(), every[rs.name].tokens()[keep])
    with pytest.raises(ValueError, match="total_tokens must count every token"), \
            capture_sites(sites, total_tokens=30):
        run_model(llama, windows, 2, "test")


@pytest.mark.parametrize("quantiles", [(0.9, 1.0), (0.5,), ()])
def test_capture_reads_the_max_off_the_quantile_buffer(llama, quantiles):
    """With quantiles the per-channel max comes from their buffer (no second observer), with ()
    from a max observer; both equal max |x| of the captured rows, and no statistics refuse."""
    from smoothrot.calibrate.capture import capture_sites, run_model

    sites = resolve_sites(llama, ["down_proj", "o_proj"])
    windows = torch.randint(0, 128, (5, 8))
    with capture_sites(sites, total_tokens=40, quantiles=quantiles) as records:
        run_model(llama, windows, 2, "test")
    for rs in sites:
        rec = records[rs.name]
        assert (rec.absmax is None) == bool(quantiles)
        assert torch.equal(rec.max_abs(), rec.tokens().abs().amax(dim=0))
    with capture_sites(sites, total_tokens=40, quantiles=None) as records:
        run_model(llama, windows, 2, "test")
    with pytest.raises(ValueError, match="no statistics"):
        records[sites[0].name].max_abs()


def test_fold_into_layernorm_divides_bias_too(llama):
    from smoothrot.arch.sites import ResolvedSite
    from smoothrot.arch.tables import SmoothingSite

    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(64).double(), torch.nn.Linear(64, 8).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(5, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = linear(norm(x))
    rs = ResolvedSite("x", SmoothingSite("ln", ("l",), "n", "norm"), 0, (linear,), norm, None,
                      resolve_sites(llama, ["qkv"])[0].transform)
    scales = torch.exp(torch.randn(64, dtype=torch.float64))
    assert rs.rotation == Rotation.full()
    with transformed([rs], {"x": SitePlan(scales, rs.rotation)}), torch.no_grad():
        out = linear(norm(x))  # the pre-hook applies H online
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("scheme", [get_scheme("w4a4"), QuantScheme("g32", 4, 4, w_group_size=32)])
def test_offline_weights_of_a_source_linear_keep_its_row_folding(scheme):
    """up_proj is in gate_up and down_proj's source, v_proj in qkv and o_proj's: a weight_q fitted
    on the unfolded weight must still get the other site's 1/s rows (whole-model GPTQ bug).

    Storing RTN codes of each site's own fused weight as weight_q must give the RTN model.
    """
    from smoothrot.core.quantizers import quantize_weight_spec
    from smoothrot.core.transform import transform_weight

    model = tiny_llama(dtype=torch.float64)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    sites = resolve_sites(model, ["all"])
    gen = torch.Generator().manual_seed(4)
    plans = {rs.name: SitePlan(torch.exp(torch.randn(rs.n_scales, generator=gen,
                                                     dtype=torch.float64)), rs.rotation)
             for rs in sites}
    with transformed(sites, plans, scheme):
        rtn = _logits(model, ids)
    offline = {
        rs.name: SitePlan(p.scales, p.rotation, quantize_weight_spec(
            transform_weight(rs.weight.detach(), p.scales, rs.transform), scheme))
        for rs, p in zip(sites, plans.values(), strict=True)
    }
    with transformed(sites, offline, scheme):
        stored = _logits(model, ids)
    assert torch.isfinite(stored).all()
    assert (stored - rtn).abs().max() <= 1e-9 * rtn.abs().max()


def test_site_act_clip_replaces_the_scheme_clip_at_that_site_only(llama):
    """A plan's act_clip quantizes that site's inputs exactly like a scheme with that a_clip."""
    ids = torch.randint(0, 128, (1, 8))
    sites = resolve_sites(llama, ["down_proj"])
    w4a4 = get_scheme("w4a4")

    def logits(clips: list[float | None], scheme: QuantScheme) -> torch.Tensor:
        plans = {rs.name: SitePlan(None, rs.rotation, act_clip=c)
                 for rs, c in zip(sites, clips, strict=True)}
        with transformed(sites, plans, scheme):
            return _logits(llama, ids)

    clipped = logits([0.6, None], w4a4)
    assert torch.equal(clipped, logits([0.6, 1.0], w4a4))
    assert not torch.equal(clipped, logits([None, None], w4a4))
    assert torch.equal(logits([0.6, 0.6], w4a4),
                       logits([None, None], QuantScheme("w4a4", 4, 4, a_clip=0.6)))
