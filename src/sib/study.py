"""`sib study`: settings x seeds as ordinary run folders (resumable, `--jobs N` at once), then paired statistics.

A study file (YAML) names a partial `TrainConfig` for every run (`base`), the `seeds`, the `evaluate`
section (a partial `EvalConfig`), the `settings` (each a label and a partial `TrainConfig`, optionally a
`sweep` of equal-length lists zipped into one setting per position) and the `baseline` label the paired
differences are taken against (schema: docs/ARCHITECTURE.md, "Studies"). The whole file is checked before
anything runs; every problem is a `ValueError` naming the file.

Output folder DIR:
    study.json               the resolved study; a DIR holding another study is refused unless --overwrite
    runs/<label>/seed<k>/    one ordinary run folder per (setting, seed) ('/' in a label becomes '__'),
                             with the evaluation in eval/
    summary.{csv,json,md}    sib.report.study_summary: means and intervals over seeds, paired differences
    dose_response.png        sib.report.study_figures, when a setting sweeps
    trade_off.{png,csv,json,md}  sib.report.trade_off: accuracy vs EPG averaged over the methods, one point per
                             setting (mean over seeds, 95% seed interval), Pareto-optimal settings marked

Two studies may run on one folder at once (say, one job per node): each run is claimed before it is trained
and its evaluation before it is evaluated (sib.claim), and a claimed one is skipped with a line naming the
process that holds it; the summary then names that run as not evaluated (rerun --summary-only later).

Configuration precedence per run: TrainConfig defaults < base < setting (sweep values included) < {seed, out}.
A run is trained with `resume=True` (continues an interrupted run; skipped when it finished every epoch) and
evaluated with `resume=True` (skipped when eval/summary.json is newer than the checkpoint; restarted from
scratch when the evaluation began before the current checkpoint was written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import traceback
import types
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sib import task_record
from sib.claim import ClaimedError, holder
from sib.config import EvalConfig, LauncherConfig, TrainConfig, save_json, to_dict
from sib.study_pool import run_in_process, run_in_workers, stop_signals

TOP_KEYS = ("base", "seeds", "baseline", "evaluate", "settings", "launcher")
RESERVED_TRAIN = ("seed", "out", "resume", "overwrite")  # set by the study for each run
RESERVED_EVAL = ("checkpoint", "out", "resume", "overwrite")
# fields that do not change what a run computes: a run folder may differ from the study in these
EXECUTION_FIELDS = ("device", "num_workers", "out", "resume", "overwrite", "log_every", "tensorboard", "checkpoint")
# matched with fullmatch: `$` would also accept a final newline ("ce\n", a second folder beside "ce")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")
OUTPUTS = ("study.json", "summary.csv", "summary.json", "summary.md", "dose_response.png", "trade_off.csv",
           "trade_off.json", "trade_off.md", "trade_off.png")


@dataclass(frozen=True)
class Setting:
    """One expanded setting: a label ("sib" or "sib/x100"), its file label, overrides and sweep dose."""

    label: str
    group: str  # the label in the study file (the part before '/')
    overrides: dict[str, Any]
    dose: float | None = None  # value of the first sweep field (x-axis of the dose-response figure)
    dose_field: str | None = None

    @property
    def folder(self) -> str:
        return self.label.replace("/", "__")


@dataclass
class Study:
    path: Path
    base: dict[str, Any]
    seeds: list[int]
    baseline: str
    evaluate: dict[str, Any]
    settings: list[Setting]
    launcher: dict[str, Any] = dataclasses.field(default_factory=dict)  # partial LauncherConfig: where, not what

    def resolved(self) -> dict[str, Any]:
        """The study as JSON: what DIR/study.json holds and what a rerun must agree with (where the runs execute,
        the `launcher` section, is not part of it: the same study may be run here and on a cluster)."""
        return json.loads(json.dumps({
            "base": self.base, "seeds": self.seeds, "baseline": self.baseline, "evaluate": self.evaluate,
            "settings": [dataclasses.asdict(s) for s in self.settings]}))

    def run_dir(self, out: Path, setting: Setting, seed: int) -> Path:
        return Path(out) / "runs" / setting.folder / f"seed{seed}"

    def train_config(self, setting: Setting, seed: int, out: Path, device: str | None = None) -> TrainConfig:
        values = {**self.base, **setting.overrides, "seed": seed, "out": str(self.run_dir(out, setting, seed))}
        if device is not None:
            values["device"] = device
        return TrainConfig(**values)

    def eval_config(self, run: Path, device: str | None = None) -> EvalConfig:
        values = {**self.evaluate, "checkpoint": str(run)}
        if device is not None:
            values["device"] = device
        return EvalConfig(**values)


# ---------------------------------------------------------------------------------------------- loading


# YAML 1.1 (PyYAML) reads 1.0e3 and 1e3 as text (its floats need a dot and a signed exponent); YAML 1.2 and
# every reader of the study file read a number, so a float field takes such text as the number it spells
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(name: str, value: Any, hint: Any) -> tuple[Any, str | None]:
    """(value, None) when `value` fits the field's annotation (numeric text -> float for a float field), else
    (value, why not)."""
    options = list(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    for tp in options:
        base = typing.get_origin(tp) or tp
        if tp is Any or (tp is type(None) and value is None):
            return value, None
        if base is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value), None
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return value, None
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value, None
    return value, f"{name}={value!r} is not of type {getattr(hint, '__name__', str(hint))}"


def _check_partial(fail: Any, where: str, values: Any, cls: type, reserved: tuple[str, ...]) -> dict[str, Any]:
    """A partial `cls` (a mapping of some of its fields) checked: names, reserved names, value types."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        fail(f"{where}: expected a mapping of option: value, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        fail(f"{where}: unknown {cls.__name__} field(s) {unknown}; valid: {sorted(hints)}")
    taken = sorted(set(values) & set(reserved))
    if taken:
        fail(f"{where}: {taken} are set by the study for each run; remove them")
    checked = {}
    for k, v in values.items():
        checked[k], problem = _coerce(k, v, hints[k])
        if problem:
            fail(f"{where}: {problem}")
    return checked


