"""`sib study --launcher slurm` against a real SLURM: the single-node cluster of scripts/slurm-local.sh (which
.ci/run starts). Where no SLURM answers, these tests skip on a developer's machine and FAIL under CI (environment
CI or SIB_REQUIRE_SLURM set): a skip there would hide an untested launcher.

What is checked, through the real `sbatch` / `srun` / `scancel` and the `sib` command line:
- a tiny study run on SLURM has the same summary as the same study run here (CPU runs are deterministic), a run
  that raises is reported failed with its error, `--status` names each state, and a task's log reads as lines;
- a task sent USR2 mid-run is requeued and resumes from its checkpoint (its log says so; the numbers are those
  of an uninterrupted run), while `--status` shows it running on its node and the next run pending;
- two launchers started at once on one study folder train and evaluate each run once;
- `srun -n 2 sib train` is DDP from SLURM's environment, with the weights of the same run under torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _required() -> bool:
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no")
               for v in ("CI", "SIB_REQUIRE_SLURM"))


@pytest.fixture(scope="module")
def slurm():
    """The cluster answers with an idle (or busy) node; else skip here, fail under CI."""
    why = None
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        why = "SLURM's commands are not installed"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
        states = proc.stdout.split()
        if proc.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
            why = f"no SLURM node is up (sinfo: {proc.stdout.strip() or proc.stderr.strip()})"
    if why:
        why += "; start one with scripts/slurm-local.sh start"
        if _required():
            pytest.fail(f"{why} (CI or SIB_REQUIRE_SLURM is set, where a skip counts as a failure)", pytrace=False)
        pytest.skip(why)


BASE = {"dataset": "synthetic", "model": "tiny_cnn", "image_size": 32, "batch_size": 16, "epochs": 2, "lr": 1.0e-2,
        "dataset_options": {"num_samples": 64}, "eval_splits": ["test"], "max_steps_per_epoch": 2, "profile_steps": 0,
        "tensorboard": False, "device": "cpu"}
EVALUATE = {"splits": ["test", "test_shifted"], "methods": ["grad_cam", "saliency"],
            "metrics": ["energy_pointing_game"], "max_images": 16, "batch_size": 16, "device": "cpu"}


def _study(path: Path, settings: list[dict], seeds=(0, 1), **base) -> Path:
    path.write_text(yaml.safe_dump({"base": {**BASE, **base}, "seeds": list(seeds), "baseline": "ce",
                                    "evaluate": EVALUATE, "settings": settings,
                                    "launcher": {"cpus_per_run": 1, "poll_s": 0.5}}, sort_keys=False))
    return path


def _sib(*args: str, cwd: Path, log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    sink = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "sib", *args], cwd=cwd, env=env, text=True, stdout=sink,
                            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE)


def _local(config: Path, out: Path) -> None:
    """The same study here, one torch thread per run (as a 1-CPU SLURM task): the reference numbers."""
    proc = _sib("study", "--config", str(config), "--out", str(out), "--jobs", str(os.cpu_count() or 1),
                cwd=config.parent)
    stdout, err = proc.communicate(timeout=900)
    assert proc.returncode in (0, 1), err[-3000:]


def _same_summary(a: Path, b: Path) -> None:
    """Every row of two summary.json files equal, exactly (NaN as NaN), timing rows aside (each run's own)."""
    rows = [[r for r in json.loads((d / "summary.json").read_text()) if r["metric"] != "sec_per_step"] for d in (a, b)]
    assert len(rows[0]) == len(rows[1]) > 0
    for x, y in zip(*rows, strict=True):
        assert json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)


def _status(out: Path) -> dict[tuple[str, int], dict]:
    from sib.study import study_status

    return {(r["setting"], r["seed"]): r for r in study_status(out)[0]}


