"""``perplexity_methods``: which reported methods get a perplexity (the job's largest fixed
cost), the others keep their held-out errors."""

from __future__ import annotations

import json

import pytest
import torch

from smoothrot.surgery.hooks import IntegerForward
from tests.unit.test_bad_inputs import small_config, tiny_model  # noqa: F401 (fixture)
from train.fit_scales import main


def test_only_the_listed_methods_get_a_perplexity(tmp_path, tiny_model) -> None:  # noqa: F811
    config = small_config(tmp_path, tiny_model, methods=["hadamard", "smoothrot_max", "joint"],
                          perplexity=True, perplexity_methods=["hadamard"])
    assert main(["--config", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    scheme = report["schemes"]["w4a4"]
    assert set(scheme["perplexity"]) == {"hadamard"}
    assert scheme["perplexity"]["hadamard"] > 1 and report["float_perplexity"] > 1
    assert {"hadamard", "smoothrot_max", "joint"} <= set(scheme["summary"])  # errors for all
    assert all(row["mean_mse"] > 0 for row in scheme["summary"].values())


def test_unknown_names_fail_before_the_model_loads(capsys, tmp_path, tiny_model) -> None:  # noqa: F811
    """A filter over the reported methods (``--methods`` may narrow a config that lists more),
    but a name no method has is a typo: one line, before anything loads."""
    config = small_config(tmp_path, tiny_model, perplexity=True, perplexity_methods=["trianed"])
    capsys.readouterr()
    assert main(["--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'trianed'") and err.count("\n") == 1
    assert not (tmp_path / "out" / "report.json").exists()
    narrowed = small_config(tmp_path, tiny_model, perplexity=True,
                            perplexity_methods=["trained", "smoothrot_max"])
    assert main(["--config", str(narrowed), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["schemes"]["w4a4"]["perplexity"]) == {"smoothrot_max"}


def test_a_mapping_chooses_per_scheme(tmp_path, tiny_model) -> None:  # noqa: F811
    """``{scheme: [methods]}``: each scheme its own list; a scheme it does not name gets every
    reported method; a key that is no scheme fails in one line before anything loads."""
    config = small_config(tmp_path, tiny_model, schemes=["w4a4", "w8a8", "w4a4-mse"],
                          methods=["hadamard", "smoothrot_max"], perplexity=True,
                          perplexity_methods={"w4a4": ["hadamard"], "w8a8": ["smoothrot_max"]})
    assert main(["--config", str(config), "--quiet"]) == 0
    ppl = {name: scheme["perplexity"] for name, scheme in
           json.loads((tmp_path / "out" / "report.json").read_text())["schemes"].items()}
    assert set(ppl["w4a4"]) == {"hadamard"} and set(ppl["w8a8"]) == {"smoothrot_max"}
    assert set(ppl["w4a4-mse"]) == {"hadamard", "smoothrot_max"}
    assert all(v > 1 for p in ppl.values() for v in p.values())


def test_a_mapping_with_a_bad_key_or_value_fails_in_one_line(capsys, tmp_path,
                                                            tiny_model) -> None:  # noqa: F811
    for bad, message in (({"w4a5": ["trained"]}, "perplexity_methods: unknown scheme 'w4a5'"),
                         ({"w4a4": "trained"}, "must be null, a list of method names or a "),
                         ({"w4a4": ["trianed"]}, "unknown method 'trianed'")):
        config = small_config(tmp_path, tiny_model, perplexity=True, perplexity_methods=bad)
        capsys.readouterr()
        assert main(["--config", str(config), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize(("target", "integer"), [("vllm", True), ("compressed-tensors", False)])
def test_perplexity_in_the_targets_gemm_arithmetic(tmp_path, tiny_model, monkeypatch,  # noqa: F811
                                                   target: str, integer: bool) -> None:
    """vLLM's integer kernels: each quantized linear of a perplexity pass runs as an int8 GEMM
    of the codes (IntegerForward); compressed-tensors' forward multiplies the dequantized float
    tensors (the pre-hook path)."""
    calls: list[int] = []
    original = IntegerForward.__call__

    def counted(self: IntegerForward, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[-1])
        return original(self, x)

    monkeypatch.setattr(IntegerForward, "__call__", counted)
    config = small_config(tmp_path, tiny_model, methods=["hadamard"], perplexity=True,
                          target=target)
    assert main(["--config", str(config), "--quiet"]) == 0
    ppl = json.loads((tmp_path / "out" / "report.json").read_text())["schemes"]["w4a4"]
    assert ppl["perplexity"]["hadamard"] > 1
    assert bool(calls) is integer
