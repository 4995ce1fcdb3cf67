"""The method registry: every way of choosing a site's transform, by name.

A :class:`Method` declares what it needs (``requires``: methods whose results it starts from)
and implements one call, ``fit(ctx) -> MethodResult`` (a :class:`SitePlan` per site plus what was
chosen on the selection split). The job is a loop over the registered methods a config asks
for; report labels and export rules come from here too. Adding a method is one module under
``smoothrot/methods/`` that calls :func:`register`, plus its import in ``methods/catalog.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smoothrot.methods.search import Choice
from smoothrot.schema.config import BASELINE
from smoothrot.schema.errors import ConfigError
from smoothrot.surgery.plan import SitePlan

if TYPE_CHECKING:
    from smoothrot.methods.context import SchemeContext

# A GPTQ row is reported relative to this one (the same weight rounding), so it runs whenever a
# GPTQ method does.
GPTQ_BASELINE = BASELINE + "+gptq"


@dataclass
class MethodResult:
    """What a method chose for each site: the plan, the (α, q) choice of policy methods and
    the loss on the selection split it was chosen by."""

    plans: dict[str, SitePlan]
    choices: dict[str, Choice] = field(default_factory=dict)
    selection_loss: dict[str, float] = field(default_factory=dict)


class Method(ABC):
    """One way to choose every site's transform under one quantization scheme."""

    name: str
    label: str
    requires: tuple[str, ...] = ()
    # How the stored weights are rounded: "rtn" (the scheme's round-to-nearest at run time) or
    # "gptq" (offline, SitePlan.weight_q).
    rounding: str = "rtn"

    @abstractmethod
    def fit(self, ctx: SchemeContext) -> MethodResult:
        """Plans for every site of ``ctx``; results of ``requires`` are in ``ctx.results``."""


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name; its requirements must be registered already."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    missing = [r for r in method.requires if r not in _REGISTRY]
    if missing:
        raise ValueError(f"method {method.name!r} requires unregistered {missing}")
    _REGISTRY[method.name] = method
    return method


def _registered() -> dict[str, Method]:
    """The registry, with every shipped method in it."""
    from smoothrot.methods import catalog  # noqa: F401 - registers them on first import

    return _REGISTRY


def method_names() -> list[str]:
    """Every registered method, in registration (= report) order."""
    return list(_registered())


def get_method(name: str) -> Method:
    try:
        return _registered()[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose from {method_names()}") from None


def chosen_by(method: str, choices: Collection[str]) -> str | None:
    """The method whose (α, q) choice ``method``'s scales come from: itself if it is in
    ``choices``, else the first of its requirements that is (trained → joint); None if none."""
    name: str | None = method
    while name is not None and name not in choices:
        requires = get_method(name).requires
        name = requires[0] if requires else None
    return name


def baselines(names: Sequence[str]) -> list[str]:
    """What the % of ``names`` are against: the baseline, and SmoothRot-max + GPTQ when a GPTQ
    method is among them (else GPTQ's own gain would be credited to the scales)."""
    gptq = any(get_method(name).rounding == "gptq" for name in names)
    return [BASELINE, GPTQ_BASELINE] if gptq else [BASELINE]


def run_order(names: Sequence[str]) -> list[Method]:
    """The methods to run for a request: the requested ones, their baselines and everything
    they require, in registration order (so requirements always run first)."""
    needed: set[str] = set()
    stack = [*baselines(names), *names]
    while stack:
        method = get_method(stack.pop())
        if method.name not in needed:
            needed.add(method.name)
            stack.extend(method.requires)
    return [m for name, m in _registered().items() if name in needed]
