"""Atomic writes: the old file or the new one, never a mix, no temporary left; a failed write names the file."""

from __future__ import annotations

import errno
import os

import pytest

from sib.io import atomic_torch_save, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "ckpt.pt"
    atomic_torch_save({"ok": 1}, p)
    before = p.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"bad": Unpicklable()}, p)
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["ckpt.pt"]


def test_os_error_inside_torch_save_is_reported_as_that_error_naming_the_file(tmp_path):
    """torch.save turns a failed write into a RuntimeError; the writer reports the OSError behind it."""
    p = tmp_path / "ckpt.pt"
    atomic_torch_save({"ok": 1}, p)
    before = p.read_bytes()

    class FullDisk:
        def __reduce__(self):  # raised while torch.save streams the pickle into the file
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"could not write .*ckpt.pt \(No space left on device\); the previous file "
                                      r"is unchanged") as err:
        atomic_torch_save({"x": FullDisk()}, p)
    assert err.value.errno == errno.ENOSPC
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_write_gives_the_permissions_of_an_ordinary_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    # mkstemp's 0600 made results unreadable to the user's group and to other tools' users
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
