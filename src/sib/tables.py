"""Tidy tables (list of dicts) written as CSV, JSON and Markdown, atomically.

Below the commands (not in sib.report) because the evaluator writes its summary with them and the report
package reads runs the evaluator wrote: both import this module, neither imports the other.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sib.io import atomic_write_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return "" if v is None else str(v)


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of `rows` (floats with 4 decimals)."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], stem: Path, columns: Sequence[str] | None = None) -> list[Path]:
    """Write `rows` to `<stem>.csv`, `<stem>.json` and `<stem>.md`; return the three paths."""
    stem = Path(stem)
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".md")]
    atomic_write_text(paths[0], buf.getvalue())
    atomic_write_text(paths[1], json.dumps(list(rows), indent=2, allow_nan=True) + "\n")
    atomic_write_text(paths[2], to_markdown(rows, columns))
    return paths
