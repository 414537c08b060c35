"""Files that are never half-written: write to a temporary file in the same folder, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a mix
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def prepare_out_dir(out: Path, marker: str, overwrite: bool, resume: bool) -> None:
    """Create `out`, refusing to clobber a previous run (one holding `marker`) unless told to.

    Args:
        out: the output folder.
        marker: a file name whose presence means "this folder holds a run" (e.g. "checkpoint.pt").
        overwrite: delete the previous run's files we own and start afresh.
        resume: continue the previous run (the caller loads it).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder")
    if (out / marker).exists() and not (overwrite or resume):
        raise FileExistsError(f"--out {out} already holds a run ({marker}); pass --resume to continue it "
                              f"or --overwrite to replace it")
    if overwrite and not resume and out.exists():
        for child in out.iterdir():
            if child.is_file():
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
