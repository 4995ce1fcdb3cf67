"""Lightning training of log-scales on the straight-through fake-quant loss."""
