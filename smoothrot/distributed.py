"""Data-parallel runs: start the process group, shard the work, merge what each rank recorded.

A run of ``devices × num_nodes`` processes splits calibration windows and every training batch
into contiguous per-rank shares, so the ranks' pieces concatenated in rank order are the
1-process data in its order. Merges are exact: the abs-max is an all-reduce(MAX), the quantile
top-k buffers are all-gathered and folded in with the observer's own ``merge`` (ranks may have
seen different token counts), and kept token rows are all-gathered in rank order, so every rank
ends up with the statistics and token sets a single process would have.

Every helper is a no-op when ``torch.distributed`` is not initialized (or has one process), so
callers use them unconditionally. Launching is Lightning's: its script launcher starts the local
ranks, or torchrun/SLURM did and the processes only join (docs/distributed.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from smoothrot.calibrate.capture import CaptureSpec, SiteRecord
from smoothrot.core.stats import AbsMaxObserver, AbsQuantileObserver
from smoothrot.schema.config import DistributedConfig
from smoothrot.schema.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank of this process (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def require_one_process(method: str) -> None:
    """``method`` walks or runs the whole model itself: several ranks would repeat the same
    work, so it refuses them with the setting to change."""
    if world_size() > 1:
        raise ConfigError(f"{method} runs in one process (every rank would repeat the same "
                          "work); set distributed.devices: 1 and num_nodes: 1")


def world_size() -> int:
    """Number of processes in the run (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """Whether this process writes files and prints the summary."""
    return rank() == 0


def launched_as_rank_zero() -> bool:
    """Whether this process will be global rank 0, read from what its launcher set before any
    process group exists: torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, or Lightning's
    launcher's ``NODE_RANK`` and ``LOCAL_RANK`` (a plain run sets none of them)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return all(int(os.environ.get(var, "0")) == 0 for var in ("NODE_RANK", "LOCAL_RANK"))


def launch(cfg: DistributedConfig, accelerator: str) -> None:
    """Start or join the process group of a ``cfg.devices × cfg.num_nodes`` run.

    Run as a script, Lightning's launcher re-executes the command line for local ranks
    1 … devices−1 (this process becomes local rank 0); under torchrun or SLURM the processes
    exist already and only join. ``accelerator``: ``cpu`` (gloo) or ``gpu`` (nccl, one GPU per
    process). Ranks other than 0 log warnings only, so the terminal shows one run.
    """
    processes = cfg.devices * cfg.num_nodes
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        if env_world > 1:
            raise ConfigError(
                f"launched as {env_world} processes (WORLD_SIZE) but distributed.devices × "
                "distributed.num_nodes is 1; set distributed.devices to the processes per node"
            )
        return
    if is_distributed():
        return
    import lightning as L

    L.Fabric(accelerator=accelerator, strategy="ddp", devices=cfg.devices,
             num_nodes=cfg.num_nodes).launch()
    log.info("rank %d of %d joined (%s backend)", rank(), world_size(), dist.get_backend())
    if rank() != 0:
        logging.getLogger("smoothrot").setLevel(logging.WARNING)


def trainer_kwargs() -> dict[str, Any]:
    """``lightning.Trainer`` arguments for training data-parallel on the current process group.

    DDP averages the gradients of the ranks' batch shares; buffers (the layer weight, the best
    scales) are identical on every rank by construction, so they are not re-broadcast each step
    (``broadcast_buffers``: newer torch calls it ``forward_sync_buffers``, older lacks that name).
    """
    if not is_distributed():
        return {"devices": 1}
    from lightning.pytorch.strategies import DDPStrategy

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    return {"strategy": DDPStrategy(broadcast_buffers=False), "devices": local,
            "num_nodes": world_size() // local}


def shard_bounds(n: int, part: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """Share ``[lo, hi)`` of ``n`` items for ``part`` of ``parts`` (default: this rank of all).

    Contiguous shares that differ by at most one item, in rank order.
    """
    r = rank() if part is None else part
    w = world_size() if parts is None else parts
    return n * r // w, n * (r + 1) // w


def shard_spec(spec: CaptureSpec, part: int | None = None,
               parts: int | None = None) -> CaptureSpec:
    """This rank's share of a capture: a block of windows, the kept rows re-based to it.

    The statistics stay sized for the whole stream (``stream_tokens``), so every rank's quantile
    buffer is deep enough for the merged, exact result.
    """
    w = world_size() if parts is None else parts
    if w == 1:
        return spec
    lo, hi = shard_bounds(spec.windows.shape[0], part, w)
    keep = spec.keep_index
    if keep is not None:
        per_window = spec.windows.shape[1]
        start, stop = lo * per_window, hi * per_window
        keep = keep[(keep >= start) & (keep < stop)] - start
    return replace(spec, windows=spec.windows[lo:hi], keep_index=keep,
                   stream_tokens=spec.total_tokens)


def _comm_device() -> torch.device:
    """Where collectives need their tensors: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_tensors(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` in rank order, as CPU tensors; shapes may differ (same ``dim()``)."""
    if not is_distributed():
        return [x]
    device = _comm_device()
    shapes = [torch.zeros(x.dim(), dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(shapes, torch.tensor(x.shape, dtype=torch.long, device=device))
    shapes = [tuple(int(n) for n in s.tolist()) for s in shapes]
    # Collectives need one shape: pad every dim to the largest (and to >= 1, never empty).
    padded_shape = [max(max(dims), 1) for dims in zip(*shapes, strict=True)]
    padded = torch.zeros(padded_shape, dtype=x.dtype, device=device)
    padded[tuple(map(slice, x.shape))] = x.to(device)
    out = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(out, padded)
    return [t[tuple(map(slice, shape))].cpu() for t, shape in zip(out, shapes, strict=True)]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The ranks' row blocks concatenated in rank order (the 1-process order of sharded data)."""
    return torch.cat(all_gather_tensors(x)) if is_distributed() else x


def merge_absmax(obs: AbsMaxObserver) -> None:
    """All-reduce an abs-max observer in place: max of the maxima, sum of the counts."""
    if not is_distributed():
        return
    device = _comm_device()
    max_abs, count = obs.state()
    max_abs = max_abs.to(device)
    total = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(max_abs, op=dist.ReduceOp.MAX)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    obs.load_state(max_abs.cpu(), int(total.item()))


def merge_quantiles(obs: AbsQuantileObserver) -> None:
    """Fold every other rank's top-k buffer into ``obs`` with the observer's own merge.

    The union of the ranks' top-k values contains the global top-k, so the result is exact; it
    is the same multiset on every rank, whatever order the merges run in.
    """
    if not is_distributed():
        return
    top, count = obs.state()
    tops = all_gather_tensors(top.t().contiguous())  # [m_r, channels]: m_r differs across ranks
    counts = all_gather_tensors(torch.tensor([count], dtype=torch.long))
    for r, (peer_top, peer_count) in enumerate(zip(tops, counts, strict=True)):
        if r == rank():
            continue
        peer = AbsQuantileObserver(obs.channels, obs.quantiles, obs.total_tokens)
        peer.load_state(peer_top.t(), int(peer_count.item()))
        obs.merge(peer)


def merge_records(records: Mapping[str, SiteRecord]) -> Mapping[str, SiteRecord]:
    """Merge each site's statistics and kept rows across ranks, in place; returns ``records``.

    Sites are visited in the mapping's order, which is the same on every rank (the site list).
    """
    if not is_distributed():
        return records
    for rec in records.values():
        if rec.absmax is not None:
            merge_absmax(rec.absmax)
        if rec.quantiles is not None:
            merge_quantiles(rec.quantiles)
        rows = all_gather_tensors(_local_rows(rec))
        width = max(r.shape[1] for r in rows)
        rows = [r for r in rows if r.shape[0]]
        rec.replace_rows(torch.cat(rows) if rows else torch.empty(0, width))
    return records


def _local_rows(rec: SiteRecord) -> torch.Tensor:
    """This rank's kept rows as ``[n, width]`` (a rank with no rows sends ``[0, 0]``)."""
    rows = rec.tokens()
    return rows if rows.dim() == 2 else torch.empty(0, 0)


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (decisions read from files only rank 0 may see)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()
