"""Reports: report.md, report.json, PNG plots, scales.safetensors and the terminal summary.

Every number here was measured on held-out tokens (layer errors) or on the disjoint evaluation
text (perplexity); "% vs max" is (method − reference) / reference, negative is better, where the
reference is SmoothRot-max, or SmoothRot-max + GPTQ for a GPTQ row when that was run (the same
weight rounding on both sides: :func:`reference`). Each method row names its weight quantizer
(RTN or GPTQ, and the scheme's weight format), and runs with several schemes
(``--schemes w4a4 nvfp4``) get one side-by-side table.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from smoothrot.io.atomic import atomic_write, write_json, write_text
from smoothrot.io.scales_file import ScalesEntry, fit_settings, write_scales_file
from smoothrot.job import FitResult, SchemeResult
from smoothrot.methods.registry import BASELINE, GPTQ_BASELINE, get_method
from smoothrot.schema.config import config_to_dict
from smoothrot.schema.quant import QuantScheme, get_scheme
from smoothrot.schema.target import TARGETS


def label(method: str) -> str:
    """The method's name in tables (from the registry)."""
    return get_method(method).label


def _weight_format(scheme: QuantScheme) -> str:
    if scheme.w_format == "nvfp4":
        return "NVFP4 (E2M1, E4M3 scale per 16, FP32 global)"
    if scheme.w_format == "mxfp4":
        return "MXFP4 (E2M1, E8M0 scale per 32)"
    group = "per-channel" if scheme.w_group_size is None else f"group {scheme.w_group_size}"
    sym = "sym" if scheme.w_symmetric else "asym"
    mse = ", MSE clip" if scheme.w_mse_clip else ""
    return f"int{scheme.w_bits} {sym} {group}{mse}"


def weight_quantizer_label(scheme_name: str, method: str) -> str:
    """How a method's weights were rounded under a scheme, e.g. ``GPTQ, int4 sym per-channel``."""
    rounding = get_method(method).rounding.upper()
    return f"{rounding}, {_weight_format(get_scheme(scheme_name))}"


def reference(method: str, methods: Collection[str]) -> str:
    """The method a row's % is against: a GPTQ row is compared with SmoothRot-max + GPTQ when
    that ran (else GPTQ's own gain would be credited to the scales); every other row, and
    SmoothRot-max + GPTQ itself (GPTQ's gain), with SmoothRot-max. The job always runs
    SmoothRot-max + GPTQ beside a GPTQ method (registry.baselines)."""
    if get_method(method).rounding == "gptq" and method != GPTQ_BASELINE \
            and GPTQ_BASELINE in methods:
        return GPTQ_BASELINE
    return BASELINE


def comparison_note(methods: Collection[str], gptq_target: str = "layer") -> str:
    """One sentence saying what each row's % is against (for tables with GPTQ rows), and with
    ``gptq_target`` "model" what a + GPTQ row's held-out MSE does not see."""
    if not any(get_method(m).rounding == "gptq" for m in methods):
        return "% vs max: against SmoothRot-max."
    if GPTQ_BASELINE in methods:
        note = ("% vs max: each + GPTQ row against SmoothRot-max + GPTQ (same weight rounding), "
                "SmoothRot-max + GPTQ and the RTN rows against SmoothRot-max.")
    else:
        note = ("% vs max: against SmoothRot-max, also for the + GPTQ rows (smoothrot_max+gptq "
                "is missing from this result), which credits GPTQ's own gain to them.")
    if gptq_target == "model":
        note += (" GPTQ rounded each site toward the float model's output (gptq.target: model), "
                 "making up for upstream error; a + GPTQ row's held-out MSE is measured on the "
                 "float model's inputs, where there is none to make up for, so perplexity is "
                 "its measure.")
    return note


def shared_note(result: FitResult, sr: SchemeResult) -> str | None:
    """Where ``sr``'s trained scales are the first scheme's (``train.share_across_schemes``),
    one sentence saying so and at how many sites; else None."""
    first = result.schemes[0]
    if not result.config.train.share_across_schemes or sr is first \
            or "trained" not in sr.results or "trained" not in first.results:
        return None
    ours, theirs = sr.results["trained"].plans, first.results["trained"].plans
    same = sum(torch.equal(ours[s].scales, theirs[s].scales) for s in ours)
    return (f"trained: the scales trained under {first.scheme} at {same} of {len(ours)} sites "
            "(better there than this scheme's start on its selection split; "
            "train.share_across_schemes), trained under this scheme at the rest.")


