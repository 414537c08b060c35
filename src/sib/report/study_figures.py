"""A study's dose-response figure: accuracy and energy pointing game against a swept weight (log axis)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sib.io import atomic_write
from sib.report.mpl import plt  # Agg, text drawn as given (no TeX)

EPG = "energy_pointing_game"


def _panels(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(title, method, metric) per panel: accuracy, then EPG per method, in the table's order."""
    panels = [("accuracy", "-", "accuracy")] if any(r["metric"] == "accuracy" for r in rows) else []
    methods = list(dict.fromkeys(r["method"] for r in rows if r["metric"] == EPG))
    return panels + [(f"EPG {m}", m, EPG) for m in methods]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def dose_response(rows: list[dict[str, Any]], sweeps: dict[str, list[str]], baseline: str, path: Path
                  ) -> Path | None:
    """One row of panels per swept setting: accuracy, then EPG per method, one line per split.

    Args:
        rows: the study table (sib.report.study_summary.COLUMNS: setting, dose, split, method, metric, mean,
            ci95_low, ci95_high).
        sweeps: x-axis title (e.g. "sib: sib_bg_weight") -> the swept setting's expanded labels.
        baseline: drawn in every panel as a horizontal line (per split, same colour) with its 95% band.
        path: PNG file to write (atomically).

    Returns:
        `path`, or None (nothing written) when no setting sweeps or the table has nothing to draw.
        Points are means over seeds, bars their t-interval; the x axis is logarithmic when every dose is > 0.
    """
    panels = _panels(rows)
    if not sweeps or not panels:
        return None
    splits = list(dict.fromkeys(r["split"] for r in rows if r["split"] != "-"))
    colours = {s: f"C{i}" for i, s in enumerate(splits)}
    index = {(r["setting"], r["split"], r["method"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(len(sweeps), len(panels), figsize=(3.0 * len(panels), 2.6 * len(sweeps)),
                             squeeze=False)
    for i, (group, labels) in enumerate(sweeps.items()):
        for j, (title, method, metric) in enumerate(panels):
            ax = axes[i][j]
            doses: list[float] = []
            for split in splits:
                pts = [(index[(lb, split, method, metric)]) for lb in labels if (lb, split, method, metric) in index]
                pts = [r for r in pts if _finite(r["dose"]) and _finite(r["mean"])]
                if not pts:
                    continue
                x = [r["dose"] for r in pts]
                y = [r["mean"] for r in pts]
                err = [[max(0.0, r["mean"] - r["ci95_low"]) if _finite(r["ci95_low"]) else 0.0 for r in pts],
                       [max(0.0, r["ci95_high"] - r["mean"]) if _finite(r["ci95_high"]) else 0.0 for r in pts]]
                ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, color=colours[split], label=split)
                doses += x
                b = index.get((baseline, split, method, metric))
                if b is not None and _finite(b["mean"]):
                    ax.axhline(b["mean"], color=colours[split], ls="--", lw=0.8)
                    if _finite(b["ci95_low"]) and _finite(b["ci95_high"]):
                        ax.axhspan(b["ci95_low"], b["ci95_high"], color=colours[split], alpha=0.12, lw=0)
            if doses and min(doses) > 0:
                ax.set_xscale("log")
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel(group, fontsize=7)
            if j == 0:
                ax.legend(fontsize=6, title=f"dashed: {baseline}", title_fontsize=6)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
