"""Residual-stream rotation (QuaRot / SpinQuant "R1"): the whole residual stream becomes x·Q.

With Q orthogonal ([hidden, hidden]) the model computes the same function after:

1. untying ``lm_head`` from the embedding if they are tied (SmolLM2, Gemma): the embedding gets
   E·Q, ``lm_head`` gets W·diag(γ_final)·Q, which are different matrices (logged);
2. folding every pre-norm's weight into the linears that read it, W ← W·diag(γ) (γ+1 for offset
   norms such as Gemma's), the final norm's into ``lm_head``, and making the norms weightless
   (γ = 1, or 0 for offset norms). Nothing divides by γ, so signed and zero γ are exact;
3. E ← E·Q, readers W ← W·Q, writers W ← Qᵀ·W (and b ← b·Q), ``lm_head`` W ← W·Q.

RMSNorm(x) = x / rms(x) commutes with Q because ||x·Q|| = ||x||, so (unlike LayerNorm) no
mean-centering is needed. Gemma's embedding scale sqrt(hidden) is a scalar and commutes with Q.
Gemma-2's sandwich norms normalize a block's *output* with a per-channel γ before the residual
add; γ does not commute with Q, so those norms keep γ and an online y ↦ y·Q follows them (a fast
Hadamard when Q is one). All folding runs in float64 and is cast back once.

Q is a randomized Hadamard matrix diag(±1)·H (``kind="hadamard"``, QuaRot's choice: spreads
outliers, fast online), or a random orthogonal matrix (``kind="random"``, and where no Hadamard
of the hidden size exists). After a Hadamard Q, sites reading the residual (q/k/v, gate/up) get no
online Hadamard of their own (``resolve_sites(..., residual_kind="hadamard")``): H is symmetric,
H·H = I, so x·Q·H = x·diag(±1) would undo R1 (measured on SmolLM2 W4A4: perplexity 1.8e5 instead
of 176). A random Q is not undone by H, so after it they keep theirs (placement "both"); pass
``ResidualRotation.kind``, the kind applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from smoothrot.arch.sites import architecture_of
from smoothrot.arch.tables import ArchitectureMap, ResidualMap
from smoothrot.core.hadamard import hadamard_matrix, hadamard_transform, is_supported
from smoothrot.schema.rotation import RESIDUAL_KINDS

log = logging.getLogger(__name__)

ROTATION_KINDS = RESIDUAL_KINDS
# Marks a rotated model so R1 is never applied twice (read by rotate_residual only).
_ROTATED_MARK = "_smoothrot_r1"


@dataclass
class ResidualRotation:
    """What :func:`rotate_residual` did: the rotation, whether it untied lm_head, online hooks."""

    q: torch.Tensor
    kind: str
    signs: torch.Tensor | None
    untied_lm_head: bool
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)


def rotation_matrix(n: int, seed: int = 0, kind: str = "hadamard") -> tuple[torch.Tensor,
                                                                           torch.Tensor | None]:
    """Orthogonal Q [n, n] (float64) and, for ``hadamard``, the signs σ with Q = diag(σ)·H."""
    if kind not in ROTATION_KINDS:
        raise ValueError(f"rotation kind {kind!r} is not one of {ROTATION_KINDS}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
        return signs.unsqueeze(1) * hadamard_matrix(n, dtype=torch.float64), signs
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), None


class OnlineResidualRotation:
    """x ↦ x·Q, as a forward hook after a Gemma-2 output norm and for folding weights.

    With Q = diag(σ)·H this is a fast Hadamard transform of x·diag(σ), O(n log n) per row.
    """

    def __init__(self, q: torch.Tensor, signs: torch.Tensor | None) -> None:
        self.q = q
        self.signs = signs

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x·Q over the last dim, in x's dtype and device."""
        if self.signs is not None:
            return hadamard_transform(x * self.signs.to(x))
        return x @ self.q.to(x)

    def __call__(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.apply(output)


def _norm_weight(norm: nn.Module, where: str) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise ValueError(
            f"{where}: R1 needs an RMSNorm with a 1-d weight and no bias, got "
            f"{type(norm).__name__} (LayerNorm would also need mean-centering)"
        )
    return weight


def _effective_gamma(weight: torch.Tensor, kind: str) -> torch.Tensor:
    return weight.double() + 1.0 if kind == "offset_rms" else weight.double()


@torch.no_grad()
def _reset_norm(weight: torch.Tensor, kind: str) -> None:
    weight.fill_(0.0 if kind == "offset_rms" else 1.0)


@torch.no_grad()
def untie_lm_head(model: nn.Module, rmap: ResidualMap) -> bool:
    """Give ``lm_head`` its own weight if it shares the embedding's; True if it did."""
    embedding = model.get_submodule(rmap.embedding)
    lm_head = model.get_submodule(rmap.lm_head)
    if lm_head.weight.data_ptr() != embedding.weight.data_ptr():
        return False
    lm_head.weight = nn.Parameter(embedding.weight.detach().clone(),
                                  requires_grad=embedding.weight.requires_grad)
    for config in {id(c): c for c in _configs(model)}.values():
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    log.info("untied %s from %s (tie_word_embeddings was True): the final norm and Q make them "
             "different matrices", rmap.lm_head, rmap.embedding)
    return True


def _configs(model: nn.Module) -> list[object]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config, text]


