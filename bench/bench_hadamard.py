"""Fast Hadamard transform vs dense matmul with the same orthonormal matrix.

    python bench/bench_hadamard.py [--tokens 4096] [--device cpu]

Prints time per call and the speed-up ratio at n ∈ {1536, 4096, 14336}, measured in one run.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import describe  # bench/machine.py (scripts run from bench/)

from smoothrot.core.hadamard import hadamard_matrix, hadamard_transform


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (also builds cached matrices)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--sizes", type=int, nargs="+", default=[1536, 4096, 14336])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {describe(args.device)}")
    print(f"{'n':>7}{'fast (ms)':>12}{'dense (ms)':>12}{'speed-up':>10}   "
          f"[{args.tokens} tokens, float32, {args.device}, {torch.get_num_threads()} threads]")
    for n in args.sizes:
        x = torch.randn(args.tokens, n, device=args.device)
        h = hadamard_matrix(n, torch.float32, args.device)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

        def fast(x=x, sync=sync):
            hadamard_transform(x)
            sync()

        def dense(x=x, h=h, sync=sync):
            x @ h
            sync()

        t_fast, t_dense = _time(fast, args.repeats), _time(dense, args.repeats)
        err = (hadamard_transform(x) - x @ h).abs().max().item()
        print(f"{n:>7}{t_fast * 1e3:12.1f}{t_dense * 1e3:12.1f}{t_dense / t_fast:9.1f}x   "
              f"max |diff| {err:.1e}")


if __name__ == "__main__":
    main()
