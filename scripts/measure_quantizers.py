"""Measure weight quantizer options and GPTQ variants on a real model (docs/quantizers.md).

    python scripts/measure_quantizers.py weights   # weight-only RTN, every linear of every block
    python scripts/measure_quantizers.py gptq      # down_proj sites: GPTQ variants vs RTN
    python scripts/measure_quantizers.py ppl --config configs/quick.yaml \
        --scales outputs/issue7_quick/scales.safetensors --evaluation-samples 64

``weights``: perplexity on the evaluation split with every linear of every decoder block
fake-quantized (weights only, no transform): per-channel vs group size, symmetric vs asymmetric,
MSE clip search, NVFP4 / MXFP4 weights.

``gptq``: for each site, the fused weight W·diag(s)·H (s: max policy with --alpha, or s = 1 with
--alpha -1) rounded by RTN and by GPTQ variants (inputs X' or Q_a(X'), act-order or not, static
or dynamic groups, damping, calibration tokens); output error of Q_a(X')·Ŵᵀ on the selection
split (what a choice may look at) and on held-out tokens (what is reported).

``ppl``: re-evaluate a finished fit_scales run on a larger evaluation sample: its trained scales
(``--scales``) with RTN weights vs with the pipeline's GPTQ (same config, so the same calibration
and selection tokens and the same selected damping), perplexity on ``--evaluation-samples``
windows of the evaluation split. Writes JSON and a Markdown table to --output-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from smoothrot.arch.sites import resolve_sites
from smoothrot.calibrate.capture import capture_sites, run_model, token_subset
from smoothrot.core.policies import smoothing_scales
from smoothrot.core.quantizers import quantize_weight_spec
from smoothrot.core.stats import weight_absmax
from smoothrot.core.transform import transform_weight
from smoothrot.data.splits import split_windows
from smoothrot.evaluate import layer_error, perplexity
from smoothrot.methods.gptq import gptq_fused_weight, gptq_fused_weight_selected
from smoothrot.models import load_model
from smoothrot.schema.config import DataConfig, load_config
from smoothrot.schema.quant import QuantScheme, get_scheme

log = logging.getLogger("measure_quantizers")


def _w4(name: str, **kw: object) -> QuantScheme:
    return QuantScheme(name, w_bits=4, a_bits=4, **kw)  # type: ignore[arg-type]


WEIGHT_SCHEMES = [
    _w4("int4 per-channel"),
    _w4("int4 per-channel mse", w_mse_clip=True),
    _w4("int4 per-channel asym", w_symmetric=False),
    _w4("int4 g128", w_group_size=128),
    _w4("int4 g128 mse", w_group_size=128, w_mse_clip=True),
    _w4("int4 g128 asym", w_group_size=128, w_symmetric=False),
    _w4("int4 g128 asym mse", w_group_size=128, w_symmetric=False, w_mse_clip=True),
    _w4("int4 g64", w_group_size=64),
    _w4("int4 g32", w_group_size=32),
    _w4("int4 g32 mse", w_group_size=32, w_mse_clip=True),
    dataclasses.replace(get_scheme("nvfp4"), name="nvfp4 weights"),
    dataclasses.replace(get_scheme("nvfp4"), name="nvfp4 weights mse", w_mse_clip=True),
    dataclasses.replace(get_scheme("mxfp4"), name="mxfp4 weights"),
    dataclasses.replace(get_scheme("mxfp4"), name="mxfp4 weights mse", w_mse_clip=True),
    QuantScheme("int8 per-channel", w_bits=8, a_bits=8),
]

# (label, gptq kwargs, act_aware, calibration tokens)
GPTQ_VARIANTS = [
    ("gptq", {}, False, 4096),
    ("gptq Q_a(X') inputs", {}, True, 4096),
    ("gptq natural order, static groups", {"act_order": False, "static_groups": True}, False,
     4096),
    ("gptq natural order, dynamic groups", {"act_order": False}, False, 4096),
    ("gptq damp 0.1", {"damp": 0.1}, False, 4096),
    ("gptq 1024 tokens", {}, False, 1024),
    ("gptq 1024 tokens damp 0.1", {"damp": 0.1}, False, 1024),
    ("gptq 1024 tokens damp 1", {"damp": 1.0}, False, 1024),
    ("gptq 1024 tokens damp 3", {"damp": 3.0}, False, 1024),
    ("gptq 1024 tokens damp 10", {"damp": 10.0}, False, 1024),
    ("gptq damp 1", {"damp": 1.0}, False, 4096),
]


def measure_weights(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perplexity with every decoder-block linear weight-quantized by each scheme."""
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    saved = [m.weight.detach().clone() for m in linears]
    out = {"float": perplexity(model, windows["evaluation"], desc="float")}
    log.info("float ppl %.3f (%d linears)", out["float"], len(linears))
    for scheme in WEIGHT_SCHEMES:
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for m in linears:
                    m.weight.copy_(quantize_weight_spec(m.weight, scheme))
            out[scheme.name] = perplexity(model, windows["evaluation"], desc=scheme.name)
        finally:
            with torch.no_grad():
                for m, w in zip(linears, saved, strict=True):
                    m.weight.copy_(w)
        log.info("%-24s ppl %.3f (%.0f s)", scheme.name, out[scheme.name],
                 time.perf_counter() - start)
    return out


