"""Where a study's runs execute. The study (sib.study) decides *what* runs: the list of (name, job) pairs, each
job the plain-data configuration of one run folder and the function that trains and evaluates it. A launcher
decides only *where*: `local` is sib.study_pool (this machine, `--jobs N` processes); `slurm` is this module,
which sends the jobs to a SLURM cluster through submitit as one job array (`map_array`), one task per run.
Another engine would sit beside `submit_slurm`, taking the same jobs and writing the same task records.

A task (`SlurmRun`) sees nothing but its run's configuration: it trains and evaluates the run folder with the
ordinary resume logic (`sib.study.run_one`), so a requeued task continues from the folder's last checkpoint.
Its state goes into the run folder (sib.task_record: running / done / failed with the error's last line):
`sib study --status` reads it there, since a cluster without accounting has no `sacct`.

Preemption and time limits: SLURM signals USR2 (submitit asks for it 90 s before the time limit; `scancel
--signal=USR2` does it by hand). submitit's handler calls `SlurmRun.checkpoint`, which records the requeue
and resubmits the same task (nothing but its configuration is pickled), then `scontrol requeue`s the job and
exits: the run keeps its last completed epoch's checkpoint (written atomically) and its finished evaluation
batches, so at most the epoch in progress is lost. A task requeued `max_requeues` times is recorded failed
instead; submitit also stops after `max_requeues` time-outs (its `max_num_timeout`).

Several GPUs per run (`gpus_per_run > 1`): one process per GPU, started by SLURM (tasks per node = GPUs); each
joins the process group through sib.distributed.slurm_environment; only rank 0 writes records and requeues.

The study folder must be on a filesystem the nodes share with the submitting machine: `shared_path_warning`
names a path that is not (under /tmp, or a tmpfs), and a task that cannot see its study folder fails saying so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from sib import task_record
from sib.config import LauncherConfig

LOGS = "slurm"  # DIR/slurm/<job id>/: submitit's pickles and each task's stdout / stderr
Job = tuple[str, dict[str, Any]]
LOCAL_ONLY = ("/tmp", "/var/tmp", "/dev/shm", "/run")
LOCAL_FILESYSTEMS = {"tmpfs", "ramfs"}


def _study_dir(job: dict[str, Any]) -> Path:
    """DIR of a job's run folder DIR/runs/<setting>/seed<k>."""
    return Path(job["train"]["out"]).parents[2]


def _mount_type(path: Path) -> str | None:
    """Filesystem type of the mount holding `path` (Linux /proc/mounts), None when unknown."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best, kind = "", None
    for fields in mounts:
        if len(fields) >= 3 and (str(path) == fields[1] or str(path).startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def shared_path_warning(out: Path) -> str | None:
    """Why `out` is probably not visible from the cluster's nodes (a local-only path), or None."""
    path = Path(out).resolve()
    if any(str(path) == p or str(path).startswith(p + "/") for p in LOCAL_ONLY):
        return (f"the study folder {path} is under a machine-local folder: the nodes must see it (a shared "
                f"filesystem); on a real cluster its tasks will fail with 'not visible on node'")
    kind = _mount_type(path)
    if kind in LOCAL_FILESYSTEMS:
        return f"the study folder {path} is on a {kind} filesystem, local to this machine: the nodes must see it"
    return None


def _threads() -> None:
    """Torch threads = the task's CPUs (SLURM_CPUS_PER_TASK): SLURM gives the cores, torch would take the node's."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        import torch

        torch.set_num_threads(int(cpus))


class SlurmRun(submitit.helpers.Checkpointable):
    """One array task: train and evaluate one run folder (`fn(job)`, sib.study.run_one), recording its state."""

    def __init__(self, fn: Callable[[dict[str, Any]], dict[str, Any]], max_requeues: int) -> None:
        self.fn, self.max_requeues = fn, max_requeues
        self._gave_up = False

    def __call__(self, name: str, job: dict[str, Any]) -> dict[str, Any]:
        run, study = Path(job["train"]["out"]), _study_dir(job)
        host = socket.gethostname()
        if not (study / "study.json").is_file():
            raise FileNotFoundError(f"{name}: the study folder {study} is not visible on node {host}: it must be on "
                                    f"a filesystem shared by the submitting machine and the nodes")
        env = submitit.JobEnvironment()
        main = env.global_rank == 0
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        _threads()
        if main:
            task_record.write(run, "running", job=env.job_id, node=host, restarts=restarts,
                              started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            again = f", requeued {restarts} time(s): resuming from the run folder" if restarts else ""
            print(f"sib: {name}: task {env.job_id} on {host}{again}", flush=True)
        try:
            result = self.fn(job)
        except Exception as err:
            if main and not self._gave_up:
                task_record.write(run, "failed", error=task_record.last_line(err))
            raise
        if main and not result.get("skipped"):
            task_record.write(run, "done", result=result)
        if main:
            print(f"sib: {name}: " + (f"skipped, {result['skipped']}" if result.get("skipped") else
                                      f"training {result['train']}, evaluation {result['eval']} "
                                      f"({result['seconds']:.0f} s)"), flush=True)
        return result

    def checkpoint(self, name: str, job: dict[str, Any]) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on USR2 (rank 0 only): requeue this task unchanged, or give up past max_requeues."""
        run = Path(job["train"]["out"])
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            self._gave_up = True
            why = (f"stopped by SLURM (time limit or preemption) {restarts + 1} times; max_requeues="
                   f"{self.max_requeues} reached: rerun the study to continue from its last checkpoint")
            task_record.write(run, "failed", error=why)
            print(f"sib: {name}: {why}", flush=True)
            return None
        task_record.write(run, "pending", requeued=restarts + 1)
        print(f"sib: {name}: signalled by SLURM; requeued ({restarts + 1} of at most {self.max_requeues}): the run "
              f"resumes from the last checkpoint in {run}", flush=True)
        return submitit.helpers.DelayedSubmission(self, name, job)