def _expand(fail: Any, i: int, raw: Any) -> list[Setting]:
    """One study-file setting -> its expanded settings (one per sweep position)."""
    if not isinstance(raw, dict):
        fail(f"settings[{i}]: expected a mapping with a 'label', got {type(raw).__name__}")
    raw = dict(raw)
    label, sweep, sweep_labels = raw.pop("label", None), raw.pop("sweep", None), raw.pop("sweep_labels", None)
    if not isinstance(label, str) or not LABEL.fullmatch(label):
        fail(f"settings[{i}]: label {label!r} must be a non-empty name of letters, digits and _ . + = -")
    where = f"settings[{i}] ({label})"
    overrides = _check_partial(fail, where, raw, TrainConfig, RESERVED_TRAIN)
    if sweep is None:
        if sweep_labels is not None:
            fail(f"{where}: sweep_labels given without a sweep")
        return [Setting(label, label, overrides)]
    if not isinstance(sweep, dict) or not sweep:
        fail(f"{where}: empty sweep; give at least one field with a list of values")
    lengths = {}
    for field, values in sweep.items():
        if not isinstance(values, list) or not values:
            fail(f"{where}: empty sweep of {field!r}; give a non-empty list of values")
        lengths[field] = len(values)
    if len(set(lengths.values())) > 1:
        fail(f"{where}: sweep lists have unequal lengths {lengths}; they are zipped, one setting per position")
    both = sorted(set(sweep) & set(overrides))
    if both:
        fail(f"{where}: {both} both set and swept")
    n = next(iter(lengths.values()))
    sweep = {field: [_check_partial(fail, f"{where} sweep", {field: v}, TrainConfig, RESERVED_TRAIN)[field]
                     for v in values] for field, values in sweep.items()}
    first = next(iter(sweep))
    if sweep_labels is None:
        sweep_labels = [f"{first}={v:g}" if isinstance(v, int | float) else f"{first}={v}" for v in sweep[first]]
    if not isinstance(sweep_labels, list) or len(sweep_labels) != n:
        fail(f"{where}: sweep_labels must be a list of {n} names, one per sweep position")
    out = []
    for k, sub in enumerate(sweep_labels):
        if not isinstance(sub, str) or not LABEL.fullmatch(sub):
            fail(f"{where}: sweep label {sub!r} must be a non-empty name of letters, digits and _ . + = -")
        dose = sweep[first][k]
        numeric = isinstance(dose, int | float) and not isinstance(dose, bool)
        out.append(Setting(f"{label}/{sub}", label, {**overrides, **{f: vs[k] for f, vs in sweep.items()}},
                           float(dose) if numeric else None, first))
    return out


