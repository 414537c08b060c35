"""Progress output of real `sib train` / `sib evaluate` processes: bars on a terminal, one line per stage in a log."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import yaml

TINY = {"dataset": "synthetic", "model": "tiny_cnn", "image_size": 32, "batch_size": 16, "epochs": 3, "lr": 1.0e-2,
        "dataset_options": {"num_samples": 64}, "eval_splits": ["test"], "profile_steps": 0, "tensorboard": False,
        "device": "cpu", "log_every": 1}


def _sib(*args: str, cwd, stdout, stderr) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sib", *args], cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                          timeout=600).returncode


def test_a_log_file_gets_one_line_per_epoch_and_stage_and_no_bar(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    with (tmp_path / "train.log").open("w") as log:
        assert _sib("train", "--config", "run.yaml", "--out", "run", cwd=tmp_path, stdout=log, stderr=log) == 0
    text = (tmp_path / "train.log").read_text()
    assert "\r" not in text and "it/s" not in text, text[:2000]
    assert [line.split()[0] for line in text.splitlines() if line.startswith("epoch=")] == ["epoch=1", "epoch=2",
                                                                                            "epoch=3"]
    with (tmp_path / "eval.log").open("w") as log:
        assert _sib("evaluate", "--checkpoint", "run", "--splits", "test", "test_shifted", "--max-images", "32",
                    "--batch-size", "8", cwd=tmp_path, stdout=log, stderr=log) == 0
    text = (tmp_path / "eval.log").read_text()
    assert "\r" not in text and "it/s" not in text, text[:2000]
    stages = [line for line in text.splitlines() if line.startswith("evaluate run ")]
    assert [line.split(":")[0] for line in stages] == ["evaluate run test", "evaluate run test_shifted"]
    assert all(": 32 images in " in line for line in stages)


def test_a_terminal_still_gets_the_bars(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    chunks: list[bytes] = []

    def drain() -> None:  # read the terminal while the process writes (a full pty would block it)
        while True:
            try:
                data = os.read(main, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        assert _sib("train", "--config", "run.yaml", "--out", "run", cwd=tmp_path, stdout=subprocess.DEVNULL,
                    stderr=sub) == 0
    finally:
        os.close(sub)
        reader.join(timeout=30)
        os.close(main)
    shown = b"".join(chunks).decode(errors="replace")
    assert "\r" in shown and "none epoch 3/3" in shown  # tqdm's bar, redrawn in place
