"""The block-output objective (training/block.py, methods/trained_block.py): the substituted
layer computes what the fused, quantized model computes; training lowers the layer's selection
loss and never returns worse scales than it started from; the method runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from smoothrot.arch.sites import resolve_sites
from smoothrot.calibrate.capture import CaptureSpec
from smoothrot.calibrate.sequential import walk_layers
from smoothrot.io.verify import verify_export
from smoothrot.schema.config import BlockTrainConfig, config_from_dict
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import get_scheme
from smoothrot.surgery.hooks import exact_norms, replaced_forwards, transformed
from smoothrot.surgery.plan import SitePlan
from smoothrot.training.block import BlockProblem, BlockScaleFitModule, _step_order, fit_block
from tests.conftest import tiny_llama
from tests.unit.test_bad_inputs import small_config, tiny_model  # noqa: F401 (fixture)
from train.fit_scales import main

SCHEME = get_scheme("w4a4")


def _specs(vocab: int) -> dict[str, CaptureSpec]:
    gen = torch.Generator().manual_seed(0)
    return {"calibration": CaptureSpec(torch.randint(0, vocab, (6, 16), generator=gen)),
            "selection": CaptureSpec(torch.randint(0, vocab, (2, 16), generator=gen))}


def _plans(sites, seed: int = 1) -> dict[str, SitePlan]:
    gen = torch.Generator().manual_seed(seed)
    return {rs.name: SitePlan(torch.rand(rs.transform.n_scales(rs.in_features),
                                         generator=gen, dtype=torch.float64) + 0.5, rs.rotation)
            for rs in sites}


def _problem(step, plans, scheme=SCHEME) -> BlockProblem:
    return BlockProblem(step, {rs.name: plans[rs.name].scales for rs in step.sites},
                        {rs.name: rs.transform.with_rotation(plans[rs.name].rotation)
                         for rs in step.sites},
                        {rs.name: scheme for rs in step.sites}, seed=step.index)


@pytest.mark.parametrize("scheme", ["w4a4", "w8a8"])
def test_substituted_layer_equals_the_fused_quantized_layer(scheme):
    """Every site of a layer at once (q/k/v, o, gate/up, down; sources rescaled by the fusion),
    in float64: the trainer's fake-quantized forwards give the deployed model's layer output."""
    model = tiny_llama(layers=2, dtype=torch.float64)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    scheme = get_scheme(scheme)
    steps = 0
    with exact_norms(model):
        for step in walk_layers(model, sites, scheme, _specs(model.config.vocab_size), 2, "t"):
            _check_layer(step, plans, scheme)
            steps += 1
    assert steps == 2


def _check_layer(step, plans, scheme) -> None:
    module = BlockScaleFitModule(_problem(step, plans, scheme), {}, BlockTrainConfig(), 9.0)
    batch = step.inputs["calibration"][0]
    layer_plans = {rs.name: plans[rs.name] for rs in step.sites}
    with torch.no_grad():
        with transformed(step.sites, layer_plans, scheme):
            fused = step.run(batch)
        with replaced_forwards(step.sites, module.site_forward):
            substituted = step.run(batch)
        plain = step.run(batch)
    assert (fused - plain).abs().max() > 1e-4  # quantization does change the output
    # Exact up to the float32 storage of the trainable log-scales (~1e-7 relative).
    torch.testing.assert_close(substituted, fused, rtol=1e-6, atol=1e-8)
    step.done.update(layer_plans)


def test_weight_errors_give_the_layer_with_the_offline_rounded_weights():
    """``weights: gptq``'s loss: with the offline rounding's error E held fixed, the substituted
    layer at the starting scales is the fused layer carrying those offline weights (float64)."""
    from dataclasses import replace

    from smoothrot.core.quantizers import quantize_weight_spec
    from smoothrot.core.transform import transform_weight

    model = tiny_llama(layers=1, dtype=torch.float64)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    gen = torch.Generator().manual_seed(3)
    with exact_norms(model):
        step = next(walk_layers(model, sites, SCHEME, _specs(model.config.vocab_size), 2, "t"))
        offline, errors = {}, {}
        for rs in step.sites:  # an "offline" rounding: RTN, then some codes moved by one step
            plan = plans[rs.name]
            fused = transform_weight(rs.weight.detach(), plan.scales, rs.transform)
            rtn = quantize_weight_spec(fused, SCHEME)
            step_size = (rtn - fused).abs().amax(dim=1, keepdim=True) * 2
            nudge = torch.randint(-1, 2, rtn.shape, generator=gen, dtype=torch.float64)
            offline[rs.name] = replace(plan, weight_q=rtn + nudge * step_size)
            errors[rs.name] = offline[rs.name].weight_q - fused
        fused_out, rtn_out, substituted = fused_other_substituted(
            step, replace(_problem(step, plans), weight_errors=errors), offline, plans)
    assert (fused_out - rtn_out).abs().max() > 1e-3  # the offline weights do differ from RTN
    torch.testing.assert_close(substituted, fused_out, rtol=1e-6, atol=1e-8)


def fused_other_substituted(step, problem, fused_plans, other_plans):
    """One calibration batch through the layer three ways: fused under ``fused_plans``, fused
    under ``other_plans``, and with ``problem``'s trainer substituting the site linears."""
    module = BlockScaleFitModule(problem, {}, BlockTrainConfig(), 9.0)
    batch = step.inputs["calibration"][0]
    with torch.no_grad():
        with transformed(step.sites, fused_plans, SCHEME):
            fused = step.run(batch)
        with transformed(step.sites, other_plans, SCHEME):
            other = step.run(batch)
        with replaced_forwards(step.sites, module.site_forward):
            substituted = step.run(batch)
    return fused, other, substituted


