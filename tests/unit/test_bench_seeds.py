"""bench/seeds.py: the README's headline table is the mean ± sample sd over seed runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "bench" / "seeds.py")
seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeds)


def _run(folder: Path, seed: int, mse: float, ppl: float, float_ppl: float,
         lr: float = 0.08, extra: tuple[str, ...] = ()) -> Path:
    folder.mkdir()
    row = {"mean_mse": mse, "pct_vs_max": 100 * (mse / 2.0 - 1), "perplexity": ppl}
    summary = {"smoothrot_max": {"mean_mse": 2.0, "pct_vs_max": 0.0}, "trained": row,
               **{m: {"mean_mse": 3.0, "pct_vs_max": 50.0} for m in extra}}
    report = {"config": {"seed": seed, "output_dir": str(folder), "train": {"lr": lr},
                         "methods": ["trained", *extra]},
              "target": "vllm", "float_perplexity": float_ppl,
              "schemes": {"w4a4": {"summary": summary}}}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_mean_and_sample_spread_and_perplexity_against_each_seeds_float(tmp_path, capsys) -> None:
    runs = [_run(tmp_path / "a", 0, 1.0, 12.0, 10.0), _run(tmp_path / "b", 1, 1.2, 16.5, 15.0)]
    assert seeds.main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out
    trained = next(line for line in out.splitlines() if line.startswith("| trained"))
    # mse 1.1 ± 0.1414; vs max −45 ± 7.07 %; ppl 14.25 ± 3.18, vs float +20 % and +10 %.
    assert "1.100 ± 0.141" in trained and "-45.0 ± 7.1 %" in trained
    assert "14.250 ± 3.182 (+15.00 ± 7.07 % vs float)" in trained
    assert "seeds [0, 1]" in out and "float ppl 12.500 ± 3.536" in out


def test_a_method_not_run_with_every_seed_is_left_out(tmp_path, capsys) -> None:
    runs = [_run(tmp_path / "a", 0, 1.0, 12.0, 10.0, extra=("hadamard",)),
            _run(tmp_path / "b", 1, 1.2, 16.5, 15.0)]
    assert seeds.main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out
    assert "| trained" in out and "Hadamard" not in out and "hadamard" not in out


def test_a_config_key_added_after_a_run_is_not_compared(tmp_path) -> None:
    runs = [_run(tmp_path / "a", 0, 1.0, 12.0, 10.0), _run(tmp_path / "b", 1, 1.2, 16.5, 15.0)]
    report = json.loads((runs[1] / "report.json").read_text())
    report["config"]["rotation"] = {"residual_kind": "hadamard"}  # a newer schema's key
    (runs[1] / "report.json").write_text(json.dumps(report))
    assert seeds.main([str(r) for r in runs]) == 0


def test_runs_of_different_configs_are_refused(tmp_path, capsys) -> None:
    runs = [_run(tmp_path / "a", 0, 1.0, 12.0, 10.0),
            _run(tmp_path / "b", 1, 1.2, 16.5, 15.0, lr=0.02)]
    assert seeds.main([str(r) for r in runs]) == 2
    assert "differ in more than the seed and the methods" in capsys.readouterr().err


def test_a_folder_without_a_report_is_one_error_line(tmp_path, capsys) -> None:
    runs = [_run(tmp_path / "a", 0, 1.0, 12.0, 10.0), tmp_path / "empty"]
    assert seeds.main([str(r) for r in runs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no report.json in {tmp_path / 'empty'}; pass the output folders of "
                   "fit_scales runs"]
