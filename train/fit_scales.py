"""Fit smoothing scales (SmoothRot-max → quantile → joint → trained) and report held-out errors.

    python train/fit_scales.py --layers down_proj
    python train/fit_scales.py --config configs/quick.yaml --schemes w4a4

Command-line flags override the YAML config (default: configs/default.yaml). Bad inputs end with
exit code 2 and one ``error: ...`` line on stderr (``--verbose`` shows the traceback instead);
Ctrl-C ends with exit code 130 and ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path

from smoothrot.allocator import tune_allocator
from smoothrot.progress import quiet_libraries
from smoothrot.schema.config import (
    DEFAULT_METHODS,
    FitConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.export import EXPORT_DTYPES
from smoothrot.schema.export import FORMATS as EXPORT_FORMATS
from smoothrot.schema.quant import PRESET_SCHEMES
from smoothrot.schema.target import TARGETS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

EPILOG = """\
examples:
  fit_scales.py --config configs/quick.yaml          a ~1-minute run on the embedded model
  fit_scales.py --layers 're:model\\.layers\\.2[89]\\.mlp\\.down_proj' --schemes w4a4 --steps 10
  fit_scales.py --config configs/quick.yaml --resume  continue after Ctrl-C or a crash

Every config key (meaning, default, valid range) is listed in docs/configuration.md; the
worked example and the report columns are explained in docs/user_guide.md.
exit codes: 0 done, 2 bad input (one 'error:' line on stderr), 130 interrupted (use --resume).
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows real defaults only: a flag left unset keeps the config's value, not 'None'."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fit_scales.py",
        description="Fit SmoothRot smoothing scales (max, quantile, joint, trained) on a model,\n"
        "report held-out layer errors and perplexity, and save the scales.\n"
        "Flags override the values of the YAML config given by --config.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="YAML config file; every key is documented in docs/configuration.md")
    p.add_argument("--layers", nargs="+", help="sites (config: layers): a name (down_proj), a "
                   "qualified linear name (model.layers.11.mlp.down_proj) or re:<regex>")
    p.add_argument("--model", help="model.name: embedded:smollm2, a local HF folder / .gguf "
                   "file, or a hub id")
    p.add_argument("--gguf-file", help="model.gguf_file: GGUF file name inside --model's folder")
    p.add_argument("--data", help="data.source: pydoc, a local text file, or "
                   "hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    p.add_argument("--schemes", nargs="+", help="schemes: quantization schemes, some of "
                   + " ".join(PRESET_SCHEMES))
    p.add_argument("--methods", nargs="+", help="methods: registered method names (default: "
                   + " ".join(DEFAULT_METHODS) + "; smoothrot_max, the baseline, always runs)")
    p.add_argument("--steps", type=int, help="train.steps: training steps per site (0 skips "
                   "training)")
    p.add_argument("--seed", type=int, help="seed: random seed (same seed, same scales)")
    p.add_argument("--device", help="model.device: cpu, cuda, cuda:N or auto")
    p.add_argument("--devices", type=int, help="distributed.devices: processes on this node "
                   "(one per GPU, or CPU processes); above 1 calibration and training run "
                   "data-parallel (docs/distributed.md)")
    p.add_argument("--output-dir", help="output_dir: where report.md/json, plots, "
                   "scales.safetensors and checkpoints/ go; an existing folder is reused and "
                   "its report files are replaced")
    p.add_argument("--no-perplexity", action="store_true",
                   help="perplexity: false; skip the perplexity evaluation")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted training from <output-dir>/checkpoints; finished "
                   "sites are not retrained and the scales equal an uninterrupted run's")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="model.trust_remote_code: allow the model's own Python code (off by "
                   "default; never needed for the supported architectures)")
    p.add_argument("--target", choices=TARGETS, help="target: whose arithmetic every number is "
                   "computed with (vllm, compressed-tensors, research; docs/deployment.md)")
    p.add_argument("--export", nargs="+", choices=EXPORT_FORMATS, metavar="FORMAT",
                   help="export.formats: after the run, write checkpoints (fused, w8a8, w4a4, "
                   "nvfp4, mxfp4) to <output-dir>/export-<format>")
    p.add_argument("--export-dir", help="export.dir: target folder of the (single) format")
    p.add_argument("--export-method", help="export.method: whose plans are exported (default "
                   "trained; GPTQ methods too, e.g. trained+gptq)")
    p.add_argument("--export-scheme", help="export.scheme: the fitted scheme whose plans are "
                   "exported (default the format's own, e.g. w4a4; w4a4-mse into w4a4)")
    p.add_argument("--export-dtype", choices=EXPORT_DTYPES,
                   help="export.dtype: dtype of the exported float tensors")
    p.add_argument("--overwrite", action="store_true",
                   help="export.overwrite: replace earlier exports at the targets (never other "
                   "folders)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="only warnings and errors; no progress bars")
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="debug logging, library warnings, and tracebacks on errors")
    return p


def resolve_config(args: argparse.Namespace) -> FitConfig:
    """The YAML config with command-line overrides applied (validated once, at the end)."""
    data = config_to_dict(load_config(args.config))
    overrides = {
        ("layers",): args.layers,
        ("model", "name"): args.model,
        ("model", "gguf_file"): args.gguf_file,
        ("model", "device"): args.device,
        ("distributed", "devices"): args.devices,
        ("data", "source"): args.data,
        ("schemes",): args.schemes,
        ("methods",): args.methods,
        ("train", "steps"): args.steps,
        ("seed",): args.seed,
        ("output_dir",): args.output_dir,
        ("target",): args.target,
        ("export", "formats"): args.export,
        ("export", "dir"): args.export_dir,
        ("export", "method"): args.export_method,
        ("export", "scheme"): args.export_scheme,
        ("export", "dtype"): args.export_dtype,
    }
    if args.no_perplexity:
        overrides[("perplexity",)] = False
    if args.trust_remote_code:
        overrides[("model", "trust_remote_code")] = True
    if args.overwrite:
        overrides[("export", "overwrite")] = True
    for keys, value in overrides.items():
        if value is None:
            continue
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return config_from_dict(data)


def prepare_output_dir(path: str) -> Path:
    """Create the output folder before any work, so a bad path fails in seconds, not at the end.

    An existing folder is reused: the job replaces its own report files there atomically.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create output dir {out} ({exc.strerror or type(exc).__name__}); pass "
            "--output-dir a writable folder"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output dir {out} is not writable; pass --output-dir a writable folder")
    return out


def lock_output_dir(out: Path) -> AbstractContextManager[object]:
    """One run per output folder: a second concurrent run is refused at once instead of
    interleaving its files with the first's. The launch's rank 0 holds the lock for the run;
    the other ranks of a data-parallel run belong to it."""
    from smoothrot.distributed import launched_as_rank_zero
    from smoothrot.io.lock import folder_lock

    return folder_lock(out) if launched_as_rank_zero() else nullcontext()


def run_exports(cfg: FitConfig, result) -> list[Path]:
    """Write the config's exports from the fitted plans (the model is loaded once more, as the
    fit loaded it; nvfp4's static input scales come from the run's calibration windows)."""
    if not cfg.export.formats:
        return []
    from smoothrot.data.splits import split_windows
    from smoothrot.io.from_fit import export_fit
    from smoothrot.models import load_model

    model, tokenizer = load_model(
        cfg.model.name, gguf_file=cfg.model.gguf_file,
        trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
    )
    calibration = None
    if "nvfp4" in cfg.export.formats:
        _, windows = split_windows(tokenizer, cfg.data, cfg.seed, ["calibration"])
        calibration = windows["calibration"]
    return export_fit(result, model, tokenizer, calibration)


def _one_line(exc: BaseException) -> str:
    """The first line of an error; deep library errors can span many lines."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    more = " (run with --verbose for the details)" if len(lines) > 1 else ""
    return lines[0] + more


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()  # process-wide, so here at the edge (smoothrot/allocator.py)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Progress bars follow the smoothrot logger's level (smoothrot/progress.py); set it here too,
    # since basicConfig is a no-op when the caller configured logging already.
    logging.getLogger("smoothrot").setLevel(level)
    with (warnings.catch_warnings(), quiet_libraries(args.quiet, args.verbose),
          _sigterm_as_interrupt(), ExitStack() as held):
        if not args.verbose:  # third-party chatter only; smoothrot's own warnings stay visible
            warnings.filterwarnings("ignore", module=r"(transformers|torch|lightning|"
                                    r"compressed_tensors|accelerate|huggingface_hub)\b")
        return _run(args, held)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler stopping the job) ends a run as Ctrl-C does: cleanup of
    half-written files, exit code 130 and the --resume hint, instead of an unexplained death.
    Restored after (main() also runs in-process, in tests)."""
    if threading.current_thread() is not threading.main_thread():  # signals need the main one
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, held: ExitStack) -> int:
    """The run, its errors as one line; ``held`` keeps the output folder's lock to the end."""
    # Imported here, not at the top, so `--help` stays instant.
    from smoothrot.distributed import is_rank_zero
    from smoothrot.io.from_fit import check_fit_export
    from smoothrot.job import run_fit
    from smoothrot.report import summary_table, write_outputs

    try:
        cfg = resolve_config(args)
        out = prepare_output_dir(cfg.output_dir)
        held.enter_context(lock_output_dir(out))
        check_fit_export(cfg)  # a doomed export fails now, not after the fit
        result = run_fit(cfg, resume=args.resume)
        if not is_rank_zero():  # every rank holds the result; rank 0 writes and prints it
            return 0
        paths = write_outputs(result, out)
        exported = run_exports(cfg, result)
    # Every error smoothrot raises for a bad input is one of these (ConfigError, ModelLoadError,
    # DataLoadError, HadamardSizeError, ResumeError, ...); FloatingPointError is a perplexity
    # that overflowed. Anything else is a bug and keeps its traceback.
    except (ValueError, OSError, RuntimeError, FloatingPointError) as exc:
        if args.verbose:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue training from the last checkpoint",
              file=sys.stderr)
        return 130
    print(summary_table(result))
    print(f"report: {paths['report_md']}  scales: {paths['scales']}")
    for path in exported:
        print(f"export: {path}  (vLLM, or smoothrot.load_pretrained({str(path)!r}); its "
              "README.md says which loaders apply its rotation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
