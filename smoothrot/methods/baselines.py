"""The two methods without smoothing scales: plain round-to-nearest and rotation only."""

from __future__ import annotations

from smoothrot.methods.context import SchemeContext
from smoothrot.methods.registry import Method, MethodResult


class Unscaled(Method):
    """s = 1: the site's own rotation (``rotate``) or nothing at all."""

    def __init__(self, name: str, label: str, rotate: bool) -> None:
        self.name, self.label, self.rotate = name, label, rotate

    def fit(self, ctx: SchemeContext) -> MethodResult:
        return MethodResult(ctx.plans(dict.fromkeys(ctx.data), self.rotate, desc=self.name))


RTN = Unscaled("rtn", "RTN", rotate=False)
HADAMARD = Unscaled("hadamard", "Hadamard-only", rotate=True)
