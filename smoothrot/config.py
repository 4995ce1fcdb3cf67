"""Typed, serializable run configuration.

Schemas only validate; behaviour lives elsewhere. Every section is a dataclass so a YAML file maps
onto it one to one, unknown keys are rejected (a typo must not silently fall back to a default),
and ``load(dump(cfg)) == cfg``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

SUPPORTED_BITS = (4, 8)
METHODS = ("rtn", "hadamard", "smoothrot_max", "quantile", "joint_global", "joint", "trained")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class QuantScheme:
    """Symmetric round-to-nearest fake quantization: per-output-channel weights, per-token
    dynamic activations."""

    name: str
    w_bits: int
    a_bits: int
    w_clip: float = 1.0
    a_clip: float = 1.0

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


PRESET_SCHEMES: dict[str, QuantScheme] = {
    "w4a4": QuantScheme("w4a4", w_bits=4, a_bits=4),
    "w8a8": QuantScheme("w8a8", w_bits=8, a_bits=8),
}


def get_scheme(name: str) -> QuantScheme:
    """Look up a preset scheme by name (case-insensitive)."""
    try:
        return PRESET_SCHEMES[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown scheme {name!r}; choose one of {sorted(PRESET_SCHEMES)}"
        ) from None


@dataclass
class ModelConfig:
    """Which model to load: ``embedded:smollm2``, a local folder / .gguf file, or a hub id."""

    name: str = "embedded:smollm2"
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class DataConfig:
    """Text source and token budgets per split (documents are split disjointly first)."""

    source: str = "pydoc"
    seq_len: int = 256
    calibration_samples: int = 64
    selection_samples: int = 8
    heldout_samples: int = 16
    evaluation_samples: int = 16
    train_tokens: int = 4096
    fractions: dict[str, float] = field(
        default_factory=lambda: {
            "calibration": 0.55,
            "selection": 0.1,
            "heldout": 0.1,
            "evaluation": 0.25,
        }
    )

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be at least 2")
        for key in ("calibration_samples", "selection_samples", "heldout_samples",
                    "evaluation_samples", "train_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be at least 1")


@dataclass
class SearchConfig:
    """Grids for the smoothing strength α and the activation quantile q."""

    alphas: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    quantiles: list[float] = field(default_factory=lambda: [0.99, 0.995, 0.999, 0.9999, 1.0])

    def __post_init__(self) -> None:
        if not self.alphas or not self.quantiles:
            raise ConfigError("search.alphas and search.quantiles must not be empty")
        for a in self.alphas:
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"search.alphas contains {a}; α must be in [0, 1]")
        for q in self.quantiles:
            if not 0.0 < q <= 1.0:
                raise ConfigError(f"search.quantiles contains {q}; q must be in (0, 1]")
        if 1.0 not in self.quantiles:
            # q = 1 is the max policy; the quantile search must be able to fall back to it.
            self.quantiles = [*self.quantiles, 1.0]


@dataclass
class TrainConfig:
    """Refinement of log-scales by Adam on the straight-through fake-quant output loss."""

    steps: int = 150
    lr: float = 0.02
    batch_tokens: int = 512
    val_every: int = 25
    log_bound: float = 9.0
    progress_bar: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"train.steps={self.steps} must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr={self.lr} must be a positive number")
        if self.batch_tokens < 1 or self.val_every < 1:
            raise ConfigError("train.batch_tokens and train.val_every must be at least 1")
        if not 0 < self.log_bound <= 20:
            raise ConfigError(
                f"train.log_bound={self.log_bound} must be in (0, 20] (natural-log range of s)"
            )


@dataclass
class FitConfig:
    """Everything ``train/fit_scales.py`` needs; one YAML file maps onto it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    layers: list[str] = field(default_factory=lambda: ["down_proj"])
    schemes: list[str] = field(default_factory=lambda: ["w4a4", "w8a8"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    perplexity: bool = True
    seed: int = 0
    output_dir: str = "outputs/fit_scales"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers must name at least one site, e.g. ['down_proj']")
        if not self.schemes:
            raise ConfigError(f"schemes must not be empty; choose from {sorted(PRESET_SCHEMES)}")
        for name in self.schemes:
            get_scheme(name)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        # Every method is reported relative to the SmoothRot baseline, so it is always run.
        if "smoothrot_max" not in self.methods:
            self.methods = ["smoothrot_max", *self.methods]
        self.methods = [m for m in METHODS if m in self.methods]


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the allowed ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or 'config'}; allowed: {sorted(fields)}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value or {}, f"{where}.{key}".lstrip("."))
        else:
            kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> FitConfig:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`FitConfig`."""
    return _from_dict(FitConfig, data, "")


def config_to_dict(cfg: FitConfig) -> dict[str, Any]:
    """Plain-data view of a config, suitable for YAML/JSON."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> FitConfig:
    """Read a YAML config; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    try:
        return config_from_dict(data)
    except TypeError as exc:  # wrong value types reaching a dataclass
        raise ConfigError(f"config file {path}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def dump_config(cfg: FitConfig) -> str:
    """YAML text of a config (round-trips through :func:`config_from_dict`)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
