"""Files that are never half-written: write to a temporary file in the same folder, then rename.

A failed write (an exception, a full disk) removes the temporary and leaves the previous file as it was;
a killed process can leave a temporary `.<name>.<random>.tmp` behind, never a damaged `<name>`
(sib.run_dir deletes such leftovers when the folder is resumed or overwritten). Which files a run folder
holds, and how they are replaced, is sib.run_dir's business.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err` (torch.save reports a failed write as a RuntimeError whose context it is)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], mode: int | None = None) -> None:
    """Replace `path` by what `write(f)` puts in the binary file `f`, or leave it as it was.

    `mode`: the new file's permissions; default those an ordinary open() would give (mkstemp's are 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a mix
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is not None and cause.errno is not None:  # disk full, file too large, I/O error: name the file
            kept = "the previous file is unchanged" if path.exists() else "no file was written"
            raise OSError(cause.errno, f"could not write {path} ({cause.strerror}); {kept}") from err
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
