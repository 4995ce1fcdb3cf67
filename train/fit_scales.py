"""Fit smoothing scales (SmoothRot-max → quantile → joint → trained) and report held-out errors.

    python train/fit_scales.py --layers down_proj
    python train/fit_scales.py --config configs/quick.yaml --schemes w4a4

Command-line flags override the YAML config (default: configs/default.yaml).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from smoothrot.config import ConfigError, FitConfig, config_from_dict, config_to_dict, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fit SmoothRot smoothing scales (max, quantile, joint, trained) on a model, "
        "report held-out layer errors and perplexity, and save the scales.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    p.add_argument("--layers", nargs="+", help="sites: a name (down_proj), a qualified linear "
                   "name (model.layers.11.mlp.down_proj) or re:<regex>")
    p.add_argument("--model", help="embedded:smollm2, a local HF folder / .gguf file, or a hub id")
    p.add_argument("--gguf-file", help="GGUF file name inside --model's folder")
    p.add_argument("--data", help="pydoc, a local text file, or hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    p.add_argument("--schemes", nargs="+", help="quantization schemes, e.g. w4a4 w8a8")
    p.add_argument("--methods", nargs="+", help="subset of rtn hadamard smoothrot_max quantile "
                   "joint_global joint trained")
    p.add_argument("--steps", type=int, help="training steps per site (0 skips training)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same scales)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--output-dir", help="where report.md/json, plots and scales go")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity evaluation")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted training from the checkpoints in the output dir")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code (off by default)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def resolve_config(args: argparse.Namespace) -> FitConfig:
    """The YAML config with command-line overrides applied (validated once, at the end)."""
    data = config_to_dict(load_config(args.config))
    overrides = {
        ("layers",): args.layers,
        ("model", "name"): args.model,
        ("model", "gguf_file"): args.gguf_file,
        ("model", "device"): args.device,
        ("data", "source"): args.data,
        ("schemes",): args.schemes,
        ("methods",): args.methods,
        ("train", "steps"): args.steps,
        ("seed",): args.seed,
        ("output_dir",): args.output_dir,
    }
    if args.no_perplexity:
        overrides[("perplexity",)] = False
    if args.trust_remote_code:
        overrides[("model", "trust_remote_code")] = True
    for keys, value in overrides.items():
        if value is None:
            continue
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return config_from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore")
    # Imported here, not at the top, so `--help` stays instant; Lightning sets its loggers'
    # levels on import, so quieten them afterwards.
    from smoothrot.pipeline import run_fit
    from smoothrot.report import summary_table, write_outputs

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    try:
        cfg = resolve_config(args)
        result = run_fit(cfg, resume=args.resume)
        paths = write_outputs(result, Path(cfg.output_dir))
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue training from the last checkpoint",
              file=sys.stderr)
        return 130
    print(summary_table(result))
    print(f"report: {paths['report_md']}  scales: {paths['scales']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
