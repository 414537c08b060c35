"""An evaluation's summary from streamed sums: memory flat in the number of images.

`sib evaluate` writes every (split, image, method, metric) value to per_image.jsonl and summarises each
(split, method, metric) group. Holding all rows until the end grew with the split (issue 12); instead
`SummaryStream.add(row)` keeps, per group and per class, a count, a running mean and a running sum of
squared deviations (Welford), plus the excluded / invalid counts and the tolerances seen. That is all the
summary needs: the mean and its variance, or the mean of class means and the variance of that (per-class
variances), so `SummaryStream.summary(run)` equals `sib.evaluate.summarise(rows, run)`, the two-pass
form over all rows, to rounding (~1e-15; tested to 1e-12). Memory: O(groups x classes).

Status rule (as `sib.evaluate._summarise`): within a group where every row has a `status`, only "ok" rows
with a value count, and "excluded" / "invalid" are counted apart; in a group where some row has none (an
older per_image.jsonl resumed), every NaN counts as excluded and every other value is used. Both
readings are accumulated, so the rule can be applied at the end.
"""

from __future__ import annotations

import math
from typing import Any

from sib.metrics import METRICS


class _Moments:
    """Count, mean and sum of squared deviations of a stream of floats (Welford 1962)."""

    __slots__ = ("m2", "mean", "n")

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, v: float) -> None:
        self.n += 1
        delta = v - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (v - self.mean)

    def merged(self, other: _Moments) -> _Moments:
        """The moments of both streams together (Chan, Golub & LeVeque 1979)."""
        out = _Moments()
        out.n = self.n + other.n
        if out.n:
            delta = other.mean - self.mean
            out.mean = self.mean + delta * other.n / out.n
            out.m2 = self.m2 + other.m2 + delta * delta * self.n * other.n / out.n
        return out

    def var(self) -> float:
        """Sample variance (n - 1); 0 for fewer than two values, as `sib.evaluate._var`."""
        return self.m2 / (self.n - 1) if self.n >= 2 else 0.0


class _Group:
    """One (split, method, metric): per-class moments under both status readings, and counts."""

    def __init__(self) -> None:
        self.ok: dict[int, _Moments] = {}  # status "ok" and a value
        self.other: dict[int, _Moments] = {}  # a value, status missing or not "ok" (used only by the no-status rule)
        self.excluded = self.invalid = self.nan = 0
        self.all_have_status = True
        self.tolerances: set[Any] = set()

    def add(self, value: float, label: int, status: str | None, tolerance: Any) -> None:
        if status is None:
            self.all_have_status = False
        self.excluded += status == "excluded"
        self.invalid += status == "invalid"
        if tolerance is not None:
            self.tolerances.add(tolerance)
        if math.isnan(value):
            self.nan += 1
            return
        bucket = self.ok if status == "ok" else self.other
        bucket.setdefault(label, _Moments()).add(value)

    def stats(self, reduction: str) -> dict[str, Any]:
        if self.all_have_status:
            classes, counts = self.ok, {"excluded": self.excluded, "invalid": self.invalid}
        else:
            classes = dict(self.ok)
            for c, m in self.other.items():
                classes[c] = classes[c].merged(m) if c in classes else m
            counts = {"excluded": self.nan, "invalid": 0}
        n = sum(m.n for m in classes.values())
        if n == 0:
            return {"value": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "n": 0, **counts}
        if reduction == "class_mean":
            value = sum(m.mean for m in classes.values()) / len(classes)
            var = sum(m.var() / m.n for m in classes.values()) / len(classes) ** 2
        else:
            total = _Moments()
            for m in classes.values():
                total = total.merged(m)
            value, var = total.mean, total.var() / total.n
        half = 1.96 * math.sqrt(var)
        return {"value": value, "ci95_low": value - half, "ci95_high": value + half, "n": n, **counts}


class SummaryStream:
    """Accumulates per-image rows one at a time; `summary()` gives one row per (split, method, metric).

    Example:
        >>> stream = SummaryStream()
        >>> for row in rows_of_every_batch: stream.add(row)
        >>> table = stream.summary("run")   # == sib.evaluate.summarise(all_rows, "run")
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str, str], _Group] = {}  # first-seen order, as `summarise`

    def add(self, row: dict[str, Any]) -> None:
        """One per-image row: split, method, metric, value (float, NaN allowed), label, and optionally
        status ("ok" / "excluded" / "invalid") and tolerance_px."""
        key = (row["split"], row["method"], row["metric"])
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        group.add(row["value"], row["label"], row.get("status"), row.get("tolerance_px"))

    def summary(self, run_name: str) -> list[dict[str, Any]]:
        """One row per group: run, split, method, metric, value, ci95_low, ci95_high, n, excluded, invalid,
        tolerance_px (the radius, or the radii seen joined by ", ", or None)."""
        out = []
        for (split, method, metric), group in self._groups.items():
            reduction = "mean" if metric == "accuracy" else METRICS.get(metric).reduction
            tolerances = sorted(group.tolerances)
            tolerance = (tolerances[0] if len(tolerances) == 1 else ", ".join(map(str, tolerances))) if tolerances \
                else None
            out.append({"run": run_name, "split": split, "method": method, "metric": metric,
                        **group.stats(reduction), "tolerance_px": tolerance})
        return out