def _pct(value: float, base: float) -> float:
    return 100.0 * (value - base) / base if base > 0 else float("nan")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(sr: SchemeResult) -> dict[str, dict[str, Any]]:
    """Per method: weight quantizer, mean MSE, mean relative error, % vs its reference (of the
    mean and per layer; ``vs`` names the reference, :func:`reference`) and perplexity if
    measured."""
    out = {}
    for method, errs in sr.errors.items():
        vs = reference(method, sr.errors)
        base = sr.errors[vs]
        mse = _mean([e.mse for e in errs.values()])
        out[method] = {
            "weight_quantizer": weight_quantizer_label(sr.scheme, method),
            "mean_mse": mse,
            "mean_relative": _mean([e.relative for e in errs.values()]),
            "vs": vs,
            "pct_vs_max": _pct(mse, _mean([e.mse for e in base.values()])),
            "mean_layer_pct_vs_max": _mean([_pct(errs[s].mse, base[s].mse) for s in errs]),
        }
        if method in sr.perplexity:
            out[method]["perplexity"] = sr.perplexity[method]
    return out


def to_json(result: FitResult) -> dict[str, Any]:
    """The machine-readable report."""
    schemes = {}
    for sr in result.schemes:
        schemes[sr.scheme] = {
            "summary": summarize(sr),
            "perplexity": sr.perplexity,
            "choices": {m: {s: {"alpha": c.alpha, "q": c.q} for s, c in ch.items()}
                        for m, ch in sr.choices.items()},
            "layers": {
                s: {
                    m: {"mse": sr.errors[m][s].mse, "relative": sr.errors[m][s].relative,
                        "pct_vs_max": _pct(sr.errors[m][s].mse,
                                           sr.errors[reference(m, sr.errors)][s].mse)}
                    for m in sr.errors
                }
                for s in result.sites
            },
            "selection_loss": sr.selection_loss,
            "act_clips": sr.act_clips,
        }
    return {
        "model": result.model_name,
        "model_fingerprint": result.model_fingerprint,
        "sites": result.sites,
        "tokens": result.tokens,
        "data_hash": result.data_hash,
        "target": result.config.target,
        "float_perplexity": result.float_perplexity,
        "schemes": schemes,
        "timings_s": result.timings,
        "config": config_to_dict(result.config),
    }


