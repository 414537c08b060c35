"""Run folders: the one owner of what sib writes where, how it is replaced, and how checkpoints are read.

Every folder sib writes into holds a manifest, `.sib_manifest.json`: the folder's kind ("train", "eval",
"demo", "study", "explain", "report") and the names sib writes there. The rules, for every command:

- An empty (or missing) folder is created and used. A folder holding a run of the same kind is refused
  unless the user passes `--resume` (continue it) or `--overwrite` (replace it). Any other non-empty folder
  (no manifest, or another kind) is refused, flags or not: sib never writes into, nor deletes from, a folder
  it did not make. Names alone do not make a folder sib's: a user's `config.json` and `summary.json`, or
  `overlays/` and `predictions.json`, without a manifest are the user's (the refusal names what `--overwrite`
  would have deleted). A symbolic link as the folder is refused too (never followed, as sub-folders are not).
- `--overwrite` removes only the artefacts of the kind (the names below, and sub-folders of their own kind
  such as a run's `eval/`), never other files: a `notes.txt` put in a run folder survives.
- Folders written before manifests existed are recognised by their kind's marker file (`checkpoint.pt`,
  `per_image.jsonl`, `comparison.json`): they may be resumed, not overwritten (a marker is a guess: a user's
  own checkpoint.pt), and the refusal names the files.

A command that writes for long (training, evaluation) claims its folder first (`prepare(..., claim_for=...)`,
sib.claim): a second process is refused, naming the first, instead of writing into the same files at once.

Checkpoints are written atomically (sib.io) and read with `torch.load(weights_only=True)` only: a checkpoint
holds tensors and plain Python data (RNG states included), so a crafted file cannot run code when loaded,
and an unreadable one raises a ValueError that names it. `check_resume` decides whether a checkpoint may be
continued under a configuration: every TrainConfig field must match except those in RESUME_MAY_CHANGE.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sib.claim import CLAIM, Claim, ClaimedError, claim, holder
from sib.io import atomic_torch_save, atomic_write_text
from sib.task_record import TASK

MANIFEST = ".sib_manifest.json"
CHECKPOINT = "checkpoint.pt"  # the last completed epoch: everything a resume needs
BEST = "best.pt"  # the weights of the epoch with the best validation accuracy
WEIGHTS = {"best": BEST, "last": CHECKPOINT}  # EvalConfig.weights -> file of a run folder
# TrainConfig fields a resume may change: run length, where and how it executes, what it logs. Everything
# else (data, model, regulariser, optimisation, seed, ...) decides the trained weights and must match.
RESUME_MAY_CHANGE = frozenset({"epochs", "device", "num_workers", "log_every", "profile_steps", "tensorboard",
                               "eval_splits", "eval_batches", "bn_double_backward", "resume", "overwrite", "out"})
_TEMP = re.compile(r"\.(?P<name>.+)\.[^.]+\.tmp")  # sib.io's temporary files: .<name>.<random>.tmp


@dataclass(frozen=True)
class FolderKind:
    """What one kind of sib folder holds.

    Attributes:
        name: the kind, as written in the manifest.
        marker: the file that identifies a folder of this kind written before manifests existed (None: the
            folder is only ever a sub-folder, recognised by its name under a parent of a known kind).
        files: names sib writes into the folder (files or plain folders of sib output).
        patterns: glob patterns of names that depend on options (e.g. "heatmaps_*.png").
        children: sub-folder name (or glob pattern) -> its kind; `--overwrite` clears them by their own rules.
        resumable: whether the command that writes it has `--resume` (for the refusal message).
    """

    name: str
    marker: str | None
    files: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    children: dict[str, FolderKind] = field(default_factory=dict)
    resumable: bool = True

    def owns(self, name: str) -> bool:
        return name in self.files or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def child(self, name: str) -> FolderKind | None:
        """The kind of the sub-folder `name`, or None when the kind has no such sub-folder."""
        return next((k for p, k in self.children.items() if fnmatch.fnmatchcase(name, p)), None)


TENSORBOARD = FolderKind("tensorboard", None, patterns=("events.out.tfevents.*",))
EVAL = FolderKind("eval", "per_image.jsonl",
                  ("eval_config.json", "per_image.jsonl", "summary.csv", "summary.json", "summary.md"))
TRAIN = FolderKind("train", CHECKPOINT,
                   ("config.json", "run.json", "log.jsonl", CHECKPOINT, BEST, "summary.json", "calibration.json"),
                   children={"tensorboard": TENSORBOARD, "eval": EVAL})
# the demo's training runs are sub-folders named as in sib.demo.RUNS (ce first: the report's baseline)
DEMO = FolderKind("demo", "comparison.json", ("comparison.csv", "comparison.json", "comparison.md"),
                  patterns=("heatmaps_*.png",), resumable=False,
                  children={"ce": TRAIN, "sib": TRAIN, "l1_cam_cal": TRAIN, "ce_reseed": TRAIN})
# sib study: DIR/runs/<setting>/seed<k>/ are training runs (sib.study writes the files listed)
STUDY = FolderKind("study", "study.json",
                   ("study.json", "summary.csv", "summary.json", "summary.md", "dose_response.png"),
                   children={"runs": FolderKind("study runs", None, children={
                       "*": FolderKind("study setting", None, children={"seed*": TRAIN})})}, resumable=False)
# sib explain: the overlays are in a folder of their own, so --overwrite never matches a user's PNG by pattern.
# Not in KINDS: explain folders always carry a manifest (a user's predictions.json alone makes no sib folder).
EXPLAIN = FolderKind("explain", "predictions.json", ("predictions.json", "predictions.csv", "overlays"),
                     resumable=False)
# sib report: one self-contained index.html. Not in KINDS either: a user's own index.html makes no sib folder
REPORT = FolderKind("report", None, ("index.html",), resumable=False)
KINDS = {k.name: k for k in (TRAIN, EVAL, DEMO, STUDY)}  # the kinds recognised by their marker without a manifest


# --------------------------------------------------------------------------------------------- folders

def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable sib manifest ({err}); delete it only if the folder is yours") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
        raise ValueError(f"{path}: not a sib manifest (no 'kind'); delete it only if the folder is yours")
    return manifest


def folder_kind(folder: Path) -> str | None:
    """The kind of sib folder `folder` is: its manifest's, else the kind whose marker it holds, else None."""
    manifest = read_manifest(folder)
    if manifest is not None:
        return manifest["kind"]
    for kind in KINDS.values():
        if kind.marker is not None and (Path(folder) / kind.marker).exists():
            return kind.name
    return None


