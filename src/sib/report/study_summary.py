"""A study's statistics: per setting, means over seeds with t-intervals, and paired differences to a baseline.

For every setting and every (split, method, metric) of the runs' `eval/per_image.jsonl` (accuracy included:
method "-", metric "accuracy"):
    mean, ci95_low/high    mean over seeds of the per-run value, with the Student-t 95% interval over seeds
                           (n_seeds - 1 degrees of freedom; NaN with one seed). The per-run value is the
                           metric's reduction (sib.metrics: "mean", or "class_mean" for the pointing game) over
                           the run's valid images: rows with a non-finite value, or a `status` other than "ok",
                           are left out.
    diff, diff_ci95_*      the paired difference to the baseline setting on the same seed (the per-run values
                           on the images both runs have valid, matched by (split, index)): its mean over seeds
                           and the t-interval over seeds.
    boot_ci95_*            a per-image paired bootstrap within each seed, pooled over seeds: in each of 1000
                           resamples every seed's images are drawn with replacement (the same draw for the run
                           and the baseline), the seed's difference of per-run values is computed, and the
                           resample's statistic is the average of those differences over seeds; the interval is
                           the 2.5 and 97.5 percentiles. It reflects image sampling only (the t-interval is the
                           one over seeds). Resamples come from numpy Generators seeded by (boot_seed, seed,
                           split, method, metric), so the numbers are reproducible and every setting is compared
                           on the same draws.
    n_images               the fewest valid images of one run, over seeds.
    n_seeds, n_pairs       seeds with a value, and seeds with a paired difference (a failed baseline seed, or
                           a seed whose maps were all invalid, leaves fewer pairs than seeds).
    invalid, invalid_seeds images whose map was not finite (rows the evaluator marked "invalid"), summed over
                           seeds, and per seed where any ("seed2 16/16": 16 of the seed's 16 images). A method
                           whose maps are invalid for every seed still gets its row (mean NaN, n_seeds 0), and
                           every (setting, seed, method) with invalid maps gets a note.
Run-level quantities get split "-" and method "-": from the last row of each run's log.jsonl the diagnostics
(`RUN_KEYS`, where logged) and from summary.json `sec_per_step`; mean, t-interval and paired difference over
seeds as above, no bootstrap.

Memory: one run's per-image rows at a time, plus the baseline's of the same seed (arrays, not dicts).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

COLUMNS = ["setting", "dose", "split", "method", "metric", "n_seeds", "n_pairs", "mean", "ci95_low", "ci95_high",
           "diff", "diff_ci95_low", "diff_ci95_high", "boot_ci95_low", "boot_ci95_high", "n_images", "invalid",
           "invalid_seeds"]
RUN_KEYS = ("diag_grad_ratio", "diag_r_abs_mean", "diag_coverage", "diag_r_in_gt", "reg_scale")
OK_STATUS = (None, "ok")
Key = tuple[str, str, str]  # (split, method, metric)


class RunValues:
    """One run's valid per-image values: key -> (index (n,) int64 sorted, value (n,) float64, label (n,) int64);
    `invalid`: key -> (images whose map was invalid, images of the key), for keys with any invalid map."""

    def __init__(self, arrays: dict[Key, tuple[np.ndarray, np.ndarray, np.ndarray]], scalars: dict[str, float],
                 invalid: dict[Key, tuple[int, int]] | None = None):
        self.arrays = arrays
        self.scalars = scalars
        self.invalid = invalid or {}


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def read_run(run: Path) -> RunValues:
    """Stream `run/eval/per_image.jsonl` into arrays; read the run-level scalars of log.jsonl and summary.json."""
    cols: dict[Key, tuple[list[int], list[float], list[int]]] = {}
    counts: dict[Key, list[int]] = {}  # key -> [invalid, all] images
    with (run / "eval" / "per_image.jsonl").open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if str(r.get("metric", "_")).startswith("_"):
                continue  # batch markers
            count = counts.setdefault((r["split"], r["method"], r["metric"]), [0, 0])
            count[0] += r.get("status") == "invalid"
            count[1] += 1
            if r.get("status") not in OK_STATUS or not _finite(r.get("value")):
                continue  # rows the evaluator flagged (invalid attribution, empty mask)
            idx, val, lab = cols.setdefault((r["split"], r["method"], r["metric"]), ([], [], []))
            idx.append(int(r["index"]))
            val.append(float(r["value"]))
            lab.append(int(r.get("label", 0)))
    arrays = {}
    for key, (idx, val, lab) in cols.items():
        order = np.argsort(idx, kind="stable")
        arrays[key] = (np.asarray(idx, np.int64)[order], np.asarray(val, np.float64)[order],
                       np.asarray(lab, np.int64)[order])
        _refuse_duplicates(run / "eval" / "per_image.jsonl", key, arrays[key][0])
    scalars: dict[str, float] = {}
    log = run / "log.jsonl"
    lines = [line for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    if lines:
        last = json.loads(lines[-1])
        scalars.update({k: float(last[k]) for k in RUN_KEYS if _finite(last.get(k))})
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
        if _finite(summary.get("sec_per_step")):
            scalars["sec_per_step"] = float(summary["sec_per_step"])
    return RunValues(arrays, scalars, {k: (bad, n) for k, (bad, n) in counts.items() if bad})


def _refuse_duplicates(path: Path, key: Key, index: np.ndarray) -> None:
    """Every image once per (split, method, metric): two processes appending one evaluation write each row twice,
    and a pairing on such rows is meaningless (it raised an IndexError deep in NumPy)."""
    repeated = index[1:][index[1:] == index[:-1]]  # `index` is sorted
    if repeated.size:
        split, method, metric = key
        raise ValueError(f"{path}: image index {int(repeated[0])} appears more than once for split {split}, method "
                         f"{method}, metric {metric} ({repeated.size} repeated rows): two evaluations wrote into this "
                         f"file at once; remove the folder {path.parent} and rerun the study, which evaluates that "
                         f"run again")


def _reduction(metric: str) -> str:
    if metric == "accuracy":
        return "mean"
    from sib.metrics import METRICS

    return METRICS.get(metric).reduction if metric in METRICS else "mean"


def statistic(values: np.ndarray, labels: np.ndarray, reduction: str, weights: np.ndarray | None = None
              ) -> np.ndarray:
    """The per-run value under image weights (bootstrap counts).

    Args:
        values: (n,) per-image values.
        labels: (n,) class of each image (for "class_mean").
        reduction: "mean" or "class_mean" (mean over classes present of the per-class mean).
        weights: (R, n) non-negative counts, one row per resample; None for the plain value.

    Returns:
        (R,) values, or (1,) without weights.
    """
    w = np.ones((1, values.size)) if weights is None else weights
    if reduction == "class_mean":
        onehot = (labels[:, None] == np.unique(labels)[None, :]).astype(np.float64)  # (n, C)
        sums, counts = w @ (values[:, None] * onehot), w @ onehot  # (R, C)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts
        return np.nanmean(np.where(counts > 0, means, np.nan), axis=1)
    return (w @ values) / w.sum(axis=1)


def _resample_counts(n: int, n_boot: int, seed_parts: Iterable[Any], boot_seed: int) -> np.ndarray:
    """(n_boot, n) counts of each image in each resample with replacement, from a seeded Generator."""
    tag = zlib.crc32("/".join(str(p) for p in seed_parts).encode())
    rng = np.random.default_rng([boot_seed, tag])
    draws = rng.integers(0, n, size=(n_boot, n)) + (np.arange(n_boot) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): Student-t 95% interval over the values (NaN bounds with fewer than two)."""
    a = np.asarray([x for x in xs if math.isfinite(x)], np.float64)
    if a.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(a.mean())
    if a.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return mean, mean - half, mean + half


