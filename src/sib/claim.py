"""Claims: one process at a time works in a run folder (training) or an evaluation folder.

Two `sib study` processes on one folder used to train the same run at once (the later overwrote the earlier's
checkpoint) or append the same evaluation twice (per_image.jsonl with every row doubled). Now a command claims
its folder before it changes anything and releases it when done:

    with claim(run_folder, "train"):      # ClaimedError (a FileExistsError) when another process holds it
        ...                               # the work

The claim is the file `.sib_claim.json` in the folder, holding who works there (`Holder`: command, host, pid,
start time and, under SLURM, the job id: ARRAY_TASK for an array task, as squeue names it) for messages and
for a cluster launcher to read (`holder`). It is held with an exclusive `flock` on that file for as long as the
work runs. The kernel drops the lock when the process ends, however it ends (an exception, SIGKILL, a crash),
and keeps it while the process is only stopped (SIGSTOP): so a claim is never taken from a live process, and a
dead one's is taken over at once. A clean release deletes the file; a claim found in the file but not locked
was left by a process that died, and taking it over is logged (stderr) naming that process. Linux NFS clients
carry `flock` across machines.

Where the filesystem has no `flock` (some cluster filesystems mounted without it), a claim falls back to the
file alone: it is live while its process runs (same host: the pid exists with the same start time) and, from
another host, until its file is removed; the check and the take-over are then not atomic.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CLAIM = ".sib_claim.json"
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # flock unsupported by the filesystem


@dataclass(frozen=True)
class Holder:
    """Who claimed a folder: the command ("train", "evaluate"), host, pid, the process's start time in clock
    ticks since boot (Linux; tells a reused pid), when (ISO time) and the cluster job id when there is one."""

    command: str
    host: str
    pid: int
    started: str
    process_start: int | None = None
    job: str | None = None

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"sib {self.command} on host {self.host}, pid {self.pid} (since {self.started}{job})"


class ClaimedError(FileExistsError):
    """The folder is claimed by another live process; `holder` says which."""

    def __init__(self, folder: Path, holder: Holder | None):
        self.folder, self.holder = folder, holder
        who = holder.describe() if holder else "another process"
        super().__init__(f"{folder} is being worked on by {who}; wait for it to finish (or stop it), then rerun: "
                         f"its claim is {folder / CLAIM}")

    def __reduce__(self) -> tuple:  # sent between processes (torchrun ranks, study workers)
        return type(self), (self.folder, self.holder)


def _process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def me(command: str) -> Holder:
    """This process as a holder of a claim for `command`."""
    env = os.environ
    array = env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID")
    job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if array else env.get("SLURM_JOB_ID") or None
    return Holder(command, socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  _process_start(os.getpid()), job)


def _read(fd: int) -> Holder | None:
    """The holder recorded in the open claim file, or None (empty: being written; unreadable: damaged)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    try:
        fields = json.loads(data)
        return Holder(**{k: fields.get(k) for k in Holder.__dataclass_fields__})
    except (ValueError, TypeError):
        return None


def _write(fd: int, holder: Holder) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(asdict(holder), indent=2) + "\n").encode())
    os.fsync(fd)


def alive(holder: Holder) -> bool:
    """Whether the process of `holder` still runs: checkable on this host only (another host's counts as alive)."""
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    start = _process_start(holder.pid)
    return holder.process_start is None or start is None or start == holder.process_start


class Claim:
    """A held claim on a folder (see the module docstring); `release()` or leaving the `with` block ends it."""

    def __init__(self, folder: Path, holder: Holder, fd: int) -> None:
        self.folder, self.holder, self._fd = folder, holder, fd

    @property
    def path(self) -> Path:
        return self.folder / CLAIM

    def release(self) -> None:
        """Delete the claim file, then drop the lock (a waiter that opened the old file sees it gone and retries)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    """The open claim file is still the one at `path` (a releasing holder may have deleted it meanwhile)."""
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _try_claim(folder: Path, holder: Holder) -> tuple[Claim | None, Holder | None]:
    """(our claim, None) or (None, the live holder). Takes over a dead holder's claim, logging it."""
    path = folder / CLAIM
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read(fd)
            os.close(fd)
            return None, other
        except OSError as err:
            if err.errno not in NO_LOCKS:
                os.close(fd)
                raise
            other = _read(fd)  # no locks on this filesystem: the file alone says who holds it
            if other is not None and alive(other) and other != holder:
                os.close(fd)
                return None, other
        if not _same_file(fd, path):
            os.close(fd)
            continue  # locked a file its holder deleted on release: claim the new one
        previous = _read(fd)
        if previous is not None and previous != holder:
            print(f"sib: taking over the claim on {folder} left by {previous.describe()}: that process ended "
                  f"without releasing it", file=sys.stderr, flush=True)
        _write(fd, holder)
        return Claim(folder, holder, fd), None


def claim(folder: str | Path, command: str, wait: float = 0.0, poll: float = 1.0) -> Claim:
    """Claim `folder` (created if absent) for `command` in this process.

    Args:
        folder: the run or evaluation folder.
        command: what the claim is for, in messages ("train", "evaluate").
        wait: seconds to wait for another holder to finish (0: refuse at once).
        poll: seconds between tries while waiting.

    Raises:
        ClaimedError: another live process holds the folder (after `wait` seconds); names it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    holder = me(command)
    deadline = time.monotonic() + wait
    while True:
        held, other = _try_claim(folder, holder)
        if held is not None:
            return held
        if time.monotonic() >= deadline:
            raise ClaimedError(folder, other)
        time.sleep(poll)


def holder(folder: str | Path) -> Holder | None:
    """Who holds `folder` now (None: nobody alive does), without claiming it."""
    path = Path(folder) / CLAIM
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        except OSError as err:
            if err.errno not in NO_LOCKS:
                raise
            found = _read(fd)
            return found if found is not None and alive(found) else None
        return None  # lockable: whoever wrote it has ended
    finally:
        os.close(fd)