def _residual_map(model: nn.Module) -> tuple[ArchitectureMap, ResidualMap]:
    arch = architecture_of(model)
    if arch.residual is None:
        raise ValueError(f"{type(model).__name__} has no residual map; R1 is not supported for it")
    return arch, arch.residual


@torch.no_grad()
def fold_norms(model: nn.Module) -> bool:
    """Fold every pre-norm γ into its readers and the final norm into lm_head (unties first).

    Returns True if lm_head was untied. The norms become weightless; the function is unchanged.
    """
    arch, rmap = _residual_map(model)
    untied = untie_lm_head(model, rmap)
    layers = model.get_submodule(arch.layers)
    feeds = [(f"{arch.layers}.{i}.{feed.norm}", [layer.get_submodule(p) for p in feed.linears],
              layer.get_submodule(feed.norm))
             for i, layer in enumerate(layers) for feed in rmap.readers]
    feeds.append((rmap.final_norm, [model.get_submodule(rmap.lm_head)],
                  model.get_submodule(rmap.final_norm)))
    for where, linears, norm in feeds:
        weight = _norm_weight(norm, where)
        gamma = _effective_gamma(weight, rmap.norm_kind)
        for linear in linears:
            linear.weight.copy_((linear.weight.double() * gamma).to(linear.weight.dtype))
        _reset_norm(weight, rmap.norm_kind)
    return untied


@torch.no_grad()
def _right(module: nn.Module, rot: OnlineResidualRotation) -> None:
    """Reader (or embedding, rows = tokens): W ← W·Q (its input is now x·Q)."""
    w = module.weight
    w.copy_(rot.apply(w.double()).to(w.dtype))


@torch.no_grad()
def _left(linear: nn.Linear, rot: OnlineResidualRotation) -> None:
    """Writer: W ← Qᵀ·W = (Wᵀ·Q)ᵀ, b ← b·Q (its output is now y·Q)."""
    w = linear.weight
    w.copy_(rot.apply(w.double().T).T.to(w.dtype))
    if linear.bias is not None:
        linear.bias.copy_(rot.apply(linear.bias.double()).to(linear.bias.dtype))


@torch.no_grad()
def rotate_residual(model: nn.Module, *, seed: int = 0, kind: str = "hadamard") -> ResidualRotation:
    """Apply R1 in place: fold norms, rotate embedding, readers, writers and lm_head by Q.

    ``kind="hadamard"`` falls back to ``random`` (with a warning) when no Hadamard matrix of the
    hidden size exists. Gemma-2 style output norms get a forward hook (kept in the result's
    ``handles``; it is part of the model from now on).
    """
    arch, rmap = _residual_map(model)
    embedding = model.get_submodule(rmap.embedding)
    if getattr(model, _ROTATED_MARK, None) is not None:
        raise ValueError("the residual stream of this model is already rotated (R1 applied twice)")
    hidden = embedding.weight.shape[1]
    if kind == "hadamard" and not is_supported(hidden):
        log.warning("no Hadamard matrix of order %d: R1 uses a random orthogonal matrix", hidden)
        kind = "random"
    q, signs = rotation_matrix(hidden, seed, kind)
    rot = OnlineResidualRotation(q, signs)
    untied = fold_norms(model)
    _right(embedding, rot)  # rows are tokens: E·Q
    layers = model.get_submodule(arch.layers)
    handles = []
    for layer in layers:
        for feed in rmap.readers:
            for path in feed.linears:
                _right(layer.get_submodule(path), rot)
        for path in rmap.writers:
            _left(layer.get_submodule(path), rot)
        for path in rmap.output_norms:
            handles.append(layer.get_submodule(path).register_forward_hook(rot))
    _right(model.get_submodule(rmap.lm_head), rot)
    log.info("rotated the residual stream of %d layers by a %s Q of order %d%s", len(layers),
             kind, hidden, f" (+{len(handles)} online output-norm rotations)" if handles else "")
    result = ResidualRotation(q=q, kind=kind, signs=signs, untied_lm_head=untied, handles=handles)
    setattr(model, _ROTATED_MARK, True)
    return result
