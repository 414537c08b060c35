"""What `sib report` reads: run folders, a demo folder or a study folder, turned into one list of runs.

Accepted inputs (anything else is a ValueError naming the folder and what was expected):
    a run folder       config.json (+ log.jsonl, checkpoint.pt, eval/) written by `sib train`
    a demo folder      `sib demo --out`: its run sub-folders (ce/, sib/) and comparison.json
    a study folder     `sib study --out`: study.json, summary.json, runs/<setting>/seed<k>/ (reported alone)
Several run and demo folders may be given together; the first run is the baseline of the comparison (the demo's
"ce" comes first). A study's baseline is the one its study.json names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sib.run_dir import DEMO, folder_kind

EXPECTED = ("a run folder (config.json and log.jsonl, from sib train), a demo folder (comparison.json, from "
            "sib demo) or a study folder (study.json, from sib study)")


@dataclass
class Run:
    """One training run as the report shows it.

    Attributes:
        label: its name in every table, legend and caption (unique within a report).
        path: the run folder.
        group: the colour group: the study setting, else the label itself.
        seed: the study seed (None outside a study).
        config: config.json (the TrainConfig as a dict).
        log: log.jsonl rows, one per finished epoch.
        summary: summary.json ({} while the run has not finished).
        eval_config: eval/eval_config.json ({} without an evaluation).
    """

    label: str
    path: Path
    group: str
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    eval_config: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluated(self) -> bool:
        """An evaluation wrote its summary (eval/summary.json) and per-image rows."""
        return (self.path / "eval" / "summary.json").is_file() and (self.path / "eval" / "per_image.jsonl").is_file()

    @property
    def has_weights(self) -> bool:
        return (self.path / "best.pt").is_file() or (self.path / "checkpoint.pt").is_file()


@dataclass
class ReportInput:
    """Everything the report is about.

    Attributes:
        kind: "runs" (run and demo folders) or "study".
        sources: the folders as given.
        runs: every run, in order (the baseline's runs first outside a study).
        baseline: the label (runs) or setting (study) differences are taken against; None with one run.
        study: the study's study.json (None outside a study).
        study_dir: the study folder.
        notes: what was left out and why, for the reader.
    """

    kind: str
    sources: list[Path]
    runs: list[Run]
    baseline: str | None
    study: dict[str, Any] | None = None
    study_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        """The colour groups (runs, or study settings) in order."""
        return list(dict.fromkeys(r.group for r in self.runs))


def _json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from err


def _log(path: Path) -> list[dict[str, Any]]:
    """log.jsonl rows; a line cut by a kill while it was written is dropped (the epoch is redone on resume)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                break
            if isinstance(row, dict):
                rows.append(row)
    return rows


def is_run(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and folder_kind(folder) in ("train", None)


def load_run_folder(folder: Path, label: str, group: str | None = None, seed: int | None = None) -> Run:
    return Run(label=label, path=folder, group=group or label, seed=seed, config=_json(folder / "config.json", {}),
               log=_log(folder / "log.jsonl"), summary=_json(folder / "summary.json", {}),
               eval_config=_json(folder / "eval" / "eval_config.json", {}))


def _check_folder(path: Path) -> str:
    """The kind of report input `path` is: "run", "demo" or "study"; else a clear error."""
    if not path.exists():
        raise FileNotFoundError(f"report input {path}: no such folder (expected {EXPECTED})")
    if not path.is_dir():
        raise ValueError(f"report input {path}: a file, not a folder (expected {EXPECTED})")
    kind = folder_kind(path)
    if kind == "study" or (path / "study.json").is_file():
        return "study"
    if kind == "demo":
        return "demo"
    if is_run(path):
        return "run"
    found = ", ".join(sorted(p.name for p in path.iterdir())[:4]) or "empty"
    raise ValueError(f"report input {path}: not a run, demo or study folder (it holds: {found}); expected {EXPECTED}")


def _unique_labels(runs: list[Run]) -> None:
    """Make labels unique: a clash takes the parent folder's name in front ("a/run"), then a number."""
    seen: dict[str, int] = {}
    for r in runs:
        if sum(o.label == r.label for o in runs) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    for r in runs:
        n = seen[r.label] = seen.get(r.label, 0) + 1
        if n > 1:
            r.label = f"{r.label}#{n}"
    for r in runs:
        r.group = r.label


def collect(paths: Sequence[str | Path]) -> ReportInput:
    """Read the report's inputs (see the module docstring).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input is none of the accepted folders, a study is given with other inputs, or a demo
            folder holds no run.
    """
    if not paths:
        raise ValueError(f"sib report needs at least one input: {EXPECTED}")
    sources = [Path(p) for p in paths]
    kinds = [_check_folder(p) for p in sources]
    if "study" in kinds:
        if len(sources) > 1:
            study = sources[kinds.index("study")]
            raise ValueError(f"report input {study} is a study folder: report a study on its own (one input), "
                             f"its runs are compared inside it")
        return _collect_study(sources[0])
    runs: list[Run] = []
    for path, kind in zip(sources, kinds, strict=True):
        if kind == "run":
            runs.append(load_run_folder(path, path.name))
            continue
        demo_runs = [path / name for name in DEMO.children if is_run(path / name)]
        if not demo_runs:
            raise ValueError(f"report input {path}: a demo folder without runs (expected {', '.join(DEMO.children)}"
                             f" sub-folders with config.json); rerun sib demo")
        prefix = f"{path.name}/" if kinds.count("demo") > 1 else ""
        runs += [load_run_folder(r, prefix + r.name) for r in demo_runs]
    _unique_labels(runs)
    return ReportInput("runs", sources, runs, runs[0].label if len(runs) > 1 else None)


def _collect_study(folder: Path) -> ReportInput:
    """The runs of a study folder, setting by setting, as its study.json lays them out (sib.study)."""
    study = _json(folder / "study.json", None)
    if not isinstance(study, dict) or not isinstance(study.get("settings"), list):
        raise ValueError(f"report input {folder}: study.json holds no settings (not written by sib study?)")
    runs, notes = [], []
    for setting in study["settings"]:
        label = setting["label"]
        for seed in study.get("seeds", []):
            run = folder / "runs" / label.replace("/", "__") / f"seed{seed}"
            if is_run(run):
                runs.append(load_run_folder(run, f"{label} s{seed}", group=label, seed=seed))
            else:
                notes.append(f"{label} seed {seed}: not started ({run} holds no config.json)")
    if not runs:
        raise ValueError(f"report input {folder}: a study with no run started yet (runs/ is empty)")
    return ReportInput("study", [folder], runs, study.get("baseline"), study=study, study_dir=folder, notes=notes)
