"""Mean and spread over seeds of fit_scales runs: the README's headline table.

    python bench/seeds.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is the output folder of one ``train/fit_scales.py --seed N`` run (its report.json); the
runs must share everything but the seed and the list of methods (methods are fitted independently of
each other); the table has the methods every run reports. Prints a markdown table: per scheme and
method, the held-out MSE and its % vs the row's reference, and the perplexity with its % vs the same
seed's float perplexity (each seed splits the text anew, so the evaluation text differs), as mean ±
sample standard deviation over the runs. A difference smaller than the spread is noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from smoothrot.methods.registry import get_method


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"train.lr": 0.08, ...}``: nested config sections as dotted keys."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {spread:{fmt.lstrip('+')}}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "report.json").is_file()]
    if missing:
        print(f"error: no report.json in {', '.join(missing)}; pass the output folders of "
              "fit_scales runs", file=sys.stderr)
        return 2
    reports = [json.loads((run / "report.json").read_text()) for run in args.runs]
    free = ("seed", "output_dir", "methods", "perplexity_methods")
    configs = [_flat({k: v for k, v in r["config"].items() if k not in free}) for r in reports]
    # A key some run lacks was added to the config schema after that run (its default then).
    shared = set.intersection(*(set(c) for c in configs))
    if any({k: c[k] for k in shared} != {k: configs[0][k] for k in shared} for c in configs):
        print("error: the runs differ in more than the seed and the methods; compare runs of "
              "one config", file=sys.stderr)
        return 2
    seeds = [r["config"]["seed"] for r in reports]
    floats = [r["float_perplexity"] for r in reports if r["float_perplexity"] is not None]
    print(f"seeds {seeds}; target {reports[0]['target']}; float ppl {_cell(floats, '.3f')}")
    schemes = list(reports[0]["schemes"])
    print("| method | " + " | ".join(f"{s.upper()} held-out MSE | vs max | ppl" for s in schemes)
          + " |")
    print("|---|" + "---:|---:|---:|" * len(schemes))
    for method in reports[0]["schemes"][schemes[0]]["summary"]:
        if any(method not in r["schemes"][s]["summary"] for r in reports for s in schemes):
            continue  # not run with every seed
        cells = []
        for scheme in schemes:
            rows = [r["schemes"][scheme]["summary"][method] for r in reports]
            mse = [row["mean_mse"] for row in rows]
            pct = [row["pct_vs_max"] for row in rows]
            ppl = [row["perplexity"] for row in rows if "perplexity" in row]
            # Each seed evaluates on its own text: the float model of that seed is the yardstick.
            vs_float = [100 * (row["perplexity"] / r["float_perplexity"] - 1)
                        for row, r in zip(rows, reports, strict=True) if "perplexity" in row]
            digits = ".3g" if statistics.fmean(mse) < 1 else ".3f"
            ppl_cell = _cell(ppl, ".3f") if not ppl else (
                f"{_cell(ppl, '.3f')} ({_cell(vs_float, '+.2f')} % vs float)")
            cells += [_cell(mse, digits), _cell(pct, "+.1f") + " %", ppl_cell]
        print(f"| {get_method(method).label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
