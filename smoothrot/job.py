"""The fit_scales job: load, calibrate, then for every scheme run the registered methods the
config asks for and measure each one (held-out layer error, perplexity).

I/O stays at the edges (models.py and data/ in, report.py and io/ out); methods live in
smoothrot/methods/; this module wires them together and times each stage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from smoothrot.arch.sites import (
    ResolvedSite,
    resolve_sites,
    with_dense_rotations,
    with_rotation_blocks,
)
from smoothrot.calibrate.capture import batch_size, capture_splits, fit_specs
from smoothrot.calibrate.sequential import capture_sequential
from smoothrot.core.quantizers import check_group_size
from smoothrot.core.stats import weight_absmax
from smoothrot.data.splits import split_windows, text_hash
from smoothrot.distributed import launch, merge_records, shard_spec
from smoothrot.evaluate import LayerError, Reference, layer_errors, perplexity
from smoothrot.methods.context import SchemeContext, SiteData
from smoothrot.methods.registry import Method, MethodResult, baselines, get_method, run_order
from smoothrot.methods.search import Choice
from smoothrot.models import check_context_length, load_model, model_fingerprint
from smoothrot.schema.config import FitConfig
from smoothrot.schema.quant import get_scheme, with_act_clip
from smoothrot.schema.target import TARGETS
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan
from smoothrot.surgery.residual import rotate_residual
from smoothrot.timer import Timer
from smoothrot.training.head_rotation import learn_head_rotations

log = logging.getLogger(__name__)


@dataclass
class SchemeResult:
    """Everything measured for one quantization scheme, per reported method (run order)."""

    scheme: str
    results: dict[str, MethodResult] = field(default_factory=dict)
    errors: dict[str, dict[str, LayerError]] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)

    @property
    def plans(self) -> dict[str, dict[str, SitePlan]]:
        return {m: r.plans for m, r in self.results.items()}

    @property
    def choices(self) -> dict[str, dict[str, Choice]]:
        """(α, q) per site of the policy methods."""
        return {m: r.choices for m, r in self.results.items() if r.choices}

    @property
    def scales(self) -> dict[str, dict[str, torch.Tensor]]:
        """Fitted scales per method (methods without scales, and GPTQ repeats, left out)."""
        return {m: {s: p.scales for s, p in r.plans.items() if p.scales is not None}
                for m, r in self.results.items()
                if get_method(m).rounding == "rtn"
                and any(p.scales is not None for p in r.plans.values())}

    @property
    def act_clips(self) -> dict[str, dict[str, float | None]]:
        return {m: {s: p.act_clip for s, p in r.plans.items()} for m, r in self.results.items()}

    @property
    def selection_loss(self) -> dict[str, dict[str, float]]:
        """site → method → loss on the selection split (methods that choose by one)."""
        out: dict[str, dict[str, float]] = {}
        for m, r in self.results.items():
            for s, loss in r.selection_loss.items():
                out.setdefault(s, {})[m] = loss
        return out


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
    # Learned per-head rotations folded into the model before any method (by o_proj site name).
    head_rotations: dict[str, torch.Tensor] = field(default_factory=dict)


def _calibrate(model, sites: list[ResolvedSite], windows: dict[str, torch.Tensor],
               cfg: FitConfig, timer: Timer) -> dict[str, SiteData]:
    specs = fit_specs(windows, cfg.data.train_tokens, cfg.seed, cfg.search.quantiles)
    capture = capture_sequential if cfg.calibration.sequential else capture_splits
    with timer.stage("calibration"):  # each rank captures its share of the windows, then merge
        records = capture(model, sites, {k: shard_spec(v) for k, v in specs.items()},
                          batch_size(cfg.data.seq_len))
        records = {split: merge_records(r) for split, r in records.items()}
    calib_rec, sel_rec, ho_rec = records["calibration"], records["selection"], records["heldout"]
    data = {}
    for rs in sites:
        rec = calib_rec[rs.name]
        # search.quantiles holds 1.0 (SearchConfig): the max, the quantile buffer's top
        stats = {q: rec.quantiles.value(q) for q in cfg.search.quantiles}
        tie = rs.transform.tied_max  # tied (GQA o_proj) scales: max over the tied channels
        heldout_x = ho_rec[rs.name].tokens()
        data[rs.name] = SiteData(
            act_stats={q: tie(v) for q, v in stats.items()},
            weight_stat=tie(weight_absmax(rs.weight.detach().cpu())),
            train_x=rec.tokens(),
            selection_x=sel_rec[rs.name].tokens(),
            heldout_x=heldout_x,
            heldout_ref=_heldout_output(rs, heldout_x),
        )
    return data


def _heldout_output(rs: ResolvedSite, x: torch.Tensor) -> Reference:
    """X·Wᵀ of the held-out tokens, the reference of every method's held-out error.

    A finite weight (3e38) can give outputs whose squares overflow float32: every held-out error
    would be inf and every comparison NaN, so this stops the run before any method does.
    """
    w = rs.weight.detach().cpu().float()
    ref = Reference.of(x @ w.T)
    if not math.isfinite(ref.energy):  # what the errors accumulate (evaluate.layer_error)
        raise FloatingPointError(
            f"{rs.name}: the layer's outputs on the held-out tokens (max |y| = "
            f"{float(ref.y.abs().max()):.3g}, max |W| = {float(w.abs().max()):.3g}) overflow "
            "float32 in its squared error; check the model weights")
    return ref


def _input_key(plan: SitePlan) -> tuple:
    """What a plan's transformed input X·diag(s)⁻¹·R depends on: equal keys, equal inputs."""
    scales = None if plan.scales is None else plan.scales.detach().cpu().numpy().tobytes()
    return scales, plan.rotation


