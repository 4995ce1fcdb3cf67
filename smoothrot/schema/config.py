"""Typed, serializable run configuration.

Schemas only validate; behaviour lives elsewhere. Every section is a dataclass so a YAML file maps
onto it one to one, unknown keys are rejected (a typo must not silently fall back to a default),
and ``load(dump(cfg)) == cfg``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from smoothrot.schema.errors import ConfigError
from smoothrot.schema.export import ExportConfig
from smoothrot.schema.quant import (
    PRESET_SCHEMES,
    get_scheme,
)
from smoothrot.schema.rotation import RESIDUAL_KINDS
from smoothrot.schema.target import TARGETS

# The method every % is reported against (registry.BASELINE); it always runs and reports.
BASELINE = "smoothrot_max"
# What a run fits and reports unless told otherwise (the paper's comparison plus GPTQ rows).
DEFAULT_METHODS = ("rtn", "hadamard", "smoothrot_max", "alpha_only", "quantile", "joint_global",
                   "joint", "trained", "hadamard+gptq", "smoothrot_max+gptq", "joint+gptq",
                   "trained+gptq")


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
    """Grids for the smoothing strength α, the activation quantile q and, once the scales are
    fixed, each site's activation clip ratio (``[1.0]``: no clipping, the paper's setting).

    ``alpha_window``: score the q < 1 candidates only at the α's within this distance of
    SmoothRot-max's α (the best α at q = 1 over all sites, under any scheme of the run); the
    q = 1 column is always scored for every α. None scores the whole grid. Every policy method
    then picks what it would pick from the whole grid wherever its choice lies in the window.
    """

    alphas: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    quantiles: list[float] = field(default_factory=lambda: [0.99, 0.995, 0.999, 0.9999, 1.0])
    act_clips: list[float] = field(default_factory=lambda: [1.0])
    alpha_window: float | None = None

    def __post_init__(self) -> None:
        if not self.alphas or not self.quantiles:
            raise ConfigError("search.alphas and search.quantiles must not be empty")
        for a in self.alphas:
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"search.alphas contains {a}; α must be in [0, 1]")
        for q in self.quantiles:
            if not 0.0 < q <= 1.0:
                raise ConfigError(f"search.quantiles contains {q}; q must be in (0, 1]")
        window = self.alpha_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int | float)
                                   or not window >= 0):
            raise ConfigError(f"search.alpha_window={self.alpha_window!r} must be null (the "
                              "whole grid) or a distance in α >= 0, e.g. 0.1")
        if not self.act_clips:
            raise ConfigError("search.act_clips must not be empty; [1.0] turns clipping off")
        for c in self.act_clips:
            if not 0.0 < c <= 1.0:
                raise ConfigError(f"search.act_clips contains {c}; a clip ratio must be in (0, 1]")
        if 1.0 not in self.quantiles:
            # q = 1 is the max policy; the quantile search must be able to fall back to it.
            self.quantiles = [*self.quantiles, 1.0]


SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Refinement of log-scales by Adam on the straight-through fake-quant output loss.

    ``schedule``: "cosine" decays the learning rate to zero over ``steps`` (converges in tens of
    steps, bench/README.md), "constant" keeps ``lr``. ``patience``: stop a site after that many
    validations in a row that do not lower the best selection loss by ``min_delta`` (relative);
    0 trains every step. ``share_across_schemes``: the scales trained under the run's first
    scheme are reused by a later scheme at every site where they beat that scheme's starting
    point on its selection loss (the rest are trained): on SmolLM2 the scales trained under
    W4A4 and W8A8 score alike under either scheme (bench/README.md). ``bf16_grads``: the
    backward GEMMs of the fake-quant product in bfloat16 on CPUs with native bfloat16 (AMX,
    AVX512-BF16; losses.Bf16GradProduct); the loss, validation and every score stay float32.
    """

    steps: int = 24
    lr: float = 0.1
    batch_tokens: int = 256
    val_every: int = 12
    log_bound: float = 9.0
    schedule: str = "cosine"
    patience: int = 0
    min_delta: float = 0.0
    progress_bar: bool = False
    share_across_schemes: bool = False
    bf16_grads: bool = True

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
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.patience < 0 or not 0 <= self.min_delta < 1:
            raise ConfigError(
                f"train.patience={self.patience} must be >= 0 and train.min_delta="
                f"{self.min_delta} in [0, 1) (a relative improvement)"
            )