def test_fit_block_lowers_the_selection_loss_and_keeps_the_start_when_told_nothing():
    model = tiny_llama(layers=1)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    step = next(walk_layers(model, sites, SCHEME, _specs(model.config.vocab_size), 2, "t"))
    start, start_loss = fit_block(_problem(step, plans), BlockTrainConfig(steps=0),
                                  log_bound=9.0)
    for rs in sites:
        torch.testing.assert_close(start[rs.name], plans[rs.name].scales, rtol=1e-6, atol=0)
    best, loss = fit_block(_problem(step, plans), BlockTrainConfig(steps=30, lr=0.05),
                           log_bound=9.0)
    assert loss < 0.97 * start_loss, (loss, start_loss)
    assert any((best[rs.name] - plans[rs.name].scales).abs().max() > 1e-3 for rs in sites)
    again, loss_again = fit_block(_problem(step, plans), BlockTrainConfig(steps=30, lr=0.05),
                                  log_bound=9.0)
    assert loss_again == loss and all(torch.equal(again[k], best[k]) for k in best)  # seeded
    # The model is left as it was: weights, requires_grad, no replaced forwards.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all("forward" not in vars(linear) for rs in sites for linear in rs.linears)


def test_float_stream_carries_the_float_models_hidden_states():
    """``walk_layers(float_stream=True)``: at every layer ``float_outputs`` are the float model's
    own outputs of it (the next layer's inputs in a walk that quantizes nothing), whatever the
    walk quantizes, while ``inputs`` carry the quantized ones."""
    model = tiny_llama(layers=2)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    specs = _specs(model.config.vocab_size)
    float_walk = [[b.hidden.clone() for b in step.inputs["selection"]]
                  for step in walk_layers(model, sites, SCHEME, specs, 2, "float")]  # no plans
    differ = False
    for step in walk_layers(model, sites, SCHEME, specs, 2, "t", float_stream=True):
        if step.index + 1 < len(float_walk):
            for hidden, output in zip(float_walk[step.index + 1],
                                      step.float_outputs["selection"], strict=True):
                assert torch.equal(hidden, output)
        differ |= any(not torch.equal(a.hidden, b) for a, b in
                      zip(step.inputs["selection"], float_walk[step.index], strict=True))
        step.done.update({rs.name: plans[rs.name] for rs in step.sites})
    assert differ  # layer 1's quantized inputs are not the float ones


def test_model_target_fits_the_float_models_output():
    """``target: model`` fits layer 1 to the float model's hidden state: its selection loss
    counts the error layer 0 passed on, so it starts above the ``layer`` target's, and
    training lowers it."""
    model = tiny_llama(layers=2)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    losses = {}
    for target in ("layer", "model"):
        cfg = BlockTrainConfig(steps=0, target=target)
        for step in walk_layers(model, sites, SCHEME, _specs(model.config.vocab_size), 2, "t",
                                float_stream=target == "model"):
            if step.index == 1:
                losses[target] = fit_block(_problem(step, plans), cfg, log_bound=9.0)[1]
                trained = fit_block(_problem(step, plans),
                                    BlockTrainConfig(steps=20, lr=0.05, target=target),
                                    log_bound=9.0)[1]
                assert trained < losses[target]
            step.done.update({rs.name: plans[rs.name] for rs in step.sites})
    assert losses["model"] > 1.5 * losses["layer"], losses
    with pytest.raises(ValueError, match="float_stream=True"):
        step = next(walk_layers(model, sites, SCHEME, _specs(model.config.vocab_size), 2, "t"))
        fit_block(_problem(step, plans), BlockTrainConfig(target="model"), log_bound=9.0)


def test_step_order_visits_every_batch_each_pass():
    order = _step_order(3, 8, seed=0)
    assert sorted(order[:3]) == sorted(order[3:6]) == [0, 1, 2] and len(order) == 8
    assert order == _step_order(3, 8, seed=0)


