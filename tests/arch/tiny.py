"""Tiny random-init models, one per supported architecture (float64-faithful norms:
``smoothrot.surgery.hooks.exact_norms``, re-exported).

Every model has hidden 64, 2 layers, a small vocabulary, eager attention and grouped-query
attention (4 query heads of 16 on 2 kv heads), so every table entry, the GQA scale tying and the
per-head rotation are exercised in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from smoothrot.arch.sites import architecture_of
from smoothrot.surgery.hooks import exact_norms, norm_modules

__all__ = ["TINY", "exact_norms", "norm_modules", "tiny_model"]

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=96, max_position_embeddings=64)

TINY: dict[str, Callable[[], PretrainedConfig]] = {
    # SmolLM2-like: tied embeddings, so R1 has to untie lm_head.
    "llama": lambda: LlamaConfig(intermediate_size=96, tie_word_embeddings=True, **COMMON),
    "mistral": lambda: MistralConfig(intermediate_size=128, sliding_window=8, **COMMON),
    # q/k/v biases.
    "qwen2": lambda: Qwen2Config(intermediate_size=96, **COMMON),
    # per-head q_norm/k_norm, explicit head_dim.
    "qwen3": lambda: Qwen3Config(intermediate_size=96, head_dim=16, **COMMON),
    # offset norms (1+γ), scaled embeddings, tied embeddings.
    "gemma": lambda: GemmaConfig(intermediate_size=96, head_dim=16, **COMMON),
    # + sandwich norms, soft-capping, sliding window.
    "gemma2": lambda: Gemma2Config(intermediate_size=128, head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=8, **COMMON),
    # fused qkv_proj and gate_up_proj.
    "phi3": lambda: Phi3Config(intermediate_size=96, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, **COMMON),
}


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A random-init ``arch`` model in eval mode with signed, partly zero norm weights.

    Linear weights get std 0.1 (the HF default 0.02 leaves activations near zero) and every norm
    weight is random with half of the *effective* γ negative and some exactly zero (γ = −1 for
    offset norms), the case that breaks methods dividing by γ.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY[arch](), attn_implementation="eager")
    model = model.to(dtype).eval()
    offset = architecture_of(model).residual.norm_kind == "offset_rms"
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(False)
            if p.dim() == 2:
                p.normal_(0.0, 0.1, generator=gen)
            elif name.endswith("norm.weight"):
                gamma = torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5
                gamma[::2] *= -1.0  # half negative
                gamma[1::7] = 0.0  # some zero
                p.copy_(gamma - 1.0 if offset else gamma)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=gen)
    return model
