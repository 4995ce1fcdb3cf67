"""Wall time of the fit_scales job ÷ one plain forward pass over the same calibration tokens.

    python bench/bench_fit.py [--config configs/default.yaml] [--device cuda] [--no-perplexity]

Both are measured in this one process on this machine, so the ratio is comparable across
machines; the per-stage breakdown shows where the time goes. The forward pass is timed three
times before the job and three times after it, and the ratio uses the median of the six: a single
pass moved by 15 % between runs on a shared 2-core CPU, which moved the ratio as much as any
lever. The job's report is written to --output-dir exactly as ``train/fit_scales.py`` writes it,
so one run gives both the timing and the numbers it timed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from machine import describe  # bench/machine.py (scripts run from bench/)

from smoothrot.allocator import tune_allocator
from smoothrot.calibrate.capture import batch_size, run_model
from smoothrot.data.splits import split_windows
from smoothrot.job import run_fit
from smoothrot.models import load_model
from smoothrot.progress import quiet_libraries
from smoothrot.report import summary_table, write_outputs
from smoothrot.schema.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def forward_times(model: torch.nn.Module, calib: torch.Tensor, seq_len: int,
                  repeats: int = 3) -> list[float]:
    """Seconds of ``repeats`` plain forward passes over ``calib``, as calibration batches it.
    The model stays loaded through the job for the passes after it (one more copy in memory)."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run_model(model, calib, batch_size(seq_len), "forward")
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--device", help="model.device (default: the config's)")
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument("--output-dir", default="outputs/bench_fit")
    args = p.parse_args()
    # As the CLIs do (before anything is allocated): the forward passes and the job share it.
    tune_allocator()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config)
    cfg.output_dir = args.output_dir
    cfg.perplexity = not args.no_perplexity
    if args.device:
        cfg.model.device = args.device

    model, tok = load_model(cfg.model.name, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
                            device=cfg.model.device)
    calib = split_windows(tok, cfg.data, cfg.seed, ["calibration"])[1]["calibration"]
    run_model(model, calib[:1], 1, "warm-up")
    before = forward_times(model, calib, cfg.data.seq_len)

    start = time.perf_counter()
    with quiet_libraries(quiet=False, verbose=False):  # no Lightning banner per site, as the CLI
        result = run_fit(cfg)
    total = time.perf_counter() - start
    after = forward_times(model, calib, cfg.data.seq_len)
    forward = statistics.median(before + after)
    paths = write_outputs(result, Path(args.output_dir))
    print(summary_table(result))
    print(f"report: {paths['report_md']}")
    print(f"machine: {describe(cfg.model.device)}")
    print(f"calibration tokens: {calib.numel()}; schemes {cfg.schemes}; sites {len(result.sites)}")
    passes = " ".join(f"{t:.1f}" for t in before) + " / " + " ".join(f"{t:.1f}" for t in after)
    print(f"one plain forward pass over the calibration tokens: {forward:.1f} s (median of "
          f"{passes} s before / after the job)")
    print(f"fit_scales job: {total:.1f} s  ->  ratio {total / forward:.1f}x")
    for stage, seconds in result.timings.items():
        print(f"  {stage:<28}{seconds:8.1f} s  {seconds / forward:6.1f}x")


if __name__ == "__main__":
    main()
