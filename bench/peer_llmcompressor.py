"""Re-measure the peer's llm-compressor W4A4 recipes (issue 16) on smoothrot's model and windows.

    bash bench/peer/setup.sh                                   # once: makes .venv-peer
    .venv/bin/python bench/peer_export.py outputs/peer         # smoothrot's venv
    .venv-peer/bin/python bench/peer_llmcompressor.py outputs/peer \
        --recipe rtn quip-rtn quip-gptq --observer minmax mse

Runs in .venv-peer (llm-compressor pins an older transformers than smoothrot) and imports
nothing from smoothrot. Reads the folder bench/peer_export.py wrote (float HF checkpoint,
``windows.safetensors``, ``peer.json``), and for every recipe x weight observer:

* reloads the float model, applies the recipe with ``llmcompressor.oneshot`` calibrated on the
  calibration windows (already token ids, used in order, no shuffling);
* computes the perplexity on the evaluation windows the way ``smoothrot.evaluate.perplexity``
  does (batches of 4, exp of the summed next-token NLL over all predicted tokens of all windows
  divided by their count), with the model in compressed-tensors' fake-quant forward;
* prints: recipe, observer, ppl, float ppl (peer.json, i.e. smoothrot's), ppl / float ppl.

Scheme (the peer's W4A4): every Linear but lm_head, weights int4 symmetric per output channel
(static), input activations int4 symmetric per token (dynamic, no clipping). Recipes:

* ``rtn``: QuantizationModifier (weight scales from the observer, no calibration of weights);
* ``quip-rtn``: QuIPModifier (online random Hadamard on every Linear's input, its inverse fused
  into the weight; lm_head untouched) then QuantizationModifier;
* ``quip-gptq``: QuIPModifier then GPTQModifier (defaults: block 128, dampening 0.01, static
  activation ordering).

``--observer`` sets the weight observer: ``minmax`` (llm-compressor's default, memoryless min-max)
or ``mse`` (grid search on the scale; memoryless for weights).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

WINDOWS_FILE = "windows.safetensors"
META_FILE = "peer.json"
RECIPES = ("rtn", "quip-rtn", "quip-gptq")
OBSERVERS = ("minmax", "mse")


def scheme(observer: str) -> dict:
    """W4A4 as the peer ran it: int4 per-channel symmetric weights, int4 dynamic per-token
    symmetric activations, every Linear (lm_head is in the modifiers' ignore)."""
    return {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel",
                    "dynamic": False, "observer": observer},
        "input_activations": {"num_bits": 4, "type": "int", "symmetric": True,
                              "strategy": "token", "dynamic": True},
    }


def build_recipe(name: str, observer: str) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import QuIPModifier

    quant = {"config_groups": {"group_0": scheme(observer)}, "ignore": ["lm_head"]}
    quip = QuIPModifier(rotations=["v"], transform_type="random-hadamard", targets="Linear",
                        ignore="lm_head")
    if name == "rtn":
        return [QuantizationModifier(**quant)]
    if name == "quip-rtn":
        return [quip, QuantizationModifier(**quant)]
    if name == "quip-gptq":
        return [quip, GPTQModifier(**quant)]
    raise ValueError(f"unknown recipe {name!r}; one of {', '.join(RECIPES)}")


def load_windows(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return load_file(str(folder / WINDOWS_FILE)), json.loads((folder / META_FILE).read_text())


def execution_device(model: torch.nn.Module) -> torch.device:
    try:
        from compressed_tensors.utils import get_execution_device

        return torch.device(get_execution_device(model))
    except Exception:  # another compressed-tensors version: plain parameters
        return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """smoothrot.evaluate.perplexity's formula: exp(mean next-token NLL) over ``windows``."""
    device = execution_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
            reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    value = math.exp(total_nll / total_tokens)
    if not math.isfinite(value):
        raise FloatingPointError(f"perplexity is not finite (NLL {total_nll})")
    return value


def load_float(folder: Path, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.to(device).eval()


def quantize(folder: Path, recipe: str, observer: str, calibration: torch.Tensor,
             device: str, pipeline: str | None) -> torch.nn.Module:
    from datasets import Dataset
    from llmcompressor import oneshot

    model = load_float(folder, device)
    ids = calibration.tolist()
    dataset = Dataset.from_dict({"input_ids": ids,
                                 "attention_mask": [[1] * len(row) for row in ids]})
    kwargs = {"pipeline": pipeline} if pipeline else {}
    oneshot(model=model, dataset=dataset, recipe=build_recipe(recipe, observer),
            num_calibration_samples=len(ids), shuffle_calibration_samples=False,
            max_seq_length=calibration.shape[1], **kwargs)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="the folder bench/peer_export.py wrote")
    p.add_argument("--recipe", nargs="+", choices=RECIPES, default=["quip-gptq"])
    p.add_argument("--observer", nargs="+", choices=OBSERVERS, default=["mse"],
                   help="weight observer(s); every recipe runs with each")
    p.add_argument("--calibration-samples", type=int,
                   help="use only the first N calibration windows (quick check)")
    p.add_argument("--evaluation-samples", type=int,
                   help="use only the first N evaluation windows (quick check; the ratio is "
                        "then against the float ppl measured here on those windows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pipeline", help="llm-compressor calibration pipeline (default: its own, "
                   "'independent': each modifier gets the pipeline it infers)")
    p.add_argument("--save", type=Path, help="also save each compressed model to "
                   "SAVE/<recipe>-<observer> (llm-compressor's compressed-tensors format)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    windows, meta = load_windows(args.folder)
    calibration, evaluation = windows["calibration"], windows["evaluation"]
    if args.calibration_samples:
        calibration = calibration[: args.calibration_samples]
    sliced = bool(args.evaluation_samples) and args.evaluation_samples < evaluation.shape[0]
    if sliced:
        evaluation = evaluation[: args.evaluation_samples]
    print(f"{args.folder}: config {meta['config']} seed {meta['seed']}, calibration "
          f"{tuple(calibration.shape)}, evaluation {tuple(evaluation.shape)}, device "
          f"{args.device}", flush=True)

    # The float checkpoint as this venv loads it, on the windows measured: must match peer.json's
    # (smoothrot's) float ppl when all evaluation windows are used.
    local_float = perplexity(load_float(args.folder, args.device), evaluation)
    reference = local_float if sliced else meta["float_perplexity"]
    print(f"float ppl here {local_float:.4f}; smoothrot's (peer.json) "
          f"{meta['float_perplexity']:.4f}; ratios below are against "
          f"{'the float ppl here (evaluation sliced)' if sliced else 'smoothrot'}'s",
          flush=True)

    rows = []
    for recipe in args.recipe:
        for observer in args.observer:
            start = time.perf_counter()
            model = quantize(args.folder, recipe, observer, calibration, args.device,
                             args.pipeline)
            ppl = perplexity(model, evaluation)
            rows.append((recipe, observer, ppl, time.perf_counter() - start))
            print(f"RESULT {recipe:10s} observer {observer:6s} ppl {ppl:10.4f}  float ppl "
                  f"{reference:.4f}  ratio {ppl / reference:8.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            if args.save:
                out = args.save / f"{recipe}-{observer}"
                model.save_pretrained(out, save_compressed=True)
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(args.folder).save_pretrained(out)
            del model

    print("\nrecipe      observer  ppl         float ppl   ratio")
    for recipe, observer, ppl, _ in rows:
        print(f"{recipe:11s} {observer:9s} {ppl:<11.4f} {reference:<11.4f} {ppl / reference:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
