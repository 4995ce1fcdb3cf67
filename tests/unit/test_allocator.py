"""smoothrot.allocator: freed tensor memory is reused instead of faulted in again, and the
user's own glibc settings (or SMOOTHROT_MALLOC=off) win."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from smoothrot.allocator import tune_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# With transparent huge pages always on, a fresh 16 MiB block faults in 8 huge pages, not 4096
# small ones: the fault count no longer shows whether memory was reused.
THP_ALWAYS = _THP.exists() and "[always]" in _THP.read_text()

# Fifty steps that each allocate and free three 16 MiB tensors (4096 pages each), as a
# layer's activations do; prints the minor page faults the steps took.
_LOOP = """
import resource, sys
if sys.argv[1] == "tune":
    from smoothrot.allocator import tune_allocator
    assert tune_allocator()
import torch
def step():
    a = torch.ones(1 << 22)
    b = a + 1
    return float((b * 2).sum())
for _ in range(3):  # start-up allocations (torch's, the heap's growth) are not counted
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "SMOOTHROT_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _LOOP, mode], env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC or THP_ALWAYS,
                    reason="glibc malloc settings, counted in 4 KiB page faults")
def test_tuned_allocator_reuses_freed_tensors():
    # The defaults return the freed heap top to the kernel and fault it in again, at least
    # ~1000 pages a step (53 k to 610 k faults in five runs); tuned, the freed pages are reused:
    # a few tensors' pages in all (4 k to 12 k: the kernel reclaims some now and then), however
    # many steps run.
    default, tuned = _faults("default"), _faults("tune")
    assert default > 50 * 800
    assert tuned < 5 * 4096


@pytest.mark.parametrize("name, value", [("SMOOTHROT_MALLOC", "off"),
                                         ("MALLOC_ARENA_MAX", "2"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")])
def test_user_settings_are_kept(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert tune_allocator() is False
