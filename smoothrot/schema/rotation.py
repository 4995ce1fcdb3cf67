"""The rotation a site applies to its input: one type used by the tables, the losses, the surgery,
the export declaration and the loader (torch-free, so the CLI and schemas can use it).

A site computes ``Q_a(x·diag(s)⁻¹·R) · Q_w(W·diag(s)·R)ᵀ`` with R orthonormal. ``kind`` says what
R is, ``location`` where ``x·R`` is computed; ``W·R`` is always fused offline (float64).

====================  ===============================================  =======================
kind                  R                                                size of each H block
====================  ===============================================  =======================
``none``              identity                                         —
``full``              one Hadamard over all n input channels            n
``head``              blockdiag(H_d): one Hadamard per attention head   head_dim (from model)
``block``             blockdiag(H_b): Hadamards over fixed-size blocks  ``block_size`` (config)
====================  ===============================================  =======================

====================  ===============================================  =======================
location              where x·R happens                                 allowed kinds
====================  ===============================================  =======================
``online``            at run time, on the linear's input (a pre-hook,   full, head, block
                      or a backend's ``transform_config``)
``offline``           folded into the source's output rows (v_proj for  head
                      o_proj: attention mixes tokens, never a head's
                      channels), free at run time
====================  ===============================================  =======================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

# Kinds of the residual-stream rotation R1 (surgery/residual.py), not of a site's R:
# ``hadamard`` Q = diag(±1)·H, ``random`` a random orthogonal Q.
RESIDUAL_KINDS = ("hadamard", "random")


class RotationKind(str, Enum):
    """What the orthonormal R is (see the module table)."""

    NONE = "none"
    FULL = "full"
    HEAD = "head"
    BLOCK = "block"


class RotationLocation(str, Enum):
    """Where ``x·R`` is computed (see the module table)."""

    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class Rotation:
    """A site's input rotation. ``block_size``: the H block of ``head`` (head_dim, filled in when
    the table is bound to a model) and ``block`` rotations; None for ``full`` and ``none``."""

    kind: RotationKind = RotationKind.FULL
    location: RotationLocation = RotationLocation.ONLINE
    block_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", RotationKind(self.kind))
        object.__setattr__(self, "location", RotationLocation(self.location))
        if self.location is RotationLocation.OFFLINE and self.kind is not RotationKind.HEAD:
            raise ValueError(f"a {self.kind.value} rotation cannot be offline; only per-head "
                             "rotations fold into the source's rows")
        blocked = self.kind in (RotationKind.HEAD, RotationKind.BLOCK)
        if not blocked and self.block_size is not None:
            raise ValueError(f"a {self.kind.value} rotation takes no block_size")
        if self.kind is RotationKind.BLOCK and self.block_size is None:
            raise ValueError("a block rotation needs block_size, e.g. 512")
        if self.block_size is not None and (isinstance(self.block_size, bool)
                                            or not isinstance(self.block_size, int)
                                            or self.block_size < 2):
            raise ValueError(f"block_size={self.block_size!r} must be an integer >= 2")

    @classmethod
    def none(cls) -> Rotation:
        return cls(RotationKind.NONE)

    @classmethod
    def full(cls) -> Rotation:
        return cls(RotationKind.FULL)

    @classmethod
    def head(cls, location: RotationLocation | str = RotationLocation.ONLINE,
             block_size: int | None = None) -> Rotation:
        return cls(RotationKind.HEAD, RotationLocation(location), block_size)

    @classmethod
    def block(cls, block_size: int) -> Rotation:
        return cls(RotationKind.BLOCK, RotationLocation.ONLINE, block_size)

    @property
    def is_identity(self) -> bool:
        return self.kind is RotationKind.NONE

    def is_online(self) -> bool:
        """True if ``x·R`` must run at inference time (a hook or a backend transform)."""
        return not self.is_identity and self.location is RotationLocation.ONLINE

    def is_offline(self) -> bool:
        """True if ``x·R`` is folded into the source's rows."""
        return not self.is_identity and self.location is RotationLocation.OFFLINE

    def bound(self, head_dim: int) -> Rotation:
        """This rotation for a model whose heads are ``head_dim`` wide (fills ``head`` blocks)."""
        if self.kind is RotationKind.HEAD and self.block_size is None:
            return replace(self, block_size=head_dim)
        return self

    def order(self, in_features: int) -> int | None:
        """The order of each Hadamard block for ``in_features`` input channels (None: no H)."""
        if self.is_identity:
            return None
        if self.kind is RotationKind.FULL:
            return in_features
        if self.block_size is None:
            raise ValueError("a per-head rotation is not bound to a model yet (no head_dim)")
        return self.block_size

    def describe(self) -> str:
        """Human-readable, for logs and reports (never parsed)."""
        if self.is_identity:
            return "none"
        size = "" if self.block_size is None else f" {self.block_size}"
        return f"{self.kind.value}{size} ({self.location.value})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "location": self.location.value,
                "block_size": self.block_size}

    @classmethod
    def from_dict(cls, data: Any) -> Rotation:
        """Strict inverse of :meth:`to_dict` (unknown keys and bad values raise ValueError)."""
        if not isinstance(data, dict):
            raise ValueError(f"a rotation must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"kind", "location", "block_size"})
        if unknown:
            raise ValueError(f"unknown rotation key(s) {unknown}")
        try:
            return cls(RotationKind(data.get("kind", "full")),
                       RotationLocation(data.get("location", "online")), data.get("block_size"))
        except ValueError as exc:
            raise ValueError(f"bad rotation {data}: {exc}") from None
