"""Architecture facts as data: which linears are smoothed from which layer, and how the residual
stream is read and written.

A :class:`SmoothingSite` names, relative to one decoder layer, a group of linears sharing one
input (``q/k/v``, ``gate/up``, ``o_proj``, ``down_proj``), the layer whose *output* absorbs
``diag(s)⁻¹`` (a linear's rows, an RMSNorm's γ or an offset RMSNorm's 1+γ) and the rotation of the
group's input. A :class:`ResidualMap` names the norms, readers and writers of the residual stream
for the QuaRot/SpinQuant R1 rotation (residual.py). One :class:`ArchitectureMap` per architecture,
keyed by HF class name in :data:`ARCHITECTURES`; supporting a new architecture is a table entry
plus a contract test (``docs/adding_an_architecture.md``), never an ``if model_type == ...``.
Binding a table to a model's modules is :mod:`smoothrot.arch.sites`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from smoothrot.schema.rotation import Rotation, RotationKind

SMOOTH_FROM_KINDS = ("linear_rows", "norm", "offset_norm")
TIES = ("kv_heads",)
NORM_KINDS = ("rms", "offset_rms")


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

    ``rotation`` (:mod:`smoothrot.schema.rotation`): ``full`` online by default (on o_proj's
    input it mixes the heads too, as QuaRot does); ``Rotation.head()`` is block-diagonal over
    head_dim blocks at run time, ``Rotation.head("offline")`` folds that per-head H into v_proj's
    rows (exact because attention mixes tokens, not a head's channels; free at run time).

    ``tie="kv_heads"``: one scale per v_proj row, shared by the o_proj input channels of all
    query heads reading that kv head (grouped-query attention).
    """

    name: str
    linears: tuple[str, ...]
    smooth_from: str
    smooth_from_kind: str = "linear_rows"
    rotation: Rotation = field(default_factory=Rotation.full)
    smooth_from_rows: str | None = None
    tie: str | None = None
    # The group's outputs reach other tokens (attention's q/k/v): an error at one token is not
    # that token's alone, so token-weighted losses leave such a site unweighted.
    mixes_tokens: bool = False

    def __post_init__(self) -> None:
        if not self.linears:
            raise ValueError(f"site {self.name!r}: linears must not be empty")
        if self.smooth_from_kind not in SMOOTH_FROM_KINDS:
            raise ValueError(f"site {self.name!r}: smooth_from_kind not in {SMOOTH_FROM_KINDS}")
        if not isinstance(self.rotation, Rotation):
            raise ValueError(f"site {self.name!r}: rotation must be a Rotation")
        if self.rotation.kind is RotationKind.BLOCK:
            raise ValueError(f"site {self.name!r}: block rotations are a fit option, not a "
                             "table entry")
        if self.smooth_from_rows is not None and (
            self.smooth_from_kind != "linear_rows" or self.smooth_from_rows not in ROW_SLICES
        ):
            raise ValueError(
                f"site {self.name!r}: smooth_from_rows needs a linear and one of {list(ROW_SLICES)}"
            )
        if self.tie is not None and self.tie not in TIES:
            raise ValueError(f"site {self.name!r}: tie not in {TIES}")
        if self.rotation.is_offline() and self.smooth_from_kind != "linear_rows":
            raise ValueError(f"site {self.name!r}: an offline rotation folds H into rows")

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
                      "input_layernorm", norm_kind, mixes_tokens=True),
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
        SmoothingSite("qkv", ("self_attn.qkv_proj",), "input_layernorm", "norm",
                      mixes_tokens=True),
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