def measure_gptq(model, windows, args) -> dict:
    """Selection and held-out output MSE of RTN and GPTQ variants, per scheme, mean over sites."""
    sites = resolve_sites(model, args.layers)
    variants = [v for v in GPTQ_VARIANTS if not args.variants or v[0] in args.variants]
    calib = windows["calibration"]
    max_tokens = max(v[3] for v in variants)
    keep = token_subset(calib.numel(), max_tokens, args.seed)
    with capture_sites(sites, total_tokens=calib.numel(), keep_index=keep) as cal_rec:
        run_model(model, calib, 8, "calibration")
    with capture_sites(sites, total_tokens=windows["selection"].numel()) as sel_rec:
        run_model(model, windows["selection"], 8, "selection")
    with capture_sites(sites, total_tokens=windows["heldout"].numel()) as ho_rec:
        run_model(model, windows["heldout"], 8, "heldout")
    result: dict = {"sites": [rs.name for rs in sites], "alpha": args.alpha, "schemes": {}}
    for scheme_name in args.schemes:
        scheme = get_scheme(scheme_name)
        rows: dict[str, dict[str, list[float]]] = {}
        seconds: dict[str, float] = {}
        for rs in sites:
            w = rs.weight.detach().float().cpu()
            t = rs.transform  # the site's rotation and (GQA o_proj) scale tying
            x_cal = cal_rec[rs.name].tokens()
            s = None
            if args.alpha >= 0:
                s = smoothing_scales(t.tied_max(x_cal.abs().amax(0)),
                                     t.tied_max(weight_absmax(w)), args.alpha, site=rs.name)
            candidates = {"rtn": quantize_weight_spec(transform_weight(w, s, t), scheme)}
            for label, kw, act_aware, tokens in variants:
                start = time.perf_counter()
                candidates[label] = gptq_fused_weight(w, s, t, x_cal[:tokens], scheme,
                                                      act_aware=act_aware, **kw)
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start
            for label, wq in candidates.items():
                row = rows.setdefault(label, {"selection": [], "heldout": []})
                for split, rec in (("selection", sel_rec), ("heldout", ho_rec)):
                    row[split].append(layer_error(rec[rs.name].tokens(), w, s, t, scheme,
                                                  weight_q=wq).mse)
            log.info("%s %s done", scheme.name, rs.name)
        summary = {}
        for label, row in rows.items():
            summary[label] = {
                split: sum(v) / len(v) for split, v in row.items()
            } | {f"{split}_vs_rtn_pct": 100.0 * (sum(row[split]) / sum(rows["rtn"][split]) - 1)
                 for split in ("selection", "heldout")}
            summary[label]["seconds_per_site"] = seconds.get(label, 0.0) / len(sites)
            summary[label]["sites_not_above_rtn"] = sum(
                a <= b for a, b in zip(row["heldout"], rows["rtn"]["heldout"], strict=True))
        result["schemes"][scheme.name] = {"summary": summary, "per_site": rows}
    return result


