"""One embedded SmolLM2 per test session (loading dequantizes the GGUF, ~17 s)."""

import pytest

from smoothrot.models import load_model


@pytest.fixture(scope="session")
def smollm2():
    return load_model("embedded:smollm2")
