"""The training loop on real (tiny) runs: logs, checkpoints, exact resume, refusals, non-finite losses."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from sib.run_dir import load_checkpoint, save_checkpoint
from sib.train import CHECKPOINT, NonFiniteLossError, git_revision, train


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
    # a warmup + cosine schedule: the resumed run must restore the scheduler's position, not restart it
    opts = dict(regularizer="sib", schedule="cosine", warmup_epochs=1.5, every=2, profile_steps=0)
    straight = train(tiny_cfg(epochs=3, out=str(tmp_path / "a"), **opts))
    train(tiny_cfg(epochs=1, out=str(tmp_path / "b"), **opts))
    resumed = train(tiny_cfg(epochs=3, out=str(tmp_path / "b"), resume=True, **opts))
    assert len({row["lr"] for row in straight.history}) == 3
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
    assert proc.wait() == -signal.SIGKILL  # killed, not finished: otherwise the resume below would do nothing
    done = load_checkpoint(tmp_path / "run")["epoch"]
    assert 1 <= done < 4
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
    with pytest.raises(ValueError, match="regularizer='none' -> regularizer='sib'"):
        train(tiny_cfg(regularizer="sib", resume=True, epochs=2))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg):
    first = train(tiny_cfg(regularizer="sib"))
    before = _weights(first.out)
    # a resume refuses changed options, so the checkpoint is made to carry the NaN weight that epoch 2 then uses
    ckpt = load_checkpoint(first.out)
    ckpt["config"]["sib_bg_weight"] = float("nan")
    save_checkpoint(ckpt, first.out / CHECKPOINT)
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


def test_every_k_regularises_every_kth_step_and_skip_mode_counts_skipped_batches(tiny_cfg):
    result = train(tiny_cfg(regularizer="sib", every=2, profile_steps=0))
    row = result.history[0]
    assert (row["step"], row["reg_steps"], row["skipped"]) == (4, 2, 0) and "hsic" in row
    # a NaN regulariser: its steps are skipped (no update, counted), the plain steps in between still train
    skip = train(tiny_cfg(regularizer="sib", every=2, on_nonfinite="skip", sib_bg_weight=float("nan"),
                          overwrite=True, profile_steps=0))
    row = skip.history[0]
    assert (row["skipped"], row["reg_steps"]) == (2, 0) and math.isfinite(row["ce"])
    assert json.loads((skip.out / "summary.json").read_text())["skipped_batches"] == 2
    assert all(torch.isfinite(v).all() for v in skip.model.state_dict().values())  # no NaN update applied


def test_accumulation_equals_the_large_batch_and_schedule_counts_optimizer_steps(tmp_path, tiny_cfg):
    opts = dict(regularizer="none", schedule="cosine", warmup_epochs=0.5, label_smoothing=0.1, epochs=2,
                profile_steps=0)
    big = train(tiny_cfg(out=str(tmp_path / "big"), batch_size=16, **opts))
    acc = train(tiny_cfg(out=str(tmp_path / "acc"), batch_size=8, accumulate=2, **opts))
    assert [r["lr"] for r in acc.history] == [r["lr"] for r in big.history]
    for k, w in big.model.state_dict().items():  # tiny_cnn has no BatchNorm: the mean of two halves' means
        torch.testing.assert_close(acc.model.state_dict()[k], w, rtol=1e-4, atol=1e-6)


def test_gradient_clipping_bounds_the_sgd_update(tmp_path, tiny_cfg):
    opts = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, max_steps_per_epoch=1, profile_steps=0)
    w0 = train(tiny_cfg(out=str(tmp_path / "w0"), lr=0.0, **opts)).model.state_dict()
    w1 = train(tiny_cfg(out=str(tmp_path / "w1"), lr=1.0, grad_clip=1e-3, **opts)).model.state_dict()
    change = torch.sqrt(sum(((w1[k] - w0[k]) ** 2).sum() for k in w0))
    assert change.item() == pytest.approx(1e-3, rel=1e-3)  # lr * clipped norm (the raw norm is far larger)


@pytest.mark.parametrize(("option", "value"), [("every", 0), ("accumulate", 0), ("on_nonfinite", "ignore"),
                                               ("reg_precision", "fp16"), ("label_smoothing", 1.0)])
def test_bad_option_values_name_the_flag(tiny_cfg, option, value):
    with pytest.raises(ValueError, match="--" + option.replace("_", "-")):
        train(tiny_cfg(**{option: value}))


def test_run_records_git_revision_and_summary(tiny_cfg):
    result = train(tiny_cfg(regularizer="sib", every=4, profile_steps=1))
    session = json.loads((result.out / "run.json").read_text())["sessions"][0]
    revision, _ = git_revision()
    assert session["git_revision"] == revision  # None outside a git checkout
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["best_val_acc"] == result.history[0]["val_acc"]
    plain, reg = summary["plain_step_s"], summary["reg_step_s"]
    assert summary["reg_share_amortised"] == pytest.approx((reg - plain) / (reg + 3 * plain))


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_epoch_checkpoint_and_resumes(tmp_path):
    """A real process gets SIGINT during its second epoch: exit 130, a message, an intact checkpoint."""
    (tmp_path / "run.yaml").write_text("dataset_options: {num_samples: 96}\nepochs: 40\n")
    args = [sys.executable, "-m", "sib", "train", "--config", str(tmp_path / "run.yaml"), "--model", "tiny_cnn",
            "--image-size", "32", "--batch-size", "16", "--regularizer", "sib", "--device", "cpu",
            "--eval-splits", "test", "--out", str(tmp_path / "run"), "--profile-steps", "0"]
    # a shell's background job inherits SIGINT ignored; restore the default so Python raises KeyboardInterrupt
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "run" / CHECKPOINT).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    done = load_checkpoint(tmp_path / "run")["epoch"]
    assert 1 <= done < 40 and f"holds epoch {done}, intact" in err
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    res = subprocess.run([*args[:-4], "--out", str(tmp_path / "run"), "--resume", "--epochs", str(done + 1),
                          "--profile-steps", "0"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(tmp_path / "run")["epoch"] == done + 1
