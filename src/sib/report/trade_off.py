"""A study's accuracy-vs-EPG trade-off: one point per setting, its seed interval, the Pareto-optimal ones marked.

The figure this field reads (Rao et al. 2023's main figure): x = the energy pointing game averaged over the
study's explanation methods, y = accuracy, one panel per evaluated split. For every run (setting, seed) the
two numbers come from its own evaluation (`eval/summary.json`: the evaluator's per-run means over valid
images); a point is their mean over the setting's seeds and its bars the Student-t 95% interval over seeds
(the EPG interval is that of the per-seed method-average, not an average of per-method intervals). A setting
is Pareto-optimal on a split when no other setting has a higher mean on both axes (at least as high on one,
higher on the other). Runs without an evaluation are left out and the point says how many seeds it rests on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sib.io import atomic_write
from sib.report.mpl import plt  # Agg, text drawn as given (no TeX)
from sib.report.study_summary import t_interval

EPG = "energy_pointing_game"
COLUMNS = ["setting", "split", "n_seeds", "n_methods", "accuracy", "accuracy_ci95_low", "accuracy_ci95_high",
           "mean_epg", "mean_epg_ci95_low", "mean_epg_ci95_high", "pareto"]


def _run_values(run: Path) -> dict[str, tuple[float, float, int]]:
    """split -> (accuracy, mean EPG over the methods, number of methods) of one evaluated run ({} if none)."""
    path = run / "eval" / "summary.json"
    if not path.is_file():
        return {}
    acc: dict[str, float] = {}
    epg: dict[str, list[float]] = {}
    for r in json.loads(path.read_text()):
        value = r.get("value")
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if r["metric"] == "accuracy":
            acc[r["split"]] = float(value)
        elif r["metric"] == EPG:
            epg.setdefault(r["split"], []).append(float(value))
    return {s: (acc[s], sum(v) / len(v), len(v)) for s, v in epg.items() if s in acc and v}


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """The labels whose (x, y) no other point dominates (>= on both, > on one)."""
    front = set()
    for a, (xa, ya) in points.items():
        if not any((xb >= xa and yb >= ya) and (xb > xa or yb > ya) for b, (xb, yb) in points.items() if b != a):
            front.add(a)
    return front


def trade_off_rows(runs: dict[str, dict[int, Path]]) -> list[dict[str, Any]]:
    """One row per (setting, split) with its seed means, intervals and Pareto flag (COLUMNS)."""
    per: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for label, seeds in runs.items():
        for _, run in sorted(seeds.items()):
            for split, values in _run_values(run).items():
                per.setdefault((label, split), []).append(values)
    rows = []
    for (label, split), values in per.items():
        acc, acc_lo, acc_hi = t_interval([v[0] for v in values])
        epg, epg_lo, epg_hi = t_interval([v[1] for v in values])
        rows.append({"setting": label, "split": split, "n_seeds": len(values), "n_methods": min(v[2] for v in values),
                     "accuracy": acc, "accuracy_ci95_low": acc_lo, "accuracy_ci95_high": acc_hi, "mean_epg": epg,
                     "mean_epg_ci95_low": epg_lo, "mean_epg_ci95_high": epg_hi, "pareto": False})
    for split in {r["split"] for r in rows}:
        mine = [r for r in rows if r["split"] == split]
        front = pareto({r["setting"]: (r["mean_epg"], r["accuracy"]) for r in mine})
        for r in mine:
            r["pareto"] = r["setting"] in front
    return rows


def trade_off_figure(rows: list[dict[str, Any]], baseline: str, path: Path) -> Path | None:
    """Draw the panels (one per split) to `path` (PNG, atomically); None when there is nothing to draw.

    Every setting has one colour (the legend, right); Pareto-optimal points are stars with their name
    written beside them. The axes frame the means (bars of few-seed intervals may run past them).
    """
    splits = list(dict.fromkeys(r["split"] for r in rows))
    if not splits:
        return None
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    cmap = plt.get_cmap("tab20")
    colours = {s: cmap(i % 20) for i, s in enumerate(settings)}
    fig, axes = plt.subplots(1, len(splits), figsize=(5.0 * len(splits) + 2.6, 4.6), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        mine = [r for r in rows if r["split"] == split]
        for r in mine:
            x, y = r["mean_epg"], r["accuracy"]
            if r["n_seeds"] > 1:
                ax.errorbar(x, y, xerr=[[x - r["mean_epg_ci95_low"]], [r["mean_epg_ci95_high"] - x]],
                            yerr=[[y - r["accuracy_ci95_low"]], [r["accuracy_ci95_high"] - y]], fmt="none",
                            ecolor=colours[r["setting"]], alpha=0.35, lw=1)
            ax.scatter([x], [y], s=130 if r["pareto"] else 36, color=colours[r["setting"]],
                       marker="*" if r["pareto"] else "o", edgecolors="black", linewidths=0.5, zorder=3)
            if r["pareto"]:
                ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        base = next((r for r in mine if r["setting"] == baseline), None)
        if base is not None:
            ax.axvline(base["mean_epg"], color="grey", lw=0.8, ls="--")
            ax.axhline(base["accuracy"], color="grey", lw=0.8, ls="--")
        xs, ys = [r["mean_epg"] for r in mine], [r["accuracy"] for r in mine]
        pad_x, pad_y = max(0.02, 0.12 * (max(xs) - min(xs))), max(0.02, 0.12 * (max(ys) - min(ys)))
        ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        ax.set_ylim(max(0.0, min(ys) - pad_y), min(1.0, max(ys) + pad_y) + 0.01)
        ax.set_xlabel(f"EPG, mean over {min(r['n_methods'] for r in mine)} methods")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{split} (dashed: {baseline}; stars: Pareto-optimal)", fontsize=9)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[s], markeredgecolor="black", markeredgewidth=0.5,
                          label=s + ("" if min(r["n_seeds"] for r in rows if r["setting"] == s) > 1 else " (1 seed)"))
               for s in settings]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle("accuracy vs energy pointing game: means over seeds, bars 95% t-interval over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / (5.0 * len(splits) + 2.6), 1))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
