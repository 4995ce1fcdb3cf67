"""Importing smoothrot pins MKL's code branch (``MKL_CBWR``) unless the user chose one: without
it a run's W4A4 figures depended on what the process had done before (its --methods list;
docs/whole_model.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _cbwr_after_import(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if env_value is not None:
        env["MKL_CBWR"] = env_value
    code = "import os, smoothrot; print(os.environ.get('MKL_CBWR'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(("given", "expected"), [(None, "AUTO,STRICT"),
                                                 ("COMPATIBLE", "COMPATIBLE")])
def test_import_pins_the_mkl_branch_unless_the_user_chose_one(given, expected) -> None:
    assert _cbwr_after_import(given) == expected
