"""Pure math: Hadamard matrices, FP4 rounding, statistics, scale policies, quantizers, GPTQ."""
