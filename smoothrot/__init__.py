"""smoothrot: per-channel smoothing + Hadamard rotation for W4A4/W8A8 LLM quantization."""
