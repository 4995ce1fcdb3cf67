"""The fit_scales job: calibrate, search, train, evaluate — for every scheme and method.

I/O stays at the edges (models.py/data.py in, report.py/export out); this module only wires the
pure pieces together and times each stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smoothrot.arch.sites import ResolvedSite, resolve_sites
from smoothrot.calibrate.capture import CaptureSpec, capture_splits, token_subset
from smoothrot.calibrate.sequential import capture_sequential, gptq_sequential
from smoothrot.core.gptq import GPTQChoice, gptq_fused_weight_selected
from smoothrot.core.policies import check_finite, smoothing_scales
from smoothrot.core.quantizers import check_group_size
from smoothrot.core.stats import weight_absmax
from smoothrot.data import split_windows, text_hash
from smoothrot.distributed import launch, merge_records, shard_spec
from smoothrot.evaluate import LayerError, layer_error, perplexity
from smoothrot.methods.search import Choice, grid_losses, select_act_clip, select_policies
from smoothrot.models import load_model, model_fingerprint
from smoothrot.schema.config import FitConfig, QuantScheme, get_scheme, with_act_clip
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan
from smoothrot.surgery.residual import rotate_residual
from smoothrot.training.fit import fit_scales

log = logging.getLogger(__name__)

POLICY_METHODS = ("smoothrot_max", "quantile", "joint_global", "joint")
# "<base>+gptq": base scales; fused weight rounded by GPTQ on train_x, damping (or RTN) chosen
# on the selection split.
GPTQ_SUFFIX = "+gptq"


@dataclass
class SiteData:
    """Calibration statistics and token sets of one site (CPU, float32)."""

    act_stats: dict[float, torch.Tensor]
    weight_stat: torch.Tensor
    train_x: torch.Tensor
    selection_x: torch.Tensor
    heldout_x: torch.Tensor


@dataclass
class SchemeResult:
    """Everything measured for one quantization scheme."""

    scheme: str
    choices: dict[str, dict[str, Choice]] = field(default_factory=dict)
    scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    errors: dict[str, dict[str, LayerError]] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)
    selection_loss: dict[str, dict[str, float]] = field(default_factory=dict)
    act_clips: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class FitResult:
    """The whole run, ready for the report and the export."""

    config: FitConfig
    model_name: str
    model_fingerprint: str
    sites: list[str]
    data_hash: dict[str, str]
    tokens: dict[str, int]
    float_perplexity: float | None
    schemes: list[SchemeResult]
    timings: dict[str, float]


class Timer:
    """Accumulates wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def method_plan(
    method: str, scales: torch.Tensor | None, weight_q: torch.Tensor | None = None,
    act_clip: float | None = None,
) -> SitePlan:
    """The transform a method applies to a site (RTN: none; the rest rotate).

    ``weight_q``: the fused weight already quantized offline (GPTQ methods); ``act_clip``: the
    site's activation clip ratio (None: the scheme's).
    """
    return SitePlan(scales=scales, rotate=method != "rtn", weight_q=weight_q, act_clip=act_clip)


