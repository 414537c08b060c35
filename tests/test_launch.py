"""The launcher's parts that need no cluster: SLURM's environment as torchrun's, the `launcher:` section and its
flags, the shared-filesystem warning, the task records read back as states, and `--summary-only` refusing an
unfinished study (the real SLURM tests are tests/test_slurm.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from sib import task_record
from sib.claim import claim
from sib.cli import main
from sib.config import LauncherConfig
from sib.distributed import _first_host, slurm_environment
from sib.launch import executor, shared_path_warning
from sib.run_dir import TRAIN, prepare
from sib.study import _run_state, load_study, run_study, study_status

STEP = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "12345"}


@pytest.mark.parametrize("nodes, first", [("gpu[03-05,07],cpu1", "gpu03"), ("node1", "node1"), ("a,b", "a"),
                                          ("x-[001-004]", "x-001"), ("n[9]", "n9")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert _first_host(nodes) == first


def test_an_srun_step_of_two_tasks_gives_torchruns_variables():
    env = slurm_environment(STEP)
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(20000 + 12345 % 40000)}
    assert slurm_environment({**STEP, "MASTER_PORT": "29500", "MASTER_ADDR": "h"})["MASTER_PORT"] == "29500"


@pytest.mark.parametrize("env", [{**STEP, "WORLD_SIZE": "2"},  # torchrun's own: left alone
                                 {**STEP, "SLURM_STEP_NUM_TASKS": "1"},  # a step of one task
                                 {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
                                  "SLURM_LOCALID": "0"}])  # the batch script, not a step: one process
def test_no_process_group_from_slurm_where_there_is_none_to_join(env):
    assert slurm_environment(env) == {}


STUDY = {"base": {"dataset": "synthetic", "model": "tiny_cnn", "image_size": 32, "epochs": 1},
         "seeds": [0], "baseline": "ce", "evaluate": {"splits": ["test"]},
         "settings": [{"label": "ce", "regularizer": "none"}]}


def _write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_the_launcher_section_is_checked_and_is_not_part_of_what_the_study_computes(tmp_path):
    launcher = {"partition": "gpu", "gpus_per_run": 4, "time_min": 600, "sbatch": ["constraint=a100", "exclusive"]}
    study = load_study(_write(tmp_path / "s.yaml", {**STUDY, "launcher": launcher}))
    assert study.launcher == launcher
    assert study.resolved() == load_study(_write(tmp_path / "t.yaml", STUDY)).resolved()
    cfg = LauncherConfig(**{**study.launcher, "time_min": 30})  # a flag over the file
    assert cfg.sbatch_options() == {"constraint": "a100", "exclusive": True}
    ex = executor(tmp_path, cfg)
    p = ex.parameters
    assert (p["partition"], p["time"], p["ntasks_per_node"], p["gpus_per_node"], p["nodes"]) == ("gpu", 30, 4, 4, 1)
    assert p["additional_parameters"] == {"constraint": "a100", "exclusive": True}
    assert p["setup"][0] == "trap '' USR2"
    with pytest.raises(ValueError, match=r"s.yaml: launcher: unknown LauncherConfig field\(s\) \['gpus'\]"):
        load_study(_write(tmp_path / "s.yaml", {**STUDY, "launcher": {"gpus": 2}}))
    with pytest.raises(ValueError, match=r"launcher: time_min='long' is not of type int"):
        load_study(_write(tmp_path / "s.yaml", {**STUDY, "launcher": {"time_min": "long"}}))
    with pytest.raises(ValueError, match=r"--sbatch '=x': expected KEY=VALUE"):
        LauncherConfig(sbatch=["=x"]).sbatch_options()


def test_a_machine_local_study_folder_is_named_in_a_warning(tmp_path):
    assert "machine-local" in shared_path_warning(Path("/tmp/study"))
    assert shared_path_warning(Path("/dev/shm/x")) is not None
    assert shared_path_warning(Path(__file__).resolve().parents[1] / "runs" / "s") is None or \
        "tmpfs" in shared_path_warning(Path(__file__).resolve().parents[1] / "runs" / "s")


def test_launching_on_slurm_without_sbatch_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch anywhere
    path = _write(tmp_path / "s.yaml", STUDY)
    code = main(["study", "--config", str(path), "--out", str(tmp_path / "out"), "--launcher", "slurm"])
    err = capsys.readouterr().err
    assert code == 1 and "sbatch is not on PATH" in err and "scripts/slurm-local.sh start" in err


def test_run_states_from_files_claims_records_and_the_queue(tmp_path):
    run = tmp_path / "runs" / "ce" / "seed0"
    assert _run_state(run, 2, {})["state"] == "not started"
    task_record.write(run, "pending", launcher="slurm", job="7_0", log="slurm/7_0/7_0_0_log.out")
    assert _run_state(run, 2, {"7_0": ("pending", "")}) == {"state": "pending", "job": "7_0", "node": None,
                                                            "detail": "pending"}
    assert _run_state(run, 2, {"7_0": ("running", "n3")})["node"] == "n3"
    lost = _run_state(run, 2, {})  # gone from the queue, no result: the log is named
    assert lost["state"] == "lost" and "slurm/7_0/7_0_0_log.out" in lost["detail"]
    assert _run_state(run, 2, None)["detail"] == "as last recorded (squeue did not answer)"
    # the record is infrastructure: the run folder is still empty to the trainer
    with prepare(run, TRAIN, overwrite=False, resume=False, claim_for="train"):
        state = _run_state(run, 2, {})
        assert state["state"] == "running" and state["detail"] == "training"
    task_record.write(run, "failed", error=task_record.last_line(ValueError("first\nValueError: the last line")))
    assert _run_state(run, 2, {}) == {"state": "failed", "job": "7_0", "detail": "ValueError: the last line"}
    (run / "log.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    (run / task_record.TASK).unlink()
    assert _run_state(run, 2, {})["detail"].startswith("trained 1 of 2 epochs")
    with pytest.raises(ValueError, match="task state 'done!'"):
        task_record.write(run, "done!")


TINY = {"base": {"dataset": "synthetic", "model": "tiny_cnn", "image_size": 32, "batch_size": 16, "epochs": 1,
                 "dataset_options": {"num_samples": 32}, "eval_splits": [], "max_steps_per_epoch": 1,
                 "profile_steps": 0, "tensorboard": False, "device": "cpu"},
        "seeds": [0, 1], "baseline": "ce",
        "evaluate": {"splits": ["test"], "methods": ["saliency"], "metrics": ["energy_pointing_game"],
                     "max_images": 8, "batch_size": 8, "device": "cpu"},
        "settings": [{"label": "ce", "regularizer": "none"}]}


def test_summary_only_refuses_an_unfinished_study_and_partial_says_what_is_missing(tmp_path, capsys):
    path, out = _write(tmp_path / "s.yaml", TINY), tmp_path / "out"
    run_study(path, out)
    shutil.rmtree(out / "runs" / "ce" / "seed1" / "eval")
    with pytest.raises(ValueError, match=r"--summary-only: 1 of 2 runs are not finished \(ce seed 1: stopped: "
                                         r"trained 1 of 1 epochs, not evaluated; .*\).*--partial"):
        run_study(path, out, summary_only=True)
    result = run_study(path, out, summary_only=True, partial=True)
    assert result.notes[0].startswith("partial summary: 1 of 2 runs missing (ce seed 1)")
    assert "partial summary: 1 of 2 runs missing" in (out / "summary.md").read_text()
    rows, command = study_status(out)
    assert [(r["seed"], r["state"]) for r in rows] == [(0, "done"), (1, "stopped")]
    assert command == f"sib study --config STUDY.yaml --out {out} --summary-only"
    assert main(["study", "--status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ce | 1 | stopped |" in printed and "1 done, 1 stopped" in printed
    # a claim held by a live process (this one) is "running"
    with claim(out / "runs" / "ce" / "seed1", "train"):
        assert study_status(out)[0][1]["state"] == "running"
    with pytest.raises(FileNotFoundError, match="--status .*no study.json"):
        study_status(tmp_path)


def test_a_task_requeues_itself_unchanged_until_max_requeues_then_reports_failed(tmp_path, monkeypatch):
    from sib.launch import SlurmRun
    from sib.study import run_one

    run = tmp_path / "study" / "runs" / "ce" / "seed0"
    job = {"train": {"out": str(run)}, "eval": {}, "overwrite": False}
    task = SlurmRun(run_one, max_requeues=2)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = task.checkpoint("ce seed 0", job)
    assert again.function is task and again.args == ("ce seed 0", job)
    assert task_record.read(run)["state"] == "pending" and task_record.read(run)["requeued"] == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert task.checkpoint("ce seed 0", job) is None
    record = task_record.read(run)
    assert record["state"] == "failed" and "max_requeues=2 reached" in record["error"]


def test_a_task_that_cannot_see_its_study_folder_says_so(tmp_path):
    from sib.launch import SlurmRun
    from sib.study import run_one

    job = {"train": {"out": str(tmp_path / "elsewhere" / "runs" / "ce" / "seed0")}, "eval": {}, "overwrite": False}
    with pytest.raises(FileNotFoundError, match=r"ce seed 0: the study folder .*elsewhere is not visible on node .*"
                                                r"shared by the submitting machine and the nodes"):
        SlurmRun(run_one, 3)("ce seed 0", job)
