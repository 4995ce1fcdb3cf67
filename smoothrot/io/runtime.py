"""Loading an export the way a backend does, with no smoothrot code in the forward pass.

This is the check that an export computes what the report states outside smoothrot. transformers
with compressed-tensors loads the weights and runs compressed-tensors' own quantized forward
(dynamic per-token activations on its grid, schema/target.py), but transformers ignores
``quantization_config.transform_config``. The ``compressed-tensors`` runtime adds the one step
vLLM takes: the online transforms are registered with compressed-tensors' own
``apply_transform_config`` and get the weights stored in the checkpoint (vLLM's dense transform
path multiplies by exactly those; for ``hadamard`` groups they equal compressed-tensors' own).
The ``transformers`` runtime leaves that step out: what a plain ``from_pretrained`` user gets,
a different function whenever a rotation runs online.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smoothrot.io.compressed_tensors import set_transform_weights, stored_transform_weights
from smoothrot.io.loader import quiet_transformers, require_safetensors
from smoothrot.models import resolve_dtype
from smoothrot.schema.export import RUNTIMES, ExportError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["load_without_smoothrot", "online_transform_config"]

log = logging.getLogger(__name__)



def online_transform_config(path: str | Path) -> Any:
    """The online part of an export's ``transform_config`` (None if it declares none).

    The ``weight_input`` halves are already fused into the stored weights; applying them again
    would compute another function.
    """
    from compressed_tensors.transform import TransformConfig, TransformLocation

    config = json.loads((Path(path) / "config.json").read_text())
    data = (config.get("quantization_config") or {}).get("transform_config") or {}
    if not data.get("config_groups"):
        return None
    full = TransformConfig.model_validate(data)
    for scheme in full.config_groups.values():
        scheme.apply = [args for args in scheme.apply
                        if TransformLocation(args.location).is_online()]
    return full


@torch.no_grad()
def load_without_smoothrot(
    path: str | Path, *, runtime: str = "compressed-tensors", dtype: str | None = None,
    device: str = "cpu",
) -> PreTrainedModel:
    """Load an export with transformers + compressed-tensors only (``runtime`` as in
    :data:`RUNTIMES`, not ``smoothrot``): no smoothrot hook or quantizer runs in its forward."""
    from compressed_tensors.transform import apply_transform_config
    from transformers import AutoModelForCausalLM

    if runtime not in RUNTIMES[1:]:
        raise ExportError(f"runtime={runtime!r}; choose one of {list(RUNTIMES[1:])}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} is not a model folder (no config.json)")
    require_safetensors(path)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype) if dtype else "auto", local_files_only=True,
            use_safetensors=True)
    online = online_transform_config(path) if runtime == "compressed-tensors" else None
    if online is not None:
        apply_transform_config(model, online)
        set_transform_weights(model, stored_transform_weights(path, set(online.config_groups)))
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s with %s only (%s)", path, runtime,
             "online transforms from the checkpoint" if online is not None
             else "no transforms applied")
    return model