def _check_names(fail: Any, study: Study) -> None:
    """Registry names (dataset, model, regulariser, methods, metrics) exist: a typo fails now, not in run 7."""
    from sib.data import DATASETS
    from sib.explain import EXPLAINERS
    from sib.metrics import METRICS
    from sib.models import available_models
    from sib.regularizers import REGULARIZERS

    models = set(available_models())
    for s in study.settings:
        cfg = {**dataclasses.asdict(TrainConfig()), **study.base, **s.overrides}
        for kind, name, ok in (("dataset", cfg["dataset"], cfg["dataset"] in DATASETS),
                               ("model", cfg["model"], cfg["model"] in models),
                               ("regularizer", cfg["regularizer"], cfg["regularizer"] in REGULARIZERS)):
            if not ok:
                fail(f"setting {s.label}: unknown {kind} {name!r}")
    ev = {**dataclasses.asdict(EvalConfig()), **study.evaluate}
    for kind, names, registry in (("method", ev["methods"], EXPLAINERS), ("metric", ev["metrics"], METRICS)):
        bad = [n for n in names if n not in registry and names != ["all"]]
        if bad:
            fail(f"evaluate: unknown {kind}(s) {bad}; valid: {registry.names()}")


def load_study(path: str | Path) -> Study:
    """Read and check a study file; every problem raises one `ValueError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such study file")

    def fail(problem: str) -> typing.NoReturn:
        raise ValueError(f"study file {path}: {problem}")

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        fail(f"not valid YAML ({err})")
    if not isinstance(raw, dict):
        fail(f"expected a mapping with keys {list(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        fail(f"unknown key(s) {unknown}; valid: {list(TOP_KEYS)}")
    base = _check_partial(fail, "base", raw.get("base"), TrainConfig, RESERVED_TRAIN)
    evaluate = _check_partial(fail, "evaluate", raw.get("evaluate"), EvalConfig, RESERVED_EVAL)
    launcher = _check_partial(fail, "launcher", raw.get("launcher"), LauncherConfig, ())
    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        fail("no seeds; give a non-empty list of integer seeds, e.g. seeds: [0, 1, 2]")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        fail(f"seeds {seeds}: every seed must be a non-negative integer")
    if len(set(seeds)) != len(seeds):
        fail(f"duplicate seeds in {seeds}")
    settings_raw = raw.get("settings")
    if not isinstance(settings_raw, list) or not settings_raw:
        fail("no settings; give a list of settings, each with a 'label'")
    settings = [s for i, r in enumerate(settings_raw) for s in _expand(fail, i, r)]
    labels = [s.label for s in settings]
    folders = [s.folder for s in settings]
    for names, what in ((labels, "setting label(s)"), (folders, "run folder name(s) ('/' becomes '__')")):
        duplicates = sorted({x for x in names if names.count(x) > 1})
        if duplicates:
            fail(f"duplicate {what} {duplicates} (after sweep expansion)")
    baseline = raw.get("baseline")
    if baseline not in labels:
        fail(f"baseline {baseline!r} is not among the settings {labels}")
    study = Study(path, base, list(seeds), baseline, evaluate, settings, launcher)
    _check_names(fail, study)
    return study


# ---------------------------------------------------------------------------------------------- running


def _finished_epochs(run: Path) -> int:
    """Epochs recorded in log.jsonl (one JSON line per finished epoch); 0 if none."""
    log = run / "log.jsonl"
    if not log.exists():
        return 0
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return int(rows[-1]["epoch"]) if rows else 0


def _changes(saved_path: Path, cfg: Any) -> list[str]:
    """Fields (present on both sides, execution-only ones aside) where a saved configuration differs."""
    if not saved_path.exists():
        return []
    saved = json.loads(saved_path.read_text())
    wanted = json.loads(json.dumps(to_dict(cfg)))
    return sorted(k for k in set(saved) & set(wanted) if k not in EXECUTION_FIELDS and saved[k] != wanted[k])


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else -1


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume, or keep) and evaluate one run; `job` holds plain dicts so a worker can unpickle it.

    A run folder or evaluation made with other values (a changed study file) is refused, or with
    `job["overwrite"]` redone from scratch. A run (or its evaluation) another process has claimed (sib.claim:
    another study on the same folder) is skipped: the result says by whom, under "skipped".
    """
    from sib.evaluate import evaluate

    cfg, ev = TrainConfig(**job["train"]), EvalConfig(**job["eval"])
    run, out = Path(cfg.out), Path(cfg.out) / "eval"
    t0 = time.perf_counter()
    for what, changes in (("trained", _changes(run / "config.json", cfg)),
                          ("evaluated", _changes(out / "eval_config.json", ev))):
        if changes and not job["overwrite"]:
            raise ValueError(f"{run} was {what} with other values of {changes}; pass --overwrite to redo it")
    try:
        trained = _train_run(cfg, run)
        checkpoint = _mtime(run / "checkpoint.pt")
        # an evaluation begun before the current checkpoint was written belongs to other weights: start it afresh
        stale = _mtime(out / "eval_config.json") < checkpoint or bool(_changes(out / "eval_config.json", ev))
        if not stale and _mtime(out / "summary.json") > checkpoint:
            evaluated = "kept"
        else:
            evaluate(dataclasses.replace(ev, overwrite=stale, resume=not stale))
            evaluated = "evaluated"
    except ClaimedError as err:  # another process (another study on this folder) is on it: skip, say so
        return {"skipped": f"{err.folder} is claimed by {err.holder.describe() if err.holder else 'another process'}",
                "seconds": time.perf_counter() - t0}
    return {"train": trained, "eval": evaluated, "seconds": time.perf_counter() - t0}


