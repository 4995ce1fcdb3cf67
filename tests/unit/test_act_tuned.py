"""``<base>+gptq+act`` (methods/act_tuned.py): with the rounded weights held fixed, the trained
scales move the activation side only, and the substituted layer is the deployed layer (1/s in
the sources, the offline weights stored as they are); training never ends above the start on the
selection split; the method runs end to end and its export reloads."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from smoothrot.arch.sites import resolve_sites
from smoothrot.calibrate.sequential import walk_layers
from smoothrot.core.quantizers import quantize_weight_spec
from smoothrot.core.transform import transform_weight
from smoothrot.io.verify import verify_export
from smoothrot.io.writer import export_model
from smoothrot.job import run_fit
from smoothrot.methods import gptq as gptq_module
from smoothrot.report import summarize
from smoothrot.schema.config import BlockTrainConfig, load_config
from smoothrot.surgery.hooks import exact_norms
from smoothrot.training.block import BlockScaleFitModule, fit_block
from smoothrot.training.substitution import fake_quant_forward
from tests.conftest import tiny_llama
from tests.unit.test_bad_inputs import small_config, tiny_model  # noqa: F401 (fixture)
from tests.unit.test_block_training import (
    SCHEME,
    _plans,
    _problem,
    _specs,
    fused_other_substituted,
)


def _rounded(step, plans) -> dict[str, torch.Tensor]:
    """An offline rounding of every site at ``plans``' scales: RTN with some codes moved by one
    step (so it is not what RTN at any other scales would give)."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for rs in step.sites:
        fused = transform_weight(rs.weight.detach(), plans[rs.name].scales, rs.transform)
        rtn = quantize_weight_spec(fused, SCHEME)
        size = (rtn - fused).abs().amax(dim=1, keepdim=True) * 2
        out[rs.name] = rtn + torch.randint(-1, 2, rtn.shape, generator=gen,
                                           dtype=rtn.dtype) * size
    return out


def test_fixed_weights_give_the_deployed_layer_at_any_activation_scales():
    """float64, every site of a layer: weights rounded at scales s, activation scales s_a ≠ s.
    The substituted layer equals the fused model carrying 1/s_a in its sources (γ, v_proj and
    up_proj rows, the latter two rounded rows scaled per row) and the rounded weights as stored."""
    model = tiny_llama(layers=1, dtype=torch.float64)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites, seed=1)
    tuned = _plans(sites, seed=2)  # the activation side's scales, unrelated to the rounding's
    with exact_norms(model):
        step = next(walk_layers(model, sites, SCHEME, _specs(model.config.vocab_size), 2, "t"))
        weights_q = _rounded(step, plans)
        deployed = {name: replace(tuned[name], weight_q=w) for name, w in weights_q.items()}
        at_s = {name: replace(plans[name], weight_q=w) for name, w in weights_q.items()}
        fused, unchanged, substituted = fused_other_substituted(
            step, replace(_problem(step, tuned), weights_q=weights_q), deployed, at_s)
    assert (fused - unchanged).abs().max() > 1e-3  # the activation scales do change the layer
    torch.testing.assert_close(substituted, fused, rtol=1e-6, atol=1e-8)


def test_fixed_weights_take_no_gradient_and_exclude_a_weight_error():
    model = tiny_llama(layers=1)
    rs = resolve_sites(model, ["down_proj"])[0]
    plans = _plans([rs])
    step = next(walk_layers(model, [rs], SCHEME, _specs(model.config.vocab_size), 2, "t"))
    weight_q = _rounded(step, plans)[rs.name]
    problem = replace(_problem(step, plans), weights_q={rs.name: weight_q})
    module = BlockScaleFitModule(problem, {}, BlockTrainConfig(), 9.0)
    linear = rs.linears[0]
    x = torch.randn(8, rs.in_features, generator=torch.Generator().manual_seed(0))
    module.site_forward(rs, linear)(x).square().sum().backward()
    assert module.log_scales["0"].phi.grad.abs().max() > 0  # the activation side learns
    with pytest.raises(ValueError, match="not both"):
        fake_quant_forward(module.log_scales["0"], linear, rs.transform, SCHEME,
                           weight_error=weight_q, weight_q=weight_q)


