"""Claims (sib.claim) between real processes: a live holder (running or stopped) keeps its folder, a killed one's
claim is taken over and logged; the record names host, pid, time and the cluster job id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sib.claim import CLAIM, ClaimedError, claim, holder

HOLD = """
import sys, time
from sib.claim import claim
held = claim(sys.argv[1], "train")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def other(tmp_path):
    """A second process holding a claim on tmp_path/run (SLURM_JOB_ID set in its environment)."""
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait()


def test_a_live_holder_keeps_its_folder_running_or_stopped(other, tmp_path):
    record = json.loads((tmp_path / "run" / CLAIM).read_text())
    assert (record["command"], record["host"], record["pid"], record["job"]) == ("train", socket.gethostname(),
                                                                                other.pid, "4242")
    assert record["started"][:4].isdigit()
    for stopped in (False, True):
        if stopped:
            os.kill(other.pid, signal.SIGSTOP)  # paused, not dead: the claim stays
        with pytest.raises(ClaimedError) as err:
            claim(tmp_path / "run", "train")
        assert f"pid {other.pid}" in str(err.value) and "SLURM job 4242" in str(err.value)
        assert holder(tmp_path / "run").pid == other.pid
    started = time.monotonic()
    with pytest.raises(ClaimedError):
        claim(tmp_path / "run", "train", wait=1.0, poll=0.2)  # waits, then refuses
    assert time.monotonic() - started >= 1.0


def test_a_dead_holders_claim_is_taken_over_and_logged(other, tmp_path, capsys):
    other.kill()
    other.wait()
    assert holder(tmp_path / "run") is None  # its file is still there, its lock went with the process
    with claim(tmp_path / "run", "evaluate") as mine:
        assert json.loads(mine.path.read_text())["pid"] == os.getpid()
        assert holder(tmp_path / "run").pid == os.getpid()
    err = capsys.readouterr().err
    assert "taking over the claim" in err and f"pid {other.pid}" in err
    assert not (tmp_path / "run" / CLAIM).exists() and holder(tmp_path / "run") is None  # released: file gone
    with claim(tmp_path / "run", "train"):  # a released claim is taken again, silently
        pass
    assert "taking over" not in capsys.readouterr().err


def test_claimed_error_crosses_processes_intact(other, tmp_path):
    import pickle

    with pytest.raises(ClaimedError) as err:
        claim(tmp_path / "run", "train")
    again = pickle.loads(pickle.dumps(err.value))
    assert str(again) == str(err.value) and again.holder == err.value.holder