def measure_ppl(args) -> tuple[dict, dict[str, torch.Tensor]]:
    """Perplexity of a run's trained scales with RTN vs selected-GPTQ weights, larger eval."""
    from smoothrot.io.scales_file import read_scales_file
    from smoothrot.job import _calibrate  # the run's exact calibration
    from smoothrot.schema.quant import with_act_clip
    from smoothrot.surgery.hooks import transformed
    from smoothrot.surgery.residual import rotate_residual
    from smoothrot.timer import Timer

    cfg = load_config(args.config)
    model, tokenizer = load_model(cfg.model.name)
    residual_kind = None
    if cfg.residual_rotation:  # as the run did (R1 before any site is resolved)
        residual_kind = rotate_residual(model, seed=cfg.seed,
                                        kind=cfg.rotation.residual_kind).kind
    sites = resolve_sites(model, cfg.layers, residual_kind=residual_kind)
    data_cfg = dataclasses.replace(cfg.data, evaluation_samples=args.evaluation_samples)
    _, windows = split_windows(tokenizer, data_cfg, cfg.seed)
    data = _calibrate(model, sites, windows, cfg, Timer())
    stored = read_scales_file(args.scales)
    res: dict = {"float": perplexity(model, windows["evaluation"], desc="float")}
    for scheme_name in args.schemes:
        scheme = get_scheme(scheme_name)
        trained = stored.plans(scheme.name, "trained")  # scales, rotation, act clip per site
        picks = {rs.name: gptq_fused_weight_selected(
            rs.weight.detach().float(), trained[rs.name].scales,
            rs.transform.with_rotation(trained[rs.name].rotation), data[rs.name].train_x,
            data[rs.name].selection_x, with_act_clip(scheme, trained[rs.name].act_clip))
            for rs in sites}
        gptq = {site: dataclasses.replace(plan, weight_q=picks[site].weight_q)
                for site, plan in trained.items()}
        for method, plans in (("trained", trained), ("trained+gptq", gptq)):
            with transformed(sites, plans, scheme):
                res[f"{scheme.name} {method}"] = perplexity(model, windows["evaluation"],
                                                            desc=f"{scheme.name} {method}")
            log.info("%s %s ppl %.3f", scheme.name, method, res[f"{scheme.name} {method}"])
        res[f"{scheme.name} damping"] = [p.damp for p in picks.values()]
    return res, windows


def _markdown_gptq(res: dict) -> str:
    lines = [f"alpha={res['alpha']} (−1: Hadamard only), {len(res['sites'])} sites", ""]
    for scheme, block in res["schemes"].items():
        lines += [f"### {scheme}", "",
                  "| weight rounding | selection MSE | vs RTN | held-out MSE | vs RTN | "
                  "sites ≤ RTN | s/site |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label, r in block["summary"].items():
            lines.append(f"| {label} | {r['selection']:.4g} | {r['selection_vs_rtn_pct']:+.1f}% | "
                         f"{r['heldout']:.4g} | {r['heldout_vs_rtn_pct']:+.1f}% | "
                         f"{r['sites_not_above_rtn']}/{len(res['sites'])} | "
                         f"{r['seconds_per_site']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["weights", "gptq", "ppl"])
    p.add_argument("--config", default="configs/quick.yaml", help="ppl: the run's config")
    p.add_argument("--scales", help="ppl: the run's scales.safetensors")
    p.add_argument("--evaluation-samples", type=int, default=64)
    p.add_argument("--model", default="embedded:smollm2")
    p.add_argument("--layers", nargs="+", default=["down_proj"])
    p.add_argument("--schemes", nargs="+", default=["w4a4", "nvfp4"])
    p.add_argument("--alpha", type=float, default=0.5,
                   help="max-policy smoothing strength for the gptq part; -1 = Hadamard only")
    p.add_argument("--variants", nargs="+", help="subset of GPTQ variant labels (default: all)")
    p.add_argument("--calibration-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/quantizers")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args()
    if args.part == "ppl" and not args.scales:
        p.error("ppl needs --scales, the fit's scales.safetensors (and its --config)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.part == "ppl":
        res, windows = measure_ppl(args)
        md = "| model | perplexity |\n|---|---:|\n" + "\n".join(
            f"| {k} | {v:.3f} |" for k, v in res.items() if isinstance(v, float))
    else:
        model, tokenizer = load_model(args.model)
        data_cfg = DataConfig(calibration_samples=args.calibration_samples)
        _, windows = split_windows(tokenizer, data_cfg, args.seed)
    if args.part == "weights":
        res = measure_weights(model, windows)
        md = "| weights (all block linears) | perplexity |\n|---|---:|\n" + "\n".join(
            f"| {k} | {v:.3f} |" for k, v in res.items())
    elif args.part == "gptq":
        res = measure_gptq(model, windows, args)
        md = _markdown_gptq(res)
    meta = {"model": args.model, "tokens": {k: int(v.numel()) for k, v in windows.items()},
            "seconds": time.perf_counter() - start, "args": vars(args)}
    stem = args.part if not args.tag else f"{args.part}_{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "result": res}, indent=2))
    (out / f"{stem}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