# What trained_block fits a layer's output to (BlockTrainConfig.target), and GPTQ
# (GPTQConfig.target): the float layer on the same input, or the float model's own.
BLOCK_TARGETS = ("layer", "model")
BLOCK_WEIGHTS = ("rtn", "gptq")
# How a layer-output loss weighs tokens: ``mse``, by their squared error; ``relative``, by it over
# the target's squared norm (losses.relative_output_loss).
BLOCK_LOSSES = ("mse", "relative")
GPTQ_WEIGHTING = ("uniform", "residual")


def _check_layer_training(section: str, steps: int, lr: float, batch_tokens: int,
                          target: str, loss: str) -> None:
    """The checks every layer-output training section shares."""
    if steps < 0:
        raise ConfigError(f"{section}.steps={steps} must be >= 0")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"{section}.lr={lr} must be a positive number")
    if batch_tokens < 1:
        raise ConfigError(f"{section}.batch_tokens={batch_tokens} must be at least 1 (rounded "
                          "up to whole windows)")
    if target not in BLOCK_TARGETS:
        raise ConfigError(f"{section}.target={target!r} is not one of {list(BLOCK_TARGETS)}")
    if loss not in BLOCK_LOSSES:
        raise ConfigError(f"{section}.loss={loss!r} is not one of {list(BLOCK_LOSSES)}")


@dataclass
class BlockTrainConfig:
    """The ``trained_block`` method (training/block.py): the scales of each decoder layer's
    sites refined together against the layer's float output, starting from ``trained``, layer
    by layer on the quantized model's inputs. ``steps`` Adam steps per layer under a cosine
    schedule from ``lr``, each on ``batch_tokens`` tokens (whole windows); validation on the
    selection split before and after. ``target``: what the quantized layer's output is fitted
    to: ``layer``, the float layer on the same (quantized model's) input; ``model``, the float
    model's own hidden state there, so a layer also makes up for the error it receives.
    ``weights``: how the loss rounds the weights: ``rtn``, straight-through RTN; ``gptq``, the
    layer's sites rounded by GPTQ (as ``+gptq`` rounds them, ``gptq.target`` included) at the
    starting scales, that error held fixed while the scales move. ``loss``: ``mse``, the mean
    over tokens of the squared error; ``relative``, of each token's squared error over the
    target's squared norm, so the few tokens whose hidden state is thousands of times the others'
    (attention sinks) do not outweigh the rest: the next layer's norm sees relative error."""

    steps: int = 30
    lr: float = 0.02
    batch_tokens: int = 512
    target: str = "layer"
    weights: str = "rtn"
    loss: str = "mse"

    def __post_init__(self) -> None:
        _check_layer_training("block_training", self.steps, self.lr, self.batch_tokens,
                              self.target, self.loss)
        if self.weights not in BLOCK_WEIGHTS:
            raise ConfigError(f"block_training.weights={self.weights!r} is not one of "
                              f"{list(BLOCK_WEIGHTS)}")


@dataclass
class ActTuningConfig:
    """The ``<base>+gptq+act`` methods (methods/act_tuned.py): after sequential GPTQ rounds a
    decoder layer's sites, the activation side's scales (1/s in the sources) are trained against
    the layer's output with the rounded weights held fixed. ``steps`` Adam steps per layer under
    a cosine schedule from ``lr``, each on ``batch_tokens`` tokens (whole windows); ``target`` as
    and ``loss`` as in ``block_training``. The selection split's layer loss keeps the best point,
    the untuned ``+gptq`` layer included."""

    steps: int = 30
    lr: float = 0.01
    batch_tokens: int = 512
    target: str = "model"
    loss: str = "mse"

    def __post_init__(self) -> None:
        _check_layer_training("act_tuning", self.steps, self.lr, self.batch_tokens, self.target,
                              self.loss)

    def as_block(self) -> BlockTrainConfig:
        """The same run as the layer-output trainer (training/block.py) takes it."""
        return BlockTrainConfig(self.steps, self.lr, self.batch_tokens, self.target,
                                loss=self.loss)


