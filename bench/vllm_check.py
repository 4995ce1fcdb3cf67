"""Serve each export with vLLM and compare it with smoothrot.load_pretrained: perplexity on the
same evaluation windows and the relative difference of the logits' log-probabilities of the text.

    python bench/vllm_check.py outputs/fit_scales/export-w4a4 outputs/fit_scales/export-w8a8

Needs vLLM and a CUDA GPU; without either it prints why and exits 0 (so it can sit in any
checklist). vLLM serves in bfloat16, the export's online rotations from its transform_config.
Prints one line per export: vLLM ppl, smoothrot ppl (same windows, same dtype), their ratio, and
the mean |Δ log p| per token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

from smoothrot.data.sources import load_documents
from smoothrot.data.splits import split_documents, token_windows
from smoothrot.io.loader import load_pretrained
from smoothrot.schema.config import DataConfig


def unavailable() -> str | None:
    """Why this check cannot run here (None: it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm on a CUDA machine)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def windows(path: Path, samples: int, seq_len: int) -> torch.Tensor:
    """Evaluation windows of the pydoc text, tokenized with the export's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = split_documents(load_documents("pydoc"), DataConfig().fractions, 0)
    return token_windows(tokenizer, splits["evaluation"], samples, seq_len, seed=0,
                         split_name="evaluation")


def vllm_logprobs(path: Path, ids: torch.Tensor) -> list[list[float]]:
    """log p(token | prefix) of every token after the first, per window, as vLLM serves them."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=ids.shape[1] + 1,
              enforce_eager=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=row.tolist()) for row in ids], params)
    return [[entry[int(tok)].logprob for entry, tok in zip(out.prompt_logprobs[1:], row[1:],
                                                           strict=True)]
            for out, row in zip(outs, ids, strict=True)]


@torch.no_grad()
def smoothrot_logprobs(path: Path, ids: torch.Tensor) -> list[list[float]]:
    model = load_pretrained(path, dtype="bfloat16", device="cuda")
    out = []
    for row in ids:
        logits = model(input_ids=row[None].cuda()).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, row[1:, None].cuda())[:, 0]
        out.append(logp.cpu().tolist())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    reason = unavailable()
    if reason:
        print(f"skipped: {reason}")
        return 0
    for path in args.exports:
        ids = windows(path, args.samples, args.seq_len)
        served, ours = vllm_logprobs(path, ids), smoothrot_logprobs(path, ids)
        flat_v = [v for row in served for v in row]
        flat_o = [v for row in ours for v in row]
        ppl_v, ppl_o = (math.exp(-sum(x) / len(x)) for x in (flat_v, flat_o))
        delta = sum(abs(a - b) for a, b in zip(flat_v, flat_o, strict=True)) / len(flat_v)
        target = json.loads((path / "config.json").read_text())["smoothrot"]["target"]
        print(f"{path}: target {target}  vLLM ppl {ppl_v:.3f}  smoothrot ppl {ppl_o:.3f}  "
              f"ratio {ppl_v / ppl_o:.4f}  mean |Δ log p| {delta:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
