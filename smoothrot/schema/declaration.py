"""The export declaration: what ``config.json["smoothrot"]`` promises about an export.

The writer (io/writer.py) builds one, the loader (io/loader.py) reads one; both use these frozen
dataclasses and their attributes, so the two sides cannot drift apart key by key. Reading is
strict: a declaration from another version, another tool or a hand edit fails in one line that
names the bad key or value, not with a KeyError deep inside ``load_pretrained``. Each site's
rotation is a :class:`~smoothrot.schema.rotation.Rotation` (kind, location, block size); the
size of each Hadamard block follows from it and the linears' input size, so it is not stored.
Torch-free, like the rest of ``smoothrot.schema``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from smoothrot.arch.tables import SMOOTH_FROM_KINDS
from smoothrot.schema.export import EXPORT_DTYPES, FORMATS
from smoothrot.schema.quant import ACT_GRIDS, QUANT_FORMATS, QuantScheme
from smoothrot.schema.rotation import RESIDUAL_KINDS, Rotation, RotationKind
from smoothrot.schema.strict import (
    BOOLEAN,
    CLIP,
    INTEGER,
    NAMES,
    STRING,
    Check,
    checked,
    is_names,
    one_of,
    optional,
)
from smoothrot.schema.target import TARGETS

DECLARATION_KEY = "smoothrot"
# 2: a site's rotation is Rotation.to_dict() (version 1 had "online_rotation" strings).
DECLARATION_VERSION = 2
LOADER = "smoothrot.load_pretrained"
ROUNDINGS = ("rtn", "gptq")
# How load_pretrained's smoothrot activation quantizer computes each format's dynamic scale.
ACTIVATION_SCALE = {
    "max": "max|x_token| * clip / (2^(bits-1) - 1), round to nearest even",
    "compressed-tensors": "max|x_token| / ((2^bits - 1) / 2), clamp to [-2^(bits-1), "
                          "2^(bits-1) - 1], then round to nearest even",
    "nvfp4": "e4m3(G * max|x_block16| / 6) / G, G = 448*6 / max|x| of the batch (dynamic)",
    "mxfp4": "2^floor(log2 max|x_block32|) / 4, one power up if the mantissa >= 1.75 (E8M0)",
}

Q = TypeVar("Q", bound="QuantDeclaration")


@dataclass(frozen=True)
class SiteDeclaration:
    """One site: its linears and source (module names), whether ``diag(s)⁻¹`` is folded into
    the source, the rotation of the linears' input (the online part runs at load time) and the
    activation clip ratio fitted for it (None: the scheme's)."""

    linears: tuple[str, ...]
    source: str
    source_kind: str
    smoothed: bool
    rotation: Rotation
    activation_clip: float | None

    def __post_init__(self) -> None:
        if self.rotation.kind is RotationKind.HEAD and self.rotation.block_size is None:
            raise ValueError("a per-head rotation needs its block_size (the model's head_dim)")

    def to_dict(self) -> dict[str, Any]:
        return {"linears": list(self.linears), "source": self.source,
                "source_kind": self.source_kind, "smoothed": self.smoothed,
                "rotation": self.rotation.to_dict(), "activation_clip": self.activation_clip}

    @classmethod
    def from_dict(cls, data: Any, where: str = "site") -> SiteDeclaration:
        d = checked(cls, data, where, {
            "linears": (lambda v: is_names(v) and len(v) > 0, "a non-empty list of names"),
            "source": STRING, "source_kind": one_of(SMOOTH_FROM_KINDS), "smoothed": BOOLEAN,
            "activation_clip": optional(CLIP),
        })
        try:
            return cls(tuple(d["linears"]), d["source"], d["source_kind"], d["smoothed"],
                       Rotation.from_dict(d["rotation"]), d["activation_clip"])
        except ValueError as exc:
            raise ValueError(f"{where}.rotation: {exc}") from None


@dataclass(frozen=True)
class QuantDeclaration:
    """One side (weights or activations) of a quantized export's scheme."""

    scheme: str
    format: str
    num_bits: int
    group_size: int | None
    clip: float
    symmetric: bool

    @classmethod
    def _checks(cls) -> dict[str, Check]:
        return {"scheme": STRING, "format": one_of(QUANT_FORMATS), "num_bits": INTEGER,
                "group_size": optional(INTEGER), "clip": CLIP,
                "symmetric": BOOLEAN}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls: type[Q], data: Any, where: str) -> Q:
        return cls(**checked(cls, data, where, cls._checks()))