def _heldout_errors(contexts: list[SchemeContext], results: list[SchemeResult],
                    timer: Timer) -> None:
    """Held-out layer error of every site under each reported method's plan, for every scheme
    (X·Wᵀ from calibration), into each result's ``errors``.

    Methods often pick the same scales at a site (a quantile method at q = 1 is SmoothRot-max;
    ~a quarter of the policy methods' picks repeat another's on SmolLM2), and a plan is often
    the same under every scheme (Hadamard-only, SmoothRot-max, scales shared across schemes):
    each distinct transformed input is computed once per site, and each distinct
    (input, scheme, offline weight, clip) scored once.
    """
    for result in results:
        result.errors = {m: {} for m in result.results}
    with timer.stage("held-out errors (all schemes)"):
        for rs in contexts[0].sites:
            site = contexts[0].data[rs.name]
            # input key -> (scheme, weight_q id) -> (a plan with that input, the scheme, and
            # the (result, method)s that variant scores)
            groups: dict[tuple, dict[tuple, tuple]] = {}
            for ctx, result in zip(contexts, results, strict=True):
                for m in result.results:
                    plan = result.results[m].plans[rs.name]
                    scheme = with_act_clip(ctx.scheme, plan.act_clip)
                    # weight_q: alive as long as the plan, so its id names it
                    variant = (scheme, None if plan.weight_q is None else id(plan.weight_q))
                    entry = groups.setdefault(_input_key(plan), {}).setdefault(
                        variant, (plan, scheme, []))
                    entry[2].append((result, m))
            for variants in groups.values():
                plan = next(iter(variants.values()))[0]
                errors = layer_errors(
                    site.heldout_x, contexts[0].weights[rs.name], plan.scales,
                    SchemeContext.transform(rs, plan),
                    [(scheme, p.weight_q) for p, scheme, _ in variants.values()],
                    reference=site.heldout_ref)
                for (_, _, scored), error in zip(variants.values(), errors, strict=True):
                    for result, m in scored:
                        result.errors[m][rs.name] = error


def _perplexity(ctx: SchemeContext, method: str) -> float:
    """Perplexity of the model with every site transformed and quantized as ``method`` says."""
    integer_gemm = TARGETS[ctx.cfg.target].integer_gemm  # the target's GEMM arithmetic
    with ctx.stage("perplexity"), transformed(ctx.sites, ctx.results[method].plans, ctx.scheme,
                                              integer_gemm=integer_gemm):
        ppl = perplexity(ctx.model, ctx.windows["evaluation"],
                         desc=f"{ctx.scheme.name} {method} ppl")
    log.info("%s %s perplexity %.3f", ctx.scheme.name, method, ppl)
    return ppl


