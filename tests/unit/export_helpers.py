"""What the export tests share: random plans for a tiny LLaMA, the in-memory reference model
(fused and fake-quantized as smoothrot evaluates it), and relative errors."""

from __future__ import annotations

import copy
import errno

import pytest
import torch

from smoothrot.arch.sites import resolve_sites
from smoothrot.io.verify import as_loaded
from smoothrot.surgery.hooks import apply_plans
from smoothrot.surgery.plan import SitePlan

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))


def random_plans(model, layers=("down_proj",), decades=4.0, seed=2) -> dict[str, SitePlan]:
    """Each site's own rotation with log-uniform scales spanning ``decades``."""
    gen = torch.Generator().manual_seed(seed)
    return {rs.name: SitePlan(10 ** ((torch.rand(rs.n_scales, generator=gen,
                                                 dtype=torch.float64) - 0.5) * decades),
                              rs.rotation)
            for rs in resolve_sites(model, list(layers))}


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def in_memory(model, plans, scheme=None, dtype=None):
    """The model smoothrot evaluates: fused (and fake-quantized) in memory, in ``dtype``."""
    ref = copy.deepcopy(model) if dtype is None else as_loaded(model, dtype)
    apply_plans(resolve_sites(ref, list(plans)), plans, scheme)
    return ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def one_line(exc_info: pytest.ExceptionInfo, *words: str) -> str:
    """The error's message, checked to be one line containing ``words``."""
    msg = str(exc_info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


def disk_full(*_args, **_kwargs):
    """Stands in for a writer (or a job) when the disk is full."""
    raise OSError(errno.ENOSPC, "No space left on device")
