"""A property of the run-folder rules (sib.run_dir.prepare), on random real folders: no user file is ever
removed or changed, whatever the folder holds and whatever the command asks.

Folders are drawn as trees of user files, files and sub-folders with sib's names, symbolic links (to files
and folders outside), stale temporaries and manifests of any kind, at any depth; the output folder itself is
sometimes a link. Commands are every folder kind with and without --overwrite / --resume. What counts as
sib's is what a manifest vouches for: a name the folder's kind writes, in a folder whose own manifest (or whose
parent's kind, for a declared sub-folder) says so; everything else, and everything a link points to, is the
user's, and must be there afterwards with the same bytes, whether the command ran or was refused.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sib.run_dir import DEMO, EVAL, EXPLAIN, KINDS, MANIFEST, REPORT, STUDY, TRAIN, FolderKind, prepare, write_manifest

COMMANDS = [TRAIN, EVAL, DEMO, STUDY, EXPLAIN, REPORT]
BY_NAME = {k.name: k for k in COMMANDS}
SIB_NAMES = sorted({n for k in COMMANDS for n in k.files} | {"eval", "tensorboard", "runs", "ce", "sib", "overlays",
                                                               "seed0", "heatmaps_x.png", "events.out.tfevents.1.h",
                                                               ".checkpoint.pt.ab12.tmp", ".summary.json.zz9.tmp"})
USER_NAMES = ["notes.txt", "thesis.tex", "holiday.png", "checkpoint.pt.bak", ".thesis.tex.ab12.tmp"]
NAMES = st.sampled_from(SIB_NAMES + USER_NAMES)
LEAVES = st.one_of(st.tuples(st.just("file"), st.binary(min_size=1, max_size=6)), st.just(("link",)),
                   st.just(("dirlink",)))


def _folders(children):
    return st.tuples(st.just("dir"), st.sampled_from([None, *BY_NAME]), st.dictionaries(NAMES, children, max_size=4))


TREES = _folders(st.recursive(LEAVES, _folders, max_leaves=10))


def _build(path: Path, node: tuple, outside: Path, counter: list[int]) -> None:
    """Make `node` at `path`: a file, a link to a new file or folder in `outside`, or a folder (with a manifest)."""
    if node[0] == "file":
        path.write_bytes(node[1])
    elif node[0] in ("link", "dirlink"):
        counter[0] += 1
        target = outside / f"target{counter[0]}"
        if node[0] == "link":
            target.write_text(f"outside file {counter[0]}")
        else:
            target.mkdir()
            (target / "inside.txt").write_text(f"outside folder {counter[0]}")
        path.symlink_to(target, target_is_directory=node[0] == "dirlink")
    else:
        path.mkdir()
        if node[1] is not None:
            write_manifest(path, BY_NAME[node[1]])
        for name, child in node[2].items():
            _build(path / name, child, outside, counter)


def _is_temp_of(kind: FolderKind, name: str) -> bool:
    parts = name.split(".")
    return name.startswith(".") and name.endswith(".tmp") and len(parts) >= 4 and kind.owns(".".join(parts[1:-2]))


def _users(path: Path, node: tuple, declared: FolderKind | None, found: dict[Path, bytes]) -> None:
    """Collect the user's files under `path` (path -> bytes): those no manifest vouches for."""
    if node[0] != "dir":
        if node[0] == "file":
            found[path] = node[1]
        return  # a link's target is outside and checked apart; the link itself may be sib's name
    own = BY_NAME.get(node[1]) if node[1] else None
    kind = own if declared is None else (declared if own in (None, declared) else None)
    for name, child in node[2].items():
        sub = kind.child(name) if kind is not None and child[0] == "dir" else None
        if kind is not None and (kind.owns(name) or _is_temp_of(kind, name)) and sub is None:
            continue  # sib's artefact (a file, a link, or a plain folder of sib output such as overlays/)
        if sub is not None:
            _users(path / name, child, sub, found)
        else:
            _users(path / name, child, None if child[0] != "dir" else _nobody(), found)


def _nobody() -> FolderKind:
    """A kind that owns nothing: everything under an undeclared sub-folder is the user's."""
    return FolderKind("nobody", None)


def _snapshot(files: dict[Path, bytes], outside: Path) -> dict[Path, bytes]:
    return {**files, **{p: p.read_bytes() for p in outside.rglob("*") if p.is_file() and not p.is_symlink()}}


# found by reading the rules: a declared sub-folder (tensorboard/) that holds a manifest of another kind is not ours
NESTED_RUN = ("dir", "train", {"tensorboard": ("dir", "train", {"events.out.tfevents.1.h": ("file", b"mine")})})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(tree=NESTED_RUN, command=TRAIN, overwrite=True, resume=False, linked=False)
@given(tree=TREES, command=st.sampled_from(COMMANDS), overwrite=st.booleans(), resume=st.booleans(),
       linked=st.booleans())
def test_no_user_file_is_ever_removed_or_changed(tree, command, overwrite, resume, linked):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        outside = tmp / "outside"
        outside.mkdir()
        folder = outside / "real" if linked else tmp / "out"  # a linked --out: everything in it is the user's
        _build(folder, tree, outside, [0])
        users: dict[Path, bytes] = {}
        _users(folder, tree, _nobody() if linked else None, users)
        expected = _snapshot(users, outside)
        out = tmp / "out"
        if linked:
            out.symlink_to(folder, target_is_directory=True)
        try:
            prepare(out, command, overwrite=overwrite, resume=resume)
        except (FileExistsError, NotADirectoryError, ValueError):
            pass  # refused: then nothing may have changed either
        after = {p: p.read_bytes() for p in expected if p.is_file() and not p.is_symlink()}
        assert after == expected, (command.name, overwrite, resume, sorted(set(expected) - set(after)))
        assert MANIFEST not in {p.name for p in users}


def test_the_generator_covers_the_interesting_cases():
    """The kinds recognised without a manifest are among those drawn, and a drawn name can be a temporary."""
    assert set(KINDS) <= set(BY_NAME) and _is_temp_of(TRAIN, ".checkpoint.pt.ab12.tmp")
    assert not _is_temp_of(TRAIN, ".thesis.tex.ab12.tmp")
