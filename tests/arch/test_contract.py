"""The contract every architecture table must meet, on a tiny random model of each architecture.

With random positive scales on every site, per-site rotations and (optionally) the residual
rotation R1, the float model computes the same logits; the fake-quantized model is finite; signed,
zero and offset norm weights are handled exactly. Adding an architecture = a table entry in
smoothrot/arch/tables.py + a config in tests/arch/tiny.py; this class then tests it.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from smoothrot.arch.sites import architecture_of, resolve_sites
from smoothrot.arch.tables import ModelDims
from smoothrot.schema.config import HeadRotationConfig
from smoothrot.schema.quant import get_scheme
from smoothrot.schema.rotation import Rotation
from smoothrot.surgery.head_rotation import apply_head_rotations, head_layout
from smoothrot.surgery.hooks import IntegerForward, apply_plans, transformed
from smoothrot.surgery.plan import SitePlan
from smoothrot.surgery.residual import rotate_residual
from smoothrot.training.head_rotation import learn_head_rotations
from tests.arch.tiny import TINY, exact_norms, norm_modules, tiny_model

ARCHS = sorted(TINY)
# No R1; R1 = diag(±1)·H (readers get no H); R1 random orthogonal, readers keep their H ("both").
R1_KINDS, R1_IDS = [None, "hadamard", "random"], ["smooth", "r1+smooth", "r1random+smooth"]


def _ids(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _per_head(model: nn.Module, sites: list, location: str) -> list:
    """o_proj sites with the per-head H (block-diagonal over head_dim) at ``location``
    (``online`` or ``offline``) instead of the table's full H."""
    rotation = Rotation.head(location)
    bound = rotation.bound(ModelDims.from_config(model.config).head_dim)
    return [dataclasses.replace(rs, site=dataclasses.replace(rs.site, rotation=rotation),
                                transform=rs.transform.with_rotation(bound))
            for rs in sites]


def _random_plans(sites, dtype=torch.float64, seed: int = 1, spread: float = 1.0) -> dict:
    """Log-normal positive scales (e^±3 range) on every site, each with its own rotation."""
    gen = torch.Generator().manual_seed(seed)
    return {rs.name: SitePlan(torch.exp(spread * torch.randn(rs.n_scales, generator=gen,
                                                             dtype=dtype)), rs.rotation)
            for rs in sites}


def _effective_gammas(model: nn.Module) -> list[torch.Tensor]:
    offset = architecture_of(model).residual.norm_kind == "offset_rms"
    return [m.weight.double() + (1.0 if offset else 0.0) for m in norm_modules(model)]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