def side_by_side(result: FitResult) -> dict[str, dict[str, dict[str, Any]]]:
    """method → scheme → summary row, methods in first-seen order (a method a scheme lacks is
    absent from that method's entry)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sr in result.schemes:
        for method, row in summarize(sr).items():
            out.setdefault(method, {})[sr.scheme] = row
    return out


def target_line(result: FitResult) -> str:
    """Which arithmetic the numbers were measured with, and whether a backend reproduces them."""
    target = TARGETS[result.config.target]
    where = ("research figures: only smoothrot.load_pretrained reproduces them"
             if target.act_clips else "what the backend serves")
    return f"{target.name} ({target.label}; {where})"


def _ppl_cell(value: float, width: int) -> str:
    """A perplexity right-aligned in ``width``; a diverged one (≥ 1e5) in 3 significant digits."""
    return (f"{value:.3f}" if value < 1e5 else f"{value:.3g}").rjust(width)


def summary_table(result: FitResult) -> str:
    """A short plain-text table for the terminal."""
    lines = []
    ppl = "" if result.float_perplexity is None else f"   float ppl {result.float_perplexity:.3f}"
    lines.append(f"{result.model_name}: {len(result.sites)} sites{ppl}")
    lines.append(f"target: {target_line(result)}")
    if result.head_rotations:
        lines.append(f"learned per-head rotations R2 in {len(result.head_rotations)} layers, "
                     "under every method")
    # The label column fits the longest label (e.g. "trained (block) + GPTQ") with a gap.
    w = max([20, *(len(label(m)) + 2 for sr in result.schemes for m in sr.results)])
    for sr in result.schemes:
        header = f"{'mean MSE':>12}{'vs max':>9}{'rel err':>10}{'ppl':>10}  weights"
        lines.append(f"\n{sr.scheme.upper():<{w}}{header}")
        for method, row in summarize(sr).items():
            p = _ppl_cell(row["perplexity"], 10) if "perplexity" in row else f"{'-':>10}"
            lines.append(f"{label(method):<{w}}{row['mean_mse']:12.4g}{row['pct_vs_max']:+8.1f}%"
                         f"{row['mean_relative']:10.4f}{p}  {row['weight_quantizer']}")
        lines.append(comparison_note(sr.errors, result.config.gptq.target))
        if shared := shared_note(result, sr):
            lines.append(shared)
    if len(result.schemes) > 1:
        schemes = [sr.scheme for sr in result.schemes]
        lines.append(f"\n{'side by side':<{w}}" + "".join(
            f"{s.upper() + ' MSE':>14}{'ppl':>9}" for s in schemes))
        for method, rows in side_by_side(result).items():
            cells = []
            for s in schemes:
                row = rows.get(s)
                mse = f"{row['mean_mse']:14.4g}" if row else f"{'-':>14}"
                p = _ppl_cell(row["perplexity"], 9) if row and "perplexity" in row else f"{'-':>9}"
                cells.append(mse + p)
            lines.append(f"{label(method):<{w}}" + "".join(cells))
    total = sum(result.timings.values())
    lines.append(f"\ntotal {total:.0f} s")
    return "\n".join(lines)


def to_markdown(result: FitResult, plots: list[str]) -> str:
    """The human-readable report."""
    md = [f"# smoothrot fit report: {result.model_name}", ""]
    md.append(f"Sites: {len(result.sites)} ({result.sites[0]} … {result.sites[-1]}). "
              f"Tokens per split: " + ", ".join(f"{k} {v}" for k, v in result.tokens.items()) + ".")
    md.append("Layer errors are measured on held-out tokens (never used for any choice); "
              "α, q and early stopping are chosen on the selection split; perplexity is on the "
              "disjoint evaluation text with every selected site fake-quantized.")
    if (window := result.config.search.alpha_window) is not None:
        md.append(f"The (α, q) grid is searched coarse to fine: q < 1 only at the α's within "
                  f"{window:g} of SmoothRot-max's α (search.alpha_window; null searches it all).")
    md.append(f"\n**Target: {target_line(result)}.** Every number below is computed with this "
              "target's quantizer arithmetic (docs/deployment.md).")
    if result.config.residual_rotation:
        kind = result.config.rotation.residual_kind
        md.append(f"The residual stream is rotated (R1 of kind {kind}, docs/whole_model.md) under "
                  "every method, RTN included; the float perplexity is of the rotated float model "
                  "(R1 is exact)." + (" The residual readers keep their own online Hadamard "
                                      "(placement both)." if kind == "random" else ""))
    if result.head_rotations:
        md.append(f"Learned per-head rotations R2 are folded into v_proj and o_proj of "
                  f"{len(result.head_rotations)} layers (head_rotation.learn, docs/whole_model.md) "
                  "under every method, RTN included; the float model is unchanged (R2 is exact).")
    if result.float_perplexity is not None:
        md.append(f"\nFloat perplexity: **{result.float_perplexity:.3f}**")
    if len(result.schemes) > 1:
        schemes = [sr.scheme.upper() for sr in result.schemes]
        md += ["", "## Schemes side by side", "",
               "Held-out mean MSE (% vs max in that scheme, as in its own table below) and "
               "perplexity.", "",
               "| method | " + " | ".join(f"{s} mean MSE | {s} ppl" for s in schemes) + " |",
               "|---|" + "---:|---:|" * len(schemes)]
        for method, rows in side_by_side(result).items():
            cells = []
            for sr in result.schemes:
                row = rows.get(sr.scheme)
                cells.append("- | -" if row is None else
                             f"{row['mean_mse']:.5g} ({row['pct_vs_max']:+.1f}%) | "
                             + (f"{row['perplexity']:.3f}" if "perplexity" in row else "-"))
            md.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    for sr in result.schemes:
        md += ["", f"## {sr.scheme.upper()}", "",
               "| method | weights | mean MSE | % vs max | mean of per-layer % "
               "| mean rel. error | perplexity |",
               "|---|---|---:|---:|---:|---:|---:|"]
        for method, row in summarize(sr).items():
            p = f"{row['perplexity']:.3f}" if "perplexity" in row else "-"
            md.append(f"| {label(method)} | {row['weight_quantizer']} | {row['mean_mse']:.5g} | "
                      f"{row['pct_vs_max']:+.1f}% | {row['mean_layer_pct_vs_max']:+.1f}% | "
                      f"{row['mean_relative']:.4f} | {p} |")
        md += ["", comparison_note(sr.errors, result.config.gptq.target)]
        if shared := shared_note(result, sr):
            md.append(shared)
        # Choices that are one (α, q) for every site (per-site ones: report.json "choices").
        glob = {m: next(iter(c.values())) for m, c in sr.choices.items()
                if len(set(c.values())) == 1}
        if glob:
            md.append("")
            md.append("Global choices: " + "; ".join(
                f"{label(m)} α={c.alpha:g}, q={c.q:g}" for m, c in glob.items()))
        if len(result.config.search.act_clips) > 1:
            md += ["", "Activation clip ratios chosen per site on the selection split "
                   "(median, min–max): " + "; ".join(
                       f"{label(m)} {statistics.median(c.values()):g} ({min(c.values()):g}–"
                       f"{max(c.values()):g})" for m, c in sr.act_clips.items()
                       if m in sr.errors)]
        methods = list(sr.errors)
        md += ["", "Per-layer held-out MSE (last column: trained vs SmoothRot-max):", "",
               "| layer | " + " | ".join(label(m) for m in methods) + " | joint α, q | Δ |",
               "|---|" + "---:|" * (len(methods) + 2)]
        for s in result.sites:
            cells = " | ".join(f"{sr.errors[m][s].mse:.4g}" for m in methods)
            c = sr.choices.get("joint", {}).get(s)
            choice = f"{c.alpha:g}, {c.q:g}" if c else "-"
            best = "trained" if "trained" in sr.errors else methods[-1]
            delta = _pct(sr.errors[best][s].mse, sr.errors[BASELINE][s].mse)
            md.append(f"| {s} | {cells} | {choice} | {delta:+.1f}% |")
    md += ["", "## Timings", "", "| stage | seconds |", "|---|---:|"]
    md += [f"| {k} | {v:.1f} |" for k, v in result.timings.items()]
    md.append(f"| total | {sum(result.timings.values()):.1f} |")
    if plots:
        md += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(md) + "\n"


def plot(result: FitResult, out: Path) -> list[str]:
    """Per-layer error by method and scale distributions, one PNG each per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files.append(str(path))

    files: list[str] = []
    x = list(range(len(result.sites)))
    for sr in result.schemes:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for method, errs in sr.errors.items():
            ax.plot(x, [errs[s].mse for s in result.sites], marker="o", ms=3, label=label(method))
        finish(fig, ax, "site (layer index order)", "held-out output MSE",
               f"{result.model_name} {sr.scheme.upper()}: per-layer error by method",
               out / f"layer_error_{sr.scheme}.png")

        fig, ax = plt.subplots(figsize=(8, 4))
        for method, per_site in sr.scales.items():
            vals = torch.cat([v.double().log10() for v in per_site.values()])
            ax.hist(vals.numpy(), bins=80, histtype="step", label=label(method))
        finish(fig, ax, "log10 s (all channels of all sites)", "channels",
               f"{sr.scheme.upper()}: scale distributions", out / f"scales_{sr.scheme}.png")
    return files


def save_scales(result: FitResult, path: Path) -> None:
    """Every method's plans (scales, rotation, activation clip) as a scales file
    (io/scales_file.py). A method whose plans carry offline-rounded weights (GPTQ) is left out:
    the file cannot hold them, and its scales alone would export another model."""
    entries = [
        ScalesEntry(sr.scheme, method, site, plan.scales, plan.rotation, plan.act_clip)
        for sr in result.schemes for method, plans in sr.plans.items()
        if all(plan.weight_q is None for plan in plans.values())
        for site, plan in plans.items()
    ]
    write_scales_file(path, entries, model=result.model_name,
                      model_fingerprint=result.model_fingerprint, sites=result.sites,
                      fit=fit_settings(result.config), head_rotations=result.head_rotations)


def write_outputs(result: FitResult, out: Path) -> dict[str, str]:
    """Write every output file (atomically) and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(result, out)
    paths = {"report_md": out / "report.md", "report_json": out / "report.json",
             "scales": out / "scales.safetensors"}
    write_json(paths["report_json"], to_json(result))
    write_text(paths["report_md"], to_markdown(result, plots))
    save_scales(result, paths["scales"])
    return {k: str(v) for k, v in paths.items()} | {"plots": ", ".join(plots)}
