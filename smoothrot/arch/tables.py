"""Architecture facts as data: which linears are smoothed from which layer, and how the residual
stream is read and written.

A :class:`SmoothingSite` names, relative to one decoder layer, a group of linears sharing one
input (``q/k/v``, ``gate/up``, ``o_proj``, ``down_proj``), the layer whose *output* absorbs
``diag(s)⁻¹`` (a linear's rows, an RMSNorm's γ or an offset RMSNorm's 1+γ) and the rotation of the
group's input. A :class:`ResidualMap` names the norms, readers and writers of the residual stream
for the QuaRot/SpinQuant R1 rotation (residual.py). One :class:`ArchitectureMap` per architecture,
keyed by HF class name in :data:`ARCHITECTURES`; supporting a new architecture is a table entry
plus a contract test (``docs/adding_an_architecture.md``), never an ``if model_type == ...``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from smoothrot.losses import InputTransform

SMOOTH_FROM_KINDS = ("linear_rows", "norm", "offset_norm")
SITE_ROTATIONS = ("online", "head_online", "head_offline", "none")
TIES = ("kv_heads",)
NORM_KINDS = ("rms", "offset_rms")
ALL = "all"
# Set on a model by residual.rotate_residual: its residual stream is already rotated by Q.
RESIDUAL_ROTATION_ATTR = "smoothrot_residual_rotation"


@dataclass(frozen=True)
class ModelDims:
    """The config numbers the tables need (head layout for o_proj, sizes of fused row slices)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def from_config(cls, config: object) -> ModelDims:
        """Read a HF config (the text config of a multimodal one)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        intermediate = int(getattr(config, "intermediate_size", 0) or 0)
        return cls(hidden, heads, kv_heads, head_dim, intermediate)


# Named row ranges [start, stop) of fused projections (Phi-3): config-dependent, so small functions.
ROW_SLICES: dict[str, Callable[[ModelDims], tuple[int, int]]] = {
    # qkv_proj rows are [q (heads·d) | k (kv·d) | v (kv·d)].
    "fused_qkv.v": lambda d: ((d.heads + d.kv_heads) * d.head_dim,
                              (d.heads + 2 * d.kv_heads) * d.head_dim),
    # gate_up_proj rows are [gate | up]; the MLP computes act(gate) * up.
    "fused_gate_up.up": lambda d: (d.intermediate, 2 * d.intermediate),
}


@dataclass(frozen=True)
class SmoothingSite:
    """One smoothing site inside a decoder layer: a group of linears sharing one input.

    ``smooth_from`` must feed the linears only through elementwise multiplications (e.g.
    SwiGLU's ``act(gate(x)) * up(x)``, or attention, which mixes tokens but not v's channels), so
    dividing its output channels by ``s`` divides the group's input channels by ``s`` exactly.
    ``smooth_from_kind`` says where ``1/s`` goes: ``linear_rows`` (rows of a linear, or the rows
    ``smooth_from_rows`` of a fused one), ``norm`` (γ/s: signed γ is fine, s > 0) or
    ``offset_norm`` (weight = 1+γ as in Gemma: γ' = (1+γ)/s − 1).

    ``rotation``: ``online`` (Hadamard over the whole group input, at run time; on o_proj's
    input it mixes the heads too, as QuaRot does), ``head_online`` (block-diagonal Hadamard over
    head_dim blocks on o_proj's input, at run time), ``head_offline`` (that per-head H folded into
    v_proj's rows: exact because attention mixes tokens, not a head's channels; free at run time)
    or ``none``.

    ``tie="kv_heads"``: one scale per v_proj row, shared by the o_proj input channels of all
    query heads reading that kv head (grouped-query attention).
    """

    name: str
    linears: tuple[str, ...]
    smooth_from: str
    smooth_from_kind: str = "linear_rows"
    rotation: str = "online"
    smooth_from_rows: str | None = None
    tie: str | None = None

    def __post_init__(self) -> None:
        if not self.linears:
            raise ValueError(f"site {self.name!r}: linears must not be empty")
        if self.smooth_from_kind not in SMOOTH_FROM_KINDS:
            raise ValueError(f"site {self.name!r}: smooth_from_kind not in {SMOOTH_FROM_KINDS}")
        if self.rotation not in SITE_ROTATIONS:
            raise ValueError(f"site {self.name!r}: rotation not in {SITE_ROTATIONS}")
        if self.smooth_from_rows is not None and (
            self.smooth_from_kind != "linear_rows" or self.smooth_from_rows not in ROW_SLICES
        ):
            raise ValueError(
                f"site {self.name!r}: smooth_from_rows needs a linear and one of {list(ROW_SLICES)}"
            )
        if self.tie is not None and self.tie not in TIES:
            raise ValueError(f"site {self.name!r}: tie not in {TIES}")
        if self.rotation == "head_offline" and self.smooth_from_kind != "linear_rows":
            raise ValueError(f"site {self.name!r}: head_offline folds H into a linear's rows")

    @property
    def path(self) -> str:
        """Name inside a layer: the linear for one linear, ``<parent>.<name>`` for a group."""
        if len(self.linears) == 1:
            return self.linears[0]
        parents = {linear.rpartition(".")[0] for linear in self.linears}
        parent = parents.pop() if len(parents) == 1 else ""
        return f"{parent}.{self.name}" if parent else self.name


@dataclass(frozen=True)
class NormFeed:
    """A norm and the linears reading its output (R1 folds γ into them)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ResidualMap:
    """Who reads and writes the residual stream (for the R1 rotation, residual.py).

    ``readers``: per layer, the pre-norms and the linears they feed (γ folded into the linears,
    then W·Q). ``writers``: linears adding to the residual (Qᵀ·W rows). ``output_norms``: norms
    applied to a block's output before the residual add (Gemma-2 sandwich norms): their γ cannot
    move past Q, so they keep it and an online x·Q follows them.
    """

    norm_kind: str
    readers: tuple[NormFeed, ...]
    writers: tuple[str, ...]
    output_norms: tuple[str, ...] = ()
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    def __post_init__(self) -> None:
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"norm_kind {self.norm_kind!r} is not one of {NORM_KINDS}")


