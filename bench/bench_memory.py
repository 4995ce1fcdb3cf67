"""Peak memory of calibration: whole model vs one decoder layer at a time.

Every case runs in a fresh subprocess and reports its own peak resident set size (``VmHWM``, the
high-water mark since the process started; ``getrusage`` where /proc is missing) and, on CUDA,
``torch.cuda.max_memory_allocated``; "baseline" is the RSS after importing torch and smoothrot,
before anything is built (importing transformers' model code is part of every case's growth).
Kept training rows grow with the number of sites (rows × in_features × 4 bytes per site). Cases:

- SmolLM2-135M (``embedded:smollm2``, saved once as float32 safetensors): whole-model pass
  vs sequential with the model resident vs sequential with weights streamed from disk;
- a random-init LLaMA of ~1B parameters per 16 layers (hidden 2048, MLP 8192, 16 heads / 8 kv
  heads, vocab 32000), 16 and 32 layers, sequential with weights streamed from a bf16
  safetensors checkpoint (one shard per layer, never whole in memory), computed in float32.

Sites: every smoothing site (``--layers all``); statistics with quantiles and a kept row budget,
as the pipeline records them. Prints a table and the ratios (goal: 32-layer peak ÷ 16-layer peak
≈ 1). Run: ``nice -n 19 python bench/bench_memory.py [--device cuda] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smoothrot.arch.sites import resolve_sites  # noqa: E402
from smoothrot.calibrate.capture import (  # noqa: E402
    CaptureSpec,
    batch_size,
    capture_splits,
    token_subset,
)
from smoothrot.calibrate.sequential import capture_sequential  # noqa: E402
from smoothrot.calibrate.weights import SAFETENSORS_INDEX, SafetensorsWeights  # noqa: E402
from smoothrot.models import empty_model  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
                tie_word_embeddings=False)
CASES = ("smollm2-whole", "smollm2-seq-resident", "smollm2-seq-disk",
         "llama1b-16L-seq-disk", "llama1b-32L-seq-disk")
QUANTILES = (0.99, 0.999, 1.0)


def _rss_mib() -> float:
    """Peak RSS of this process so far, MiB.

    Linux's ``getrusage`` ``ru_maxrss`` survives ``exec``, so a child would report its parent's
    peak; ``VmHWM`` in /proc belongs to the process image alone. Elsewhere: ``ru_maxrss``.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _prepare_smollm2(work: Path, samples: int, seq_len: int) -> None:
    """float32 safetensors copy of the embedded model + pydoc calibration windows."""
    from smoothrot.data.sources import load_documents
    from smoothrot.data.splits import split_documents, token_windows
    from smoothrot.models import load_model, save_float_checkpoint

    model, tokenizer = load_model("embedded:smollm2")
    save_float_checkpoint(model, work / "smollm2")
    splits = split_documents(load_documents("pydoc"), {"calibration": 0.55}, 0)
    windows = token_windows(tokenizer, splits["calibration"], samples, seq_len, seed=0,
                            split_name="calibration")
    torch.save(windows, work / "smollm2_windows.pt")


def _shard_of(name: str) -> str:
    """``<layer>.safetensors`` for a decoder layer's tensor, ``outer.safetensors`` otherwise."""
    parts = name.split(".")
    return f"{parts[2] if name.startswith('model.layers.') else 'outer'}.safetensors"


