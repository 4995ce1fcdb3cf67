"""Held-out layer error per kind of site (qkv, o_proj, gate_up, down_proj), side by side for runs.

    python bench/site_kinds.py RUN_DIR [RUN_DIR ...] [--scheme w4a4] [--methods M ...]

Each RUN_DIR is a ``train/fit_scales.py`` output folder (its report.json). The mean over a run's
sites hides where the error is: with ``--layers all`` down_proj's errors are ten times the other
sites', so two runs with the same mean can differ several-fold at the sites that read the residual
stream. Prints, per method and site kind, the mean held-out MSE and mean relative error
‖Y−Ŷ‖²/‖Y‖² over the layers, one column per run (docs/whole_model.md: rotation placement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def kind_means(layers: dict[str, dict[str, dict[str, float]]], method: str
               ) -> dict[str, tuple[float, float]]:
    """Site kind (the last part of the site name) → (mean MSE, mean relative error)."""
    kinds: dict[str, list[dict[str, float]]] = {}
    for site, methods in layers.items():
        if method in methods:
            kinds.setdefault(site.rsplit(".", 1)[-1], []).append(methods[method])
    return {k: (statistics.fmean(e["mse"] for e in v), statistics.fmean(e["relative"] for e in v))
            for k, v in kinds.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--scheme", default=None, help="scheme (default: the first run's first)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method of run 1")
    args = p.parse_args(argv)
    reports = [json.loads((run / "report.json").read_text()) for run in args.runs]
    scheme = args.scheme or next(iter(reports[0]["schemes"]))
    if any(scheme not in r["schemes"] for r in reports):
        print(f"error: not every run has scheme {scheme!r}", file=sys.stderr)
        return 2
    layers = [r["schemes"][scheme]["layers"] for r in reports]
    methods = args.methods or list(reports[0]["schemes"][scheme]["summary"])
    names = [run.name for run in args.runs]
    print(f"{scheme}: mean held-out MSE (relative error) per site kind")
    print("| method | site | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for method in methods:
        means = [kind_means(lay, method) for lay in layers]
        for kind in next((m for m in means if m), {}):  # a method some runs lack: "-" there
            cells = [f"{m[kind][0]:.4g} ({m[kind][1]:.4f})" if kind in m else "-" for m in means]
            print(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
