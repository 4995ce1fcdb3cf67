"""Quantization schemes: what a W4A4 / W8A8 / FP4 fake quantizer computes, and the presets.

Schemas only validate; the arithmetic is core/quantizers.py and core/fp4.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from smoothrot.schema.errors import ConfigError

SUPPORTED_BITS = (4, 8)
# How a dynamic symmetric int activation scale is computed from a token's abs-max (a backend's
# arithmetic, schema/target.py): "max" → max|x|/(2^(b-1)-1), round, codes ±(2^(b-1)-1) (vLLM's
# int8 kernel and its int4 Humming kernel, smoothrot's original); "compressed-tensors" →
# max|x|/((2^b-1)/2), clamp to [-2^(b-1), 2^(b-1)-1], then round (compressed-tensors' forward).
ACT_GRIDS = ("max", "compressed-tensors")
# Element formats and, for the FP4 block formats, the block size each one fixes.
QUANT_FORMATS = ("int", "nvfp4", "mxfp4")
FP_FORMAT_BLOCK = {"nvfp4": 16, "mxfp4": 32}


@dataclass(frozen=True)
class QuantScheme:
    """Round-to-nearest fake quantization of a linear layer's weight and (dynamic) input.

    Defaults are the original W4A4/W8A8 schemes: symmetric integer, one weight scale per output
    channel, one activation scale per token. ``w_group_size``/``a_group_size`` give one scale per
    group of that many consecutive input channels instead (it must divide the input size);
    ``w_symmetric=False`` adds an integer zero point; ``w_mse_clip`` picks each weight group's clip
    ratio from a grid by least weight error. ``nvfp4``/``mxfp4`` formats are 4-bit E2M1 with
    block scales (E4M3 per 16 + FP32 global, E8M0 per 32); their group size is the block size.
    """

    name: str
    w_bits: int
    a_bits: int
    w_clip: float = 1.0
    a_clip: float = 1.0
    w_format: str = "int"
    a_format: str = "int"
    w_group_size: int | None = None
    a_group_size: int | None = None
    w_symmetric: bool = True
    w_mse_clip: bool = False
    a_grid: str = "max"

    def __post_init__(self) -> None:
        for what, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if bits not in SUPPORTED_BITS:
                raise ConfigError(
                    f"scheme {self.name!r}: {what}={bits} is not supported; use one of "
                    f"{SUPPORTED_BITS}"
                )
        for what, clip in (("w_clip", self.w_clip), ("a_clip", self.a_clip)):
            if not 0.0 < clip <= 1.0:
                raise ConfigError(f"scheme {self.name!r}: {what}={clip} must be in (0, 1]")
        for side in ("w", "a"):
            fmt = getattr(self, f"{side}_format")
            group = getattr(self, f"{side}_group_size")
            if fmt not in QUANT_FORMATS:
                raise ConfigError(
                    f"scheme {self.name!r}: {side}_format={fmt!r} is not one of {QUANT_FORMATS}"
                )
            if group is not None and (isinstance(group, bool) or not isinstance(group, int)
                                      or group < 2):
                raise ConfigError(
                    f"scheme {self.name!r}: {side}_group_size={group!r} must be None "
                    "(per channel / per token) or an integer >= 2, e.g. 128"
                )
            if fmt in FP_FORMAT_BLOCK and (getattr(self, f"{side}_bits") != 4
                                           or group != FP_FORMAT_BLOCK[fmt]):
                raise ConfigError(
                    f"scheme {self.name!r}: {fmt} needs {side}_bits=4 and "
                    f"{side}_group_size={FP_FORMAT_BLOCK[fmt]}"
                )
        if self.a_grid not in ACT_GRIDS:
            raise ConfigError(f"scheme {self.name!r}: a_grid={self.a_grid!r} is not one of "
                              f"{ACT_GRIDS}")
        if self.a_grid != "max" and self.a_format != "int":
            raise ConfigError(f"scheme {self.name!r}: a_grid applies to int activations only")
        if not self.w_symmetric and self.w_format != "int":
            raise ConfigError(f"scheme {self.name!r}: asymmetric weights need w_format='int'")
        if self.w_mse_clip and self.w_clip != 1.0:
            raise ConfigError(
                f"scheme {self.name!r}: w_mse_clip searches the clip ratio; leave w_clip at 1.0"
            )

    @property
    def scale_equivariant(self) -> bool:
        """Whether Q(c·z) = c·Q(z) for every c > 0 on both sides, so the loss of scales c·s does
        not depend on c. Int grids (max-, MSE- or min/max-scaled) and NVFP4 (its FP32 global
        scale absorbs c) are; MXFP4 is not: its power-of-two block scales make the loss depend
        on c modulo 2 (docs/equivalence.md section 4)."""
        return "mxfp4" not in (self.w_format, self.a_format)


PRESET_SCHEMES: dict[str, QuantScheme] = {
    "w4a4": QuantScheme("w4a4", w_bits=4, a_bits=4),
    "w8a8": QuantScheme("w8a8", w_bits=8, a_bits=8),
    "w4a4-mse": QuantScheme("w4a4-mse", w_bits=4, a_bits=4, w_mse_clip=True),
    "w4a4-g128": QuantScheme("w4a4-g128", w_bits=4, a_bits=4, w_group_size=128),
    "w4a4-g128-mse": QuantScheme(
        "w4a4-g128-mse", w_bits=4, a_bits=4, w_group_size=128, w_mse_clip=True
    ),
    "w4a4-g128-asym": QuantScheme(
        "w4a4-g128-asym", w_bits=4, a_bits=4, w_group_size=128, w_symmetric=False
    ),
    "w8a8-mse": QuantScheme("w8a8-mse", w_bits=8, a_bits=8, w_mse_clip=True),
    # The two halves of W4A4, to see which side loses the perplexity (docs/whole_model.md).
    "w4a8": QuantScheme("w4a8", w_bits=4, a_bits=8),
    "w8a4": QuantScheme("w8a4", w_bits=8, a_bits=4),
    "nvfp4": QuantScheme("nvfp4", w_bits=4, a_bits=4, w_format="nvfp4", a_format="nvfp4",
                         w_group_size=16, a_group_size=16),
    "mxfp4": QuantScheme("mxfp4", w_bits=4, a_bits=4, w_format="mxfp4", a_format="mxfp4",
                         w_group_size=32, a_group_size=32),
}


def with_act_clip(scheme: QuantScheme, act_clip: float | None) -> QuantScheme:
    """``scheme`` with a site's own activation clip ratio (None: the scheme's ``a_clip``)."""
    return scheme if act_clip is None else replace(scheme, a_clip=act_clip)


def get_scheme(name: str) -> QuantScheme:
    """Look up a preset scheme by name (case-insensitive)."""
    try:
        return PRESET_SCHEMES[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown scheme {name!r}; choose one of {sorted(PRESET_SCHEMES)}"
        ) from None