@dataclass(frozen=True)
class ArchitectureMap:
    """Where the decoder layers live, which sites each layer has, and its residual stream."""

    layers: str
    sites: tuple[SmoothingSite, ...]
    residual: ResidualMap | None = None


def _attention_mlp_sites(norm_kind: str, mlp_norm: str) -> tuple[SmoothingSite, ...]:
    """The four sites of a pre-norm attention + gated MLP layer with separate projections."""
    return (
        SmoothingSite("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      "input_layernorm", norm_kind),
        SmoothingSite("o_proj", ("self_attn.o_proj",), "self_attn.v_proj", "linear_rows",
                      tie="kv_heads"),
        SmoothingSite("gate_up", ("mlp.gate_proj", "mlp.up_proj"), mlp_norm, norm_kind),
        SmoothingSite("down_proj", ("mlp.down_proj",), "mlp.up_proj", "linear_rows"),
    )


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")

# LLaMA, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q_norm/k_norm after q/k: untouched by
# input scaling W·diag(s) with input x/s, and by R1, which acts on the residual side).
LLAMA_LIKE = ArchitectureMap(
    layers="model.layers",
    sites=_attention_mlp_sites("norm", "post_attention_layernorm"),
    residual=ResidualMap(
        norm_kind="rms",
        readers=(NormFeed("input_layernorm", _QKV), NormFeed("post_attention_layernorm", _GATE_UP)),
        writers=_WRITERS,
    ),
)

# Gemma: weight = 1+γ norms, embeddings scaled by sqrt(hidden) (a scalar: commutes with Q).
GEMMA = ArchitectureMap(
    layers="model.layers",
    sites=_attention_mlp_sites("offset_norm", "post_attention_layernorm"),
    residual=ResidualMap(
        norm_kind="offset_rms",
        readers=(NormFeed("input_layernorm", _QKV), NormFeed("post_attention_layernorm", _GATE_UP)),
        writers=_WRITERS,
    ),
)

# Gemma-2: sandwich norms. pre_feedforward_layernorm feeds gate/up; post_attention_layernorm and
# post_feedforward_layernorm normalize the attention / MLP *output* before the residual add.
GEMMA2 = ArchitectureMap(
    layers="model.layers",
    sites=_attention_mlp_sites("offset_norm", "pre_feedforward_layernorm"),
    residual=ResidualMap(
        norm_kind="offset_rms",
        readers=(NormFeed("input_layernorm", _QKV),
                 NormFeed("pre_feedforward_layernorm", _GATE_UP)),
        writers=(),
        output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
)

# Phi-3: fused qkv_proj and gate_up_proj; o_proj and down_proj smooth from row slices of them.
PHI3 = ArchitectureMap(
    layers="model.layers",
    sites=(
        SmoothingSite("qkv", ("self_attn.qkv_proj",), "input_layernorm", "norm"),
        SmoothingSite("o_proj", ("self_attn.o_proj",), "self_attn.qkv_proj", "linear_rows",
                      smooth_from_rows="fused_qkv.v", tie="kv_heads"),
        SmoothingSite("gate_up", ("mlp.gate_up_proj",), "post_attention_layernorm", "norm"),
        SmoothingSite("down_proj", ("mlp.down_proj",), "mlp.gate_up_proj", "linear_rows",
                      smooth_from_rows="fused_gate_up.up"),
    ),
    residual=ResidualMap(
        norm_kind="rms",
        readers=(NormFeed("input_layernorm", ("self_attn.qkv_proj",)),
                 NormFeed("post_attention_layernorm", ("mlp.gate_up_proj",))),
        writers=_WRITERS,
    ),
)

# Keyed by the HF model class name, as llm-compressor does: it is what `from_pretrained` returns.
ARCHITECTURES: dict[str, ArchitectureMap] = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "Qwen3ForCausalLM": LLAMA_LIKE,
    "GemmaForCausalLM": GEMMA,
    "Gemma2ForCausalLM": GEMMA2,
    "Phi3ForCausalLM": PHI3,
}


class UnsupportedArchitectureError(ValueError):
    """The model class has no mapping table."""


@dataclass(frozen=True, eq=False)
class ResolvedSite:
    """A site bound to modules of one model.

    ``name`` is the qualified site name (``model.layers.3.mlp.down_proj`` for one linear,
    ``model.layers.3.self_attn.qkv`` for a group). ``rows`` is the row range of ``smooth_from``
    that absorbs ``1/s`` (None: all rows / the norm). ``transform`` is the input transform the
    loss and the surgery use (rotation and scale tying).
    """

    name: str
    site: SmoothingSite
    layer_index: int
    linears: tuple[nn.Linear, ...]
    smooth_from: nn.Module
    rows: tuple[int, int] | None
    transform: InputTransform

    @property
    def linear(self) -> nn.Linear:
        """The first linear of the group; its input is the group's input (hooks go here)."""
        return self.linears[0]

    @property
    def weight(self) -> torch.Tensor:
        """The group's weights concatenated along the output dim, [Σ out, in]."""
        if len(self.linears) == 1:
            return self.linears[0].weight
        return torch.cat([linear.weight for linear in self.linears])

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    @property
    def n_scales(self) -> int:
        """Length of this site's scale vector (kv_heads·head_dim for tied o_proj scales)."""
        return self.transform.n_scales(self.in_features)

    @property
    def smooth_from_kind(self) -> str:
        return self.site.smooth_from_kind


def architecture_of(model: nn.Module) -> ArchitectureMap:
    """The mapping table for ``model``'s class, or a one-line error listing supported ones."""
    cls = type(model).__name__
    try:
        return ARCHITECTURES[cls]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {cls} has no smoothing table; supported: {sorted(ARCHITECTURES)}. "
            "Add an ArchitectureMap to smoothrot/arch/tables.py (docs/adding_an_architecture.md)"
        ) from None