def test_a_study_on_slurm_equals_it_run_here_and_a_failing_run_is_reported(slurm, tmp_path):
    config = _study(tmp_path / "study.yaml", [
        {"label": "ce", "regularizer": "none"},
        {"label": "sib", "regularizer": "sib", "sweep": {"sib_bg_weight": ["1.0e5"]}, "sweep_labels": ["x100"]},
        {"label": "broken", "regularizer": "none", "on_nonfinite": "explode"}])  # refused when its run starts
    _local(config, tmp_path / "here")
    out = tmp_path / "cluster"
    proc = _sib("study", "--config", str(config), "--out", str(out), "--launcher", "slurm", "--wait", cwd=tmp_path)
    stdout, err = proc.communicate(timeout=900)
    assert proc.returncode == 1, err[-3000:]  # the broken runs failed; the others were aggregated
    assert "submitted 6 run(s) as SLURM job array" in stdout and "slurm job " in stdout
    assert "machine-local" in err or "/tmp" not in str(out)  # pytest's folder is under /tmp: the warning says so
    for seed in (0, 1):
        assert f"failed: broken seed {seed}: failed job" in err
        assert "ValueError: --on-nonfinite 'explode'" in err
    _same_summary(out, tmp_path / "here")

    states = _status(out)
    assert {k: r["state"] for k, r in states.items()} == {
        ("ce", 0): "done", ("sib/x100", 0): "done", ("broken", 0): "failed",
        ("ce", 1): "done", ("sib/x100", 1): "done", ("broken", 1): "failed"}
    assert states[("broken", 1)]["detail"].startswith("ValueError: --on-nonfinite 'explode'")
    assert states[("ce", 0)]["node"] == socket.gethostname() and "_" in states[("ce", 0)]["job"]
    proc = _sib("study", "--status", str(out), cwd=tmp_path)
    printed, _ = proc.communicate(timeout=60)
    assert "4 done, 2 failed" in printed and f"--config {config} --out {out} --summary-only" in printed

    # a task's log: SLURM's output files, one line per epoch and per evaluation stage, no bar redraws
    record = json.loads((out / "runs" / "ce" / "seed0" / ".sib_task.json").read_text())
    log = Path(record["log"]).read_text()
    errors = Path(record["log"]).with_suffix(".err").read_text()
    assert "\r" not in log + errors
    assert [line.split()[0] for line in log.splitlines() if line.startswith("epoch=")] == ["epoch=1", "epoch=2"]
    assert "evaluate seed0 test: 16 images" in errors and "evaluate seed0 test_shifted: 16 images" in errors


