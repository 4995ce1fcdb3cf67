"""The perplexity's NLL in row chunks equals one cross-entropy over the whole batch."""

from __future__ import annotations

import math

import pytest
import torch

import smoothrot.evaluate as evaluate
from tests.unit.test_peer_export import _TinyLM


@pytest.mark.parametrize("rows", [1, 3, 7, 1000])  # a row, a few, uneven, all in one
def test_chunked_nll_equals_the_whole_batch(monkeypatch, rows: int) -> None:
    model = _TinyLM().eval()
    windows = torch.randint(0, 11, (6, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), windows[:, 1:].reshape(-1), reduction="sum")
    expected = math.exp(float(nll) / windows[:, 1:].numel())
    monkeypatch.setattr(evaluate, "_NLL_CHUNK_BYTES", rows * 11 * 4)  # `rows` logits rows a call
    assert evaluate.perplexity(model, windows) == pytest.approx(expected, rel=1e-6)
