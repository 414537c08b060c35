"""The report's comparison table: each run (or study setting) against the baseline, with intervals.

One row per (compared run, split, method, metric). Sources:
    runs     each run's eval/summary.json gives its value and 95% interval (sib.evaluate: mean +- 1.96 SE);
             the difference to the baseline is computed on the images both runs have valid, matched by
             (split, index), with its per-image paired bootstrap interval (sib.report.study_summary, 1000
             resamples): the same statistics a one-seed study reports.
    study    the study's summary.json (sib.report.study_summary): means over seeds with t-intervals, the
             paired difference with its t-interval over seeds, and the bootstrap interval over images.
`diff_low/diff_high` is the interval the report colours by: over seeds where a study has two or more seeds,
else the bootstrap over images. Run-level rows (split "-": time per step, the diagnostics of the last epoch)
have no interval with one seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sib.report.inputs import ReportInput, Run
from sib.report.study_summary import summarise_runs

Key = tuple[str, str, str]  # (split, method, metric)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _nan(v: Any) -> float:
    return float(v) if _finite(v) else math.nan


def _eval_summary(run: Run) -> dict[Key, dict[str, Any]]:
    rows = json.loads((run.path / "eval" / "summary.json").read_text())
    return {(r["split"], r["method"], r["metric"]): r for r in rows}


def comparison(inp: ReportInput) -> tuple[list[dict[str, Any]], list[str]]:
    """The comparison rows (keys: run, split, method, metric, base, base_low, base_high, value, low, high, diff,
    diff_low, diff_high, boot_low, boot_high, n, invalid: maps that were not finite) and notes on what was left
    out.

    A baseline run without an evaluation gives way to the first evaluated run (`inp.baseline` is updated; None
    when only one run is evaluated)."""
    if inp.kind == "study":
        return _study_rows(inp)
    return _run_rows(inp)


def _run_rows(inp: ReportInput) -> tuple[list[dict[str, Any]], list[str]]:
    notes = [f"{r.label}: no evaluation in {r.path / 'eval'} (run sib evaluate --checkpoint {r.path}); "
             f"left out of the table and the gallery" for r in inp.runs if not r.evaluated]
    runs = [r for r in inp.runs if r.evaluated]
    if not runs:
        return [], notes
    base = inp.baseline if any(r.label == inp.baseline for r in runs) else runs[0].label
    if inp.baseline is not None and base != inp.baseline:
        notes.append(f"{inp.baseline} has no evaluation: differences are taken against {base}, the first "
                     f"evaluated run")
        inp.baseline = base if len(runs) > 1 else None
    stats, more = summarise_runs({r.label: {0: r.path} for r in runs}, base)
    notes += [n.replace(" seed 0", "") for n in more]
    by_run: dict[str, dict[Key, dict[str, Any]]] = {}
    for s in stats:
        by_run.setdefault(s["setting"], {})[(s["split"], s["method"], s["metric"])] = s
    summaries = {r.label: _eval_summary(r) for r in runs}
    compared = [r.label for r in runs if r.label != base] if len(runs) > 1 else [base]
    rows = []
    for label in compared:
        for key, s in by_run.get(label, {}).items():
            b = by_run.get(base, {}).get(key) if label != base else None
            ev, bev = summaries[label].get(key, {}), summaries[base].get(key, {})
            rows.append({"run": label, "split": key[0], "method": key[1], "metric": key[2],
                         "base": _nan(b["mean"]) if b else math.nan,
                         "base_low": _nan(bev.get("ci95_low")) if b else math.nan,
                         "base_high": _nan(bev.get("ci95_high")) if b else math.nan,
                         "value": _nan(s["mean"]), "low": _nan(ev.get("ci95_low")), "high": _nan(ev.get("ci95_high")),
                         "diff": _nan(s["diff"]), "diff_low": _nan(s["boot_ci95_low"]),
                         "diff_high": _nan(s["boot_ci95_high"]), "boot_low": _nan(s["boot_ci95_low"]),
                         "boot_high": _nan(s["boot_ci95_high"]), "n": s["n_images"], "invalid": s.get("invalid", 0)})
    return rows, notes


def study_stats(inp: ReportInput) -> tuple[list[dict[str, Any]], list[str]]:
    """The study table: DIR/summary.json, or (for a study still running) the same rows computed from its runs."""
    assert inp.study is not None and inp.study_dir is not None
    path = Path(inp.study_dir) / "summary.json"
    if path.is_file():
        return json.loads(path.read_text()), []
    runs: dict[str, dict[int, Path]] = {}
    for r in inp.runs:
        runs.setdefault(r.group, {})[int(r.seed or 0)] = r.path
    doses = {s["label"]: s.get("dose") for s in inp.study["settings"]}
    rows, notes = summarise_runs(runs, inp.baseline or "", doses)
    return rows, [f"{path} not written yet (the study is running, or rerun sib study --summary-only): the table "
                  f"below is computed from the runs on disk"] + notes


def _study_rows(inp: ReportInput) -> tuple[list[dict[str, Any]], list[str]]:
    stats, notes = study_stats(inp)
    index = {(s["setting"], s["split"], s["method"], s["metric"]): s for s in stats}
    rows = []
    for s in stats:
        if s["setting"] == inp.baseline:
            continue
        b = index.get((inp.baseline, s["split"], s["method"], s["metric"]))
        seeds_ok = _finite(s.get("diff_ci95_low")) and _finite(s.get("diff_ci95_high"))
        rows.append({"run": s["setting"], "split": s["split"], "method": s["method"], "metric": s["metric"],
                     "base": _nan(b["mean"]) if b else math.nan, "base_low": _nan(b["ci95_low"]) if b else math.nan,
                     "base_high": _nan(b["ci95_high"]) if b else math.nan, "value": _nan(s["mean"]),
                     "low": _nan(s["ci95_low"]), "high": _nan(s["ci95_high"]), "diff": _nan(s["diff"]),
                     "diff_low": _nan(s["diff_ci95_low"] if seeds_ok else s["boot_ci95_low"]),
                     "diff_high": _nan(s["diff_ci95_high"] if seeds_ok else s["boot_ci95_high"]),
                     "boot_low": _nan(s["boot_ci95_low"]), "boot_high": _nan(s["boot_ci95_high"]),
                     "n": s.get("n_seeds"), "invalid": s.get("invalid", 0)})
    return rows, notes


def sign(row: dict[str, Any]) -> int:
    """+1 / -1 where the difference's interval excludes zero (above / below), else 0."""
    low, high = row["diff_low"], row["diff_high"]
    if not (_finite(low) and _finite(high)):
        return 0
    return 1 if low > 0 else -1 if high < 0 else 0


def key_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows a reader looks at first: accuracy per split, then the energy pointing game per (split, method)
    (the first metric evaluated when EPG was not)."""
    metrics = [r["metric"] for r in rows if r["method"] != "-"]
    key_metric = "energy_pointing_game" if "energy_pointing_game" in metrics else (metrics[0] if metrics else None)
    return [r for r in rows if r["metric"] == "accuracy" or (r["metric"] == key_metric and r["split"] != "-")]
