"""DDP: samplers shard exactly; 2 real torchrun processes (gloo) sync the gradients of the full loss."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from sib.distributed import DistInfo, EpochBatchSampler, shard_indices
from sib.train import train

# the per-process run every rank executes; the test compares what each rank saved
WORKER = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    from sib.config import TrainConfig
    from sib.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # created here, so train() reuses it for all three runs
    out, saved = sys.argv[1], {}
    runs = {"none": {}, "rrr": {}, "sib": {}, "energy_cam": {"regularizer": "energy", "reg_layer": "cam"}}
    for name, extra in runs.items():
        cfg = TrainConfig(**{**eval(sys.argv[2]), "regularizer": name, **extra, "out": f"{out}/ddp_{name}"})
        result = train(cfg)
        saved[name] = {"weights": result.model.state_dict(), "history": result.history,
                       "grads": [p.grad.clone() for p in result.model.parameters()]}
    torch.save(saved, f"{out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
""")

# tiny_cnn has no BatchNorm, so "none" and "rrr" on 2 x 8 samples equal one process on the 16
BASE = dict(dataset="synthetic", model="tiny_cnn", image_size=32, epochs=1, lr=1e-2, device="cpu",
            dataset_options={"num_samples": 64}, eval_splits=["test"], eval_batches=2, max_steps_per_epoch=3,
            profile_steps=0, overwrite=True)


def test_epoch_batches_are_the_union_batch_split_by_rank():
    single = list(EpochBatchSampler(50, 8, seed=7))
    ranks = [list(EpochBatchSampler(50, 4, seed=7, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6  # 50 // 8, incomplete last batch dropped
    for step, union in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == union
    assert list(EpochBatchSampler(50, 8, seed=8)) != single  # the epoch seed decides the order
    assert len(EpochBatchSampler(50, 8, seed=7, max_batches=2)) == 2
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(10, 8, seed=0, rank=0, world_size=2)


def test_eval_shards_cover_every_sample_once():
    shards = [shard_indices(11, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert shard_indices(11, DistInfo()) is None


def _no_time(history):
    # NaN diagnostics (e.g. diag_coverage of rrr) compare equal as text; NaN != NaN as floats
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items() if k != "sec_per_step"}
            for row in history]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_sync_gradients_and_match_the_union_batch(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path),
         repr({**BASE, "batch_size": 8})], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ["none", "rrr", "sib", "energy_cam"]:
        a, b = ranks[0][name], ranks[1][name]
        # each rank saw different samples; DDP averaged the gradient of ce + regulariser (double backprop)
        assert all(torch.equal(g, h) for g, h in zip(a["grads"], b["grads"], strict=True)), name
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]), name
        # metrics are reduced, so every rank logs the same row (the wall time is each process's own)
        assert _no_time(a["history"]) == _no_time(b["history"]), name
        assert a["history"][0]["step"] == 3
    assert (tmp_path / "ddp_sib" / "checkpoint.pt").is_file() and (tmp_path / "ddp_sib" / "log.jsonl").is_file()
    extra = {"energy_cam": {"regularizer": "energy", "reg_layer": "cam"}}
    for name in ["none", "rrr", "energy_cam"]:  # one process on the union batch: equal up to float reduction order
        single = train(dataclasses_replace_config(BASE, batch_size=16, **{"regularizer": name, **extra.get(name, {})},
                                                  out=str(tmp_path / name)))
        ddp = ranks[0][name]
        for g, h in zip(ddp["grads"], [p.grad for p in single.model.parameters()], strict=True):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
        for k, w in single.model.state_dict().items():
            torch.testing.assert_close(ddp["weights"][k], w, rtol=1e-4, atol=1e-6)
        row, ref = ddp["history"][0], single.history[0]
        assert row["train_acc"] == ref["train_acc"] and row["test_acc"] == ref["test_acc"]
        assert row["ce"] == pytest.approx(ref["ce"], rel=1e-5)
    # "sib" is not compared with the union batch: its HSIC is computed over each process's own batch


def dataclasses_replace_config(base: dict, **overrides):
    from sib.config import TrainConfig

    return TrainConfig(**{**base, **overrides})