def _is_temp_of(kind: FolderKind, name: str) -> bool:
    m = _TEMP.fullmatch(name)
    return m is not None and kind.owns(m["name"])


def _owned(folder: Path, kind: FolderKind) -> list[Path]:
    """Entries of `folder` that are sib's for this kind: artefacts, their stale temporaries, child folders."""
    return sorted(p for p in folder.iterdir()
                  if kind.owns(p.name) or _is_temp_of(kind, p.name) or (kind.child(p.name) and p.is_dir()))


def _clear(folder: Path, kind: FolderKind) -> None:
    """Delete this kind's artefacts from `folder` (children by their own kind), nothing else."""
    for p in _owned(folder, kind):
        child = kind.child(p.name)
        if p.is_symlink():  # never followed: what a link points to is not this folder's
            if child is None:
                p.unlink()  # an artefact's name: the link goes, its target stays
        elif child is not None and p.is_dir():
            found = folder_kind(p)  # its own manifest first: a nested run in tensorboard/ is not tensorboard's
            if found in (child.name, None):  # another kind's folder under this name is left alone
                _clear(p, child)
                if all(q.name in (MANIFEST, CLAIM) for q in p.iterdir()):  # else its manifest keeps it ours
                    (p / CLAIM).unlink(missing_ok=True)  # a dead process's (a live one's was refused)
                    (p / MANIFEST).unlink(missing_ok=True)
                    p.rmdir()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _remove_temporaries(folder: Path, kind: FolderKind) -> None:
    """Temporaries a killed writer left (the file they were replacing is intact): safe to delete."""
    for p in folder.iterdir():
        if _is_temp_of(kind, p.name) and p.is_file():
            p.unlink()
        elif kind.child(p.name) is not None and p.is_dir() and not p.is_symlink():
            _remove_temporaries(p, kind.child(p.name))


def _would_delete(folder: Path, kind: FolderKind, overwrite: bool) -> str:
    """For a refused --overwrite: "; --overwrite would have deleted: a, b" (the kind's names found), else ""."""
    names = sorted(p.name for p in _owned(folder, kind))
    return f"; --overwrite would have deleted: {', '.join(names)}" if overwrite and names else ""


