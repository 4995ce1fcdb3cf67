"""One line describing the machine a benchmark ran on (shared by the bench scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(device: str = "cpu") -> str:
    """CPU, core and thread counts, torch version, and the GPU when ``device`` is CUDA."""
    line = (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")
    if device.startswith("cuda") and torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return line