class TestArchitectureContract:
    def test_every_decoder_linear_is_in_exactly_one_site(self, arch):
        model = tiny_model(arch)
        sites = resolve_sites(model, ["all"])
        layers = model.get_submodule(architecture_of(model).layers)
        assert len(sites) == 4 * len(layers)
        assert len({rs.name for rs in sites}) == len(sites)
        members = [id(lin) for rs in sites for lin in rs.linears]
        linears = [id(m) for m in layers.modules() if isinstance(m, nn.Linear)]
        assert sorted(members) == sorted(linears)
        for rs in sites:
            assert rs.weight.shape == (sum(lin.out_features for lin in rs.linears), rs.in_features)

    def test_norm_weights_are_signed_and_partly_zero(self, arch):
        """The fixture really exercises the signed-γ case that breaks γ^α rescaling."""
        for gamma in _effective_gammas(tiny_model(arch)):
            assert (gamma < 0).sum() >= gamma.numel() // 3 and (gamma == 0).any()

    @pytest.mark.parametrize("r2", [False, True], ids=["", "learned-r2"])
    @pytest.mark.parametrize("r1", R1_KINDS, ids=R1_IDS)
    def test_float64_transform_is_exact(self, arch, r1, r2):
        """R1 (each kind), R2 learned on the model (a few training steps, folded into v_proj /
        o_proj), random scales and each site's rotation: the float64 logits are unchanged."""
        model = tiny_model(arch, torch.float64)
        ids = _ids()
        with exact_norms(model):
            ref = _logits(model, ids)
        kind = rotate_residual(model, seed=3, kind=r1).kind if r1 else None
        sites = resolve_sites(model, ["all"], residual_kind=kind)
        if r2:
            gen = torch.Generator().manual_seed(5)
            windows = {"calibration": torch.randint(0, 96, (4, 12), generator=gen),
                       "selection": torch.randint(0, 96, (2, 12), generator=gen)}
            learned = learn_head_rotations(
                model, sites, windows, HeadRotationConfig(learn=True, steps=3, batch_tokens=16),
                get_scheme("w4a4"), train_tokens=32, seed=0)
            assert set(learned) == {rs.name for rs in sites if rs.site.name == "o_proj"}
        with exact_norms(model), transformed(sites, _random_plans(sites)):
            out = _logits(model, ids)
            for gamma in _effective_gammas(model):
                assert torch.isfinite(gamma).all()
        assert torch.isfinite(out).all()
        assert _rel(out, ref) <= 1e-9

    @pytest.mark.parametrize("r1", R1_KINDS, ids=R1_IDS)
    def test_float32_with_native_norms(self, arch, r1):
        """HF's own float32 forward (norms, softmax) agrees to float32 precision."""
        model = tiny_model(arch, torch.float32)
        ids = _ids()
        ref = _logits(model, ids)
        kind = rotate_residual(model, seed=3, kind=r1).kind if r1 else None
        sites = resolve_sites(model, ["all"], residual_kind=kind)
        with transformed(sites, _random_plans(sites, torch.float32)):
            out = _logits(model, ids)
        assert _rel(out, ref) <= 1e-4

    @pytest.mark.parametrize("r1", R1_KINDS, ids=R1_IDS)
    def test_fake_quantized_forward(self, arch, r1):
        """W4A4 is finite and changes the logits; W8A8 stays close to float."""
        model = tiny_model(arch)
        ids = _ids()
        ref = _logits(model, ids)
        kind = rotate_residual(model, seed=3, kind=r1).kind if r1 else None
        sites = resolve_sites(model, ["all"], residual_kind=kind)
        plans = _random_plans(sites, torch.float32, spread=0.3)
        with transformed(sites, plans, get_scheme("w4a4")):
            w4 = _logits(model, ids)
        with transformed(sites, plans, get_scheme("w8a8")):
            w8 = _logits(model, ids)
        assert torch.isfinite(w4).all() and torch.isfinite(w8).all()
        assert _rel(w4, ref) > 1e-3
        assert _rel(w8, ref) < 0.1 * _rel(w4, ref)

    @pytest.mark.parametrize("scheme", ["w4a4", "w8a8"])
    def test_integer_gemm_forward_matches_the_fake_quantized_one(self, arch, scheme):
        """vLLM's arithmetic (int8 GEMM of the codes, then the scales; biases included) gives
        the float fake-quantized model's logits up to float32 rounding (amplified downstream by
        flipped codes), far below the quantization error itself; forwards restored on exit."""
        model = tiny_model(arch)
        ids = _ids()
        ref = _logits(model, ids)
        sites = resolve_sites(model, ["all"])
        plans = _random_plans(sites, torch.float32, spread=0.3)
        with transformed(sites, plans, get_scheme(scheme)):
            fake = _logits(model, ids)
        with transformed(sites, plans, get_scheme(scheme), integer_gemm=True):
            linears = [linear for rs in sites for linear in rs.linears]
            assert all(isinstance(linear.forward, IntegerForward) for linear in linears)
            integer = _logits(model, ids)
        assert not any("forward" in linear.__dict__ for linear in linears)
        assert torch.equal(_logits(model, ids), ref)
        assert _rel(integer, fake) < 0.05 * _rel(fake, ref)

    def test_transformed_restores_every_parameter(self, arch):
        model = tiny_model(arch)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sites = resolve_sites(model, ["all"])
        with transformed(sites, _random_plans(sites, torch.float32), get_scheme("w4a4")):
            pass
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(m._forward_pre_hooks for m in model.modules())

    def test_head_rotation_offline_in_v_rows_equals_online(self, arch):
        """Per-head H commutes with attention, so folding it into v_proj rows is exact too."""
        model = tiny_model(arch, torch.float64)
        ids = _ids()
        sites = _per_head(model, resolve_sites(model, ["o_proj"]), "online")
        offline = _per_head(model, sites, "offline")
        plans = _random_plans(sites)
        offline_plans = _random_plans(offline)  # the same scales, H folded into v_proj's rows
        assert all(p.rotation.is_online() for p in plans.values())
        assert all(p.rotation.is_offline() for p in offline_plans.values())
        with exact_norms(model):
            ref = _logits(model, ids)
            with transformed(sites, plans):
                online = _logits(model, ids)
            handles = apply_plans(offline, offline_plans)
            assert handles == []  # nothing left to do at run time
        with exact_norms(model):
            out = _logits(model, ids)
        # No hook rotates o_proj's input, so v_proj's rows must carry H for this to hold.
        assert _rel(online, ref) <= 1e-9 and _rel(out, ref) <= 1e-9

    def test_head_offline_quantized_matches_online(self, arch):
        """o_proj sees the same quantized input either way (v_proj itself left in float: when
        it is quantized too, offline H mixes its rows within a head and changes its grid)."""
        model = tiny_model(arch, torch.float64)
        ids = _ids()
        sites = _per_head(model, resolve_sites(model, ["o_proj"]), "online")
        plans = _random_plans(sites, spread=0.3)
        offline = _per_head(model, sites, "offline")
        offline_plans = _random_plans(offline, spread=0.3)
        scheme = get_scheme("w8a8")
        with transformed(sites, plans, scheme):
            online = _logits(model, ids)
        with transformed(offline, offline_plans, scheme):
            out = _logits(model, ids)
        assert _rel(out, online) <= 1e-6

    def test_random_head_rotations_are_exact(self, arch):
        """Any orthogonal R_g per kv head folds exactly (what training may reach)."""
        model = tiny_model(arch, torch.float64)
        ids = _ids()
        with exact_norms(model):
            ref = _logits(model, ids)
        layout = head_layout(model)
        gen = torch.Generator().manual_seed(2)
        rotations = {rs.name: torch.linalg.qr(torch.randn(
            layout.kv_heads, layout.head_dim, layout.head_dim, generator=gen,
            dtype=torch.float64))[0] for rs in resolve_sites(model, ["o_proj"])}
        apply_head_rotations(model, rotations)
        with exact_norms(model):
            out = _logits(model, ids)
        assert _rel(out, ref) <= 1e-9
        o_proj = resolve_sites(model, ["o_proj"])[0].linear.weight
        assert not torch.allclose(o_proj, tiny_model(arch, torch.float64).get_submodule(
            resolve_sites(model, ["o_proj"])[0].name).weight)  # the weights did change

    def test_r1_folds_norms_and_unties_lm_head(self, arch):
        model = tiny_model(arch)
        rmap = architecture_of(model).residual
        embedding = model.get_submodule(rmap.embedding)
        lm_head = model.get_submodule(rmap.lm_head)
        tied = lm_head.weight.data_ptr() == embedding.weight.data_ptr()
        original = copy.deepcopy(model)
        result = rotate_residual(model, seed=0)
        assert result.untied_lm_head == tied
        assert lm_head.weight.data_ptr() != embedding.weight.data_ptr()
        assert not model.config.tie_word_embeddings
        identity = 0.0 if rmap.norm_kind == "offset_rms" else 1.0
        layers = model.get_submodule(architecture_of(model).layers)
        folded = [model.get_submodule(rmap.final_norm)] + [
            layer.get_submodule(feed.norm) for layer in layers for feed in rmap.readers]
        assert all(torch.all(n.weight == identity) for n in folded)
        assert len(result.handles) == len(layers) * len(rmap.output_norms)
        q = result.q.float()
        assert torch.allclose(embedding.weight, original.get_submodule(rmap.embedding).weight @ q,
                              atol=1e-5)
        with pytest.raises(ValueError, match="already rotated"):
            rotate_residual(model)

    def test_r1_sites_reading_the_residual_do_not_rotate_again(self, arch):
        """Q·H with Q = diag(σ)·H is diag(σ): a second Hadamard would undo R1."""
        model = tiny_model(arch)
        before = {rs.site.name: rs.rotation for rs in resolve_sites(model, ["all"])}
        rotate_residual(model)
        after = {rs.site.name: rs.rotation
                 for rs in resolve_sites(model, ["all"], residual_kind="hadamard")}
        assert before == {"qkv": Rotation.full(), "o_proj": Rotation.full(),
                          "gate_up": Rotation.full(), "down_proj": Rotation.full()}
        assert after == {**before, "qkv": Rotation.none(), "gate_up": Rotation.none()}
        # A random orthogonal R1 is not undone by H: every site keeps its own (placement both).
        both = {rs.site.name: rs.rotation
                for rs in resolve_sites(model, ["all"], residual_kind="random")}
        assert both == before
        with pytest.raises(ValueError, match="residual_kind"):
            resolve_sites(model, ["all"], residual_kind=True)
        # R1 is an explicit argument: the rotated model carries no state resolve_sites reads.
        assert {rs.site.name: rs.rotation for rs in resolve_sites(model, ["all"])} == before
