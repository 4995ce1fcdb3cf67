"""The README.md of an export folder: which loaders compute what the report states.

An export whose rotation runs online is silently wrong in any loader that ignores its
``transform_config`` (plain transformers does), so every folder says so on its first page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smoothrot.schema.declaration import ExportDeclaration
from smoothrot.schema.target import TARGETS

_FORMAT_LAYOUT = {
    "fused": "float weights (no quantization_config scheme)",
    "w8a8": "compressed-tensors int-quantized: int8 per-channel weights, dynamic per-token int8 "
            "activations",
    "w4a4": "compressed-tensors pack-quantized: int4 per-channel weights (8 per int32), dynamic "
            "per-token int4 activations",
    "nvfp4": "compressed-tensors nvfp4-pack-quantized (E2M1, E4M3 per 16, FP32 global scales)",
    "mxfp4": "compressed-tensors mxfp4-pack-quantized (E2M1, E8M0 per 32)",
}


def model_card(decl: ExportDeclaration, meta: Mapping[str, Any]) -> str:
    """The export's README.md from its declaration and smoothrot.json metadata."""
    online = sorted({s.rotation.describe() for s in decl.sites.values()
                     if s.rotation.is_online()})
    target = TARGETS[decl.target]
    headline = meta.get("headline") or {}
    lines = [
        f"# smoothrot {decl.format} export of {meta.get('source_model', 'a model')}",
        "",
        f"- Format: {_FORMAT_LAYOUT[decl.format]}; float tensors in {decl.dtype}.",
        f"- Target: **{target.name}** ({target.label}).",
        f"- Method: {meta.get('method', 'given plans')}"
        + (f", scheme {meta['scheme']}" if meta.get("scheme") else "") + ".",
        f"- Sites: {len(decl.sites)}; residual rotation R1: "
        + (f"yes, a {decl.residual_rotation.kind} Q (folded into the weights)"
           if decl.residual_rotation else "no") + ".",
        "- Online rotations: " + (", ".join(online) if online else "none") + ".",
    ]
    if "perplexity" in headline:
        lines.append(f"- Reported perplexity: {headline['perplexity']:.3f} (float, i.e. the "
                     "source model as loaded in float32 (a GGUF's weights dequantized): "
                     f"{headline.get('float_perplexity') or float('nan'):.3f}), under target "
                     f"{target.name}.")
    lines += ["", "## Loaders", "", "| loader | applies the online rotation | computes |",
              "|---|---|---|"]
    rotation = "yes" if online else "nothing to apply"
    lines += [
        f"| vLLM (compressed-tensors) | {rotation}: `transform_config` | the vllm target |",
        f"| transformers + compressed-tensors, then compressed-tensors' `apply_transform_config` "
        f"with the stored weights (`smoothrot.io.runtime.load_without_smoothrot`) | {rotation} | "
        "the compressed-tensors target |",
        f"| `smoothrot.load_pretrained` | {rotation} | the fitted model exactly |",
    ]
    if online:
        lines.append("| plain transformers `from_pretrained` | **no: transformers ignores "
                     "`transform_config`** | **another function; do not use** |")
    else:
        lines.append("| plain transformers `from_pretrained` | nothing to apply | the "
                     "compressed-tensors target |")
    if any(s.activation_clip not in (None, 1.0) for s in decl.sites.values()):
        lines += ["", "Per-site activation clips are declared in `config.json[\"smoothrot\"]`; "
                  "only `smoothrot.load_pretrained` applies them (a research export)."]
    lines += ["", "Check it: `python train/export.py verify <this folder> --runtime "
              "compressed-tensors` (docs/deployment.md).", ""]
    return "\n".join(lines)
