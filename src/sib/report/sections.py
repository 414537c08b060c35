"""The report's longer sections as HTML: heatmap gallery, comparison table, training curves, configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sib.report import compare, gallery, plots
from sib.report.inputs import ReportInput, Run
from sib.report.page import cell, dot, esc, finite, img, interval, num, table, value

HIDDEN_CONFIG = {"out", "resume", "overwrite"}  # differ between runs by construction


# ---------------------------------------------------------------------------------------------- gallery

def _tile(g: gallery.SplitGallery, i: int, run: str, method: str, where: str) -> str:
    epg = g.epg.get((i, run, method))
    pred = g.preds.get((i, run))
    wrong = pred is not None and pred != g.labels.get(i)
    lines = [f"EPG {epg:.3f}"] if epg is not None else []  # absent: EPG not evaluated on this image
    if (i, run, method) in g.flat:
        lines.append("flat map")
    if pred is not None:
        lines.append(f'<span class="pred">pred {esc(pred)}</span>')
    image = img(g.tiles[(i, run, method)], f"{method} of {run} on image {i}", "tile", data_tile=where,
                data_split=g.split, data_image=i, data_run=run, data_method=method)
    return (f"<td><figure>{image}<figcaption{' class=wrong' if wrong else ''}>{'<br>'.join(lines)}</figcaption>"
            "</figure></td>")


def _grid(g: gallery.SplitGallery, method: str, indices: list[int], colour: dict[str, str], where: str,
          row_note: dict[int, str] | None = None) -> str:
    """One method: rows are images; columns the input, then one column per run."""
    head1 = f'<th></th><th></th><th class="method" colspan="{len(g.runs)}">{esc(method)}</th>'
    head2 = "<th></th><th>input</th>" + "".join(f"<th>{dot(colour.get(r, '#999'))}{esc(r)}</th>" for r in g.runs)
    body = []
    for i in indices:
        note = f"<br>{esc(row_note[i])}" if row_note and i in row_note else ""
        cells = [f'<th class="rowhead">#{i}<br>label {esc(g.labels.get(i, "?"))}{note}</th>',
                 f"<td><figure>{img(g.inputs[i], f'input image {i}', 'tile')}</figure></td>"]
        cells += [_tile(g, i, r, method, where) for r in g.runs]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="gallery"><thead><tr>{head1}</tr><tr>{head2}</tr></thead><tbody>{"".join(body)}'
            "</tbody></table>")


def gallery_section(galleries: list[gallery.SplitGallery], colour: dict[str, str], why_empty: str) -> str:
    parts = ['<section id="gallery"><h2>Heatmaps: where each run looks</h2>']
    if not galleries:
        return "".join(parts) + f"<p>{esc(why_empty)}</p></section>"
    parts.append('<p class="legend">Each tile is one run\'s explanation of one image (red/yellow: high, blue: low; '
                 "for signed maps red positive, blue negative) over a faded copy of the input; the white line "
                 "(black outside it) outlines the object. Caption: the tile's energy pointing game (EPG, share of the "
                 "map on the object) from the run's evaluation, and the run's prediction (red when wrong). Each tile "
                 "is scaled to its own range: compare where a map is, not how strong.</p>")
    for g in galleries:
        parts.append(f"<h3>{esc(g.split)}: the same {len(g.same)} images for every run</h3><div class=\"methods\">")
        parts += [_grid(g, m, g.same, colour, "same") for m in g.methods]
        parts.append("</div>")
        differ = {m: rows for m, rows in g.differ.items() if rows}
        if differ:
            parts.append(f"<h3>{esc(g.split)}: where the runs differ most</h3><p class=\"legend\">Per method, the "
                         "images whose per-image EPG differs most between the runs (spread = largest minus "
                         "smallest EPG across the runs), largest first.</p><div class=\"methods\">")
            parts += [_grid(g, m, [i for i, _ in rows], colour, "differ", {i: f"spread {s:.3f}" for i, s in rows})
                      for m, rows in differ.items()]
            parts.append("</div>")
    return "".join(parts) + "</section>"


# ------------------------------------------------------------------------------------------- comparison

def comparison_section(inp: ReportInput, rows: list[dict[str, Any]], colour: dict[str, str]) -> str:
    parts = ['<section id="comparison"><h2>Comparison table</h2>']
    if not rows:
        return "".join(parts) + "<p>No evaluation to compare (see Notes).</p></section>"
    base = inp.baseline
    study = inp.kind == "study"
    what = "setting" if study else "run"
    headers = [(what, "text"), ("split", "text"), ("method", "text"), ("metric", "text")]
    if base:
        headers += [(f"baseline {base}", "num"), ("95% CI", "text")]
    headers += [(f"{what} value", "num"), ("95% CI", "text")]
    if base:
        headers += [(f"Δ ({what} − {base})", "num"), ("Δ 95% CI", "text")]
        if study:
            headers += [("Δ bootstrap CI (images)", "text")]
    headers += [("seeds" if study else "images", "num")]
    body = []
    for r in rows:
        s = compare.sign(r)
        cells = [f"<td>{dot(colour.get(r['run'], '#999'))}{esc(r['run'])}</td>", cell(r["split"]), cell(r["method"]),
                 cell(r["metric"])]
        if base:
            cells += [cell(num(r["base"]), r["base"], "num"), cell(interval(r["base_low"], r["base_high"]))]
        shown = "invalid" if r.get("invalid") and not finite(r["value"]) else num(r["value"])
        cells += [cell(shown, r["value"], "num"), cell(interval(r["low"], r["high"]))]
        if base:
            cls = "num pos" if s > 0 else "num neg" if s < 0 else "num"
            cells += [cell(num(r["diff"], True), r["diff"], cls), cell(interval(r["diff_low"], r["diff_high"], True))]
            if study:
                cells.append(cell(interval(r["boot_low"], r["boot_high"], True)))
        count = str(r["n"]) if r["n"] is not None else ""
        count += f" ({r['invalid']} invalid)" if r.get("invalid") else ""
        cells.append(cell(count, r["n"], "num"))
        body.append(f'<tr data-sign="{s}">' + "".join(cells) + "</tr>")
    ci = ("the Δ interval is over seeds (Student t) where a setting has two or more seeds, else the per-image "
          "paired bootstrap" if study else "values: the evaluation's 95% interval over images; Δ: computed on "
          "the images both runs evaluated, with a paired bootstrap 95% interval")
    parts.append(f'<p class="legend">{esc(ci)}. Δ is coloured only where its interval excludes zero: '
                 '<span style="background:#d6e6f5">blue</span> above zero, <span style="background:#fde2c8">'
                 "orange</span> below. Colour gives the sign, not whether it is better (for sec_per_step lower is "
                 "better). Rows with split \"-\" are per run (time per step, last-epoch diagnostics). \"invalid\": "
                 "maps that were not finite (NaN or inf), left out of the value and counted. Click a column header "
                 "to sort.</p>")
    parts.append('<p><input class="filter" data-table="comparison-table" placeholder="filter rows, e.g. '
                 'test_shifted grad_cam" size="40"> <span class="muted" id="comparison-table-count">'
                 f"{len(rows)} of {len(rows)}</span></p>")
    parts.append(table(headers, body, "comparison-table", sortable=True))
    return "".join(parts) + "</section>"


# ----------------------------------------------------------------------------------------------- curves

def curves_section(inp: ReportInput, colour: dict[str, str]) -> str:
    parts = ['<section id="curves"><h2>Training curves</h2>']
    groups = plots.curve_groups(inp.runs)
    if not groups:
        return "".join(parts) + "<p>No epoch finished yet (log.jsonl is empty).</p></section>"
    epochs = {len(r.log) for r in inp.runs}
    if epochs == {1}:
        parts.append("<p class=\"legend\">Every run trained one epoch: each curve is a single point.</p>")
    if inp.kind == "study":
        parts.append('<p class="legend">One colour per setting, one line per seed.</p>')
    for title, keys in groups.items():
        parts.append(f"<h3>{esc(title)}</h3>" + img(plots.curves(inp.runs, keys, colour), title))
    return "".join(parts) + "</section>"


# -------------------------------------------------------------------------------------------- configuration

def _eval_text(run: Run) -> str:
    if not run.evaluated:
        return "not evaluated"
    ev = run.eval_config
    return (f"{', '.join(ev.get('splits', []))}; {len(ev.get('methods', []))} methods × "
            f"{len(ev.get('metrics', []))} metrics; up to {ev.get('max_images') or 'all'} images; "
            f"{evaluated_weights(run)}")


def evaluated_weights(run: Run) -> str:
    """Which weights the evaluation used, e.g. "best.pt (epoch 1 of 4)": the curves run past them."""
    ev = run.eval_config
    weights = ev.get("evaluated_weights") or {}
    name = Path(str(weights.get("file", ""))).name or f"weights {ev.get('weights', 'best')}"
    epoch = weights.get("epoch")
    return f"{name} (epoch {epoch} of {len(run.log)})" if epoch is not None else name


def _config_runs(inp: ReportInput) -> list[Run]:
    """The runs whose configurations are shown: in a study one per setting (its first seed; seeds differ only
    by seed)."""
    return list({r.group: r for r in reversed(inp.runs)}.values())[::-1] if inp.kind == "study" else inp.runs


def differing_fields(inp: ReportInput) -> list[str]:
    """The configuration fields whose values differ between the runs (study: between the settings)."""
    shown = _config_runs(inp)
    keys = sorted({k for r in shown for k in r.config} - HIDDEN_CONFIG)
    return [k for k in keys if len({value(r.config.get(k, "—")) for r in shown}) > 1]


def reseeded(inp: ReportInput) -> list[str]:
    """Outside a study, the runs whose configuration is the baseline's but for the seed: their differences
    from the baseline are what retraining alone does (the noise a one-seed comparison's intervals miss)."""
    if inp.kind == "study" or inp.baseline is None:
        return []
    base = next(r for r in inp.runs if r.label == inp.baseline)

    def differing(r: Run) -> set[str]:
        keys = (set(base.config) | set(r.config)) - HIDDEN_CONFIG
        return {k for k in keys if value(r.config.get(k, "—")) != value(base.config.get(k, "—"))}

    return [r.label for r in inp.runs if r is not base and r.config and differing(r) == {"seed"}]


def configuration_section(inp: ReportInput, colour: dict[str, str]) -> str:
    parts = ['<section id="config"><h2>Configuration</h2><h3>Runs</h3>']
    rows = []
    for r in inp.runs:
        c, s = r.config, r.summary
        rows.append(f"<tr><td>{dot(colour.get(r.group, '#999'))}{esc(r.label)}</td><td><code>{esc(r.path)}</code></td>"
                    + "".join(cell(str(c.get(k, ""))) for k in ("dataset", "model", "regularizer"))
                    + cell(f"{len(r.log)} of {c.get('epochs', '?')}", len(r.log), "num")
                    + cell(num(s.get("best_val_acc")), s.get("best_val_acc"), "num")
                    + cell(num(s.get("sec_per_step"), digits=3), s.get("sec_per_step"), "num")
                    + cell(_eval_text(r)) + "</tr>")
    parts.append(table([("run", "text"), ("folder", "text"), ("dataset", "text"), ("model", "text"),
                        ("regularizer", "text"), ("epochs", "num"), ("best val acc", "num"), ("s / step", "num"),
                        ("evaluation", "text")], rows, "runs-table", sortable=True))
    shown = _config_runs(inp)
    keys = sorted({k for r in shown for k in r.config} - HIDDEN_CONFIG)
    differing = differing_fields(inp)
    head = [("field", "text")] + [((r.group if inp.kind == "study" else r.label), "text") for r in shown]

    def rows_of(ks: list[str], mark: bool) -> list[str]:
        return [f"<tr{' class=differs' if mark else ''}><td><code>{esc(k)}</code></td>"
                + "".join(cell(value(r.config.get(k, "—"))) for r in shown) + "</tr>" for k in ks]

    if len(shown) > 1:
        parts.append("<h3>What differs between the configurations</h3>")
        parts.append(table(head, rows_of(differing, True)) if differing else
                     "<p>Nothing: the configurations are identical (apart from their folders).</p>")
    parts.append("<details><summary>Full configuration (every field; differing ones highlighted)</summary>"
                 + table(head, rows_of(keys, False) if len(shown) == 1 else
                         [row for k in keys for row in rows_of([k], k in differing)]) + "</details>")
    return "".join(parts) + "</section>"