@dataclass
class KLTrainConfig:
    """The ``trained_kl`` method (training/model_kl.py): every site's scales of the whole model
    refined at once, starting from ``trained_block + GPTQ`` (whose rounding error the loss holds
    fixed), against the KL divergence from the float model's next-token distribution to the
    quantized model's. ``steps`` Adam steps under a cosine schedule from ``lr``, each on
    ``batch_tokens`` tokens (whole calibration windows); the selection KL every ``val_every``
    steps (and before the first) keeps the best scales."""

    steps: int = 40
    lr: float = 0.005
    batch_tokens: int = 256
    val_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_tokens < 1 or self.val_every < 1:
            raise ConfigError(f"kl_training.steps={self.steps} must be >= 0, batch_tokens="
                              f"{self.batch_tokens} and val_every={self.val_every} at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"kl_training.lr={self.lr} must be a positive number")


@dataclass
class HeadRotationConfig:
    """Learned per-head rotations R2 (training/head_rotation.py): with ``learn``, before any
    method runs, each attention layer's o_proj input gets an orthogonal rotation per kv head,
    trained (Cayley parameterization, from the identity) together with that site's scales on its
    straight-through fake-quant output loss, then folded into v_proj's rows and o_proj's columns
    (exact: attention mixes tokens, never a head's channels; free at run time). Every method then
    fits its scales on the rotated model. ``steps`` Adam steps of ``batch_tokens`` tokens under a
    cosine schedule, ``lr`` for the rotations and ``scale_lr`` for the scales, which start at
    SmoothRot-max with ``alpha``; ``scheme`` (null: the first of ``schemes``) is the quantization
    it is learned under."""

    learn: bool = False
    steps: int = 200
    lr: float = 0.01
    scale_lr: float = 0.02
    batch_tokens: int = 256
    alpha: float = 0.6
    scheme: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.learn, bool):
            raise ConfigError(f"head_rotation.learn={self.learn!r} must be true or false")
        if self.steps < 0 or self.batch_tokens < 1:
            raise ConfigError(f"head_rotation.steps={self.steps} must be >= 0 and "
                              f"head_rotation.batch_tokens={self.batch_tokens} at least 1")
        for key in ("lr", "scale_lr"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"head_rotation.{key}={value} must be a positive number")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"head_rotation.alpha={self.alpha} must be in [0, 1]")
        if self.scheme is not None:
            get_scheme(self.scheme)


@dataclass
class CalibrationConfig:
    """How site inputs are captured: the whole model at once, or one decoder layer at a time.

    ``sequential`` bounds peak memory by one layer plus the cached hidden states (sequential.py);
    the statistics and kept rows are the same either way.
    """

    sequential: bool = False


