"""Write what bench/peer_llmcompressor.py needs to re-measure the peer's llm-compressor recipes
(issue 16) on exactly smoothrot's model and token windows.

    python bench/peer_export.py outputs/peer                       # configs/whole_model_vllm.yaml
    python bench/peer_export.py outputs/peer --config configs/whole_model_vllm.yaml --seed 1
    python bench/peer_export.py outputs/peer --calibration-samples 2 --evaluation-samples 2

Runs in smoothrot's own venv. Writes into the folder:

* the float model as an HF safetensors checkpoint (``config.json``, ``model.safetensors``) plus
  its tokenizer: for ``embedded:smollm2`` the Q4_1 GGUF dequantized to float32, as smoothrot
  loads it;
* ``windows.safetensors``: the calibration and evaluation windows (LongTensor [samples, seq_len])
  from :func:`smoothrot.data.splits.split_windows`, the code path ``run_fit`` uses, for the
  config and seed given;
* ``peer.json``: config file, seed, model name, window shapes and the float perplexity smoothrot
  computes on the evaluation windows (:func:`smoothrot.evaluate.perplexity`).

The ``*-samples`` flags override the config's ``data.*_samples`` (for a quick check only: the
windows then differ from the config's, since the draw depends on the count).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from smoothrot.schema.config import FitConfig, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "whole_model_vllm.yaml"
WINDOWS_FILE = "windows.safetensors"
META_FILE = "peer.json"
SPLITS = ("calibration", "evaluation")


def resolve_config(path: str | Path, seed: int | None = None,
                   calibration_samples: int | None = None,
                   evaluation_samples: int | None = None) -> FitConfig:
    """The YAML config (same loader as train/fit_scales.py) with the given overrides."""
    data = config_to_dict(load_config(path))
    if seed is not None:
        data["seed"] = seed
    if calibration_samples is not None:
        data["data"]["calibration_samples"] = calibration_samples
    if evaluation_samples is not None:
        data["data"]["evaluation_samples"] = evaluation_samples
    return config_from_dict(data)


def _display_path(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def save_windows(folder: str | Path, windows: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``windows`` (split name -> LongTensor [samples, seq_len]) and ``meta`` to
    ``folder``; the window shapes are added to the json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: windows[name].to(torch.long).contiguous() for name in SPLITS}
    save_file(tensors, str(folder / WINDOWS_FILE))
    meta = {**meta, "windows": {name: list(t.shape) for name, t in tensors.items()}}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_windows(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`save_windows` (bench/peer_llmcompressor.py reads the same files)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    return load_file(str(folder / WINDOWS_FILE)), json.loads((folder / META_FILE).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write (created; files in it are replaced)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: "
                   "configs/whole_model_vllm.yaml)")
    p.add_argument("--seed", type=int, help="seed of the split (default: the config's)")
    p.add_argument("--calibration-samples", type=int, help="override data.calibration_samples")
    p.add_argument("--evaluation-samples", type=int, help="override data.evaluation_samples")
    p.add_argument("--no-model", action="store_true",
                   help="write the windows and json only (the model folder is already there)")
    args = p.parse_args(argv)

    from smoothrot.data.splits import split_windows
    from smoothrot.evaluate import perplexity
    from smoothrot.models import load_model, save_float_checkpoint

    cfg = resolve_config(args.config, args.seed, args.calibration_samples,
                         args.evaluation_samples)
    torch.manual_seed(cfg.seed)  # as run_fit does
    model, tokenizer = load_model(
        cfg.model.name, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
        device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    _, windows = split_windows(tokenizer, cfg.data, cfg.seed, names=SPLITS)
    if not args.no_model:
        save_float_checkpoint(model, args.out)
        tokenizer.save_pretrained(args.out)
    with torch.no_grad():
        float_ppl = perplexity(model, windows["evaluation"], desc="float ppl")
    meta = {
        "config": _display_path(args.config),
        "seed": cfg.seed,
        "model": cfg.model.name,
        "dtype": cfg.model.dtype,
        "data_source": cfg.data.source,
        "seq_len": cfg.data.seq_len,
        "float_perplexity": float_ppl,
    }
    save_windows(args.out, windows, meta)
    shapes = ", ".join(f"{n} {tuple(windows[n].shape)}" for n in SPLITS)
    print(f"wrote {args.out}: {shapes}; float ppl {float_ppl:.4f} (seed {cfg.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
