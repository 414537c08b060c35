"""Fault injection on real run folders: killed and failed writes, damaged and hostile checkpoints, stale state.

Each fault must end in a clear error naming the file (the CLI: one line, no traceback) or in a correct
result, and no file may be lost. Faults come from the operating system (SIGKILL, a file-size limit, a failing
fsync) or from files on disk; none of sib's own code is replaced.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from sib.cli import main
from sib.config import EvalConfig, to_dict
from sib.evaluate import evaluate
from sib.run_dir import MANIFEST, load_checkpoint
from sib.train import CHECKPOINT, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_tiny_config):
    """One finished epoch of a tiny run; each test works on its own copy."""
    out = tmp_path_factory.mktemp("faults") / "run"
    train(make_tiny_config(out, profile_steps=0))
    return out


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def cfg(make_tiny_config, run):
    """The run's own configuration (as the fixture trained it) with some fields replaced."""
    return lambda **kw: make_tiny_config(run, profile_steps=0, **kw)


def _cli_args(cfg, tmp_path):
    """`sib train` arguments reproducing `cfg` exactly (a resume refuses any other options)."""
    options = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "resume", "overwrite")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(options))
    return ["train", "--config", str(tmp_path / "run.yaml"), "--out", str(cfg.out)]


def _temporaries(folder):
    return sorted(p.name for p in folder.rglob("*.tmp"))


def _one_line_error(captured, *parts):
    err = captured.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for part in parts:
        assert part in err, (part, err)


# A real process writes a 64 MB checkpoint in a loop with sib's writer; it is SIGKILLed while a write is on.
WRITER = """
import sys, torch
from sib.run_dir import load_checkpoint, save_checkpoint
ckpt = load_checkpoint(sys.argv[1])
ckpt["padding"] = torch.zeros(2 ** 24)  # long enough a write to be cut in the middle
while True:
    save_checkpoint(ckpt, sys.argv[1])
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_a_whole_checkpoint_and_resume_cleans_up(run, cfg):
    before = load_checkpoint(run)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run / CHECKPOINT)])
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            partial = [p for p in run.glob(f".{CHECKPOINT}.*.tmp") if p.exists() and p.stat().st_size > 1 << 20]
            if partial:
                break
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        if _temporaries(run):  # the kill landed inside a write (else the rename won the race: try again)
            break
    assert _temporaries(run), "no write was interrupted"
    after = load_checkpoint(run)  # the old checkpoint or a complete new one, never a mix
    assert after["epoch"] == 1 and all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    resumed = train(cfg(resume=True, epochs=2))
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert load_checkpoint(run)["epoch"] == 2
    assert _temporaries(run) == []  # the killed writer's leftover was removed by the resume


def test_disk_full_on_checkpoint_write_keeps_the_previous_checkpoint(run, cfg, monkeypatch):
    """fsync reports ENOSPC (how a full disk surfaces after buffered writes) for the checkpoint's temporary."""
    before = (run / CHECKPOINT).read_bytes()
    log_before = (run / "log.jsonl").read_text()
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{CHECKPOINT}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=rf"could not write {re.escape(str(run / CHECKPOINT))} \(No space left on "
                                      rf"device\); the previous file is unchanged") as err:
        train(cfg(resume=True, epochs=2))
    assert err.value.errno == errno.ENOSPC
    assert (run / CHECKPOINT).read_bytes() == before and (run / "log.jsonl").read_text() == log_before
    assert _temporaries(run) == []
    monkeypatch.undo()  # space freed: the same command continues the run
    assert [r["epoch"] for r in train(cfg(resume=True, epochs=2)).history] == [1, 2]


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))  # below checkpoint.pt (~34 kB), above the rest


@pytest.mark.slow
def test_failed_write_in_a_real_process_is_one_line_and_loses_nothing(run, cfg, tmp_path):
    assert (run / CHECKPOINT).stat().st_size > 16_000
    before = (run / CHECKPOINT).read_bytes()
    args = _cli_args(cfg(epochs=2), tmp_path)
    res = subprocess.run([sys.executable, "-m", "sib", *args, "--resume"], capture_output=True, text=True,
                         timeout=600, preexec_fn=_file_size_limit)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr
    assert last == (f"sib train: error: [Errno {errno.EFBIG}] could not write {run / CHECKPOINT} "
                    f"(File too large); the previous file is unchanged")
    assert (run / CHECKPOINT).read_bytes() == before and _temporaries(run) == []


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_checkpoint_is_named_with_what_to_do(run, cfg, tmp_path, capsys, damage):
    data = (run / CHECKPOINT).read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": random.Random(0).randbytes(4096)}[damage]
    (run / CHECKPOINT).write_bytes(damaged)
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(run / CHECKPOINT))}: unreadable, truncated "
                                         rf"or corrupt \(.*\); restore it from a copy, or delete it and rerun"):
        load_checkpoint(run)
    assert main([*_cli_args(cfg(epochs=2), tmp_path), "--resume"]) == 2
    _one_line_error(capsys.readouterr(), "sib train: error: checkpoint", str(run / CHECKPOINT), "corrupt")
    assert main(["evaluate", "--checkpoint", str(run), "--weights", "last", "--device", "cpu"]) == 2
    _one_line_error(capsys.readouterr(), "sib evaluate: error: checkpoint", str(run / CHECKPOINT), "corrupt")
    assert (run / CHECKPOINT).read_bytes() == damaged  # nothing replaced it behind the user's back