def executor(out: Path, cfg: LauncherConfig, name: str = "sib-study") -> submitit.SlurmExecutor:
    """submitit's SLURM executor for the runs of study folder `out`, from the launcher section."""
    ex = submitit.SlurmExecutor(folder=Path(out) / LOGS / "%j", max_num_timeout=cfg.max_requeues)
    procs = max(1, cfg.gpus_per_run)
    params: dict[str, Any] = {"job_name": name, "time": cfg.time_min, "nodes": 1, "ntasks_per_node": procs,
                              "cpus_per_task": cfg.cpus_per_run, "array_parallelism": cfg.array_parallelism,
                              "additional_parameters": cfg.sbatch_options()}
    if cfg.gpus_per_run:
        params["gpus_per_node"] = cfg.gpus_per_run
    if cfg.mem_gb is not None:
        params["mem"] = f"{int(cfg.mem_gb * 1024)}M"
    for key, value in (("partition", cfg.partition), ("account", cfg.account), ("qos", cfg.qos)):
        if value:
            params[key] = value
    # the batch shell ignores USR2: `scancel --signal=USR2 --full` (or a site that signals the whole job) would
    # otherwise end it, and the job with it, while the task's handler is still requeueing (measured: the requeue
    # command was killed and the run reported failed). The task itself (submitit) handles USR2.
    params["setup"] = ["trap '' USR2", *cfg.setup]
    ex.update_parameters(**params)
    return ex


def submit_slurm(jobs: list[Job], out: Path, cfg: LauncherConfig,
                 fn: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """Send `jobs` to SLURM as one array; record each run as pending with its task id and log; return the job id.

    Raises:
        RuntimeError: sbatch is missing or refused the array (its message included).
    """
    if shutil.which("sbatch") is None:
        raise RuntimeError("--launcher slurm: sbatch is not on PATH (no SLURM here); install SLURM or run "
                           "scripts/slurm-local.sh start for a single-node cluster on this machine")
    ex = executor(out, cfg)
    task = SlurmRun(fn, cfg.max_requeues)
    try:
        submitted = ex.map_array(task, [name for name, _ in jobs], [job for _, job in jobs])
    except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as err:
        detail = getattr(err, "output", None) or err
        raise RuntimeError(f"--launcher slurm: sbatch refused the job array: {detail}") from err
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for (_, job), handle in zip(jobs, submitted, strict=True):
        if (task_record.read(job["train"]["out"]) or {}).get("job") == handle.job_id:
            continue  # the task started first and wrote its own record: never put it back to pending
        task_record.write(job["train"]["out"], "pending", launcher="slurm", job=handle.job_id, node=None,
                          log=str(handle.paths.stdout), submitted=when, restarts=0)
    return submitted[0].job_id.split("_")[0]


def queue(job_ids: set[str]) -> dict[str, tuple[str, str]] | None:
    """SLURM's view of array tasks: {"123_4": (state, node)} for those still queued or running; None when
    squeue cannot answer (no SLURM here: then nothing is known, not "every task ended")."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    if shutil.which("squeue") is None:
        return None
    try:
        text = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%N", "-j", ",".join(arrays)], capture_output=True,
                              text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if text.returncode != 0:
        if "Invalid job id" in text.stderr:  # every job has left the queue (and its memory)
            return {}
        return None
    found = {}
    for line in text.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            found[parts[0]] = (parts[1].lower(), parts[2])
    return found


def progress_line(counts: dict[str, int], job: str, seconds: float) -> str:
    """`slurm job 123: 4 done, 2 running, 6 pending, 1 failed (80 s)`: failed and lost only when there are any."""
    shown = [k for k in ("done", "running", "pending", "failed", "lost") if counts.get(k) or k in ("done", "running",
                                                                                                 "pending")]
    return f"slurm job {job}: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in shown) + f" ({seconds:.0f} s)"