@dataclass
class GPTQConfig:
    """How the ``+gptq`` methods round weights (gptq.py, sequential.py).

    ``sequential`` computes each site's Hessian (and its damping choice) from the inputs of the
    model with every earlier site already quantized, weights and activations, instead of the
    float model's inputs. ``target``: what the rounded site's output should match: ``layer``,
    the float weight on the same (quantized model's) inputs, as GPTQ does; ``model``, the float
    model's own output at that site, so the weights also make up for the error their inputs
    carry (GPTQ of a least-squares target, chosen per site on the selection split against
    plain GPTQ and RTN; needs ``sequential``). ``weighting``: how the Hessian, the least-squares
    target and the selection loss weigh tokens: ``uniform``, alike (GPTQ); ``residual``, at
    sites whose output stays with its token (all but attention's q/k/v), by 1 / the squared
    norm of the layer's output there, so the few tokens the residual stream carries at
    thousands of times the others' size (attention sinks) do not decide the rounding of every
    other token (needs ``sequential``). ``all_tokens``: the Hessian and the least-squares
    target from every calibration token instead of the ``data.train_tokens`` the trainers keep
    (a d-wide Hessian wants many more than d tokens; the walk runs them all anyway).
    ``refit_scales``: every GPTQ rounding also competes, on the selection split, with its
    per-channel scales refitted by least squares to its codes (core/gptq.refit_row_scales).
    """

    sequential: bool = True
    target: str = "layer"
    weighting: str = "uniform"
    all_tokens: bool = False
    refit_scales: bool = False

    def __post_init__(self) -> None:
        if self.target not in BLOCK_TARGETS:
            raise ConfigError(f"gptq.target={self.target!r} is not one of {list(BLOCK_TARGETS)}")
        if self.weighting not in GPTQ_WEIGHTING:
            raise ConfigError(f"gptq.weighting={self.weighting!r} is not one of "
                              f"{list(GPTQ_WEIGHTING)}")
        if self.all_tokens and not self.sequential:
            raise ConfigError("gptq.all_tokens needs gptq.sequential: true (without it GPTQ "
                              "rounds on the rows calibration kept, data.train_tokens)")
        if self.weighting == "residual" and not self.sequential:
            raise ConfigError("gptq.weighting='residual' needs gptq.sequential: true (the weights "
                              "come from the layer's output in the sequential walk)")
        if self.target == "model" and not self.sequential:
            raise ConfigError("gptq.target='model' needs gptq.sequential: true (the float "
                              "model's inputs differ from the quantized model's only there)")


@dataclass
class DistributedConfig:
    """Data-parallel processes (docs/distributed.md): calibration windows and every training
    batch are split across ``devices × num_nodes`` ranks and merged exactly."""

    devices: int = 1
    num_nodes: int = 1

    def __post_init__(self) -> None:
        for key in ("devices", "num_nodes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distributed.{key}={getattr(self, key)} must be at least 1")


@dataclass
class RotationConfig:
    """Fit options for the sites' online rotations. ``block_size`` (a power of two) splits every
    full online Hadamard over n channels into block-diagonal Hadamards of the largest power of two
    that divides n, at most ``block_size`` (512: 1536 = 3·512, 576 = 9·64), which vLLM runs with
    its fast kernel instead of a dense matrix product (docs/deployment.md).

    ``residual_kind`` is the kind of R1 (with ``residual_rotation: true``, surgery/residual.py):
    ``hadamard`` Q = diag(±1)·H, after which the residual readers (q/k/v, gate/up) get no online
    H (H·H = I would undo R1); ``random`` a seeded random orthogonal Q, which no H cancels, so
    the readers keep their own online H after their scales (placement "both")."""

    block_size: int | None = None
    residual_kind: str = "hadamard"

    def __post_init__(self) -> None:
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 2
                              or b & (b - 1)):
            raise ConfigError(f"rotation.block_size={b!r} must be null or a power of two >= 2, "
                              "e.g. 512")
        if self.residual_kind not in RESIDUAL_KINDS:
            raise ConfigError(f"rotation.residual_kind={self.residual_kind!r} is not one of "
                              f"{list(RESIDUAL_KINDS)}; use hadamard (R1 = diag(±1)·H) or random")