def _train_run(cfg: TrainConfig, run: Path) -> str:
    """Retrain (the configuration changed under --overwrite), keep (finished), or train / resume the run."""
    from sib.train import train

    if _changes(run / "config.json", cfg):
        train(dataclasses.replace(cfg, overwrite=True, resume=False))
        return "retrained"
    if _trained(run, cfg.epochs):
        return "kept"
    trained = "resumed" if (run / "checkpoint.pt").exists() else "trained"
    train(dataclasses.replace(cfg, resume=True))
    return trained


def _guarded(job: dict[str, Any]) -> dict[str, Any]:
    try:
        return {**run_one(job), "error": None}
    except Exception as err:  # a failed run is reported by name; the study goes on with the others
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}


def _prepare_out(study: Study, out: Path, overwrite: bool) -> None:
    """Refuse a DIR holding something else (another study unless `overwrite`, or foreign files); write study.json."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder")
    resolved = study.resolved()
    marker = out / "study.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous != resolved:
            differ = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
            if not overwrite:
                raise FileExistsError(f"--out {out} holds another study (differs in {differ}); use another --out, or "
                                      f"--overwrite to replace it (runs whose configuration changed are retrained)")
            for name in OUTPUTS[1:]:  # the old study's summary no longer describes this one
                (out / name).unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty and holds no study.json; give a new or empty folder")
    save_json(resolved, marker)


@dataclass
class StudyResult:
    out: Path
    rows: list[dict[str, Any]]
    failed: list[str]
    notes: list[str]
    figure: Path | None
    baseline: str | None = None
    submitted: str | None = None  # the SLURM job id, when the runs were sent to a cluster and not waited for


LAUNCHERS = ("local", "slurm")


def run_study(config: str | Path, out: str | Path, jobs: int = 1, device: str | None = None,
              summary_only: bool = False, overwrite: bool = False, launcher: str = "local",
              launcher_options: dict[str, Any] | None = None, wait: bool = False, partial: bool = False) -> StudyResult:
    """Load the study, run every (setting, seed) not yet done, then aggregate; see the module docstring.

    Args:
        config: the study file.
        out: the study folder DIR.
        jobs: runs at once with the local launcher (separate processes, 'spawn'; each gets cpu_count // jobs torch
            threads; SIGTERM or SIGINT stops them all and raises sib.study_pool.StudyInterrupted naming the runs cut).
        device: overrides the device of every run and evaluation.
        summary_only: only aggregate the runs on disk (DIR must hold this study); refused while runs are not
            finished, unless `partial`.
        overwrite: accept a changed study file for DIR; runs whose configuration changed are retrained,
            the others kept; nothing but the study's own files is deleted.
        launcher: "local" (this machine) or "slurm" (one job array through submitit: sib.launch).
        launcher_options: LauncherConfig fields over the study file's `launcher:` section (the flags).
        wait: with slurm, wait for the array (a line per change), then aggregate; else return after submitting.
        partial: aggregate although runs are missing; the summary says which.
    """
    study = load_study(config)
    out = Path(out)
    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: must be >= 1")
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r}: expected one of {list(LAUNCHERS)}")
    failed: list[str] = []
    if summary_only:
        marker = out / "study.json"
        if not marker.exists():
            raise FileNotFoundError(f"--summary-only: {marker}: no such file (run the study first)")
        if json.loads(marker.read_text()) != study.resolved():
            raise ValueError(f"--summary-only: {out} holds another study than {study.path}")
        return _aggregate_finished(study, out, partial, "--summary-only")
    _prepare_out(study, out, overwrite)
    if launcher == "slurm":  # a task's working folder is the cluster's business: give it absolute run folders
        out = out.resolve()
    jobs_list = []
    for seed in study.seeds:  # seed-major: complete paired comparisons arrive early
        for s in study.settings:
            cfg = study.train_config(s, seed, out, device)
            jobs_list.append((f"{s.label} seed {seed}", {
                "train": to_dict(cfg), "eval": to_dict(study.eval_config(Path(cfg.out), device)),
                "overwrite": overwrite}))
    if launcher == "slurm":
        cfg = LauncherConfig(**{**study.launcher, **(launcher_options or {})})
        return _run_on_slurm(study, out, jobs_list, cfg, wait)
    failed = _execute(jobs_list, jobs)
    return aggregate(study, out, failed)


def _aggregate_finished(study: Study, out: Path, partial: bool, why: str, failed: list[str] | None = None
                        ) -> StudyResult:
    """Aggregate when every run is finished; with `partial`, aggregate what is, saying what is missing."""
    states = {name: state for name, state in _states(study, out)}
    missing = {name: st for name, st in states.items() if st["state"] != "done"}
    if missing and not partial:
        shown = "; ".join(f"{name}: {_describe(st)}" for name, st in list(missing.items())[:6])
        more = f"; and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise ValueError(f"{why}: {len(missing)} of {len(states)} runs are not finished ({shown}{more}); wait for "
                         f"them (sib study --status {out}) or pass --partial to aggregate the finished ones")
    result = aggregate(study, out, failed)
    if missing:
        note = (f"partial summary: {len(missing)} of {len(states)} runs missing ({', '.join(missing)}); rerun "
                f"sib study --summary-only when they are finished")
        result.notes.insert(0, note)
        with (out / "summary.md").open("a") as f:
            f.write(f"\n> {note}\n")
    return result


def _describe(state: dict[str, Any]) -> str:
    """One cell of the status table: the state and what is known of it."""
    parts = [state["state"]]
    if state.get("job"):
        parts.append(f"job {state['job']}")
    if state.get("node"):
        parts.append(f"on {state['node']}")
    text = " ".join(parts)
    return f"{text}: {state['detail']}" if state.get("detail") else text


def _trained(run: Path, epochs: int) -> bool:
    """Trained to its last epoch (what `_train_run` keeps)."""
    return (run / "summary.json").exists() and _finished_epochs(run) >= epochs


def _run_done(run: Path, epochs: int) -> bool:
    """Trained to its last epoch and evaluated after its last checkpoint (what `run_one` would keep)."""
    return _trained(run, epochs) and _mtime(run / "eval" / "summary.json") > _mtime(run / "checkpoint.pt")


def _run_state(run: Path, epochs: int, live: dict[str, tuple[str, str]] | None,
               record: dict[str, Any] | None = None) -> dict[str, Any]:
    """done / running / pending / failed / lost / stopped / not started, from the run's files, its claims, its
    task record (sib.task_record; read here when not given) and SLURM's queue (`live`: None when SLURM cannot be
    asked)."""
    record = (task_record.read(run) or {}) if record is None else record
    if _run_done(run, epochs):
        return {"state": "done", "job": record.get("job"), "node": record.get("node")}
    for folder, what in ((run, "training"), (run / "eval", "evaluating")):
        who = holder(folder)
        if who is not None:
            return {"state": "running", "job": who.job, "node": who.host, "detail": what}
    job = record.get("job")
    if record.get("state") == "failed":
        return {"state": "failed", "job": job, "detail": record.get("error", "")}
    if record.get("state") in ("pending", "running") and record.get("launcher") == "slurm" and job:
        if live is None:
            return {"state": record["state"], "job": job, "node": record.get("node"),
                    "detail": "as last recorded (squeue did not answer)"}
        if job in live:
            queued, node = live[job]
            state = "running" if queued in ("running", "completing") else "pending"
            return {"state": state, "job": job, "node": node or None, "detail": None if state == "running" else queued}
        return {"state": "lost", "job": job, "detail": f"the task left the queue without a result; its log: "
                                                      f"{record.get('log', '?')}; rerun the study to resume it"}
    epochs_done = _finished_epochs(run)
    if epochs_done:
        evaluated = ", not evaluated" if epochs_done >= epochs else ""
        return {"state": "stopped", "detail": f"trained {epochs_done} of {epochs} epochs{evaluated}; rerun the study "
                                              f"to finish it"}
    return {"state": "not started"}


def _states(study: Study, out: Path) -> list[tuple[str, dict[str, Any]]]:
    """(run name, state) of every (setting, seed), seed-major as the runs are sent."""
    runs = [(f"{s.label} seed {seed}", study.run_dir(out, s, seed), {**study.base, **s.overrides})
            for seed in study.seeds for s in study.settings]
    records = {run: task_record.read(run) or {} for _, run, _ in runs}
    live = _queue({r["job"] for r in records.values() if r.get("launcher") == "slurm" and r.get("job")})
    default_epochs = TrainConfig().epochs
    return [(name, _run_state(run, int(values.get("epochs", default_epochs)), live, records[run]))
            for name, run, values in runs]


def _queue(job_ids: set[str]) -> dict[str, tuple[str, str]] | None:
    """sib.launch.queue, imported (with submitit) only when some run was sent to SLURM."""
    if not job_ids:
        return {}
    from sib.launch import queue

    return queue(job_ids)


def study_status(out: str | Path) -> tuple[list[dict[str, Any]], str]:
    """`sib study --status DIR`: one row per run (setting, seed, state, job, node, detail), and the command that
    aggregates. Needs only DIR (its study.json); the launch record names the study file when there is one."""
    out = Path(out)
    marker = out / "study.json"
    if not marker.exists():
        raise FileNotFoundError(f"--status {out}: no study.json there (not a study folder, or not started)")
    resolved = json.loads(marker.read_text())
    study = Study(marker, resolved["base"], resolved["seeds"], resolved["baseline"], resolved["evaluate"],
                  [Setting(**s) for s in resolved["settings"]])
    rows = []
    for name, st in _states(study, out):
        label, _, seed = name.rpartition(" seed ")
        rows.append({"setting": label, "seed": int(seed), "state": st["state"], "job": st.get("job") or "",
                     "node": st.get("node") or "", "detail": st.get("detail") or ""})
    launch = out / LAUNCH_RECORD
    config = json.loads(launch.read_text()).get("config") if launch.exists() else None
    command = f"sib study --config {config or 'STUDY.yaml'} --out {out} --summary-only"
    return rows, command


LAUNCH_RECORD = "launch.json"  # DIR/launch.json: the study file and every SLURM submission of this folder


def _run_on_slurm(study: Study, out: Path, jobs_list: list[tuple[str, dict[str, Any]]], cfg: LauncherConfig,
                  wait: bool) -> StudyResult:
    """Send the unfinished runs not already queued as one array; with `wait`, follow them, then aggregate."""
    from sib.launch import progress_line, shared_path_warning, submit_slurm

    warning = shared_path_warning(out)
    if warning:
        print(f"sib study: warning: {warning}", file=sys.stderr, flush=True)
    states = dict(_states(study, out))
    todo = [(name, job) for name, job in jobs_list if states[name]["state"] not in ("done", "running", "pending")]
    queued = [name for name, _ in jobs_list if states[name]["state"] in ("running", "pending")]
    notes = [f"{len(queued)} run(s) already queued or running, not sent again: {', '.join(queued)}"] if queued else []
    job = None
    if todo:
        job = submit_slurm(todo, out, cfg, run_one)
        launch = out / LAUNCH_RECORD
        record = json.loads(launch.read_text()) if launch.exists() else {"submissions": []}
        record["config"] = str(study.path)
        record["submissions"].append({"job": job, "runs": [name for name, _ in todo],
                                      "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        save_json(record, launch)
        print(f"submitted {len(todo)} run(s) as SLURM job array {job}; logs in {out / 'slurm'}/", flush=True)
    if not wait:
        if job is None and not queued:  # nothing left to run: as the local launcher, aggregate
            return aggregate(study, out)
        notes.append(f"watch: sib study --status {out}   aggregate when done: sib study --config {study.path} "
                     f"--out {out} --summary-only")
        return StudyResult(out, [], [], notes, None, study.baseline, submitted=job or "already queued")
    poll = max(0.1, cfg.poll_s)
    t0, last = time.monotonic(), None
    try:
        # SIGINT and SIGTERM raise KeyboardInterrupt here even where the shell started us with SIGINT ignored
        # (a background job): both stop the watching
        with stop_signals():
            while True:
                states = dict(_states(study, out))
                counts = Counter(st["state"] for st in states.values())
                if counts != last:  # a line per change, not per poll
                    print(progress_line(counts, job or "(earlier)", time.monotonic() - t0), flush=True)
                    last = counts
                if not counts["running"] and not counts["pending"]:
                    break
                time.sleep(poll)
    except KeyboardInterrupt:  # Ctrl-C stops the watching only: the array is SLURM's, and goes on
        notes.append(f"stopped watching; the runs go on on SLURM (job {job or 'earlier'}): sib study --status {out}; "
                     f"scancel {job or 'JOB'} stops them")
        return StudyResult(out, [], [], notes, None, study.baseline, submitted=job or "already queued")
    failed = [f"{name}: {_describe(st)}" for name, st in states.items() if st["state"] in ("failed", "lost")]
    result = _aggregate_finished(study, out, True, "--wait", failed)
    result.notes = notes + result.notes
    return result


def _execute(jobs_list: list[tuple[str, dict[str, Any]]], jobs: int) -> list[str]:
    """Run the jobs (in this process, or `jobs` spawned workers: sib.study_pool); print one line per run; return
    failures. SIGTERM or SIGINT stops every worker and raises StudyInterrupted naming the runs cut."""
    failed: list[str] = []
    done = iter(range(1, len(jobs_list) + 1))

    def report(name: str, res: dict[str, Any]) -> None:
        i = next(done)
        if res.get("error"):
            failed.append(f"{name}: {res['error']}")
            print(f"[{i}/{len(jobs_list)}] FAILED {name}: {res['error']}", file=sys.stderr, flush=True)
        elif res.get("skipped"):
            print(f"[{i}/{len(jobs_list)}] {name}: skipped, {res['skipped']}", flush=True)
        else:
            print(f"[{i}/{len(jobs_list)}] {name}: training {res['train']}, evaluation {res['eval']} "
                  f"({res['seconds']:.0f} s)", flush=True)

    if jobs == 1:
        run_in_process(jobs_list, _guarded, report)
    else:
        run_in_workers(jobs_list, jobs, _guarded, report, threads=max(1, (os.cpu_count() or 1) // jobs))
    return failed


def aggregate(study: Study, out: Path, failed: list[str] | None = None) -> StudyResult:
    """DIR/summary.{csv,json,md} and DIR/dose_response.png from the runs on disk."""
    from sib.report.study_figures import dose_response
    from sib.report.study_summary import COLUMNS, summarise_runs
    from sib.report.trade_off import COLUMNS as TRADE_COLUMNS
    from sib.report.trade_off import trade_off_figure, trade_off_rows
    from sib.tables import write_table

    runs = {s.label: {seed: study.run_dir(out, s, seed) for seed in study.seeds} for s in study.settings}
    doses = {s.label: s.dose for s in study.settings}
    rows, notes = summarise_runs(runs, study.baseline, doses)
    write_table(rows, out / "summary", COLUMNS)
    sweeps: dict[str, list[str]] = {}
    for s in study.settings:
        if s.dose is not None:
            sweeps.setdefault(f"{s.group}: {s.dose_field}", []).append(s.label)
    figure = dose_response(rows, sweeps, study.baseline, out / "dose_response.png")
    if figure is None:
        (out / "dose_response.png").unlink(missing_ok=True)
        notes.append("dose_response.png: skipped (no setting sweeps a numeric field)")
    # accuracy vs mean EPG per setting, Pareto-optimal settings marked (sib.report.trade_off)
    trade = trade_off_rows(runs)
    if trade:
        write_table(trade, out / "trade_off", TRADE_COLUMNS)
    if trade_off_figure(trade, study.baseline, out / "trade_off.png") is None:
        notes.append("trade_off.png: skipped (no run has both an accuracy and an EPG)")
    return StudyResult(out, rows, list(failed or []), notes, figure, study.baseline)