def _wait_for(predicate, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _epochs(run: Path) -> list[int]:
    log = run / "log.jsonl"
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.exists() else []


def test_usr2_requeues_the_task_which_resumes_from_its_checkpoint(slurm, tmp_path):
    epochs = 80  # several seconds of training even on a fast CPU: the signal must land mid-run
    config = _study(tmp_path / "study.yaml", [{"label": "ce", "regularizer": "none"}], epochs=epochs,
                    dataset_options={"num_samples": 512}, max_steps_per_epoch=16)
    text = yaml.safe_load(config.read_text())
    text["launcher"]["array_parallelism"] = 1  # seed 1 waits for seed 0: a pending run to see
    config.write_text(yaml.safe_dump(text, sort_keys=False))
    out = tmp_path / "cluster"
    run = out / "runs" / "ce" / "seed0"
    launcher = _sib("study", "--config", str(config), "--out", str(out), "--launcher", "slurm", "--wait",
                    cwd=tmp_path, log=tmp_path / "launcher.log")
    _wait_for(lambda: len(_epochs(run)) >= 2 or launcher.poll() is not None, "two epochs of seed 0")
    states = _status(out)
    first = states[("ce", 0)]
    assert first["state"] == "running" and first["node"] == socket.gethostname(), states
    assert states[("ce", 1)]["state"] == "pending", states
    done_before = len(_epochs(run))
    assert done_before < epochs, "the run ended before it could be signalled: make it longer"
    subprocess.run(["scancel", "--signal=USR2", "--full", first["job"]], check=True, timeout=60)
    assert launcher.wait(timeout=900) == 0, (tmp_path / "launcher.log").read_text()[-3000:]

    record = json.loads((run / ".sib_task.json").read_text())
    assert record["state"] == "done" and record["restarts"] == 1 and record["result"]["train"] == "resumed"
    log = Path(record["log"]).read_text()
    assert "Caught signal SIGUSR2" in log and "requeued (1 of at most 3)" in log
    assert "requeued 1 time(s): resuming from the run folder" in log
    resumed = [line for line in log.splitlines() if line.startswith(f"resumed {run.relative_to(tmp_path)}")
               or line.startswith(f"resumed {run}")]
    assert len(resumed) == 1 and f"of {epochs} epochs done" in resumed[0], log[-3000:]
    assert _epochs(run) == list(range(1, epochs + 1))  # every epoch once in the log, in order
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert len(sessions) == 2  # the first start and the resume
    _local(config, tmp_path / "here")  # the same study, uninterrupted
    _same_summary(out, tmp_path / "here")
    ours = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    theirs = torch.load(tmp_path / "here" / "runs" / "ce" / "seed0" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_two_launchers_at_once_train_and_evaluate_each_run_once(slurm, tmp_path):
    config = _study(tmp_path / "study.yaml", [{"label": "ce", "regularizer": "none"}], epochs=6,
                    dataset_options={"num_samples": 256}, max_steps_per_epoch=8)
    out = tmp_path / "cluster"
    launchers = [_sib("study", "--config", str(config), "--out", str(out), "--launcher", "slurm", "--wait",
                      cwd=tmp_path, log=tmp_path / f"launcher{k}.log") for k in range(2)]
    for k, p in enumerate(launchers):
        assert p.wait(timeout=900) == 0, (tmp_path / f"launcher{k}.log").read_text()[-3000:]
    for seed in (0, 1):
        run = out / "runs" / "ce" / f"seed{seed}"
        assert len(json.loads((run / "run.json").read_text())["sessions"]) == 1  # trained once
        assert _epochs(run) == list(range(1, 7))
        rows = [json.loads(line) for line in (run / "eval" / "per_image.jsonl").read_text().splitlines()]
        keys = [(r["split"], r["method"], r["metric"], r["index"]) for r in rows if r["metric"] != "_batch_done"]
        assert len(keys) == len(set(keys)) == 16 * 2 * 3  # evaluated once: 16 images x 2 splits x 3 rows
    assert {r["state"] for r in _status(out).values()} == {"done"}


def test_srun_starts_ddp_from_slurms_environment_with_torchruns_weights(slurm, tmp_path):
    flags = ["--dataset", "synthetic", "--model", "tiny_cnn", "--image-size", "32", "--batch-size", "8",
             "--epochs", "2", "--max-steps-per-epoch", "3", "--profile-steps", "0", "--no-tensorboard",
             "--device", "cpu", "--eval-splits", "test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    srun = subprocess.run(["srun", "-n", "2", "--cpus-per-task", "1", sys.executable, "-m", "sib", "train", *flags,
                           "--out", str(tmp_path / "srun")], capture_output=True, text=True, env=env, timeout=600)
    assert srun.returncode == 0, srun.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "sib", "train", *flags,
                               "--out", str(tmp_path / "torchrun")], capture_output=True, text=True, env=env,
                              timeout=600)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    sessions = json.loads((tmp_path / "srun" / "run.json").read_text())["sessions"]
    assert [s["world_size"] for s in sessions] == [2]
    a = torch.load(tmp_path / "srun" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "torchrun" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"][-1]["step"] == 6  # 3 global batches of 2 x 8 per epoch


def test_the_interrupt_signal_of_a_stopped_launcher_leaves_the_tasks_running(slurm, tmp_path):
    """Ctrl-C on `--wait` stops the watching, not the runs: the array goes on and `--status` follows it."""
    config = _study(tmp_path / "study.yaml", [{"label": "ce", "regularizer": "none"}], seeds=(0,), epochs=3)
    out = tmp_path / "cluster"
    launcher = _sib("study", "--config", str(config), "--out", str(out), "--launcher", "slurm", "--wait",
                    cwd=tmp_path, log=tmp_path / "launcher.log")
    _wait_for(lambda: "slurm job " in (tmp_path / "launcher.log").read_text(), "the launcher's first status line")
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=60) == 0
    said = (tmp_path / "launcher.log").read_text()
    assert "stopped watching" in said and f"sib study --status {out}" in said
    _wait_for(lambda: _status(out)[("ce", 0)]["state"] == "done", "the run to finish on SLURM")
