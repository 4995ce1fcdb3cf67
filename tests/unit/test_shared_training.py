"""``train.share_across_schemes``: a later scheme reuses the first scheme's trained scales where
they beat its own starting point on its selection loss, and trains the other sites."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_bad_inputs import small_config, tiny_model  # noqa: F401 (fixture)
from train.fit_scales import main


def _trained(tmp_path, model, share: bool, caplog) -> tuple[dict, list[str]]:
    config = small_config(tmp_path, model, layers=["all"], schemes=["w4a4", "w8a8"],
                          methods=["trained"],
                          train={"steps": 4, "batch_tokens": 32, "val_every": 2,
                                 "share_across_schemes": share})
    with caplog.at_level("INFO", logger="smoothrot.methods.trained"):
        assert main(["--config", str(config), "--quiet"]) == 0
    scales = load_file(tmp_path / "out" / "scales.safetensors")
    sites = sorted(k.removeprefix("w4a4/trained/") for k in scales if k.startswith("w4a4/trained/"))
    return scales, sites


@pytest.mark.parametrize("share", [False, True])
def test_later_scheme_reuses_the_first_schemes_trained_scales(tmp_path, tiny_model,  # noqa: F811
                                                              caplog, share):
    scales, sites = _trained(tmp_path, tiny_model, share, caplog)
    same = [s for s in sites
            if torch.equal(scales[f"w4a4/trained/{s}"], scales[f"w8a8/trained/{s}"])]
    logged = [r.getMessage() for r in caplog.records if "reused at" in r.getMessage()]
    report = (tmp_path / "out" / "report.md").read_text()
    if not share:
        assert same == [] and logged == []  # each scheme trains its own
        assert "share_across_schemes" not in report
        return
    (message,) = logged
    reused, total = map(int, re.search(r"reused at (\d+) of (\d+) sites", message).groups())
    assert total == len(sites) and reused == len(same) and reused >= 1, message
    # The report says which scales the W8A8 row carries.
    assert f"trained: the scales trained under w4a4 at {reused} of {total} sites" in report
