"""smoothrot: per-channel smoothing + Hadamard rotation for W4A4/W8A8 LLM quantization."""

from __future__ import annotations

import os
from typing import Any

# Same seed, same result: without a fixed code branch MKL picks its float32 GEMM kernels by the
# buffers' memory alignment, so the same computation rounds differently depending on what the
# process allocated before (e.g. which methods a run lists), and W4A4 amplifies those roundings
# into ~3 % perplexity moves (docs/whole_model.md). Read by MKL at its first call, so it is set
# here, before smoothrot runs any; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import smoothrot.schema.config` (and the CLIs' --help) does not import torch.
    if name == "load_pretrained":
        from smoothrot.io.loader import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'smoothrot' has no attribute {name!r}")
