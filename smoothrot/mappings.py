"""Architecture facts as data: which linear is smoothed into which.

A :class:`SmoothingSite` names, relative to one decoder layer, the linear whose *input* is
smoothed and rotated, and the layer whose *output rows* absorb ``diag(s)⁻¹``. Supporting a new
architecture means adding one table entry (see ``docs/adding_an_architecture.md``), never an
``if model_type == ...`` elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class SmoothingSite:
    """One smoothing site inside a decoder layer.

    ``smooth_from`` must feed ``linear`` only through elementwise multiplications (e.g. SwiGLU's
    ``act(gate(x)) * up(x)``), so scaling its output rows by ``1/s`` scales the linear's input
    channels by ``1/s`` exactly.
    """

    name: str
    linear: str
    smooth_from: str
    online_hadamard: bool = True


@dataclass(frozen=True)
class ArchitectureMap:
    """Where the decoder layers live and which sites each layer has."""

    layers: str
    sites: tuple[SmoothingSite, ...]


_GATED_MLP_DOWN = SmoothingSite(name="down_proj", linear="mlp.down_proj", smooth_from="mlp.up_proj")

LLAMA_LIKE = ArchitectureMap(layers="model.layers", sites=(_GATED_MLP_DOWN,))

# Keyed by the HF model class name, as llm-compressor does: it is what `from_pretrained` returns.
ARCHITECTURES: dict[str, ArchitectureMap] = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "Qwen3ForCausalLM": LLAMA_LIKE,
}


class UnsupportedArchitectureError(ValueError):
    """The model class has no mapping table."""


@dataclass(frozen=True)
class ResolvedSite:
    """A site bound to modules of one model: ``name`` is the qualified linear name."""

    name: str
    site: SmoothingSite
    layer_index: int
    linear: nn.Linear
    smooth_from: nn.Linear


def architecture_of(model: nn.Module) -> ArchitectureMap:
    """The mapping table for ``model``'s class, or a one-line error listing supported ones."""
    cls = type(model).__name__
    try:
        return ARCHITECTURES[cls]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {cls} has no smoothing table; supported: {sorted(ARCHITECTURES)}. "
            "Add an ArchitectureMap to smoothrot/mappings.py (docs/adding_an_architecture.md)"
        ) from None


def _matches(pattern: str, site: SmoothingSite, qualified: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], qualified) is not None
    return pattern in (site.name, qualified)


def resolve_sites(model: nn.Module, patterns: list[str]) -> list[ResolvedSite]:
    """Bind the requested sites to modules, in layer order.

    A pattern is a site name (``down_proj``: every layer), a qualified linear name
    (``model.layers.11.mlp.down_proj``) or a regular expression prefixed with ``re:``.
    """
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers)
    resolved: list[ResolvedSite] = []
    used: set[str] = set()
    for index, layer in enumerate(layers):
        for site in arch.sites:
            qualified = f"{arch.layers}.{index}.{site.linear}"
            hits = [p for p in patterns if _matches(p, site, qualified)]
            if not hits:
                continue
            used.update(hits)
            resolved.append(
                ResolvedSite(
                    name=qualified,
                    site=site,
                    layer_index=index,
                    linear=layer.get_submodule(site.linear),
                    smooth_from=layer.get_submodule(site.smooth_from),
                )
            )
    unused = [p for p in patterns if p not in used]
    if unused:
        names = sorted({s.name for s in arch.sites})
        raise ValueError(
            f"--layers {unused} matched no smoothing site in {type(model).__name__}; use a site "
            f"name {names}, a name like {arch.layers}.0.{arch.sites[0].linear}, or 're:<regex>'"
        )
    return resolved
