"""bench/peer_export.py and bench/peer_llmcompressor.py (issue 16): the windows file written in
smoothrot's venv reads back unchanged in the peer's script, the config overrides apply, and the
peer's perplexity is smoothrot's formula. No model is loaded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smoothrot.evaluate import perplexity

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer_export = _load("bench_peer_export", "peer_export.py")
peer = _load("bench_peer_llmcompressor", "peer_llmcompressor.py")


def test_windows_round_trip_through_both_scripts(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    windows = {"calibration": torch.randint(0, 49152, (3, 16), generator=g),
               "evaluation": torch.randint(0, 49152, (2, 16), generator=g),
               "selection": torch.zeros(1, 16, dtype=torch.long)}  # not exported
    meta = {"config": "configs/x.yaml", "seed": 3, "float_perplexity": 12.5}
    peer_export.save_windows(tmp_path, windows, meta)
    for load in (peer_export.load_windows, peer.load_windows):
        got, got_meta = load(tmp_path)
        assert set(got) == {"calibration", "evaluation"}
        for name in got:
            assert got[name].dtype == torch.long and torch.equal(got[name], windows[name])
        assert got_meta == {**meta, "windows": {"calibration": [3, 16], "evaluation": [2, 16]}}
    assert json.loads((tmp_path / "peer.json").read_text())["seed"] == 3


def test_config_overrides() -> None:
    path = ROOT / "configs" / "whole_model_vllm.yaml"
    base = peer_export.resolve_config(path)
    cfg = peer_export.resolve_config(path, seed=7, calibration_samples=2, evaluation_samples=3)
    assert (cfg.seed, cfg.data.calibration_samples, cfg.data.evaluation_samples) == (7, 2, 3)
    assert cfg.data.seq_len == base.data.seq_len and cfg.model.name == base.model.name


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.out(torch.cumsum(self.emb(input_ids), dim=1)))


@pytest.mark.parametrize("samples", [1, 4, 6])  # one, exactly one, more than one batch of 4
def test_peer_perplexity_is_smoothrots_formula(samples: int) -> None:
    model = _TinyLM().eval()
    windows = torch.randint(0, 11, (samples, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = perplexity(model, windows)
    assert peer.perplexity(model, windows) == pytest.approx(expected, rel=1e-12)
