"""The next-token KL objective (training/model_kl.py, methods/trained_kl.py): the substituted
model computes what the fused, quantized model computes, its float pass is the float model;
training lowers the selection KL and never returns worse scales than it started from; the
method runs end to end and exports."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from smoothrot.arch.sites import resolve_sites
from smoothrot.core.transform import transform_weight
from smoothrot.methods.gptq import gptq_fused_weight
from smoothrot.schema.config import KLTrainConfig, config_from_dict
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import get_scheme
from smoothrot.surgery.hooks import exact_norms, replaced_forwards, transformed
from smoothrot.surgery.plan import SitePlan
from smoothrot.training.model_kl import KLProblem, ModelKLFitModule, fit_model_kl, next_token_kl
from tests.conftest import tiny_llama
from tests.unit.test_bad_inputs import small_config, tiny_model  # noqa: F401 (fixture)
from tests.unit.test_block_training import assert_export_reloads
from train.fit_scales import main

SCHEME = get_scheme("w4a4")


def _plans(sites, seed: int = 1) -> dict[str, SitePlan]:
    gen = torch.Generator().manual_seed(seed)
    return {rs.name: SitePlan(torch.rand(rs.transform.n_scales(rs.in_features),
                                         generator=gen, dtype=torch.float64) + 0.5, rs.rotation)
            for rs in sites}


def _problem(model, sites, plans, scheme=SCHEME, seed: int = 0) -> KLProblem:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    windows = {"calibration": torch.randint(0, vocab, (6, 16), generator=gen),
               "selection": torch.randint(0, vocab, (3, 16), generator=gen)}
    return KLProblem(model, sites, {rs.name: plans[rs.name].scales for rs in sites},
                     {rs.name: rs.transform.with_rotation(plans[rs.name].rotation)
                      for rs in sites},
                     {rs.name: scheme for rs in sites}, windows, seed=seed)


def test_next_token_kl_is_the_mean_kl_over_positions():
    gen = torch.Generator().manual_seed(0)
    ref, out = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    p, q = ref.softmax(-1), out.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(next_token_kl(ref, out), expected)
    assert float(next_token_kl(ref, ref)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("scheme", ["w4a4", "w8a8"])
def test_substituted_model_equals_the_fused_quantized_model(scheme):
    """Every site of every layer at once, in float64: the trainer's quantized pass gives the
    deployed model's logits, its float pass the float model's."""
    model = tiny_llama(layers=2, dtype=torch.float64)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    scheme = get_scheme(scheme)
    module = ModelKLFitModule(_problem(model, sites, plans, scheme), KLTrainConfig(), 9.0, 2)
    ids = module.problem.windows["selection"]
    with torch.no_grad(), exact_norms(model):
        plain = model(input_ids=ids).logits
        with transformed(sites, plans, scheme):
            fused = model(input_ids=ids).logits
        with replaced_forwards(sites, module.site_forward):
            substituted = model(input_ids=ids).logits
            module.float_pass = True
            float_pass = model(input_ids=ids).logits
    assert (fused - plain).abs().max() > 1e-4  # quantization does change the logits
    # Exact up to the float32 storage of the trainable log-scales (~1e-7 relative).
    torch.testing.assert_close(substituted, fused, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(float_pass, plain, rtol=0, atol=0)


def test_held_rounding_error_reproduces_the_offline_rounded_model():
    """With a GPTQ rounding's error held fixed (the ``trained_kl`` loss), the substituted model
    at the starting scales is the model with those GPTQ weights, in float64."""
    model = tiny_llama(layers=2, dtype=torch.float64)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    gen = torch.Generator().manual_seed(3)
    weights_q, errors = {}, {}
    for rs in sites:
        plan, transform = plans[rs.name], rs.transform.with_rotation(plans[rs.name].rotation)
        x = torch.randn(64, rs.in_features, generator=gen, dtype=torch.float64)
        weight = rs.weight.detach()
        weights_q[rs.name] = gptq_fused_weight(weight, plan.scales, transform, x, SCHEME).double()
        errors[rs.name] = weights_q[rs.name] - transform_weight(weight, plan.scales, transform)
    problem = replace(_problem(model, sites, plans), weight_errors=errors)
    held = ModelKLFitModule(problem, KLTrainConfig(), 9.0, 2)
    rtn = ModelKLFitModule(_problem(model, sites, plans), KLTrainConfig(), 9.0, 2)
    ids = problem.windows["selection"]
    gptq_plans = {name: replace(plan, weight_q=weights_q[name]) for name, plan in plans.items()}
    with torch.no_grad(), exact_norms(model):
        with transformed(sites, gptq_plans, SCHEME):
            fused = model(input_ids=ids).logits
        with replaced_forwards(sites, held.site_forward):
            substituted = model(input_ids=ids).logits
        with replaced_forwards(sites, rtn.site_forward):
            rounded_here = model(input_ids=ids).logits
    torch.testing.assert_close(substituted, fused, rtol=1e-6, atol=1e-8)
    assert (rounded_here - fused).abs().max() > 1e-4  # GPTQ's weights are not RTN's


def test_fit_lowers_the_selection_kl_and_keeps_the_start_when_told_nothing():
    model = tiny_llama(layers=2)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    start, start_kl, kept = fit_model_kl(_problem(model, sites, plans), KLTrainConfig(steps=0),
                                         log_bound=9.0)
    assert kept == start_kl > 0
    for rs in sites:
        torch.testing.assert_close(start[rs.name], plans[rs.name].scales, rtol=1e-6, atol=0)
    cfg = KLTrainConfig(steps=20, lr=0.05, batch_tokens=32, val_every=5)
    best, begin, kl = fit_model_kl(_problem(model, sites, plans), cfg, log_bound=9.0)
    assert begin == pytest.approx(start_kl, rel=1e-6)
    assert kl < 0.97 * start_kl, (kl, start_kl)
    assert any((best[rs.name] - plans[rs.name].scales).abs().max() > 1e-3 for rs in sites)
    again, _, kl_again = fit_model_kl(_problem(model, sites, plans), cfg, log_bound=9.0)
    assert kl_again == kl and all(torch.equal(again[k], best[k]) for k in best)  # seeded
    # The kept scales score what the fit reported, through the fused, quantized model.
    final = {name: SitePlan(best[name], plans[name].rotation) for name in plans}
    ids = _problem(model, sites, plans).windows["selection"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with transformed(sites, final, SCHEME):
            scored = float(next_token_kl(ref, model(input_ids=ids).logits))
    assert math.isclose(scored, kl, rel_tol=1e-3), (scored, kl)
    # The model is left as it was: weights, requires_grad, no replaced forwards.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all("forward" not in vars(linear) for rs in sites for linear in rs.linears)


def test_steps_after_the_last_full_epoch_are_scored(caplog):
    """6 steps with a validation every 4: the scales after step 6 are scored too (else the
    last 2 steps would be trained and never looked at)."""
    model = tiny_llama(layers=1)
    sites = resolve_sites(model, ["all"])
    with caplog.at_level("INFO", logger="smoothrot.training.model_kl"):
        fit_model_kl(_problem(model, sites, _plans(sites)),
                     KLTrainConfig(steps=6, val_every=4, batch_tokens=16), log_bound=9.0)
    steps = [r.args[0] for r in caplog.records if r.msg.startswith("step %d")]
    assert steps == [0, 4, 6]


@pytest.mark.parametrize("module", ["trained_block", "trained_kl"])
def test_whole_walk_methods_refuse_several_processes(monkeypatch, module):
    """Every rank would repeat the same walk / model pass: one clear error instead."""
    import importlib

    import smoothrot.distributed

    method = importlib.import_module(f"smoothrot.methods.{module}")
    monkeypatch.setattr(smoothrot.distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"runs in one process.*distributed\.devices: 1"):
        getattr(method, module.upper()).fit(None)


def test_kl_training_config_is_checked():
    assert config_from_dict({"kl_training": {"steps": 5}}).kl_training.steps == 5
    with pytest.raises(ConfigError, match=r"kl_training\.lr=0 must be a positive"):
        config_from_dict({"kl_training": {"lr": 0}})
    with pytest.raises(ConfigError, match=r"kl_training\.steps=-1 must be >= 0"):
        config_from_dict({"kl_training": {"steps": -1}})


def test_trained_kl_end_to_end_beside_trained_block(tmp_path, tiny_model):  # noqa: F811
    config = small_config(tmp_path, tiny_model, layers=["all"],
                          methods=["trained_block", "trained_kl", "trained_kl+gptq"],
                          block_training={"steps": 4, "lr": 0.05, "batch_tokens": 32},
                          kl_training={"steps": 6, "lr": 0.05, "batch_tokens": 32,
                                       "val_every": 3})
    assert main(["--config", str(config), "--quiet", "--export", "w4a4",
                 "--export-method", "trained_kl"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    summary = report["schemes"]["w4a4"]["summary"]
    for method in ("trained_block", "trained_kl", "trained_kl+gptq"):
        assert summary[method]["mean_mse"] > 0
    assert report["timings_s"]["w4a4: KL training"] > 0
    assert_export_reloads(tmp_path / "out" / "export-w4a4", tiny_model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_model_kl_on_cuda_matches_the_cpu():
    results = []
    for device in ("cpu", "cuda"):
        model = tiny_llama(layers=1).to(device)
        sites = resolve_sites(model, ["all"])
        results.append(fit_model_kl(_problem(model, sites, _plans(sites)),
                                    KLTrainConfig(steps=4, batch_tokens=32, val_every=2),
                                    log_bound=9.0, accelerator="gpu" if device == "cuda"
                                    else "cpu"))
    (cpu, _, cpu_kl), (gpu, _, gpu_kl) = results
    assert gpu_kl == pytest.approx(cpu_kl, rel=1e-3)
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-3, atol=1e-5)
