"""Deployment targets: whose arithmetic a run's numbers are computed with.

A figure counts when a backend would compute it. The target fixes what the fit, the search, the
training and every evaluation see, so the report's numbers are the served numbers:

======================  ==================================================  ==================
target                  activation quantization (dynamic, per token)         activation clips
======================  ==================================================  ==================
``vllm`` (default)      int8: max|x|/127 (CUTLASS ``dynamic_scaled_int8``);  none (vLLM's
                        int4: max|x|/7, round to nearest even (Humming,      dynamic quant has
                        ``CompressedTensorsWNA4Int``)                        no clip)
``compressed-tensors``  max|x|/((2^b−1)/2), clamp to [−2^(b−1), 2^(b−1)−1],  none
                        then round (compressed-tensors' own forward, what
                        transformers runs)
``research``            as ``vllm``, plus per-site clip ratios               allowed
                        (``search.act_clips``): reproduced by
                        ``smoothrot.load_pretrained`` only
======================  ==================================================  ==================

The perplexity of a quantized model is computed with the target's GEMM arithmetic too: ``vllm``
and ``research`` run each W4A4 / W8A8 linear as an int8 GEMM with int32 sums and float32
per-token × per-channel scales (vLLM's integer kernels; on the CPU), ``compressed-tensors`` as a
float32 product of the dequantized tensors (its forward). The two agree to float32 rounding.

Sources and the backend × format table: docs/deployment.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from smoothrot.schema.quant import QuantScheme


@dataclass(frozen=True)
class Target:
    """One deployment target: its activation grid and whether it can carry per-site clips."""

    name: str
    act_grid: str
    act_clips: bool
    label: str
    # Online rotations of activations computed as the runtime does (core/transform.py
    # dense_rotate): compressed-tensors' grid has half-way points at the row maximum, where
    # 1e-7 differences between two exact rotations decide the code.
    dense_rotation: bool = False
    # Quantized linears as integer kernels compute them (surgery/hooks.py IntegerForward):
    # int32 sums of codes, then the scales; else float32 on the dequantized tensors.
    integer_gemm: bool = True

    def scheme(self, scheme: QuantScheme) -> QuantScheme:
        """``scheme`` with this target's arithmetic (int activation grid)."""
        if scheme.a_format != "int" or scheme.a_grid == self.act_grid:
            return scheme
        return replace(scheme, a_grid=self.act_grid)


TARGETS: dict[str, Target] = {
    "vllm": Target("vllm", "max", False,
                   "vLLM: int8 activations max/127, int4 max/7, no activation clip"),
    "compressed-tensors": Target(
        "compressed-tensors", "compressed-tensors", False,
        "transformers + compressed-tensors: int activations max/((2^b-1)/2), no activation clip",
        dense_rotation=True, integer_gemm=False),
    "research": Target("research", "max", True,
                       "research: per-site activation clips, smoothrot.load_pretrained only"),
}
