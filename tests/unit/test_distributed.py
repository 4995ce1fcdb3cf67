"""Data-parallel runs: 2 CPU processes (gloo) give the 1-process statistics, token sets and scales.

The 2-process run is ``distributed_worker.py`` started as a script, so it goes through
``smoothrot.distributed.launch`` and Lightning's launcher exactly as ``train/fit_scales.py`` does
with ``distributed.devices: 2``. Statistics and kept rows must be bit-identical to one process;
trained scales and the selection loss agree to float rounding (DDP sums the two half-batch
gradients in another order than one process sums the whole batch): measured ~4e-7 relative,
asserted below 1e-5.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smoothrot import distributed
from smoothrot.calibrate.capture import CaptureSpec, SiteRecord, token_subset
from smoothrot.core.stats import AbsMaxObserver, AbsQuantileObserver
from smoothrot.schema.config import DistributedConfig, config_from_dict, config_to_dict
from smoothrot.schema.errors import ConfigError
from smoothrot.training.checkpoints import FINAL_SCALES, LAST_CKPT
from smoothrot.training.sampler import EpochTokenSampler
from tests.unit import distributed_worker as worker

REPO = Path(__file__).resolve().parents[2]
# Variables by which Lightning would think this run was launched by torchrun/SLURM already.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "TORCHELASTIC_RUN_ID")
SCALES_RTOL = 1e-5


# ---- single process: every helper is a no-op, the sharding arithmetic is exact ----------------

def test_helpers_are_noops_in_one_process() -> None:
    assert (distributed.is_distributed(), distributed.rank(), distributed.world_size()) == (
        False, 0, 1)
    assert distributed.is_rank_zero()
    x = torch.randn(5, 3)
    assert distributed.gather_rows(x) is x
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.trainer_kwargs() == {"devices": 1}
    obs = AbsMaxObserver(3)
    obs.update(x)
    distributed.merge_absmax(obs)
    assert torch.equal(obs.value(), x.abs().amax(0))
    rec = SiteRecord(capacity=5)
    rec.keep(x)
    assert distributed.merge_records({"s": rec})["s"].tokens().equal(x)
    spec = CaptureSpec(torch.zeros(4, 8, dtype=torch.long))
    assert distributed.shard_spec(spec) is spec


def test_launch_in_one_process_refuses_a_launcher_that_started_more(monkeypatch) -> None:
    distributed.launch(DistributedConfig(), "cpu")
    assert not distributed.is_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"distributed\.devices"):
        distributed.launch(DistributedConfig(), "cpu")


@pytest.mark.parametrize("n", [0, 1, 5, 7, 64])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_shards_are_contiguous_and_balanced(n: int, parts: int) -> None:
    bounds = [distributed.shard_bounds(n, r, parts) for r in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("parts", [2, 3])
def test_sharded_capture_keeps_the_same_rows_and_sizes_for_the_whole_stream(parts: int) -> None:
    windows = torch.arange(5 * 4).view(5, 4)  # token id == global row position
    keep = token_subset(windows.numel(), 7, seed=3)
    spec = CaptureSpec(windows, keep, (0.99,))
    kept = []
    for r in range(parts):
        local = distributed.shard_spec(spec, r, parts)
        assert local.total_tokens == 20  # quantile buffers sized for all ranks' tokens
        kept.append(local.windows.reshape(-1)[local.keep_index])
    assert torch.equal(torch.cat(kept), keep)


@pytest.mark.parametrize("parts", [2, 3])
def test_sampler_shards_concatenate_to_the_one_process_batches(parts: int) -> None:
    batch, steps = 8, 3
    whole = EpochTokenSampler(n=50, batch_size=batch, steps_per_epoch=steps, seed=2,
                              first_step=lambda: 7)
    shards = [EpochTokenSampler(n=50, batch_size=batch, steps_per_epoch=steps, seed=2,
                                first_step=lambda: 7, part=r, parts=parts)
              for r in range(parts)]
    assert sum(s.shard_size for s in shards) == batch
    per_rank = [torch.stack(list(s)) for s in shards]  # [steps, shard_size] each
    assert all(p.shape == (steps, s.shard_size) for p, s in zip(per_rank, shards, strict=True))
    assert torch.equal(torch.cat(per_rank, dim=1), torch.stack(list(whole)))
    with pytest.raises(ValueError, match="batch_size >= parts"):
        EpochTokenSampler(n=50, batch_size=2, steps_per_epoch=1, seed=0, part=0, parts=3)


def test_observer_states_sent_between_processes_merge_exactly() -> None:
    x = worker.observer_data()
    qs = worker.QUANTILES
    merged_q = AbsQuantileObserver(x.shape[1], qs, total_tokens=x.shape[0])
    merged_m = AbsMaxObserver(x.shape[1])
    for lo, hi in ((0, 13), (13, 700), (700, 1000)):  # three ranks, uneven token counts
        q, m = AbsQuantileObserver(x.shape[1], qs, x.shape[0]), AbsMaxObserver(x.shape[1])
        q.update(x[lo:hi])
        m.update(x[lo:hi])
        peer_q = AbsQuantileObserver(x.shape[1], qs, x.shape[0])
        peer_q.load_state(*q.state())
        peer_m = AbsMaxObserver(x.shape[1])
        peer_m.load_state(*m.state())
        merged_q.merge(peer_q)
        merged_m.merge(peer_m)
    expected = torch.stack([torch.quantile(x.abs(), q, dim=0) for q in qs])
    assert torch.equal(merged_q.values(), expected)
    assert torch.equal(merged_m.value(), x.abs().amax(0))
    assert merged_q.count == merged_m.count == 1000
    with pytest.raises(ValueError, match="expected"):
        merged_q.load_state(torch.zeros(x.shape[1], merged_q.k + 1), 1)
    with pytest.raises(ValueError, match="expected"):
        merged_m.load_state(torch.zeros(3), 1)


def test_distributed_config_section_is_typed_and_round_trips() -> None:
    cfg = config_from_dict({"distributed": {"devices": 4, "num_nodes": 2}})
    assert (cfg.distributed.devices, cfg.distributed.num_nodes) == (4, 2)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"distributed": {"gpus": 2}})
    with pytest.raises(ConfigError, match=r"distributed\.devices=0"):
        config_from_dict({"distributed": {"devices": 0}})
    with pytest.raises(ConfigError, match="must be an integer"):
        config_from_dict({"distributed": {"num_nodes": "two"}})


# ---- 2 processes vs 1 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict[str, torch.Tensor]], Path]:
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(Path(worker.__file__)), str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, out


def test_two_processes_merge_observers_exactly(two_ranks) -> None:
    ranks, _ = two_ranks
    ref = worker.observer_case()  # one process, all rows
    x = worker.observer_data()
    assert torch.equal(ref["obs_quantiles"][0], torch.quantile(x.abs(), worker.QUANTILES[0], 0))
    for result in ranks:
        assert int(result["world"]) == 2
        for key, value in ref.items():
            assert torch.equal(result[key], value), key


def test_two_processes_calibrate_like_one(two_ranks) -> None:
    ranks, _ = two_ranks
    ref = worker.calibration_case()
    assert len(ref) == 2 * 7  # two down_proj sites: 4 statistics and 3 token sets each
    for result in ranks:
        for key, value in ref.items():
            assert result[key].shape == value.shape, key
            assert torch.equal(result[key], value), key


def test_two_processes_train_like_one_and_only_rank_zero_writes(two_ranks) -> None:
    ranks, out = two_ranks
    ref = worker.training_case()
    assert torch.equal(ranks[0]["scales"], ranks[1]["scales"])  # DDP keeps the ranks in step
    assert torch.equal(ranks[0]["best_val"], ranks[1]["best_val"])
    scale_err = ((ranks[0]["scales"] - ref["scales"]).abs() / ref["scales"]).max().item()
    val_err = abs(float(ranks[0]["best_val"]) / float(ref["best_val"]) - 1)
    assert scale_err < SCALES_RTOL and val_err < SCALES_RTOL, (scale_err, val_err)
    assert not torch.equal(ref["scales"], torch.ones(48, dtype=torch.float64))  # it trained
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([FINAL_SCALES, LAST_CKPT])
    assert torch.equal(load_file(str(ckpt / FINAL_SCALES))["scales"], ranks[0]["scales"])
