"""Shared fixtures: tiny random-init models for fast architecture tests; a refused network."""

from __future__ import annotations

import socket

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(intermediate: int = 96, layers: int = 2, dtype: torch.dtype = torch.float32):
    """A random-init LLaMA with a non-power-of-two MLP (96 = 12·8) to exercise Paley Hadamards."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def refused_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every TCP connection refused at once (as on an offline machine whose DNS answers);
    returns the list of attempts, so a test can tell one probe from retries with back-off."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts
