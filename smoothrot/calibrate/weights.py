"""Where a model's weights live between the moments a layer runs: the weight sources of
sequential calibration (:mod:`smoothrot.calibrate.sequential`).

:class:`ResidentWeights` moves modules of a loaded model to the device and back;
:class:`SafetensorsWeights` fills a model built on the ``meta`` device
(:func:`smoothrot.models.empty_model`) from a safetensors checkpoint just before a layer runs, and
drops the tensors afterwards, so the model never sits in memory whole.

Kept apart from the layer-by-layer walk because it is a different concern: reading and checking
checkpoint tensors (shard index, names, shapes, tied parameters, dtypes) and handing memory back
to the OS, none of which depends on what the walk records or rounds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import nn

__all__ = [
    "SAFETENSORS_INDEX",
    "CheckpointError",
    "LayerWeights",
    "ResidentWeights",
    "SafetensorsWeights",
    "return_freed_memory",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it should fill (missing tensor, wrong shape)."""


class LayerWeights(Protocol):
    """Where a module's tensors live between the moments it runs.

    ``prefix`` is the module's qualified name plus a dot (``model.layers.3.``; empty for the
    whole model), which is how checkpoints name its tensors.
    """

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        """Put every tensor of ``module`` on ``device``, ready to run."""

    def release(self, module: nn.Module, prefix: str) -> None:
        """Free the device memory ``materialize`` took."""


@dataclass(frozen=True)
class ResidentWeights:
    """Weights of a loaded model: moved to the compute device to run, then back to ``home``."""

    home: torch.device

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        module.to(device)

    def release(self, module: nn.Module, prefix: str) -> None:
        module.to(self.home)


def _tensor_groups(module: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Parameters and buffers of ``module``, tied names grouped: ``[(names, tensor)]``."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


def _assign(module: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Point every name of a (tied) group at one ``value``, keeping parameters parameters."""
    param = nn.Parameter(value, requires_grad=False)
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = param
        else:
            owner._buffers[leaf] = value


class SafetensorsWeights:
    """Tensors read from a safetensors checkpoint (one file, or a folder of shards) on demand.

    Each ``materialize`` opens the files it needs and closes them again, so no memory map of
    the checkpoint stays resident while later layers run. Floating-point tensors are cast to the
    dtype of the model's (meta) tensor they fill. Tensors the checkpoint does not hold but the
    module already has (e.g. rotary ``inv_freq`` computed at construction) are only moved.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = self._index(self.path)

    def __repr__(self) -> str:
        return f"SafetensorsWeights({str(self.path)!r})"

    @staticmethod
    def _index(path: Path) -> dict[str, Path]:
        """``{tensor name: file}`` from the shard index, or from the files' headers."""
        if not path.exists():
            raise FileNotFoundError(
                f"weights path {path} does not exist; pass a .safetensors file or the folder "
                "save_pretrained wrote"
            )
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return {name: path / file for name, file in weight_map.items()}
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files or files[0].suffix != ".safetensors":
            raise ValueError(
                f"{path} holds no *.safetensors file; pass a .safetensors file or a folder "
                "written by save_pretrained(..., safe_serialization=True)"
            )
        names: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                names.update(dict.fromkeys(f.keys(), file))
        return names

    def _key(self, prefix: str, names: list[str]) -> str | None:
        return next((prefix + n for n in names if prefix + n in self.files), None)

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        wanted: dict[Path, list[tuple[str, list[str], torch.Tensor]]] = {}
        for names, tensor in _tensor_groups(module):
            key = self._key(prefix, names)
            if key is not None:
                wanted.setdefault(self.files[key], []).append((key, names, tensor))
            elif tensor.is_meta:
                raise CheckpointError(
                    f"checkpoint {self.path} has no tensor {prefix + names[0]!r}; point the "
                    "weights at the checkpoint of this model config (all shards, written by "
                    "save_pretrained(..., safe_serialization=True))"
                )
            else:
                _assign(module, names, tensor.to(device))
        for file, entries in wanted.items():
            with safe_open(file, framework="pt") as f:
                for key, names, like in entries:
                    value = f.get_tensor(key)
                    if value.shape != like.shape:
                        raise CheckpointError(
                            f"checkpoint {file}: tensor {key!r} has shape {list(value.shape)} but "
                            f"the model expects {list(like.shape)}; the checkpoint was written "
                            "for another config"
                        )
                    dtype = like.dtype if value.is_floating_point() else value.dtype
                    _assign(module, names, value.to(device=device, dtype=dtype))

    def release(self, module: nn.Module, prefix: str) -> None:
        for names, tensor in _tensor_groups(module):
            if self._key(prefix, names) is not None:
                _assign(module, names, torch.empty_like(tensor, device="meta"))
            else:
                _assign(module, names, tensor.to("cpu"))


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_memory() -> None:
    """Give a released layer's heap memory back to the OS.

    glibc raises its mmap threshold when a large block is freed, so later layer-sized tensors
    come from the heap and its free space is kept: measured on a random ~1B LLaMA streamed from
    disk, peak RSS then grew 1.4× from 16 to 32 layers; trimming after each layer keeps it flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
