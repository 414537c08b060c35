"""HTML building blocks of the report: escaping, images as data URIs, tables, and the page's CSS and JavaScript.

Everything is inline (no server, no network, no CDN): the page opens from disk and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0; color: #222; }
header { background: #f3f4f6; padding: 14px 24px; border-bottom: 1px solid #ddd; }
header h1 { margin: 0 0 4px; font-size: 22px; }
nav { padding: 6px 24px; border-bottom: 1px solid #eee; position: sticky; top: 0; background: #fff; z-index: 2; }
nav a { margin-right: 14px; color: #1f4e8c; text-decoration: none; }
main { padding: 0 24px 40px; }
section { margin-top: 26px; }
h2 { font-size: 18px; border-bottom: 2px solid #e5e7eb; padding-bottom: 3px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.lead { color: #444; max-width: 1000px; }
.muted { color: #666; font-size: 12px; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f9fafb; }
#comparison-table thead th { position: sticky; top: 31px; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th::after { content: " \\2195"; color: #bbb; }
table.sortable thead th[aria-sort=ascending]::after { content: " \\25B2"; color: #333; }
table.sortable thead th[aria-sort=descending]::after { content: " \\25BC"; color: #333; }
tr.differs td { background: #fff8e1; }
td.pos { background: #d6e6f5; color: #08306b; font-weight: 600; }
td.neg { background: #fde2c8; color: #7f2704; font-weight: 600; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 5px; }
img.figure { max-width: 100%; border: 1px solid #eee; }
.verdict { margin: 6px 0 10px; max-width: 1000px; list-style: none; padding-left: 0; }
.verdict li { margin: 2px 0; }
.caution { max-width: 1000px; margin: 6px 0 12px; padding: 8px 12px; background: #fff8e1;
           border-left: 4px solid #f0b400; }
table.key td { padding: 4px 10px; white-space: nowrap; }
.small { font-size: 11px; }
#comparison-table td { white-space: nowrap; }
.gallery th, .gallery td { border: none; padding: 2px 3px; text-align: center; font-weight: normal; }
.gallery thead th { background: none; font-size: 12px; }
.gallery th.method { border-bottom: 2px solid #ccc; font-weight: 600; }
.gallery td.gap, .gallery th.gap { width: 10px; }
.gallery figure { margin: 0; }
.gallery img { width: 112px; height: 112px; image-rendering: pixelated; display: block; }
.gallery figcaption { font-size: 11px; color: #444; line-height: 1.25; }
.gallery figcaption.wrong .pred { color: #b00; }
.rowhead { font-size: 11px; color: #444; text-align: right; white-space: nowrap; }
.methods { display: flex; flex-wrap: wrap; gap: 10px 28px; align-items: flex-start; }
details summary { cursor: pointer; color: #1f4e8c; }
.legend { font-size: 12px; color: #444; margin: 4px 0 8px; max-width: 1000px; }
code { background: #f3f4f6; padding: 0 3px; border-radius: 3px; }
"""

# Sort a table by the clicked column (numbers by their data-sort value, blanks last); filter rows by words.
JS = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
  const asc = th.getAttribute('aria-sort') !== 'ascending';
  table.querySelectorAll('thead th').forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
  const num = th.dataset.type === 'num';
  const key = tr => { const c = tr.cells[col]; return c.dataset.sort !== undefined ? c.dataset.sort : c.textContent; };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    let x = key(a), y = key(b);
    if (num) {
      x = x === '' ? NaN : Number(x); y = y === '' ? NaN : Number(y);
      if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
      return asc ? x - y : y - x;
    }
    return asc ? x.localeCompare(y) : y.localeCompare(x);
  });
  rows.forEach(r => body.appendChild(r));
}
function filterRows(input) {
  const table = document.getElementById(input.dataset.table), words = input.value.toLowerCase().split(/\\s+/);
  let shown = 0;
  Array.from(table.tBodies[0].rows).forEach(tr => {
    const text = tr.textContent.toLowerCase(), ok = words.every(w => text.includes(w));
    tr.hidden = !ok; shown += ok;
  });
  document.getElementById(input.dataset.table + '-count').textContent = shown + ' of ' + table.tBodies[0].rows.length;
}
document.querySelectorAll('table.sortable thead th').forEach(th => {
  th.tabIndex = 0; th.title = 'click to sort';
  th.addEventListener('click', () => sortBy(th));
  th.addEventListener('keydown', e => { if (e.key === 'Enter') sortBy(th); });
});
document.querySelectorAll('input.filter').forEach(i => i.addEventListener('input', () => filterRows(i)));
"""


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes, alt: str, cls: str = "figure", **attrs: Any) -> str:
    extra = "".join(f" {k.replace('_', '-')}=\"{esc(v)}\"" for k, v in attrs.items())
    return f'<img class="{cls}" alt="{esc(alt)}" src="{png_uri(data)}"{extra}>'


def dot(colour: str) -> str:
    return f'<span class="dot" style="background:{esc(colour)}"></span>'


def finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def num(v: Any, signed: bool = False, digits: int = 4) -> str:
    """A number for a table cell ("" for NaN/None); large and tiny magnitudes in scientific notation."""
    if not finite(v):
        return ""
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:+.3g}" if signed else f"{v:.3g}"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def interval(low: Any, high: Any, signed: bool = False, digits: int = 4) -> str:
    if not (finite(low) and finite(high)):
        return ""
    return f"[{num(low, signed, digits)}, {num(high, signed, digits)}]"


def value(v: Any) -> str:
    """A configuration value as text: JSON for lists and dicts, else str."""
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)


def cell(text: str, sort: Any = None, cls: str = "", raw: bool = False) -> str:
    attrs = f' class="{cls}"' if cls else ""
    if sort is not None:
        attrs += f' data-sort="{esc(repr(float(sort)) if finite(sort) else "")}"'
    return f"<td{attrs}>{text if raw else esc(text)}</td>"


def table(headers: Sequence[tuple[str, str]], rows: Sequence[str], table_id: str = "", sortable: bool = False,
          cls: str = "") -> str:
    """A table from (header text, "num"|"text") pairs and pre-rendered `<tr>` rows."""
    classes = " ".join(c for c in (cls, "sortable" if sortable else "") if c)
    head = "".join(f'<th data-type="{t}"{" class=num" if t == "num" else ""}>{esc(h)}</th>' for h, t in headers)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return (f'<table{ident} class="{classes}"><thead><tr>{head}</tr></thead><tbody>' + "".join(rows)
            + "</tbody></table>")


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], sections: Sequence[str], footer: str) -> str:
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><div class=\"muted\">{subtitle}</div></header><nav>{links}</nav>"
            f"<main>{''.join(sections)}</main><footer class=\"muted\" style=\"padding:0 24px 20px\">{footer}</footer>"
            f"<script>{JS}</script></body></html>\n")