@dataclass(frozen=True)
class ActivationQuantDeclaration(QuantDeclaration):
    """Dynamic activation quantization; ``grid`` (int: whose arithmetic, schema/quant.py
    ACT_GRIDS) and ``scale`` say how the scale is computed."""

    dynamic: bool
    grid: str
    scale: str

    @classmethod
    def _checks(cls) -> dict[str, Check]:
        return {**super()._checks(), "dynamic": BOOLEAN, "grid": one_of(ACT_GRIDS),
                "scale": STRING}

    @classmethod
    def of(cls, scheme: QuantScheme) -> ActivationQuantDeclaration:
        scale = ACTIVATION_SCALE[scheme.a_format if scheme.a_format != "int" else scheme.a_grid]
        return cls(scheme.name, scheme.a_format, scheme.a_bits, scheme.a_group_size,
                   scheme.a_clip, True, True, scheme.a_grid, scale)


@dataclass(frozen=True)
class WeightQuantDeclaration(QuantDeclaration):
    """Offline weight quantization; ``rounding`` says whether the codes are RTN or GPTQ."""

    mse_clip: bool
    rounding: str

    @classmethod
    def _checks(cls) -> dict[str, Check]:
        return {**super()._checks(), "mse_clip": BOOLEAN, "rounding": one_of(ROUNDINGS)}

    @classmethod
    def of(cls, scheme: QuantScheme, rounding: str) -> WeightQuantDeclaration:
        return cls(scheme.name, scheme.w_format, scheme.w_bits, scheme.w_group_size,
                   scheme.w_clip, scheme.w_symmetric, scheme.w_mse_clip, rounding)


@dataclass(frozen=True)
class ResidualDeclaration:
    """The R1 residual rotation baked into the weights (surgery/residual.py)."""

    seed: int
    kind: str
    untied_lm_head: bool

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "kind": self.kind, "untied_lm_head": self.untied_lm_head}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ResidualDeclaration:
        return cls(**checked(cls, data, where, {"seed": INTEGER, "kind": one_of(RESIDUAL_KINDS),
                                                 "untied_lm_head": BOOLEAN}))