def test_block_training_config_is_checked():
    assert config_from_dict({"block_training": {"steps": 5}}).block_training.steps == 5
    with pytest.raises(ConfigError, match=r"block_training\.lr=0 must be a positive"):
        config_from_dict({"block_training": {"lr": 0}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \[.stepz.\] in block_training"):
        config_from_dict({"block_training": {"stepz": 5}})
    with pytest.raises(ConfigError, match=r"block_training\.target='float' is not one of"):
        config_from_dict({"block_training": {"target": "float"}})
    with pytest.raises(ConfigError, match=r"block_training\.weights='int4' is not one of"):
        config_from_dict({"block_training": {"weights": "int4"}})
    with pytest.raises(ConfigError, match=r"block_training\.loss='kl' is not one of"):
        config_from_dict({"block_training": {"loss": "kl"}})
    with pytest.raises(ConfigError, match=r"act_tuning\.loss='kl' is not one of"):
        config_from_dict({"act_tuning": {"loss": "kl"}})
    assert config_from_dict({"act_tuning": {"loss": "relative"}}).act_tuning.as_block().loss \
        == "relative"


def test_relative_loss_weighs_each_token_by_its_size():
    """``loss: relative``: the selection loss is the mean over tokens of each token's squared
    error over its target's squared norm (computed here from the substituted layer directly);
    training lowers it, and its scales differ from the ``mse`` loss's."""
    model = tiny_llama(layers=2)
    sites = resolve_sites(model, ["all"])
    plans = _plans(sites)
    for step in walk_layers(model, sites, SCHEME, _specs(model.config.vocab_size), 2, "t",
                            float_stream=True):
        if step.index == 1:
            break
        step.done.update({rs.name: plans[rs.name] for rs in step.sites})
    cfg = BlockTrainConfig(steps=0, target="model", loss="relative")
    _, start = fit_block(_problem(step, plans), cfg, log_bound=9.0)
    module = BlockScaleFitModule(_problem(step, plans), step.float_outputs, cfg, 9.0)
    errors = []
    with torch.no_grad(), replaced_forwards(step.sites, module.site_forward):
        for batch, target in zip(step.inputs["selection"], step.float_outputs["selection"],
                                 strict=True):
            out = step.run(batch)
            errors.append((out - target).pow(2).sum(-1) / target.pow(2).sum(-1))
    assert start == pytest.approx(float(torch.cat([e.flatten() for e in errors]).mean()),
                                  rel=1e-5)
    trained = {loss: fit_block(_problem(step, plans), BlockTrainConfig(
        steps=20, lr=0.05, target="model", loss=loss), log_bound=9.0) for loss in
        ("relative", "mse")}
    assert trained["relative"][1] < start
    assert any(not torch.equal(trained["relative"][0][k], trained["mse"][0][k])
               for k in trained["mse"][0])


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_trained_block_end_to_end_beside_trained(tmp_path, tiny_model, weights):  # noqa: F811
    config = small_config(tmp_path, tiny_model, layers=["all"],
                          methods=["trained", "trained_block", "trained_block+gptq"],
                          block_training={"steps": 4, "lr": 0.05, "batch_tokens": 32,
                                          "weights": weights})
    assert main(["--config", str(config), "--quiet", "--export", "w4a4",
                 "--export-method", "trained_block"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    summary = report["schemes"]["w4a4"]["summary"]
    for method in ("trained", "trained_block", "trained_block+gptq"):
        assert summary[method]["mean_mse"] > 0
    assert summary["trained_block"]["mean_mse"] != summary["trained"]["mean_mse"]
    # The export carries the block-trained scales and reloads to the in-memory plans' model.
    assert_export_reloads(tmp_path / "out" / "export-w4a4", tiny_model)


def assert_export_reloads(export, model_dir) -> None:
    """``export`` reloads to the model its fit computed in memory (smoothrot's verify)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
    assert verify_export(export, model, ids)["passed"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_block_on_cuda_matches_the_cpu():
    """The GPU path: the layer and its cached inputs on the device, Lightning on one GPU."""
    results = []
    for device in ("cpu", "cuda"):
        model = tiny_llama(layers=1).to(device)
        sites = resolve_sites(model, ["all"])
        step = next(walk_layers(model, sites, SCHEME, _specs(model.config.vocab_size), 2, "t"))
        accelerator = "gpu" if device == "cuda" else "cpu"
        results.append(fit_block(_problem(step, _plans(sites)), BlockTrainConfig(steps=5),
                                 log_bound=9.0, accelerator=accelerator))
    (cpu, cpu_loss), (gpu, gpu_loss) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-3)
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-3, atol=1e-5)
