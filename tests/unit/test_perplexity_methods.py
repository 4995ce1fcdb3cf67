"""``perplexity_methods``: which reported methods get a perplexity (the job's largest fixed
cost), the others keep their held-out errors."""

from __future__ import annotations

import json

import pytest

from smoothrot.schema.config import FitConfig
from smoothrot.schema.errors import ConfigError
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


def test_a_method_that_is_not_reported_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"perplexity_methods \['trained'\]"):
        FitConfig(methods=["hadamard"], perplexity_methods=["trained"])
    FitConfig(methods=["hadamard"], perplexity_methods=["smoothrot_max"])  # the baseline reports