@dataclass
class FitConfig:
    """Everything ``train/fit_scales.py`` needs; one YAML file maps onto it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    block_training: BlockTrainConfig = field(default_factory=BlockTrainConfig)
    act_tuning: ActTuningConfig = field(default_factory=ActTuningConfig)
    kl_training: KLTrainConfig = field(default_factory=KLTrainConfig)
    head_rotation: HeadRotationConfig = field(default_factory=HeadRotationConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    layers: list[str] = field(default_factory=lambda: ["down_proj"])
    schemes: list[str] = field(default_factory=lambda: ["w4a4", "w8a8"])
    # Registered method names (smoothrot/methods/); the baseline smoothrot_max always runs.
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    perplexity: bool = True
    # Which reported methods get a perplexity (a forward pass over the evaluation split each);
    # null: every reported method; a mapping: per scheme (a scheme it does not name: every
    # method). A filter: listed methods the run does not report are skipped (so --methods can
    # narrow a config), unknown names fail. Held-out errors are always measured.
    perplexity_methods: list[str] | dict[str, list[str]] | None = None
    seed: int = 0
    output_dir: str = "outputs/fit_scales"
    # Rotate the residual stream by Q (QuaRot/SpinQuant R1, residual.py) before calibration.
    residual_rotation: bool = False
    # Whose arithmetic every number is computed with (schema/target.py).
    target: str = "vllm"
    rotation: RotationConfig = field(default_factory=RotationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers must name at least one site, e.g. ['down_proj']")
        for entry in self.layers:  # a bad regex fails now, not after the model loaded
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as exc:
                    raise ConfigError(f"layers entry {entry!r} is not a valid regex ({exc}); "
                                      "fix the pattern after 're:'") from None
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed={self.seed} must be in [0, 2**32) (numpy's seed range)")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty; pass --output-dir a folder, e.g. "
                              "outputs/fit_scales")
        for key in ("schemes", "methods"):
            values = getattr(self, key)
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(f"{key} lists {repeated} more than once; name each once")
        needed = ["calibration", "selection", "heldout"] + (["evaluation"] if self.perplexity
                                                            else [])
        missing = [name for name in needed if name not in self.data.fractions]
        if missing:
            raise ConfigError(
                f"data.fractions has no share for {missing}, which the run needs (evaluation: "
                "perplexity); add them, e.g. " + ", ".join(
                    f"{name}: {DataConfig().fractions[name]}" for name in missing)
                + (", or set perplexity: false" if missing == ["evaluation"] else ""))
        if not isinstance(self.residual_rotation, bool):
            raise ConfigError(
                f"residual_rotation={self.residual_rotation!r} must be true or false"
            )
        if self.rotation.residual_kind != "hadamard" and not self.residual_rotation:
            raise ConfigError(
                f"rotation.residual_kind={self.rotation.residual_kind!r} needs residual_rotation:"
                " true (it is the kind of R1); set residual_rotation: true or drop the key")
        processes = self.distributed.devices * self.distributed.num_nodes
        for key in ("calibration_samples", "selection_samples", "heldout_samples"):
            if getattr(self.data, key) < processes:  # every rank needs a window of each split
                raise ConfigError(
                    f"data.{key}={getattr(self.data, key)} is fewer than the {processes} "
                    f"processes; raise data.{key} to at least {processes} or use fewer devices"
                )
        if not self.schemes:
            raise ConfigError(f"schemes must not be empty; choose from {sorted(PRESET_SCHEMES)}")
        for name in self.schemes:
            get_scheme(name)
        if not self.methods:
            raise ConfigError("methods must not be empty, e.g. [trained]")
        self._check_perplexity_methods()
        if self.target not in TARGETS:
            raise ConfigError(f"target={self.target!r} is not one of {list(TARGETS)}")
        clips = self.search.act_clips != [1.0]
        if clips and not TARGETS[self.target].act_clips:
            raise ConfigError(
                f"search.act_clips={self.search.act_clips} needs target: research ({self.target}'s "
                "dynamic activation quantization has no clip); use act_clips: [1.0] or set "
                "target: research")
        if clips and self.export.formats:
            raise ConfigError(
                "export.formats with search.act_clips: no backend applies per-site activation "
                "clips, so the export would not compute the reported numbers; drop the clips "
                "(act_clips: [1.0]) to export")

    def _perplexity_lists(self) -> list[object]:
        """The method lists ``perplexity_methods`` holds: one, one per scheme, or none."""
        value = self.perplexity_methods
        return [] if value is None else list(value.values()) if isinstance(value, dict) else [value]

    def _check_perplexity_methods(self) -> None:
        """A list of method names, or a mapping of preset scheme names to such lists."""
        value = self.perplexity_methods
        if not all(isinstance(v, list) and all(isinstance(m, str) for m in v)
                   for v in self._perplexity_lists()):
            raise ConfigError(
                f"perplexity_methods={value!r} must be null, a list of method names or a "
                "mapping of scheme names to such lists, e.g. {w4a4: [smoothrot_max, trained], "
                "w8a8: [trained]}")
        for name in value if isinstance(value, dict) else ():
            try:
                get_scheme(name)
            except ConfigError as exc:
                raise ConfigError(f"perplexity_methods: {exc}") from None

    def perplexity_method_names(self) -> set[str]:
        """Every method name ``perplexity_methods`` lists, under any scheme."""
        return {m for names in self._perplexity_lists() for m in names}

    def perplexity_filter(self, scheme: str) -> list[str] | None:
        """The methods whose perplexity ``scheme`` reports (None: every reported method)."""
        if isinstance(self.perplexity_methods, dict):  # scheme names are case-insensitive
            return {k.lower(): v for k, v in self.perplexity_methods.items()}.get(scheme.lower())
        return self.perplexity_methods


_SCALARS: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,),
                                          str: (str,)}
_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("true or false", "booleans"), str: ("a string", "strings")}


def _type_mismatch(value: Any, hint: Any) -> str | None:
    """What ``hint`` expects if ``value`` does not fit it, else None.

    Checks the plain types config fields use (scalars, optional scalars, lists and dicts of
    scalars), so a wrong YAML type is reported with its key instead of as a TypeError later.
    """
    if hint in _SCALARS:
        fits = isinstance(value, _SCALARS[hint]) and (hint is bool or not isinstance(value, bool))
        return None if fits else _NAMES[hint][0]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        wrong = _type_mismatch(value, inner[0]) if len(inner) == 1 else None
        return None if wrong is None else f"{wrong} or null"
    if origin is list and args[0] in _NAMES and (
        not isinstance(value, list) or any(_type_mismatch(v, args[0]) for v in value)
    ):
        return f"a list of {_NAMES[args[0]][1]}"
    if origin is dict and args[1] in _NAMES and (
        not isinstance(value, dict) or any(_type_mismatch(v, args[1]) for v in value.values())
    ):
        return f"a mapping of names to {_NAMES[args[1]][1]}"
    return None


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
            continue
        expected = _type_mismatch(value, hint)
        if expected is not None:
            tip = ""
            if isinstance(value, str) and expected.startswith("a number"):
                try:  # YAML 1.1 reads 1e-3 (no dot) as text
                    float(value)
                    tip = f" (YAML reads {value} as text; write it with a dot, e.g. 1.0e-3)"
                except ValueError:
                    pass
            raise ConfigError(f"{where}.{key}".lstrip(".") + f"={value!r} must be {expected}{tip}")
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> FitConfig:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`FitConfig`."""
    return _from_dict(FitConfig, data, "")


def config_to_dict(cfg: FitConfig) -> dict[str, Any]:
    """Plain-data view of a config, suitable for YAML/JSON."""
    return dataclasses.asdict(cfg)


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build Python objects) that also refuses a key given
    twice in one mapping, where PyYAML would keep the last value silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may override keys
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(f"key {key!r} appears twice in one mapping (line "
                                         f"{key_node.start_mark.line + 1}); keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> FitConfig:
    """Read a YAML config; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}  # a SafeLoader
    except yaml.YAMLError as exc:
        first = f"config file {path} is not valid YAML: {exc}".splitlines()[0]
        if isinstance(exc, yaml.constructor.ConstructorError):  # e.g. !!python/object tags
            first += " (configs are plain YAML; tags that build Python objects are refused)"
        raise ConfigError(first) from None
    try:
        return config_from_dict(data)
    except TypeError as exc:  # wrong value types reaching a dataclass
        raise ConfigError(f"config file {path}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def dump_config(cfg: FitConfig) -> str:
    """YAML text of a config (round-trips through :func:`config_from_dict`)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
