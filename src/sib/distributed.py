"""Process-group helpers for `torchrun --nproc_per_node N -m sib train ...` (or `srun -n N sib train ...`), and
the samplers that shard data.

One process per device. Under torchrun (environment `WORLD_SIZE` > 1) `init_distributed` joins the
process group (NCCL on CUDA, gloo on CPU); a plain `python -m sib train` is a world of one and touches no
process group. Under SLURM's `srun` with several tasks and no torchrun variables, `slurm_environment` derives
them from SLURM's (rank, world size, local rank, the step's first node as master, a port from the job id) and
the same torchrun path follows: one code path, two ways to start the processes.

The model is wrapped in `DistributedDataParallel` at its default settings: with double
backprop (S-IB, RRR, energy) `static_graph=True` raises no error but never synchronises the gradients
(measured, DESIGN.md), so it must not be used; `find_unused_parameters` is not needed (every parameter
is used on every step, plain or regularised).

What is per process and what is global:
- `batch_size` is per process; an optimizer step sees `batch_size * world_size` samples.
- Gradients are averaged across processes by DDP: with a model without BatchNorm and a regulariser that
  is a mean of per-sample terms (`none`, `rrr`, `energy`), a step equals one process on the union batch,
  up to float reduction order. BatchNorm statistics are per process (SyncBatchNorm needs GPUs), and the
  S-IB HSIC is a batch-level statistic computed over each process's own batch, so S-IB gradients differ
  from a single process on the union batch; they are still identical across processes.
- Logged metrics (losses, accuracies) are reduced across processes; only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group (so we destroy it); False if the caller did

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


MASTER_PORTS = (20000, 60000)  # the range a SLURM job's rendezvous port is drawn from (by its job id)


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[03-05,07],cpu1" -> "gpu03"), as `scontrol show hostnames` would
    give it; written here so a task needs no SLURM command on its node."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head[: head.index("[")], head[head.index("[") + 1: head.index("]")]
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """torchrun's variables derived from SLURM's, for a process of an `srun` step of several tasks; {} elsewhere
    (torchrun's own variables present, no SLURM step, or a step of one task).

    RANK = SLURM_PROCID, WORLD_SIZE = the step's task count, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the
    step's first node, MASTER_PORT = MASTER_PORT if set, else drawn from the job id in MASTER_PORTS (every task
    of the step computes the same port; two steps of one job on one node would need MASTER_PORT set).
    """
    env = dict(os.environ if env is None else env)
    # only a step's processes: the batch script has SLURM_PROCID=0 and SLURM_NTASKS=N too, but is one process
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    world = int(env["SLURM_STEP_NUM_TASKS"] or "1")
    if world <= 1:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    low, high = MASTER_PORTS
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or (_first_host(nodes) if nodes else "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT") or str(low + job % (high - low))}


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun (or SLURM srun) process group if there is one; return this process's rank and the world
    size.

    Args:
        device: the device this process will use (decides NCCL vs gloo).
    """
    os.environ.update(slurm_environment())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns)


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max") across processes; a no-op in a world of one."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every process (used for errors found on rank 0 only)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class EpochBatchSampler:
    """The training batches of one epoch: a seeded permutation cut into global batches, sharded by rank.

    The permutation depends only on `seed` (the trainer passes one seed per epoch), so a resumed run sees
    the same batches. Global batch g is `perm[g*B*W : (g+1)*B*W]` (B = per-process batch, W = world
    size); rank r takes its r-th contiguous slice of B. Hence a run on W processes with batch B sees, step
    by step, exactly the samples a single process with batch B*W sees. The incomplete last global batch
    is dropped (never a batch of 1 for the HSIC), unless the whole dataset fits in one batch on one process.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None) -> None:
        global_batch = batch_size * world_size
        if num_samples < global_batch and world_size > 1:
            raise ValueError(f"the training split has {num_samples} samples, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes); lower --batch-size")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        full = num_samples // global_batch
        self.num_batches = full if full > 0 else 1  # a dataset smaller than one batch: one batch of all
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed)).tolist()
        global_batch = self.batch_size * self.world_size
        for g in range(self.num_batches):
            start = g * global_batch + self.rank * self.batch_size
            yield perm[start:start + self.batch_size]


def shard_indices(num_samples: int, info: DistInfo) -> list[int] | None:
    """Evaluation indices of this process (`rank::world`; disjoint, and together every sample once)."""
    return list(range(info.rank, num_samples, info.world_size)) if info.enabled else None
