"""What happened to a study's run, as told by the process that ran it: `.sib_task.json` in the run folder.

A cluster without accounting (`sacct` answers nothing) still lets `sib study --status` say, per run, pending
(submitted as job J), running (job J on node N), done, or failed (with the error's last line): every launcher
writes the record when it submits, and the task writes it when it starts, ends, fails or is requeued. The
record is read together with the files of the run (a finished evaluation is "done" whatever the record says)
and the claim (sib.claim: a live claim is "running"), so a record left by a killed task cannot lie for long.

The record is infrastructure, like the claim: sib.run_dir ignores it when it decides whether a folder is
empty or sib's, and never deletes it with --overwrite. Written atomically (sib.io).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from sib.io import atomic_write_text

TASK = ".sib_task.json"
STATES = ("pending", "running", "done", "failed")


def read(run: str | Path) -> dict[str, Any] | None:
    """The record of run folder `run`, or None (none written, or unreadable: a record is advice, not data)."""
    try:
        record = json.loads((Path(run) / TASK).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in STATES else None


def write(run: str | Path, state: str, **fields: Any) -> dict[str, Any]:
    """Replace the record of `run` (created with its folder) by `state` and `fields`, stamped with host, pid and
    time; keys of the previous record that `fields` does not set (the launcher, the job's log) are kept."""
    if state not in STATES:
        raise ValueError(f"task state {state!r}: expected one of {STATES}")
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    previous = read(run) or {}
    keep = {k: previous[k] for k in ("launcher", "job", "node", "log", "submitted", "restarts") if k in previous}
    record = {**keep, **fields, "state": state, "host": socket.gethostname(), "pid": os.getpid(),
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run / TASK, json.dumps(record, indent=2) + "\n")
    return record


def last_line(error: BaseException | str) -> str:
    """The one line a status table shows for an error: `Type: message`, its last non-empty line."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text
