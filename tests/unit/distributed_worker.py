"""The cases of test_distributed.py, and one rank of its 2-process run when executed as a script.

    python tests/unit/distributed_worker.py OUT_DIR

starts 2 CPU (gloo) processes through ``smoothrot.distributed.launch`` (Lightning's launcher
re-runs this command for rank 1); each rank writes ``OUT_DIR/rank<r>.pt``. The test runs the same
case functions in its own single process and compares.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from smoothrot import distributed
from smoothrot.core.stats import AbsMaxObserver, AbsQuantileObserver
from smoothrot.schema.config import DistributedConfig, FitConfig, TrainConfig
from smoothrot.schema.quant import get_scheme
from smoothrot.training.fit import TrainProblem, fit_scales

QUANTILES = (0.9, 0.99, 0.999, 1.0)
# Rank 0's share of the observer rows: uneven on purpose (313 vs 687 rows).
OBSERVER_SPLIT = 313
# float32 gradients: two ranks' halves of a batch then sum to the one-process gradient up to
# float32 rounding (bfloat16 gradients, train.bf16_grads, round each half on its own)
TRAIN = TrainConfig(steps=12, lr=0.05, batch_tokens=64, val_every=4, bf16_grads=False)


def observer_data() -> torch.Tensor:
    """1000 heavy-tailed rows, 24 channels (a few huge outliers in some channels)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 24, generator=g) * torch.rand(24, generator=g).mul(5).exp()
    x[::53, 3] = 900.0
    x[400:410, 7] = -3e4
    return x


def observer_case() -> dict[str, torch.Tensor]:
    """Max and quantiles of this rank's rows merged across ranks (all rows in one process)."""
    x = observer_data()
    lo, hi = (0, x.shape[0])
    if distributed.world_size() == 2:
        lo, hi = ((0, OBSERVER_SPLIT), (OBSERVER_SPLIT, x.shape[0]))[distributed.rank()]
    absmax = AbsMaxObserver(x.shape[1])
    quant = AbsQuantileObserver(x.shape[1], QUANTILES, total_tokens=x.shape[0])
    for start in range(lo, hi, 97):
        absmax.update(x[start:min(start + 97, hi)])
        quant.update(x[start:min(start + 97, hi)])
    distributed.merge_absmax(absmax)
    distributed.merge_quantiles(quant)
    return {"obs_max": absmax.value(), "obs_quantiles": quant.values(),
            "obs_count": torch.tensor([absmax.count, quant.count])}


def tiny_llama() -> torch.nn.Module:
    """A 2-layer random-init llama (down_proj input 128: a Hadamard size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def calibration_case() -> dict[str, torch.Tensor]:
    """The pipeline's calibration of both down_proj sites: statistics and token sets."""
    from smoothrot.arch.sites import resolve_sites
    from smoothrot.job import Timer, _calibrate

    model = tiny_llama()
    sites = resolve_sites(model, ["down_proj"])
    g = torch.Generator().manual_seed(1)
    # 5 calibration windows: the two ranks get 2 and 3 (uneven token counts).
    windows = {name: torch.randint(0, 96, (n, 16), generator=g)
               for name, n in (("calibration", 5), ("selection", 3), ("heldout", 3))}
    cfg = FitConfig()
    cfg.data.seq_len, cfg.data.train_tokens = 16, 37
    cfg.search.quantiles = list(QUANTILES)
    data = _calibrate(model, sites, windows, cfg, Timer())
    out = {}
    for site, d in data.items():
        for q, v in d.act_stats.items():
            out[f"{site}/stat/{q}"] = v
        out[f"{site}/train_x"] = d.train_x
        out[f"{site}/selection_x"] = d.selection_x
        out[f"{site}/heldout_x"] = d.heldout_x
    return out


def training_problem() -> dict[str, torch.Tensor]:
    """One small outlier-heavy site to train (also test_resume.py's problem)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(260, 48, generator=g)
    x[:, :2] *= 30.0
    x[::37, 7] = 500.0
    return {"w": torch.randn(16, 48, generator=g) / 7, "x": x[:200], "val": x[200:],
            "init": torch.ones(48, dtype=torch.float64)}


def training_case(checkpoint_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Trained scales and best selection loss of one synthetic site (data-parallel on 2 ranks)."""
    p = training_problem()
    problem = TrainProblem(p["w"], p["init"], get_scheme("w4a4"), p["x"], p["val"], seed=1)
    scales, best = fit_scales(problem, TRAIN, checkpoint_dir=checkpoint_dir)
    return {"scales": scales, "best_val": torch.tensor([best], dtype=torch.float64)}


def main(out: Path) -> None:
    distributed.launch(DistributedConfig(devices=2), "cpu")
    result = {"world": torch.tensor([distributed.world_size()])}
    result.update(observer_case())
    result.update(calibration_case())
    result.update(training_case(out / "checkpoints"))
    torch.save(result, out / f"rank{distributed.rank()}.pt")
    distributed.barrier()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(Path(sys.argv[1]))