def test_tuning_lowers_the_selection_loss_with_the_weights_fixed():
    """RTN-rounded weights held fixed: the activation scales alone lower the layer's loss, and
    the trained point is a move away from the rounding's scales."""
    model = tiny_llama(layers=1)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    step = next(walk_layers(model, sites, SCHEME, _specs(model.config.vocab_size), 2, "t"))
    rtn = {rs.name: quantize_weight_spec(transform_weight(
        rs.weight.detach(), plans[rs.name].scales, rs.transform), SCHEME) for rs in step.sites}
    problem = replace(_problem(step, plans), weights_q=rtn)
    _, start = fit_block(problem, BlockTrainConfig(steps=0), log_bound=9.0)
    best, loss = fit_block(problem, BlockTrainConfig(steps=30, lr=0.002), log_bound=9.0)
    assert loss < 0.95 * start, (loss, start)
    assert any((best[rs.name] - plans[rs.name].scales).abs().max() > 1e-3 for rs in sites)


def test_act_tuned_end_to_end(tmp_path, tiny_model):  # noqa: F811
    """On a tiny model, GPTQ toward the float model's output (its least-squares targets have
    grids of their own): with no steps ``+gptq+act`` is ``+gptq`` (the same sequential rounding
    at the same scales); with steps its scales move. Both exports store the GPTQ codes on the
    grids they lie on and reload to the in-memory model."""
    methods = ["trained_block+gptq", "trained_block+gptq+act"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    summaries = {}
    for steps, exported in ((0, methods[0]), (20, methods[1])):
        config = load_config(small_config(
            tmp_path, tiny_model, layers=["all"], methods=methods, gptq={"target": "model"},
            block_training={"steps": 4, "lr": 0.05, "batch_tokens": 32},
            act_tuning={"steps": steps, "lr": 0.002, "batch_tokens": 32}))
        result = run_fit(config)
        summaries[steps] = summarize(result.schemes[0])
        plans = result.schemes[0].plans[exported]
        path = export_model(model, plans, tmp_path / f"export{steps}", fmt="w4a4")
        assert verify_export(path, model, ids, plans=plans)["passed"] is True
    plain, untuned = (summaries[0][m]["mean_mse"] for m in methods)
    assert untuned == pytest.approx(plain, rel=1e-4)
    tuned = result.schemes[0].plans[methods[1]]
    start = result.schemes[0].plans[methods[0]]
    assert max(float((tuned[k].scales - start[k].scales).abs().max()) for k in tuned) > 1e-4


def test_gptq_token_options_end_to_end(tmp_path, tiny_model, monkeypatch):  # noqa: F811
    """``gptq.all_tokens`` rounds on every calibration token (4 windows × 32), not the 64 the
    trainers keep; ``gptq.weighting: residual`` hands token weights to every site but q/k/v;
    ``gptq.refit_scales`` lets refitted scales compete and some sites keep them; the export of
    such a fit reloads to the in-memory model."""
    seen: dict[tuple[bool, str], tuple[int, bool]] = {}
    refits: list[tuple[bool, bool]] = []
    rounder = gptq_module.gptq_fused_weight_selected

    def recording(weight, scales, transform, x, x_sel, scheme, **kwargs):
        seen[(all_tokens, current[0])] = (x.shape[0], kwargs.get("token_weights") is not None)
        current[0] = "next"
        choice = rounder(weight, scales, transform, x, x_sel, scheme, **kwargs)
        refits.append((kwargs["refit"], choice.refit))
        return choice

    monkeypatch.setattr(gptq_module, "gptq_fused_weight_selected", recording)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    for all_tokens in (False, True):
        current = ["first"]  # q/k/v of layer 0 is rounded first
        refits.clear()
        config = load_config(small_config(
            tmp_path, tiny_model, layers=["all"], methods=["smoothrot_max+gptq"],
            gptq={"target": "model", "weighting": "residual", "all_tokens": all_tokens,
                  "refit_scales": all_tokens}))
        result = run_fit(config)
        assert seen[(all_tokens, "first")] == (128 if all_tokens else 64, False)
        assert seen[(all_tokens, "next")] == (128 if all_tokens else 64, True)
        assert {asked for asked, _ in refits} == {all_tokens}
        assert any(kept for _, kept in refits) == all_tokens
    plans = result.schemes[0].plans["smoothrot_max+gptq"]
    path = export_model(model, plans, tmp_path / "export", fmt="w4a4")
    assert verify_export(path, model, ids, plans=plans)["passed"] is True
