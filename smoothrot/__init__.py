"""smoothrot: per-channel smoothing + Hadamard rotation for W4A4/W8A8 LLM quantization."""

from __future__ import annotations

import os
from typing import Any

# Same seed, same result: without a pinned code branch (conditional numerical reproducibility)
# MKL's float32 results may depend on the process's history (MKL names memory alignment), and
# two runs of one config whose --methods lists differed learned different R2 rotations on
# identical inputs; W4A4 amplifies such roundings into ~3 % perplexity moves
# (docs/whole_model.md). Read by MKL at its first call, so it is set here, before smoothrot runs
# any; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import smoothrot.schema.config` (and the CLIs' --help) does not import torch.
    if name == "load_pretrained":
        from smoothrot.io.loader import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'smoothrot' has no attribute {name!r}")
