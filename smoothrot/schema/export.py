"""The export vocabulary: formats, dtypes, activation quantizers, the export folder's file names
and the ``export`` section of a run's config.

Torch-free, so the CLIs' ``--help`` and the config schema can use the same lists the export code
checks against (there are no literal copies to keep in step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smoothrot.schema.errors import ConfigError

# "fused": the float model after surgery; the rest are compressed-tensors checkpoints.
FORMATS = ("fused", "w8a8", "w4a4", "nvfp4", "mxfp4")
FP4_FORMATS = ("nvfp4", "mxfp4")
EXPORT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# Who quantizes activations of a reloaded quantized export (smoothrot.load_pretrained).
ACTIVATION_QUANTIZERS = ("smoothrot", "compressed-tensors")
# Who computes a reloaded export (io/runtime.py): smoothrot's loader (hooks), compressed-tensors
# alone (its forward, its transforms with the stored weights: as vLLM), plain transformers.
RUNTIMES = ("smoothrot", "compressed-tensors", "transformers")

# Files of an export folder besides the Hugging Face ones. The scales sit in a subfolder because
# vLLM loads every top-level *.safetensors of a checkpoint without an index.
METADATA_FILE = "smoothrot.json"
EXPORT_SCALES_FILE = "smoothrot/scales.safetensors"


class ExportError(ValueError):
    """An export or reload request cannot be honoured; the message names the cause and the fix."""


@dataclass
class ExportConfig:
    """What to export after a fit: ``formats`` (none: no export), whose scales (``method``, of
    ``scheme``: default the format's own, for ``fused`` the run's first), the float ``dtype``,
    the target ``dir`` (one format only; default ``<output_dir>/export-<format>``) and whether
    an existing target may be replaced."""

    formats: list[str] = field(default_factory=list)
    method: str = "trained"
    scheme: str | None = None
    dtype: str = "float32"
    dir: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ConfigError(f"export.formats has {unknown}; choose from {list(FORMATS)}")
        if self.dtype not in EXPORT_DTYPES:
            raise ConfigError(f"export.dtype={self.dtype!r} is not one of {list(EXPORT_DTYPES)}")