def _prepare_llama(work: Path, layers: tuple[int, ...]) -> None:
    """Random-init bf16 checkpoint, one shard per layer, and one folder per depth (symlinks)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    deepest = max(layers)
    shards = work / "llama_shards"
    shards.mkdir(exist_ok=True)
    model = empty_model(LlamaConfig(num_hidden_layers=deepest, **LLAMA_1B))
    gen = torch.Generator().manual_seed(0)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    weight_map = {name: _shard_of(name) for name in shapes}
    for file in sorted(set(weight_map.values())):
        tensors = {}
        for name in (n for n, f in weight_map.items() if f == file):
            shape = shapes[name]
            tensors[name] = (torch.ones(shape) if len(shape) == 1 else
                             torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, shards / file)
        del tensors
    for n in layers:
        folder = work / f"llama1b_{n}L"
        folder.mkdir(exist_ok=True)
        LlamaConfig(num_hidden_layers=n, **LLAMA_1B).save_pretrained(folder)
        kept = {k: f for k, f in weight_map.items()
                if f == "outer.safetensors" or int(f.split(".")[0]) < n}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": kept}))
        for file in set(kept.values()):
            link = folder / file
            if not link.exists():
                link.symlink_to(shards / file)


def _run_case(case: str, work: Path, device: str, tokens: int, train_tokens: int) -> dict:
    """One measurement, in this (fresh) process; returns the numbers as a dict."""
    from transformers import AutoModelForCausalLM

    baseline = _rss_mib()
    dev = torch.device(device)
    if case.startswith("smollm2"):
        folder = work / "smollm2"
        windows = torch.load(work / "smollm2_windows.pt")
    else:
        folder = work / f"llama1b_{case.split('-')[1].removesuffix('L')}L"
        windows = torch.randint(0, LLAMA_1B["vocab_size"], (max(1, tokens // 128), 128),
                                generator=torch.Generator().manual_seed(0))
    spec = CaptureSpec(windows, token_subset(windows.numel(), train_tokens, 0), QUANTILES)
    batch = batch_size(windows.shape[1])
    start = time.perf_counter()
    if case.endswith("seq-disk"):
        model = empty_model(folder)
        sites = resolve_sites(model, ["all"])
        records = capture_sequential(model, sites, {"calibration": spec}, batch, device=dev,
                                     weights=SafetensorsWeights(folder))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        sites = resolve_sites(model, ["all"])
        if case.endswith("whole"):
            model.to(dev)
            records = capture_splits(model, sites, {"calibration": spec}, batch)
        else:  # weights resident on the CPU, one layer at a time on the device
            records = capture_sequential(model, sites, {"calibration": spec}, batch, device=dev)
    seconds = time.perf_counter() - start
    rec = records["calibration"]
    return {
        "case": case,
        "layers": model.config.num_hidden_layers,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens": windows.numel(),
        "sites": len(rec),
        "kept_rows": sum(r.tokens().shape[0] for r in rec.values()),
        "kept_mib": sum(r.tokens().numel() * 4 for r in rec.values()) / 2**20,
        "baseline_mib": baseline,
        "peak_mib": _rss_mib(),
        "cuda_peak_mib": (torch.cuda.max_memory_allocated() / 2**20
                          if dev.type == "cuda" else None),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="compute device (cpu, cuda)")
    parser.add_argument("--workdir", help="keep checkpoints here (default: a temp dir)")
    parser.add_argument("--smollm2-samples", type=int, default=8, help="windows of 128 tokens")
    parser.add_argument("--tokens", type=int, default=256, help="LLaMA-1B calibration tokens")
    parser.add_argument("--train-tokens", type=int, default=128, help="kept rows per site")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.case:
        result = _run_case(args.case, Path(args.workdir), args.device, args.tokens,
                           args.train_tokens)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c",
                        "import sys, pathlib; sys.path.insert(0, sys.argv[1]); "
                        "from bench.bench_memory import _prepare_smollm2; "
                        "_prepare_smollm2(pathlib.Path(sys.argv[2]), int(sys.argv[3]), 128)",
                        str(REPO), str(work), str(args.smollm2_samples)],
                       check=True, stderr=subprocess.DEVNULL)
        _prepare_llama(work, (16, 32))
        from machine import describe  # bench/machine.py; run as a script, bench/ is on the path

        print(f"machine: {describe(args.device)}")
        print(f"prepared checkpoints in {time.perf_counter() - start:.0f} s", flush=True)
        results = {}
        for case in CASES:
            out = subprocess.run(
                [sys.executable, __file__, "--case", case, "--workdir", str(work),
                 "--device", args.device, "--tokens", str(args.tokens),
                 "--train-tokens", str(args.train_tokens)],
                check=True, capture_output=True, text=True)
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
            print(_row(results[case]), flush=True)
    _ratios(results)


def _row(r: dict) -> str:
    cuda = f"  cuda peak {r['cuda_peak_mib']:8.1f} MiB" if r["cuda_peak_mib"] is not None else ""
    return (f"{r['case']:22s} {r['layers']:3d} layers {r['params_m']:7.1f} M params "
            f"{r['tokens']:5d} tok {r['sites']:4d} sites | RSS baseline {r['baseline_mib']:7.1f} "
            f"peak {r['peak_mib']:7.1f} (+{r['peak_mib'] - r['baseline_mib']:7.1f}) MiB, "
            f"of which kept rows {r['kept_mib']:6.1f} MiB{cuda} | "
            f"{r['seconds']:6.1f} s")


def _ratios(results: dict[str, dict]) -> None:
    def grow(case: str) -> float:
        return results[case]["peak_mib"] - results[case]["baseline_mib"]

    pairs = [("smollm2-seq-resident", "smollm2-whole"), ("smollm2-seq-disk", "smollm2-whole"),
             ("llama1b-32L-seq-disk", "llama1b-16L-seq-disk")]
    for a, b in pairs:
        def rest(case: str) -> float:  # growth other than the kept rows (they scale by design)
            return grow(case) - results[case]["kept_mib"]

        line = (f"peak RSS {a} / {b}: {results[a]['peak_mib'] / results[b]['peak_mib']:.3f} "
                f"(above baseline: {grow(a) / grow(b):.3f}; without kept rows: "
                f"{rest(a) / rest(b):.3f})")
        if results[a]["cuda_peak_mib"]:
            line += (f"; CUDA peak: "
                     f"{results[a]['cuda_peak_mib'] / results[b]['cuda_peak_mib']:.3f}")
        print(line)


if __name__ == "__main__":
    main()
