"""The training loop on real (tiny) runs: logs, checkpoints, exact resume, refusals, non-finite losses."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from sib.train import CHECKPOINT, NonFiniteLossError, load_checkpoint, train


def _weights(path):
    return load_checkpoint(path)["model"]


def _comparable(history):
    return [{k: v for k, v in row.items() if k != "sec_per_step"} for row in history]


def test_run_writes_config_log_and_checkpoints(tiny_cfg):
    cfg = tiny_cfg(regularizer="sib", epochs=2)
    result = train(cfg)
    out = result.out
    assert {"config.json", "log.jsonl", CHECKPOINT, "best.pt"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for key in ("ce", "reg", "hsic", "bg", "coverage", "train_acc", "val_acc", "test_acc", "test_shifted_acc"):
        assert key in log[0], key
    assert json.loads((out / "config.json").read_text())["regularizer"] == "sib"


def test_resume_equals_uninterrupted_run(tmp_path, tiny_cfg):
    straight = train(tiny_cfg(epochs=3, out=str(tmp_path / "a"), regularizer="sib"))
    train(tiny_cfg(epochs=1, out=str(tmp_path / "b"), regularizer="sib"))
    resumed = train(tiny_cfg(epochs=3, out=str(tmp_path / "b"), regularizer="sib", resume=True))
    assert _comparable(resumed.history) == _comparable(straight.history)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """A real process is killed (SIGKILL) after its first checkpoint; --resume finishes it exactly."""
    (tmp_path / "run.yaml").write_text("dataset_options: {num_samples: 96}\nepochs: 4\n")
    args = [sys.executable, "-m", "sib", "train", "--config", str(tmp_path / "run.yaml"), "--model", "tiny_cnn",
            "--image-size", "32", "--batch-size", "16", "--lr", "0.01", "--regularizer", "sib", "--device", "cpu",
            "--eval-splits", "test"]
    ref = subprocess.run([*args, "--out", str(tmp_path / "ref")], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "run" / CHECKPOINT).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(tmp_path / "run")["epoch"]
    assert 1 <= done <= 4
    res = subprocess.run([*args, "--out", str(tmp_path / "run"), "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wa, wb = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log_ref = (tmp_path / "ref" / "log.jsonl").read_text().splitlines()
    log_run = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert _comparable([json.loads(r) for r in log_run]) == _comparable([json.loads(r) for r in log_ref])


def test_refuses_existing_run_without_flags(tiny_cfg):
    train(tiny_cfg())
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(tiny_cfg())
    train(tiny_cfg(overwrite=True))  # allowed


def test_resume_with_other_configuration_names_the_mismatch(tiny_cfg):
    train(tiny_cfg())
    with pytest.raises(ValueError, match="regularizer='none'.*regularizer='sib'"):
        train(tiny_cfg(regularizer="sib", resume=True, epochs=2))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg):
    first = train(tiny_cfg(regularizer="sib"))
    before = _weights(first.out)
    cfg = tiny_cfg(regularizer="sib", epochs=2, resume=True, sib_bg_weight=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step \d+: term\(s\) sib"):
        train(dataclasses.replace(cfg))
    after = _weights(first.out)
    assert load_checkpoint(first.out)["epoch"] == 1
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_names_list_valid_ones(tiny_cfg):
    with pytest.raises(ValueError, match="valid names"):
        train(tiny_cfg(model="resnet-18"))
    with pytest.raises(ValueError, match="valid names"):
        train(tiny_cfg(regularizer="ib", overwrite=True))
    with pytest.raises(ValueError, match="valid names"):
        train(tiny_cfg(dataset="cifar", overwrite=True))
    with pytest.raises(ValueError, match="adamw, sgd"):
        train(tiny_cfg(optimizer="lamb", overwrite=True))


def test_sgd_and_bf16_autocast_run(tiny_cfg):
    result = train(tiny_cfg(optimizer="sgd", amp="bf16", regularizer="sib"))
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.history[-1].items() if isinstance(v, float))