@dataclass(frozen=True)
class ExportDeclaration:
    """Everything a loader needs beyond the Hugging Face checkpoint: per site what is fused and
    what runs online, the quantization scheme (quantized formats), which rotations are also
    declared as compressed-tensors ``transform_config`` groups (or why none), and R1."""

    format: str
    dtype: str
    loader: str
    sites: Mapping[str, SiteDeclaration]
    activation_quantization: ActivationQuantDeclaration | None
    weight_quantization: WeightQuantDeclaration | None
    transform_config_groups: tuple[str, ...]
    transform_config_note: str | None
    residual_rotation: ResidualDeclaration | None
    target: str = "vllm"
    version: int = DECLARATION_VERSION
    # o_proj sites whose v_proj rows and o_proj columns carry a learned per-head rotation R2
    # (folded: nothing runs at load time; the matrices are in HEAD_ROTATIONS_FILE).
    head_rotations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sides = [q is not None for q in (self.activation_quantization, self.weight_quantization)]
        if self.format == "fused" and any(sides):
            raise ValueError("format 'fused' takes no activation or weight quantization")
        if self.format != "fused" and not all(sides):
            raise ValueError(f"format {self.format!r} needs both activation_quantization and "
                             "weight_quantization")

    @property
    def linears(self) -> list[str]:
        """Every declared linear, site by site."""
        return [name for site in self.sites.values() for name in site.linears]

    @property
    def gptq(self) -> bool:
        """True if the stored weight codes are GPTQ's (not a round-to-nearest of the weights)."""
        return self.weight_quantization is not None and self.weight_quantization.rounding == "gptq"

    def quant_scheme(self) -> QuantScheme | None:
        """The scheme a quantized export was written with (None for ``fused``)."""
        a, w = self.activation_quantization, self.weight_quantization
        if a is None or w is None:
            return None
        return QuantScheme(a.scheme, w_bits=w.num_bits, a_bits=a.num_bits, w_clip=w.clip,
                           a_clip=a.clip, w_format=w.format, a_format=a.format,
                           w_group_size=w.group_size, a_group_size=a.group_size,
                           w_symmetric=w.symmetric, w_mse_clip=w.mse_clip, a_grid=a.grid)

    def to_dict(self) -> dict[str, Any]:
        def maybe(value: Any) -> Any:
            return None if value is None else value.to_dict()

        return {
            "version": self.version, "format": self.format, "dtype": self.dtype,
            "loader": self.loader,
            "sites": {name: site.to_dict() for name, site in self.sites.items()},
            "activation_quantization": maybe(self.activation_quantization),
            "weight_quantization": maybe(self.weight_quantization),
            "transform_config_groups": list(self.transform_config_groups),
            "transform_config_note": self.transform_config_note,
            "residual_rotation": maybe(self.residual_rotation),
            "target": self.target,
            "head_rotations": list(self.head_rotations),
        }

    @classmethod
    def from_dict(cls, data: Any) -> ExportDeclaration:
        """Strict inverse of :meth:`to_dict`; a one-line ValueError names what is wrong."""
        where = DECLARATION_KEY
        if isinstance(data, dict) and "version" in data and data["version"] != DECLARATION_VERSION:
            raise ValueError(f"declaration version {data['version']!r} is not supported (this "
                             f"smoothrot reads version {DECLARATION_VERSION})")
        if isinstance(data, dict):  # exports written before learned head rotations existed
            data = {"head_rotations": [], **data}
        d = checked(cls, data, where, {
            "head_rotations": NAMES, "format": one_of(FORMATS), "dtype": one_of(EXPORT_DTYPES),
            "loader": STRING,
            "sites": (lambda v: isinstance(v, dict) and len(v) > 0, "a non-empty mapping"),
            "transform_config_groups": NAMES, "transform_config_note": optional(STRING),
            "target": one_of(tuple(TARGETS)), "version": INTEGER,
        })

        patterns = [name for name in d["sites"] if name.startswith("re:")]
        if patterns:
            raise ValueError(f"{where}.sites has the pattern {patterns[0]!r} (sites are "
                             "qualified site names, e.g. model.layers.0.mlp.down_proj)")

        def nested(parse: Callable[[Any, str], Any], key: str) -> Any:
            return None if d[key] is None else parse(d[key], f"{where}.{key}")

        return cls(
            format=d["format"], dtype=d["dtype"], loader=d["loader"],
            sites={name: SiteDeclaration.from_dict(site, f"{where}.sites[{name!r}]")
                   for name, site in d["sites"].items()},
            activation_quantization=nested(ActivationQuantDeclaration.from_dict,
                                           "activation_quantization"),
            weight_quantization=nested(WeightQuantDeclaration.from_dict, "weight_quantization"),
            transform_config_groups=tuple(d["transform_config_groups"]),
            transform_config_note=d["transform_config_note"],
            residual_rotation=nested(ResidualDeclaration.from_dict, "residual_rotation"),
            target=d["target"], version=d["version"],
            head_rotations=tuple(d["head_rotations"]),
        )