def _fit_scheme(ctx: SchemeContext, methods: list[Method], reported: set[str]) -> SchemeResult:
    """Fit every method in order; the result keeps the reported ones (and the baseline)."""
    result = SchemeResult(scheme=ctx.scheme.name)
    for method in methods:  # each stage logs itself and has its own bar
        ctx.results[method.name] = method.fit(ctx)
        if method.name in reported:
            result.results[method.name] = ctx.results[method.name]
    return result


def _measure(contexts: list[SchemeContext], results: list[SchemeResult], timer: Timer) -> None:
    """Held-out errors of every scheme's methods, then the perplexities the config asks for."""
    _heldout_errors(contexts, results, timer)
    for ctx, result in zip(contexts, results, strict=True):
        wanted = ctx.cfg.perplexity_filter(ctx.scheme.name)
        if ctx.cfg.perplexity:
            result.perplexity = {m: _perplexity(ctx, m) for m in result.results
                                 if wanted is None or m in wanted}


def _check_sites(sites: list[ResolvedSite], cfg: FitConfig) -> None:
    """Fail early, naming the site, on sizes no rotation or group can take."""
    for rs in sites:
        try:
            rs.transform.check(rs.in_features)
        except ValueError as exc:  # HadamardSizeError is a ValueError
            raise type(exc)(f"{rs.name}: {exc}") from None
        for scheme in map(get_scheme, cfg.schemes):
            check_group_size(rs.in_features, scheme.w_group_size, f"{rs.name} {scheme.name}")
            check_group_size(rs.in_features, scheme.a_group_size, f"{rs.name} {scheme.name}")


def run_fit(cfg: FitConfig, *, resume: bool = False) -> FitResult:
    """Run the whole job described by ``cfg`` and return its measurements.

    With ``cfg.distributed`` above one process this starts (or joins) the process group first;
    every rank returns the same result.
    """
    methods = run_order(cfg.methods)  # unknown method names fail before any loading
    for name in sorted(cfg.perplexity_method_names()):
        get_method(name)
    target = TARGETS[cfg.target]
    reported = {*baselines(cfg.methods), *cfg.methods}
    launch(cfg.distributed, "cpu" if cfg.model.device == "cpu" else "gpu")
    torch.manual_seed(cfg.seed)
    timer = Timer()
    with timer.stage("load model"):
        model, tokenizer = load_model(
            cfg.model.name, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
            device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
    check_context_length(model, cfg.data.seq_len)
    fingerprint = model_fingerprint(model)  # of the model as loaded, before any R1
    residual_kind = None  # the kind of R1 applied (hadamard falls back to random if it must)
    if cfg.residual_rotation:
        with timer.stage("residual rotation"):
            residual_kind = rotate_residual(model, seed=cfg.seed,
                                            kind=cfg.rotation.residual_kind).kind
    sites = with_dense_rotations(with_rotation_blocks(
        resolve_sites(model, cfg.layers, residual_kind=residual_kind),
        cfg.rotation.block_size), target.dense_rotation)
    _check_sites(sites, cfg)
    with timer.stage("load data"):
        splits, windows = split_windows(tokenizer, cfg.data, cfg.seed)
    schemes = tuple(target.scheme(get_scheme(name)) for name in cfg.schemes)
    head_rotations: dict[str, torch.Tensor] = {}
    if cfg.head_rotation.learn:
        with timer.stage("head rotations"):
            head_rotations = learn_head_rotations(
                model, sites, windows, cfg.head_rotation,
                target.scheme(get_scheme(cfg.head_rotation.scheme or cfg.schemes[0])),
                train_tokens=cfg.data.train_tokens, seed=cfg.seed,
                log_bound=cfg.train.log_bound)
    data = _calibrate(model, sites, windows, cfg, timer)
    float_ppl = None
    if cfg.perplexity:
        with timer.stage("float perplexity"):
            float_ppl = perplexity(model, windows["evaluation"], desc="float ppl")
    across: dict[str, object] = {}  # work every scheme shares (SchemeContext.shared)
    contexts = [SchemeContext(scheme, model, sites, data, windows, cfg, timer, resume, schemes,
                              across) for scheme in schemes]
    results = [_fit_scheme(ctx, methods, reported) for ctx in contexts]
    _measure(contexts, results, timer)
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
        head_rotations=head_rotations,
    )
