"""The report's matplotlib figures, as PNG bytes: training curves per epoch and the differences at a glance."""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.ticker import MaxNLocator

from sib.report.inputs import Run
from sib.report.mpl import matplotlib, plt  # Agg, text drawn as given (no TeX)

MARKERS = "os^Dv<>ph*"
SHARES = {"coverage", "diag_coverage", "diag_r_in_gt"}  # fractions in [0, 1]: always a linear axis
# log.jsonl keys that are bookkeeping, not curves; every other numeric key of a row is a loss term
BOOKKEEPING = {"epoch", "step", "lr", "reg_steps", "skipped", "sec_per_step", "reg_scale"}
NAMES = {"ce": "cross-entropy", "reg": "regulariser (weighted total)", "bg": "S-IB background term",
         "hsic": "S-IB HSIC (foreground term)", "coverage": "S-IB mask coverage",
         "train_acc": "train accuracy", "val_acc": "validation accuracy", "test_acc": "test accuracy",
         "test_shifted_acc": "shifted-background test accuracy",
         "diag_grad_ratio": "|grad reg| / |grad ce|", "diag_r_abs_mean": "mean |R| (regulariser's map)",
         "diag_coverage": "mask coverage (diagnostic)", "diag_r_in_gt": "share of R's energy on the object"}


def colours(groups: list[str]) -> dict[str, str]:
    """One colour per run (or study setting), the same in every figure and table of the report."""
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {g: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, g in enumerate(groups)}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def curve_groups(runs: list[Run]) -> dict[str, list[str]]:
    """Figure title -> the log.jsonl keys it plots (only keys some run logged with a finite value)."""
    keys = list(dict.fromkeys(k for r in runs for row in r.log for k, v in row.items() if _finite(v)))
    acc = [k for k in keys if k.endswith("_acc")]
    diag = [k for k in keys if k.startswith("diag_")]
    loss = [k for k in keys if k not in BOOKKEEPING and k not in acc and k not in diag]
    loss.sort(key=lambda k: k != "ce")  # cross-entropy first, then the regulariser's terms as logged
    groups = {"Losses (training, mean over the epoch)": loss, "Accuracy": acc,
              "Regulariser diagnostics (one fixed validation batch)": diag}
    return {title: ks for title, ks in groups.items() if ks}


def curves(runs: list[Run], keys: list[str], colour: dict[str, str]) -> bytes:
    """One panel per log.jsonl key, one line per run over epochs (study seeds share their setting's colour).

    A positive series spanning more than two decades is drawn on a log axis (S-IB's terms do).
    """
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.5 * nrows + 0.3), squeeze=False)
    labelled: set[str] = set()
    groups = list(dict.fromkeys(r.group for r in runs))
    for ax, key in zip(axes.flat, keys, strict=False):
        values: list[float] = []
        last = 1
        for run in runs:
            pts = [(row["epoch"], row[key]) for row in run.log if _finite(row.get(key)) and "epoch" in row]
            if not pts:
                continue
            x, y = zip(*pts, strict=True)
            label = run.group if run.group not in labelled else None
            labelled.add(run.group)
            # a marker and width per run, so that a run whose curve lies on another's stays visible
            k = groups.index(run.group)
            ax.plot(x, y, marker=MARKERS[k % len(MARKERS)], ms=max(3.0, 7.0 - k), lw=max(0.8, 2.2 - 0.4 * k),
                    color=colour[run.group], label=label, alpha=0.9 if run.seed in (None, 0) else 0.55,
                    mfc="none" if k else colour[run.group])
            values += y
            last = max(last, max(x))
        positive = [v for v in values if v > 0]
        if (key not in SHARES and not key.endswith("_acc") and positive and min(values) >= 0
                and max(positive) / min(positive) > 100):
            ax.set_yscale("log")  # zeros (a run without the term) drop out of a log axis
        ax.set_title(NAMES.get(key, key), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if last <= 10:
            ax.set_xticks(range(1, int(last) + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, last + 0.5)
        if ax.get_yscale() == "linear":
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        ncol = len(labels) if len(labels) <= 10 else math.ceil(len(labels) / 2)
        fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return _png(fig)


def _quantity(row: dict[str, Any]) -> str:
    if row["metric"] == "accuracy":
        return f"accuracy · {row['split']}"
    return f"{row['metric'].replace('energy_pointing_game', 'EPG')} {row['method']} · {row['split']}"


def differences(rows: list[dict[str, Any]], baseline: str, colour: dict[str, str]) -> bytes | None:
    """The differences at a glance: one line per quantity, each compared run's difference to the baseline with
    its 95% interval (filled where the interval excludes zero), a vertical line at zero.

    Args:
        rows: comparison rows (sib.report.compare) of the quantities to show, each with run, diff, diff_low,
            diff_high.
    """
    rows = [r for r in rows if _finite(r["diff"])]
    if not rows:
        return None
    quantities = list(dict.fromkeys(_quantity(r) for r in sorted(rows, key=lambda r: r["metric"] != "accuracy")))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    height = 0.8 + len(quantities) * (0.18 + 0.1 * len(runs))
    fig, ax = plt.subplots(figsize=(7.5, height))
    step = 0.7 / max(1, len(runs))
    for r in rows:
        y = quantities.index(_quantity(r)) + (runs.index(r["run"]) - (len(runs) - 1) / 2) * step
        lo, hi = r["diff_low"], r["diff_high"]
        excludes = _finite(lo) and _finite(hi) and (lo > 0 or hi < 0)
        c = colour.get(r["run"], "C0")
        if _finite(lo) and _finite(hi):
            ax.plot([lo, hi], [y, y], color=c, lw=1.6)
        ax.plot([r["diff"]], [y], marker="o", ms=6, color=c, mfc=c if excludes else "white", mew=1.5,
                label=r["run"])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(quantities)), quantities, fontsize=8)
    ax.set_ylim(len(quantities) - 0.5, -0.5)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel(f"difference to {baseline} (run − {baseline}), 95% interval; filled: interval excludes 0",
                  fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if len(unique) > 1:  # beside the axes: inside, it would cover points
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
    fig.tight_layout()
    return _png(fig)