def _batch_size(cfg: FitConfig) -> int:
    return max(1, 2048 // cfg.data.seq_len)


def _capture_specs(windows: dict[str, torch.Tensor], cfg: FitConfig) -> dict[str, CaptureSpec]:
    """Calibration (statistics, the seeded training rows), selection and held-out splits."""
    calib = windows["calibration"]
    keep = token_subset(calib.numel(), cfg.data.train_tokens, cfg.seed)
    return {
        "calibration": CaptureSpec(calib, keep, tuple(cfg.search.quantiles)),
        "selection": CaptureSpec(windows["selection"]),
        "heldout": CaptureSpec(windows["heldout"]),
    }


def _calibrate(model, sites, windows, cfg: FitConfig, timer: Timer) -> dict[str, SiteData]:
    specs = _capture_specs(windows, cfg)
    capture = capture_sequential if cfg.calibration.sequential else capture_splits
    with timer.stage("calibration"):  # each rank captures its share of the windows, then merge
        records = capture(model, sites, {k: shard_spec(v) for k, v in specs.items()},
                          _batch_size(cfg))
        records = {split: merge_records(r) for split, r in records.items()}
    calib_rec, sel_rec, ho_rec = records["calibration"], records["selection"], records["heldout"]
    data = {}
    for rs in sites:
        rec = calib_rec[rs.name]
        stats = {q: rec.quantiles.value(q) for q in cfg.search.quantiles}
        stats[1.0] = rec.absmax.value()
        tie = rs.transform.tied_max  # tied (GQA o_proj) scales: max over the tied channels
        data[rs.name] = SiteData(
            act_stats={q: tie(v) for q, v in stats.items()},
            weight_stat=tie(weight_absmax(rs.weight.detach().cpu())),
            train_x=rec.tokens(),
            selection_x=sel_rec[rs.name].tokens(),
            heldout_x=ho_rec[rs.name].tokens(),
        )
    return data


def _gptq(model, sites: list[ResolvedSite], scales: dict[str, torch.Tensor | None],
          clips: dict[str, float], weights: dict[str, torch.Tensor], data: dict[str, SiteData],
          windows: dict[str, torch.Tensor], cfg: FitConfig, scheme: QuantScheme,
          method: str) -> dict[str, GPTQChoice]:
    """GPTQ of every site's fused weight, damping (or RTN) chosen on the selection split.

    Sequential (``cfg.gptq.sequential``): on the inputs of the model quantized so far, so the
    selection losses are measured there too; otherwise on the float model's captured rows.
    Each site's activations are quantized with its clip ratio ``clips[site]``.
    """
    def round_site(rs: ResolvedSite, x: torch.Tensor, x_selection: torch.Tensor) -> GPTQChoice:
        return gptq_fused_weight_selected(weights[rs.name], scales[rs.name], rs.transform.arg,
                                          x, x_selection, with_act_clip(scheme, clips[rs.name]))

    if not cfg.gptq.sequential:
        return {rs.name: round_site(rs, data[rs.name].train_x, data[rs.name].selection_x)
                for rs in tqdm(sites, desc=f"{scheme.name} {method}", leave=False)}
    specs = _capture_specs(windows, cfg)
    plans = {rs.name: method_plan(method, scales[rs.name], act_clip=clips[rs.name])
             for rs in sites}
    return gptq_sequential(model, sites, plans, scheme,
                           {k: replace(specs[k], quantiles=None) for k in ("calibration",
                                                                           "selection")},
                           _batch_size(cfg), round_site)


def _select_clips(sites: list[ResolvedSite], method: str,
                  scales: dict[str, torch.Tensor | None], weights: dict[str, torch.Tensor],
                  data: dict[str, SiteData], grid: list[float],
                  scheme: QuantScheme) -> dict[str, float]:
    """Each site's activation clip ratio for ``method``'s scales (RTN weights), chosen on the
    selection split; a one-entry grid is that clip everywhere, with no search."""
    if len(grid) == 1:
        return {rs.name: float(grid[0]) for rs in sites}
    return {
        rs.name: select_act_clip(data[rs.name].selection_x, weights[rs.name], scales[rs.name],
                                 grid, scheme, rs.transform.arg if method != "rtn" else False)[0]
        for rs in tqdm(sites, desc=f"{scheme.name} {method} clips", leave=False)
    }


def _run_scheme(
    scheme_name: str,
    model,
    sites: list[ResolvedSite],
    data: dict[str, SiteData],
    windows: dict[str, torch.Tensor],
    cfg: FitConfig,
    timer: Timer,
    resume: bool,
) -> SchemeResult:
    scheme = get_scheme(scheme_name)
    result = SchemeResult(scheme=scheme.name)
    alphas, quantiles = cfg.search.alphas, cfg.search.quantiles
    weights = {rs.name: rs.weight.detach().cpu().float() for rs in sites}
    with timer.stage(f"{scheme.name}: search"):
        tables = {
            rs.name: grid_losses(data[rs.name].selection_x, weights[rs.name],
                                 data[rs.name].act_stats, data[rs.name].weight_stat, alphas,
                                 quantiles, scheme, rs.name, rotate=rs.transform.arg)
            for rs in tqdm(sites, desc=f"{scheme.name} grid search", leave=False)
        }
    choices = select_policies(tables, alphas, quantiles)
    scales: dict[str, dict[str, torch.Tensor | None]] = {"rtn": {}, "hadamard": {}}
    for rs in sites:
        scales["rtn"][rs.name] = None
        scales["hadamard"][rs.name] = None
    for method in POLICY_METHODS:
        scales[method] = {
            s: smoothing_scales(data[s].act_stats[c.q], data[s].weight_stat, c.alpha, site=s)
            for s, c in choices[method].items()
        }
    result.choices = {m: choices[m] for m in POLICY_METHODS if m in cfg.methods}
    clips = result.act_clips
    needed = {m.removesuffix(GPTQ_SUFFIX) for m in cfg.methods}
    trains = "trained" in needed
    with timer.stage(f"{scheme.name}: activation clips"):
        for method in [m for m in scales if m in needed or (trains and m == "joint")]:
            clips[method] = _select_clips(sites, method, scales[method], weights, data,
                                          cfg.search.act_clips, scheme)
    for s in tables:
        result.selection_loss[s] = {
            m: float(tables[s][alphas.index(choices[m][s].alpha), quantiles.index(choices[m][s].q)])
            for m in POLICY_METHODS
        }
    if trains:
        scales["trained"] = {}
        accelerator = "gpu" if next(model.parameters()).is_cuda else "cpu"
        with timer.stage(f"{scheme.name}: training"):
            for rs in tqdm(sites, desc=f"{scheme.name} training", leave=False):
                d = data[rs.name]
                best, loss = fit_scales(
                    weights[rs.name], scales["joint"][rs.name],
                    with_act_clip(scheme, clips["joint"][rs.name]), d.train_x, d.selection_x,
                    cfg.train, seed=cfg.seed + rs.layer_index, accelerator=accelerator,
                    checkpoint_dir=Path(cfg.output_dir) / "checkpoints" / scheme.name / rs.name,
                    resume=resume, rotate=rs.transform.arg,
                )
                scales["trained"][rs.name] = best
                result.selection_loss[rs.name]["trained"] = loss
        clips["trained"] = _select_clips(sites, "trained", scales["trained"], weights, data,
                                         cfg.search.act_clips, scheme)
    weights_q: dict[str, dict[str, torch.Tensor]] = {}
    for method in [m for m in cfg.methods if m.endswith(GPTQ_SUFFIX)]:
        base = method.removesuffix(GPTQ_SUFFIX)
        scales[method], clips[method] = scales[base], clips[base]
        with timer.stage(f"{scheme.name}: gptq"):
            picks = _gptq(model, sites, scales[base], clips[base], weights, data, windows, cfg,
                          scheme, method)
        weights_q[method] = {site: pick.weight_q for site, pick in picks.items()}
        for site, pick in picks.items():
            result.selection_loss[site][method] = pick.selection_loss
        damps = [pick.damp for pick in picks.values()]
        log.info("%s %s: damping per site %s (RTN kept on %d/%d)", scheme.name, method,
                 {d: damps.count(d) for d in dict.fromkeys(damps)}, damps.count(None), len(damps))
    methods = [m for m in cfg.methods if m in scales]
    with timer.stage(f"{scheme.name}: held-out errors"):
        for method in tqdm(methods, desc=f"{scheme.name} held-out errors", leave=False):
            result.errors[method] = {
                rs.name: layer_error(data[rs.name].heldout_x, weights[rs.name],
                                     scales[method][rs.name],
                                     rs.transform.arg if method != "rtn" else False,
                                     with_act_clip(scheme, clips[method][rs.name]),
                                     weight_q=weights_q.get(method, {}).get(rs.name))
                for rs in sites
            }
    result.scales = {m: {s: v for s, v in scales[m].items() if v is not None}
                     for m in methods if m in (*POLICY_METHODS, "trained")}
    if cfg.perplexity:
        with timer.stage(f"{scheme.name}: perplexity"):
            for method in methods:
                plans = {rs.name: method_plan(method, scales[method][rs.name],
                                              weights_q.get(method, {}).get(rs.name),
                                              clips[method][rs.name])
                         for rs in sites}
                with transformed(sites, plans, scheme):
                    result.perplexity[method] = perplexity(
                        model, windows["evaluation"], desc=f"{scheme.name} {method} ppl"
                    )
                log.info("%s %s perplexity %.3f", scheme.name, method, result.perplexity[method])
    return result


def run_fit(cfg: FitConfig, *, resume: bool = False) -> FitResult:
    """Run the whole job described by ``cfg`` and return its measurements.

    With ``cfg.distributed`` above one process this starts (or joins) the process group first;
    every rank returns the same result.
    """
    launch(cfg.distributed, "cpu" if cfg.model.device == "cpu" else "gpu")
    torch.manual_seed(cfg.seed)
    timer = Timer()
    with timer.stage("load model"):
        model, tokenizer = load_model(
            cfg.model.name, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
            device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
    fingerprint = model_fingerprint(model)  # of the model as loaded, before any R1
    if cfg.residual_rotation:
        with timer.stage("residual rotation"):
            rotate_residual(model, seed=cfg.seed)
    sites = resolve_sites(model, cfg.layers)
    for rs in sites:
        try:  # fail early, naming the site, on unsupported Hadamard sizes
            rs.transform.check(rs.in_features)
        except ValueError as exc:  # HadamardSizeError is a ValueError
            raise type(exc)(f"{rs.name}: {exc}") from None
        # The last site's own weight never reaches calibration's activation check.
        check_finite(weight_absmax(rs.weight.detach().cpu()), "max |W| over the input channel",
                     rs.name)
        for scheme in map(get_scheme, cfg.schemes):
            check_group_size(rs.in_features, scheme.w_group_size, f"{rs.name} {scheme.name}")
            check_group_size(rs.in_features, scheme.a_group_size, f"{rs.name} {scheme.name}")
    with timer.stage("load data"):
        splits, windows = split_windows(tokenizer, cfg.data, cfg.seed)
    data = _calibrate(model, sites, windows, cfg, timer)
    float_ppl = None
    if cfg.perplexity:
        with timer.stage("float perplexity"):
            float_ppl = perplexity(model, windows["evaluation"], desc="float ppl")
    results = [
        _run_scheme(name, model, sites, data, windows, cfg, timer, resume) for name in cfg.schemes
    ]
    return FitResult(
        config=cfg,
        model_name=cfg.model.name,
        model_fingerprint=fingerprint,
        sites=[rs.name for rs in sites],
        data_hash={name: text_hash(splits[name]) for name in splits},
        tokens={name: int(w.numel()) for name, w in windows.items()},
        float_perplexity=float_ppl,
        schemes=results,
        timings=timer.seconds,
    )