def test_malicious_checkpoint_runs_no_code(run, cfg, tmp_path, capsys):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):  # unpickling this calls open(marker, "w"): code chosen by the file's author
            return (open, (str(marker), "w"))

    hostile = {"model": {"w": torch.zeros(1)}, "config": {}, "num_classes": 10, "payload": Payload()}
    for name in (CHECKPOINT, "best.pt"):
        torch.save(hostile, run / name)
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(run / CHECKPOINT))}: refused, it holds "
                                         rf"objects other than tensors and plain data \(GLOBAL io.open\)"):
        load_checkpoint(run)
    assert main(["evaluate", "--checkpoint", str(run), "--device", "cpu"]) == 2
    _one_line_error(capsys.readouterr(), str(run / "best.pt"), "could run code")
    assert main([*_cli_args(cfg(epochs=2), tmp_path), "--resume"]) == 2
    _one_line_error(capsys.readouterr(), str(run / CHECKPOINT), "could run code")
    assert not marker.exists()
    torch.load(run / CHECKPOINT, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()


def test_resume_with_changed_options_names_them_and_changes_nothing(run, cfg, tmp_path, capsys):
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError) as err:
        train(cfg(resume=True, epochs=3, batch_size=8, seed=123, lr=1.0))
    message = str(err.value)
    for part in (str(run / CHECKPOINT), "batch_size=16 -> batch_size=8", "seed=0 -> seed=123", "lr=0.01 -> lr=1.0",
                 "--overwrite"):
        assert part in message, part
    assert "epochs=1" not in message  # epochs may change
    assert main([*_cli_args(cfg(epochs=2, seed=5), tmp_path), "--resume"]) == 2
    _one_line_error(capsys.readouterr(), "seed=0 -> seed=5")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == {**files, MANIFEST: files[MANIFEST]}
    assert [r["epoch"] for r in train(cfg(resume=True, epochs=2)).history] == [1, 2]  # more epochs: allowed


@pytest.mark.parametrize("change", ["more_epochs", "retrained"])
def test_evaluate_resume_after_the_weights_changed_never_returns_old_numbers(run, cfg, tmp_path, change):
    ev = EvalConfig(checkpoint=str(run), weights="last", splits=["test"], methods=["saliency"],
                    metrics=["energy_pointing_game"], batch_size=16, out=str(tmp_path / "ev"), device="cpu")
    evaluate(ev)
    rows = (tmp_path / "ev" / "per_image.jsonl").read_bytes()
    if change == "more_epochs":
        train(cfg(resume=True, epochs=2))
    else:  # same epoch count, other weights: only the content hash tells them apart
        train(cfg(overwrite=True, seed=1))
    epoch = load_checkpoint(run)["epoch"]
    with pytest.raises(ValueError, match=rf"--resume: .*ev holds an evaluation of other weights \(epoch 1, sha256 "
                                         rf"[0-9a-f]{{12}}\) than .*checkpoint.pt now holds \(epoch {epoch}, sha256 "
                                         rf"[0-9a-f]{{12}}\); its rows are stale: rerun with --overwrite"):
        evaluate(dataclasses.replace(ev, resume=True))
    assert (tmp_path / "ev" / "per_image.jsonl").read_bytes() == rows
    again = evaluate(dataclasses.replace(ev, overwrite=True))
    fresh = evaluate(dataclasses.replace(ev, out=str(tmp_path / "fresh")))
    assert again.summary == fresh.summary
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    accuracy = next(r["value"] for r in again.summary if r["metric"] == "accuracy")
    assert accuracy == pytest.approx(log[-1]["test_acc"])  # the new weights' accuracy, as training measured it


def test_overwrite_keeps_files_the_user_put_in_the_run_folder(run, cfg):
    (run / "thesis.tex").write_text("\\chapter{Results}")
    (run / "plots").mkdir()
    (run / "plots" / "fig1.pdf").write_bytes(b"%PDF")
    result = train(cfg(overwrite=True, seed=1))
    assert (run / "thesis.tex").read_text() == "\\chapter{Results}" and (run / "plots" / "fig1.pdf").exists()
    assert load_checkpoint(run)["config"]["seed"] == 1 and len(result.history) == 1


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_non_empty_folder_is_refused(cfg, tmp_path, overwrite):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.tex").write_text("chapter 1")
    with pytest.raises(FileExistsError, match="not empty .*thesis.tex.* not a sib train folder"):
        train(dataclasses.replace(cfg(overwrite=overwrite), out=str(folder)))
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("checkpoint", ["folder", "file"])
def test_evaluating_into_the_run_folder_is_refused(run, checkpoint):
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # tensorboard/ too
    target = run if checkpoint == "folder" else run / CHECKPOINT
    with pytest.raises(ValueError, match="is the run folder of --checkpoint .*default: .*eval"):
        evaluate(EvalConfig(checkpoint=str(target), out=str(run), overwrite=True, device="cpu"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