def _reads_rotated_residual(model: nn.Module, arch: ArchitectureMap, site: SmoothingSite) -> bool:
    """True if R1 was applied and the site's linears read the (rotated) residual stream."""
    if arch.residual is None or getattr(model, RESIDUAL_ROTATION_ATTR, None) is None:
        return False
    return any(set(site.linears) <= set(feed.linears) for feed in arch.residual.readers)


def _input_transform(site: SmoothingSite, dims: ModelDims, rotated_input: bool) -> InputTransform:
    rotation = {"online": "online", "none": "none"}.get(site.rotation, "head")
    if rotated_input and rotation == "online":
        # R1 already rotated this input by Q = diag(σ)·H; a second H would undo it (H·H = I for
        # a symmetric H, so x·Q·H = x·diag(σ)), bringing the outliers back.
        rotation = "none"
    head = rotation == "head" or site.tie is not None
    tie = site.tie == "kv_heads" and dims.heads != dims.kv_heads
    return InputTransform(
        rotation=rotation,
        head_dim=dims.head_dim if head else None,
        heads=dims.heads if tie else None,
        kv_heads=dims.kv_heads if tie else None,
    )


def _source_size(rs_name: str, module: nn.Module, kind: str, rows: tuple[int, int] | None) -> int:
    if kind == "linear_rows":
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{rs_name}: smooth_from is {type(module).__name__}, not a Linear")
        return rows[1] - rows[0] if rows else module.out_features
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 1:
        raise ValueError(f"{rs_name}: smooth_from {type(module).__name__} has no 1-d weight γ")
    return weight.numel()


