"""Same seed, same numbers: ``configs/quick.yaml`` (budget cut to three layers) against a stored
reference of the same code path. Written before the package was reorganised; regenerated on
2026-12-01 for changes meant to move the numbers: splits that keep near-duplicate documents
together (issue 17), the cosine training schedule in quick.yaml and the exact int8 GEMM scoring
path (issue 18); on 2026-12-02 for the fused straight-through quantizer (issue 18: its gradient
differs at float32 rounding, which moved only the trained rows, by −1.5 to +1.8 %).

Regenerate (only when a change is *meant* to move the numbers, and say so in the commit):
``python -m tests.integration.test_reference``.

The reference was computed on an AMD EPYC; another CPU's BLAS sums in another order, and each
kind of row amplifies that rounding differently (measured on an Intel Xeon, 2026-12-03, against
this file): the policy rows moved by ≤ 2.3e-4, the GPTQ rows (greedy rounding decisions flip)
by ≤ 4.2e-3, the trained rows (the rounding enters every gradient step) by ≤ 1.5 %. Each kind
is held to a few times its measured spread (:func:`tolerance`); on the reference's own machine
every row agreed within 1e-4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from smoothrot.schema.config import config_from_dict, config_to_dict, load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "tests" / "data" / "quick_reference.json"
# Three down_proj sites (first, middle, last) and the quick budgets; every method, both schemes.
LAYERS = [r"re:model\.layers\.(0|14|29)\.mlp\.down_proj"]


def tolerance(method: str) -> float:
    """Relative tolerance of a row across CPUs (module docstring)."""
    if method.startswith("trained"):
        return 4e-2
    return 1e-2 if method.endswith("+gptq") else 1e-3


def reference_config(output_dir: Path):
    """configs/quick.yaml with three layers, both schemes and every method."""
    data = config_to_dict(load_config(ROOT / "configs" / "quick.yaml"))
    data.update(layers=LAYERS, schemes=["w4a4", "w8a8"], output_dir=str(output_dir))
    data.pop("methods", None)
    return config_from_dict(data)


def method_means(output_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """scheme → method → {mean_mse, perplexity} of a finished run."""
    from smoothrot.job import run_fit
    from smoothrot.report import summarize

    result = run_fit(reference_config(output_dir))
    return {
        sr.scheme: {m: {k: row[k] for k in ("mean_mse", "perplexity") if k in row}
                    for m, row in summarize(sr).items()}
        for sr in result.schemes
    }


def test_quick_config_reproduces_reference(tmp_path):
    expected = json.loads(REFERENCE.read_text())
    got = method_means(tmp_path)
    assert set(got) == set(expected)
    for scheme, methods in expected.items():
        assert set(got[scheme]) == set(methods), scheme
        for method, row in methods.items():
            for key, value in row.items():
                assert math.isclose(got[scheme][method][key], value,
                                    rel_tol=tolerance(method)), (
                    scheme, method, key, got[scheme][method][key], value)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.write_text(json.dumps(method_means(Path(tmp)), indent=1) + "\n")
    print(f"wrote {REFERENCE}")