def _complete(run: Path) -> bool:
    """An evaluation that finished after the run's last checkpoint was written."""
    done, ckpt = run / "eval" / "summary.json", run / "checkpoint.pt"
    return (done.exists() and (run / "eval" / "per_image.jsonl").exists()
            and (not ckpt.exists() or done.stat().st_mtime_ns >= ckpt.stat().st_mtime_ns))


class _Acc:
    """Per (setting, key): per-seed values, paired differences and summed bootstrap differences."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.diffs: list[float] = []
        self.boot: np.ndarray | None = None
        self.boot_seeds = 0
        self.n_images: list[int] = []
        self.invalid: dict[int, tuple[int, int]] = {}  # seed -> (invalid images, images)


def summarise_runs(runs: dict[str, dict[int, Path]], baseline: str, doses: dict[str, float | None] | None = None,
                   n_boot: int = 1000, boot_seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """The study table (see the module docstring) and notes on runs left out.

    Args:
        runs: setting label -> {seed: run folder}, in the table's order.
        baseline: the label paired differences are taken against.
        doses: setting label -> its sweep dose (a column of the table).
        n_boot: bootstrap resamples.
        boot_seed: seeds the resampling Generators.

    Returns:
        (rows with `COLUMNS`, notes naming every run without a complete evaluation).
    """
    notes: list[str] = []
    acc: dict[str, dict[Key, _Acc]] = {label: {} for label in runs}
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    for seed in seeds:
        base_run = runs.get(baseline, {}).get(seed)
        base = read_run(base_run) if base_run is not None and _complete(base_run) else None
        for label, by_seed in runs.items():
            run = by_seed.get(seed)
            if run is None:
                continue
            if not _complete(run):
                notes.append(f"{label} seed {seed}: no complete evaluation in {run}; left out")
                continue
            values = base if label == baseline and base is not None else read_run(run)
            _add_run(acc[label], values, None if label == baseline else base, seed, n_boot, boot_seed)
            notes += _invalid_notes(label, seed, values)
    rows = []
    for label, per_key in acc.items():
        for key, a in per_key.items():
            mean, low, high = t_interval(a.values)
            diff, dlow, dhigh = t_interval(a.diffs) if a.diffs else (math.nan,) * 3
            blow = bhigh = math.nan
            if a.boot is not None and a.boot_seeds:
                blow, bhigh = (float(q) for q in np.percentile(a.boot / a.boot_seeds, [2.5, 97.5]))
            rows.append({"setting": label, "dose": (doses or {}).get(label), "split": key[0], "method": key[1],
                         "metric": key[2], "n_seeds": len(a.values), "n_pairs": len(a.diffs), "mean": mean,
                         "ci95_low": low, "ci95_high": high, "diff": diff, "diff_ci95_low": dlow,
                         "diff_ci95_high": dhigh, "boot_ci95_low": blow, "boot_ci95_high": bhigh,
                         "n_images": min(a.n_images) if a.n_images else None,
                         "invalid": sum(bad for bad, _ in a.invalid.values()),
                         "invalid_seeds": ", ".join(f"seed{seed} {bad}/{n}" for seed, (bad, n) in a.invalid.items())})
    return rows, notes


def _invalid_notes(label: str, seed: int, run: RunValues) -> list[str]:
    """One note per (split, method) whose maps were invalid on some of this run's images (the first metric's
    count: every metric of a method shares its maps)."""
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    for (split, method, _), counts in run.invalid.items():
        seen.setdefault((split, method), counts)
    return [f"{label} seed {seed}: {method} maps invalid (not finite) on {bad} of {n} {split} images; left out"
            for (split, method), (bad, n) in seen.items()]


def _add_run(per_key: dict[Key, _Acc], run: RunValues, base: RunValues | None, seed: int, n_boot: int,
             boot_seed: int) -> None:
    """Add one run's per-run values, and (with `base`) its paired differences, to the accumulators."""
    for key, counts in run.invalid.items():
        per_key.setdefault(key, _Acc()).invalid[seed] = counts
    for key, (idx, val, lab) in run.arrays.items():
        a = per_key.setdefault(key, _Acc())
        reduction = _reduction(key[2])
        a.values.append(float(statistic(val, lab, reduction)[0]))
        a.n_images.append(int(idx.size))
        if base is None or key not in base.arrays:
            continue
        bidx, bval, _ = base.arrays[key]
        common, ia, ib = np.intersect1d(idx, bidx, assume_unique=True, return_indices=True)
        if common.size == 0:
            continue
        va, vb, labels = val[ia], bval[ib], lab[ia]
        a.diffs.append(float(statistic(va, labels, reduction)[0] - statistic(vb, labels, reduction)[0]))
        w = _resample_counts(common.size, n_boot, (seed, *key), boot_seed)
        d = statistic(va, labels, reduction, w) - statistic(vb, labels, reduction, w)
        a.boot = d if a.boot is None else a.boot + d
        a.boot_seeds += 1
    for name, value in run.scalars.items():
        key = ("-", "-", name)
        a = per_key.setdefault(key, _Acc())
        a.values.append(value)
        if base is not None and name in base.scalars:
            a.diffs.append(value - base.scalars[name])


