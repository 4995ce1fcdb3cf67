"""smoothrot: per-channel smoothing + Hadamard rotation for W4A4/W8A8 LLM quantization."""

from __future__ import annotations

from typing import Any

__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import smoothrot.schema.config` (and the CLIs' --help) does not import torch.
    if name == "load_pretrained":
        from smoothrot.io.loader import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'smoothrot' has no attribute {name!r}")