def _bind(model: nn.Module, arch: ArchitectureMap, dims: ModelDims, index: int,
          layer: nn.Module, site: SmoothingSite) -> ResolvedSite:
    name = f"{arch.layers}.{index}.{site.path}"
    linears = tuple(layer.get_submodule(p) for p in site.linears)
    if len({lin.in_features for lin in linears}) != 1:
        raise ValueError(f"{name}: the linears {site.linears} do not share one input size")
    rows = ROW_SLICES[site.smooth_from_rows](dims) if site.smooth_from_rows else None
    source = layer.get_submodule(site.smooth_from)
    transform = _input_transform(site, dims, _reads_rotated_residual(model, arch, site))
    n_scales = transform.n_scales(linears[0].in_features)
    size = _source_size(name, source, site.smooth_from_kind, rows)
    if size != n_scales:
        raise ValueError(
            f"{name}: {site.smooth_from} gives {size} channels but the site needs {n_scales}; "
            f"the {type(model).__name__} table does not fit this model"
        )
    return ResolvedSite(name, site, index, linears, source, rows, transform)


def _matches(pattern: str, site: SmoothingSite, qualified: str, members: list[str]) -> bool:
    if pattern == ALL:
        return True
    if pattern.startswith("re:"):
        return any(re.fullmatch(pattern[3:], q) is not None for q in (qualified, *members))
    return pattern in (site.name, qualified, *members)


def resolve_sites(model: nn.Module, patterns: list[str]) -> list[ResolvedSite]:
    """Bind the requested sites to modules, in layer order (table order inside a layer).

    A pattern is ``all``, a site name (``down_proj``, ``qkv``: every layer), a qualified site name
    (``model.layers.11.mlp.down_proj``, ``model.layers.0.self_attn.qkv``), the qualified name of
    any linear of a group (``model.layers.0.self_attn.k_proj``) or a regex prefixed with ``re:``.
    On a model whose residual stream was rotated (R1), sites reading the residual stream (q/k/v,
    gate/up) get no online rotation of their own: their input is already rotated.
    """
    arch = architecture_of(model)
    dims = ModelDims.from_config(model.config)
    layers = model.get_submodule(arch.layers)
    resolved: list[ResolvedSite] = []
    used: set[str] = set()
    for index, layer in enumerate(layers):
        for site in arch.sites:
            qualified = f"{arch.layers}.{index}.{site.path}"
            members = [f"{arch.layers}.{index}.{p}" for p in site.linears]
            hits = [p for p in patterns if _matches(p, site, qualified, members)]
            if not hits:
                continue
            used.update(hits)
            resolved.append(_bind(model, arch, dims, index, layer, site))
    unused = [p for p in patterns if p not in used]
    if unused:
        names = [ALL, *dict.fromkeys(s.name for s in arch.sites)]
        raise ValueError(
            f"--layers {unused} matched no smoothing site in {type(model).__name__}; use a site "
            f"name {names}, a name like {arch.layers}.0.{arch.sites[-1].path}, or 're:<regex>'"
        )
    return resolved
