"""The order of training tokens, a pure function of (seed, optimizer step).

Exact resume rests on it: the tokens of training step g never depend on how many steps ran
before a restart, and data-parallel ranks take fixed slices of the same batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler

from smoothrot.distributed import shard_bounds


def _derived_seed(seed: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, index), unrelated for neighbouring pairs."""
    digest = hashlib.sha256(f"smoothrot/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EpochTokenSampler(Sampler[torch.Tensor]):
    """The token indices of one epoch's ``steps_per_epoch`` batches (one index tensor per step),
    a pure function of its first step.

    The token stream is an endless concatenation of permutations of all ``n`` tokens (pass k
    shuffled with a seed derived from (seed, k)); batch g is stream[g·B : (g+1)·B]. An epoch
    starting at optimizer step g0 yields batches g0 … g0+V−1. ``first_step`` reads g0 from the
    trainer (its ``global_step``, which a checkpoint restores exactly); without it g0 = epoch·V
    from :meth:`set_epoch`. Lightning's own epoch counter is not used: after a restart at an
    epoch end it is one ahead of the loop in Lightning 2.6, which would skip an epoch of data.

    Data-parallel, rank ``part`` of ``parts`` yields its fixed contiguous slice of every batch
    (:attr:`shard_size` indices), so batch g is still a pure function of (seed, g) and the ranks'
    slices concatenated are the 1-process batch.

    Whole batches, not single indices: the DataLoader (``batch_size=None``) then gathers a batch
    with one indexing op instead of fetching and stacking ``shard_size`` rows one by one.
    """

    def __init__(self, n: int, batch_size: int, steps_per_epoch: int, seed: int,
                 first_step: Callable[[], int] | None = None, part: int = 0,
                 parts: int = 1) -> None:
        if n < 1 or batch_size < parts or steps_per_epoch < 1 or not 0 <= part < parts:
            raise ValueError(
                f"EpochTokenSampler needs n, steps_per_epoch >= 1, batch_size >= parts and "
                f"0 <= part < parts, got {n}, {steps_per_epoch}, {batch_size}, {part}, {parts}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = steps_per_epoch
        self.first_step = first_step
        self.epoch = 0
        self.lo, self.hi = shard_bounds(batch_size, part, parts)

    @property
    def shard_size(self) -> int:
        """Indices this rank takes from each batch (the DataLoader's batch size)."""
        return self.hi - self.lo

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that gives the first step when there is no ``first_step``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _pass(self, k: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_derived_seed(self.seed, k))
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.first_step is not None:
            step = self.first_step()
        else:
            step = self.epoch * self.steps_per_epoch
        start = step * self.batch_size
        stop = start + self.batch_size * self.steps_per_epoch
        out = []
        for k in range(start // self.n, (stop - 1) // self.n + 1):
            lo, hi = max(start - k * self.n, 0), min(stop - k * self.n, self.n)
            out.append(self._pass(k)[lo:hi])
        batches = torch.cat(out).view(self.steps_per_epoch, self.batch_size)
        return iter(batches[:, self.lo:self.hi].contiguous())
