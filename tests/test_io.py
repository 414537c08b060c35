"""Atomic writes and the output-folder guard."""

from __future__ import annotations

import pytest

from sib.io import atomic_torch_save, atomic_write_text, prepare_out_dir


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


def test_prepare_out_dir_guards_previous_runs(tmp_path):
    out = tmp_path / "run"
    prepare_out_dir(out, "checkpoint.pt", overwrite=False, resume=False)
    (out / "checkpoint.pt").write_text("x")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        prepare_out_dir(out, "checkpoint.pt", overwrite=False, resume=False)
    prepare_out_dir(out, "checkpoint.pt", overwrite=False, resume=True)
    assert (out / "checkpoint.pt").exists()
    prepare_out_dir(out, "checkpoint.pt", overwrite=True, resume=False)
    assert not (out / "checkpoint.pt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        prepare_out_dir(tmp_path / "file", "checkpoint.pt", overwrite=False, resume=False)
