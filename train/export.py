"""Export fitted scales as a fused / W8A8 / W4A4 / NVFP4 / MXFP4 checkpoint, and verify one.

    python train/export.py export --scales outputs/fit_scales/scales.safetensors --format w4a4
    python train/export.py verify outputs/fit_scales/export-w4a4

An export loads again with one call: ``smoothrot.load_pretrained(path)``. ``verify`` checks its
stored bytes against the SHA-256 digests written with it, reloads it and compares it with the
original model: logits for ``fused``, the in-memory fake-quant model's logits, bit for bit, for
the quantized formats (limits in docs/equivalence.md). ``--overwrite`` never replaces the run,
the scales, the report or the model the export is made from. ``nvfp4`` also
stores static input scales, calibrated on --samples windows of --data's calibration split.
Exit status 1 if a check fails, 2 on a usage error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from smoothrot.allocator import tune_allocator
from smoothrot.schema.export import (  # torch-free, so --help stays instant
    ACTIVATION_QUANTIZERS,
    EXPORT_DTYPES,
    FORMATS,
    RUNTIMES,
)
from smoothrot.schema.target import TARGETS  # torch-free as well


def load_model(name: str, **kwargs: Any):
    """smoothrot.models.load_model, imported on first use (tests replace this function)."""
    from smoothrot.models import load_model as _load

    return _load(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a fused (float), W8A8, W4A4, NVFP4 or MXFP4 checkpoint from a fit's "
        "scales, or verify one against the original model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="write an export folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--scales", required=True, help="scales.safetensors written by fit_scales")
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--out", help="target folder (default: <scales folder>/export-<format>)")
    e.add_argument("--model", help="the model the scales were fitted on (default: the one "
                   "named in the scales file)")
    e.add_argument("--gguf-file", help="GGUF file name inside --model's folder")
    e.add_argument("--method", default="trained", help="whose scales: trained, joint, "
                   "joint_global, quantile, smoothrot_max, hadamard (none) or rtn (none)")
    e.add_argument("--scheme", help="scheme whose scales to use (default: the format's; for "
                   "fused the run's first scheme)")
    e.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES,
                   help="dtype of the stored float tensors")
    e.add_argument("--report", help="the run's report.json, for provenance (default: next to "
                   "the scales file, if there)")
    e.add_argument("--target", choices=TARGETS,
                   help="deployment target: whose activation arithmetic the export declares "
                   "(default: the fit's, from its report.json, else vllm); "
                   "per-site activation clips need research (smoothrot.load_pretrained only)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --out (never another folder)")
    e.add_argument("--verify", action="store_true", help="verify the export afterwards")
    _verify_options(e)

    v = sub.add_parser("verify", help="reload an export and compare it with the original model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("path", help="export folder")
    v.add_argument("--model", help="the original model (default: the one the export names)")
    v.add_argument("--gguf-file", help="GGUF file name inside --model's folder")
    _verify_options(v)
    return p


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="pydoc", help="text for the check (its evaluation split) "
                   "and for nvfp4's input scales (its calibration split)")
    p.add_argument("--samples", type=int, default=8, help="token windows (per use)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--runtime", default="smoothrot", choices=RUNTIMES,
                   help="who computes the reloaded export: smoothrot.load_pretrained, "
                   "compressed-tensors alone (its forward and transforms, as vLLM's dense path), "
                   "or plain transformers (fails when a rotation must run online)")
    p.add_argument("--activation-quantizer", default="smoothrot", choices=ACTIVATION_QUANTIZERS,
                   help="who quantizes activations of a quantized reload")


def _windows(tokenizer: Any, args: argparse.Namespace, split: str = "evaluation"):
    """--samples token windows of --seq-len from ``split`` of --data (the fit's default split)."""
    from smoothrot.data.sources import load_documents
    from smoothrot.data.splits import split_documents, token_windows
    from smoothrot.schema.config import DataConfig

    splits = split_documents(load_documents(args.data), DataConfig().fractions, 0)
    return token_windows(tokenizer, splits[split], args.samples, args.seq_len, seed=0,
                         split_name=split)


def run_export(args: argparse.Namespace) -> Path:
    from smoothrot.io.from_scales import export_from_scales_file, read_report
    from smoothrot.io.scales_file import read_scales_file
    from smoothrot.io.writer import check_target

    scales = Path(args.scales)
    fitted_on = read_scales_file(scales).model
    report_path = Path(args.report) if args.report else scales.parent / "report.json"
    report = read_report(report_path) if args.report or report_path.is_file() else None
    out = Path(args.out) if args.out else scales.parent / f"export-{args.format}"
    name = args.model or fitted_on
    inputs = {"the scales file's folder": scales.parent, "the report": report_path,
              "the model folder": name}
    check_target(out, args.overwrite, inputs)  # before the model loads
    model, tokenizer = load_model(name, gguf_file=args.gguf_file)
    calibration = _windows(tokenizer, args, "calibration") if args.format == "nvfp4" else None
    path = export_from_scales_file(
        scales, args.format, out, model=model, tokenizer=tokenizer, method=args.method,
        scheme=args.scheme, dtype=args.dtype, overwrite=args.overwrite, report=report,
        calibration=calibration, target=args.target, inputs=inputs,
    )
    print(f"exported {args.format} to {path}; "
          f"load it with smoothrot.load_pretrained({str(path)!r})")
    return path


def run_verify(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from smoothrot.io.metadata import read_metadata
    from smoothrot.io.verify import verify_export

    meta = read_metadata(path)
    name = getattr(args, "model", None) or meta.get("source_model")
    if not name:
        raise ValueError(f"{path} does not name its source model; pass --model")
    model, tokenizer = load_model(name, gguf_file=getattr(args, "gguf_file", None))
    result = verify_export(path, model, _windows(tokenizer, args),
                           activation_quantizer=args.activation_quantizer, runtime=args.runtime)
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()  # process-wide, so here at the edge (smoothrot/allocator.py)
    previous = os.environ.get("TQDM_DISABLE")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when each bar is created
    try:
        return _run(args)
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def _run(args: argparse.Namespace) -> int:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore")
    try:
        if args.command == "export":
            path = run_export(args)
            if args.verify:
                return 0 if run_verify(path, args)["passed"] else 1
            return 0
        return 0 if run_verify(Path(args.path), args)["passed"] else 1
    except (ValueError, OSError, RuntimeError) as exc:  # bad input, full disk, load errors
        if args.verbose:
            raise
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