def write_manifest(folder: Path, kind: FolderKind) -> None:
    manifest = {"kind": kind.name, "written_by": "sib", "files": sorted(kind.files), "patterns": list(kind.patterns),
                "folders": {name: child.name for name, child in kind.children.items()}}
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def prepare(out: Path, kind: FolderKind, *, overwrite: bool, resume: bool, claim_for: str | None = None
            ) -> Claim | None:
    """Create or check the output folder `out` of a `kind` command (see the module docstring for the rules).

    Args:
        claim_for: claim the folder for this command ("train", "evaluate"; sib.claim) before changing anything
            in it, and return the claim (the caller releases it when its work is done); None: no claim.

    Raises:
        NotADirectoryError: `out` is a file.
        FileExistsError: `out` is a symbolic link; or it is not empty and not a folder of this kind, or holds a
            run of this kind and neither `resume` nor `overwrite` was asked for.
        ClaimedError (a FileExistsError): another live process holds `out` or, with `overwrite`, a sub-folder.
        ValueError: both `resume` and `overwrite`.
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pass one (resume continues the run in "
                         f"{out}, overwrite replaces it)")
    if out.is_symlink():  # as sub-folders: a link is never followed to write or delete (it may leave the run)
        raise FileExistsError(f"--out {out} is a symbolic link (to {os.readlink(out)}); sib writes only into a real "
                              f"folder: pass the link's target as --out, or remove the link")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder")
    _refuse(out, kind, overwrite, resume)  # before claiming: a refused folder gets no claim file either
    held = claim(out, claim_for) if claim_for else None
    try:
        _refuse(out, kind, overwrite, resume)  # again: another process may have finished a run meanwhile
        if out.is_dir():  # nothing to clear in a folder that does not exist yet (`make demo` on a fresh clone)
            if overwrite:
                _refuse_claimed_children(out, kind)
                _clear(out, kind)
            _remove_temporaries(out, kind)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, kind)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return held


def _refuse(out: Path, kind: FolderKind, overwrite: bool, resume: bool) -> None:
    """Raise FileExistsError when `prepare` may not use `out` under these flags (module docstring)."""
    if not out.is_dir():
        return
    found = folder_kind(out)
    entries = [p for p in out.iterdir() if p.name not in (MANIFEST, CLAIM, TASK)]  # infrastructure, not content
    if found is None and entries:  # names alone (a user's config.json) never make a folder sib's
        shown = ", ".join(sorted(p.name for p in entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(f"--out {out}: the folder is not empty ({shown}) and is not a sib {kind.name} "
                              f"folder (no {MANIFEST}); sib writes only into an empty folder or its own"
                              f"{_would_delete(out, kind, overwrite)}: choose another --out")
    if found is not None and found != kind.name:
        raise FileExistsError(f"--out {out} holds a sib {found} folder, not a {kind.name} one; "
                              f"choose another --out")
    present = [p for p in _owned(out, kind) if not _is_temp_of(kind, p.name)]
    present = [p for p in present if not (p.is_dir() and kind.child(p.name) and not any(p.iterdir()))]
    if present and not (overwrite or resume):
        again = "pass --resume to continue it or --overwrite" if kind.resumable else "pass --overwrite"
        raise FileExistsError(f"--out {out} already holds a sib {kind.name} run ({present[0].name}, ...); "
                              f"{again} to replace its files (other files in the folder are kept)")
    if overwrite and present and read_manifest(out) is None:  # recognised by its marker only: a guess
        raise FileExistsError(f"--out {out}: a sib {kind.name} folder from before manifests (it holds "
                              f"{kind.marker}) has no {MANIFEST}, and sib deletes only what a manifest says it "
                              f"wrote{_would_delete(out, kind, overwrite)}; delete those files yourself if they "
                              f"are sib's" + (", or pass --resume to continue the run" if kind.resumable else ""))


def _refuse_claimed_children(folder: Path, kind: FolderKind) -> None:
    """--overwrite clears sub-folders of their own kind (a run's eval/): never under a process working there."""
    for p in folder.iterdir():
        child = kind.child(p.name)
        if child is None or p.is_symlink() or not p.is_dir():
            continue
        other = holder(p)
        if other is not None:
            raise ClaimedError(p, other)
        _refuse_claimed_children(p, child)


# ----------------------------------------------------------------------------------------- checkpoints

def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain data, loadable with weights_only=True."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(internal), gauss],
                             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (or the tuples checkpoints of earlier sib versions hold)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    if isinstance(n, dict):
        n = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list[Any]:
    """What unpickling a plain NumPy array needs: checkpoints of earlier sib versions hold NumPy's RNG state
    as one (uint32 keys). Only array construction is allowed; torch documents these as safe to allow-list."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` (tensors and plain data only) atomically: readers see the old file or the new one."""
    atomic_torch_save(state, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A sib checkpoint (a run folder's checkpoint.pt, or a .pt file), read without running any code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, corrupt, holds objects other than tensors and plain data (refused:
            unpickling them could run code), or is not a sib checkpoint. The message names the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file (expected a run folder or a .pt file)")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickles; the error below says it in one line
            warnings.simplefilter("ignore", UserWarning)
            with torch.serialization.safe_globals(_numpy_array_globals()):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        # a pickle that names a function or class to call: what a crafted file does to run code when loaded
        found = re.search(r"GLOBAL [\w.]+|Unsupported class [\w.]+", str(err))
        if isinstance(err, pickle.UnpicklingError) and found:
            raise ValueError(f"checkpoint {path}: refused, it holds objects other than tensors and plain data "
                             f"({found[0]}) and loading them could run code; use a checkpoint written by sib "
                             f"from a source you trust") from err
        raise ValueError(f"checkpoint {path}: unreadable, truncated or corrupt ({_reason(err)}); restore it from "
                         f"a copy, or delete it and rerun the training with --overwrite") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"),
                                                                                                 dict):
        raise ValueError(f"checkpoint {path}: not a sib checkpoint (no 'model'/'config' entries)")
    return ckpt


def _reason(err: Exception) -> str:
    """A short, single-line account of why torch could not read a file (its messages run to paragraphs)."""
    operand = re.search(r"Unsupported operand \d+", str(err))
    if operand:
        return operand[0]
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    first = first.split(". ")[0][:100]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def resolve_weights(checkpoint: str | Path, weights: str = "best") -> Path:
    """The checkpoint file to evaluate: a file is used as given; in a run folder `weights` picks it.

    Args:
        checkpoint: a run folder or a checkpoint file.
        weights: "best" (best.pt, the epoch with the best validation accuracy) or "last" (checkpoint.pt).
    """
    path = Path(checkpoint)
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: valid values are {', '.join(WEIGHTS)}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file (expected a run folder or a .pt file)")
    if not path.is_dir():
        return path
    chosen = path / WEIGHTS[weights]
    if chosen.is_file():
        return chosen
    if weights == "best" and (path / CHECKPOINT).is_file():
        raise FileNotFoundError(f"checkpoint {path}: the run has no {BEST} (written when validation accuracy "
                                f"improves); pass --weights last to evaluate {CHECKPOINT}")
    raise FileNotFoundError(f"checkpoint {path}: not a run folder (no {WEIGHTS[weights]})")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def check_resume(saved: dict[str, Any], wanted: dict[str, Any], defaults: dict[str, Any], path: Path) -> None:
    """Refuse to continue a checkpoint under a configuration that differs outside RESUME_MAY_CHANGE.

    Args:
        saved: the checkpoint's configuration (a TrainConfig as a dict).
        wanted: the resuming run's configuration, as a dict.
        defaults: the TrainConfig defaults: a field the checkpoint predates counts as its default.
        path: the checkpoint, for the message.

    Raises:
        ValueError: naming every differing field with the checkpoint's and the new value.
    """
    diffs = [f"{k}={saved.get(k, defaults.get(k))!r} -> {k}={v!r}" for k, v in wanted.items()
             if k not in RESUME_MAY_CHANGE and not _same(saved.get(k, defaults.get(k)), v)]
    if diffs:
        raise ValueError(f"--resume: checkpoint {path} was trained with other options ({'; '.join(diffs)}); "
                         f"only {', '.join(sorted(RESUME_MAY_CHANGE - {'resume', 'overwrite', 'out'}))} may "
                         f"change on a resume: rerun with the checkpoint's options, or use --overwrite or another "
                         f"--out to start a new run")