def key_table(rows: list[dict[str, Any]], baseline: str | None = None) -> list[dict[str, str]]:
    """One line per setting for the terminal: accuracy on every split and EPG per method on the first split.

    A cell reads "mean (diff [low, high])": the mean over seeds, then the paired difference to the baseline
    with its t-interval over seeds; the baseline's cells read "mean [low, high]" (its t-interval over seeds).
    One seed (or one pair) has no interval, and says so; a method whose maps were invalid says "invalid".
    The seeds column spans every cell of the line ("2-3" when they differ) and, for a setting other than
    `baseline`, names the paired count when fewer seeds were paired ("3 (2 paired)").
    """
    splits = list(dict.fromkeys(r["split"] for r in rows if r["split"] != "-"))
    if not splits:
        return []
    columns = [(f"acc {s}", (s, "-", "accuracy")) for s in splits]
    columns += [(f"EPG {r['method']} ({splits[0]})", (splits[0], r["method"], r["metric"])) for r in rows
                if r["metric"] == "energy_pointing_game" and r["split"] == splits[0]]
    columns = list(dict(columns).items())
    index = {(r["setting"], r["split"], r["method"], r["metric"]): r for r in rows}
    table = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        line = {"setting": setting}
        cells = {name: index[(setting, *key)] for name, key in columns if (setting, *key) in index}
        if cells:
            line["seeds"] = _seeds_text(list(cells.values()), paired=setting != baseline)
        line.update({name: _key_cell(r) for name, r in cells.items()})
        table.append(line)
    return table


def _span(counts: list[int]) -> str:
    return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _seeds_text(cells: list[dict[str, Any]], paired: bool) -> str:
    seeds, pairs = [r["n_seeds"] for r in cells], [r.get("n_pairs", r["n_seeds"]) for r in cells]
    fewer = paired and any(p < n for p, n in zip(pairs, seeds, strict=True))
    return _span(seeds) + (f" ({_span(pairs)} paired)" if fewer else "")


def _key_cell(r: dict[str, Any]) -> str:
    if not math.isfinite(r["mean"]):
        return f"invalid ({r['invalid']} maps)" if r.get("invalid") else "-"
    cell = f"{r['mean']:.3f}"
    if math.isfinite(r["diff"]):
        cell += (f" ({r['diff']:+.3f} [{r['diff_ci95_low']:+.3f}, {r['diff_ci95_high']:+.3f}])"
                 if math.isfinite(r["diff_ci95_low"]) else f" ({r['diff']:+.3f}, 1 seed: no interval)")
    elif math.isfinite(r["ci95_low"]):
        cell += f" [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"
    elif r["n_seeds"] == 1:
        cell += " (1 seed: no interval)"
    return cell + (f", {r['invalid']} invalid" if r.get("invalid") else "")
