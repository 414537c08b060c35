"""`sib report RUN_OR_STUDY... --out DIR`: one self-contained HTML page (DIR/index.html) a person reads first.

Inputs: run folders, a demo folder or a study folder (sib.report.inputs). Sections, in reading order:
    At a glance      per compared run: which key differences (accuracy per split, energy pointing game per
                     method and split) have a 95% interval that excludes zero, and a figure of all of them;
                     for a study, the dose-response figure too
    Heatmaps         per split and method, the same images explained by every run, the object outlined;
                     then the images where the runs' per-image EPG differs most (sib.report.gallery)
    Comparison       every (run, split, method, metric) against the baseline with intervals, the difference
                     coloured by sign where its interval excludes zero; sortable by any column, filterable
    Training         curves per epoch from log.jsonl: losses, accuracies, regulariser diagnostics
    Configuration    the runs, what differs between their configurations, and the full configurations
Images are PNG data URIs and the CSS/JS is inline: the page opens from disk, with no server and no network.
"""

from __future__ import annotations

import dataclasses
import datetime
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sib import __version__
from sib.io import atomic_write_text
from sib.report import compare, gallery, plots
from sib.report import sections as sections_
from sib.report.inputs import ReportInput, Run, collect
from sib.report.page import cell, dot, esc, finite, img, interval, num, page, table, value
from sib.run_dir import MANIFEST, REPORT, prepare, read_manifest

GALLERY_RUNS = 10  # at most this many runs (study: settings) in the gallery; the table has them all
GLOSSARY = ("EPG (energy pointing game): the share of a heatmap's positive energy that falls on the object, from 0 to "
            "1; higher means the explanation sits more on the object. Accuracy: the share of images classified "
            "right.")
SHIFTED = (" test_shifted (the built-in benchmark): test digits on background textures drawn independently of the "
           "class, so a model that learned the background shortcut loses accuracy there.")


def write_report(inputs: Sequence[str | Path], out: str | Path, *, overwrite: bool = False,
                 methods: list[str] | None = None, n_images: int = 6, n_differ: int = 4, device: str = "cpu") -> Path:
    """Write DIR/index.html for the runs, demo or study in `inputs`; return its path.

    Args:
        inputs: run folders and demo folders (compared, the first run is the baseline), or one study folder.
        out: the report folder (sib.run_dir kind "report": `overwrite` replaces only its index.html).
        methods: explanation methods of the gallery (default: up to 4 of those every run's evaluation ran).
        n_images: images per split shown for every run; n_differ: images per method where they differ most.
        device: where the gallery's models run.

    Raises:
        FileNotFoundError, ValueError: an input is missing or is not a run, demo or study folder (named).
        FileExistsError: `out` holds something else, or a report and not `overwrite`.
    """
    if n_images < 0 or n_differ < 0:
        raise ValueError(f"--images {n_images} / n_differ {n_differ}: must be >= 0")
    inp = collect(inputs)
    out = Path(out)
    if (out / "index.html").exists() and read_manifest(out) is None:
        raise FileExistsError(f"--out {out} holds an index.html that sib did not write; choose another --out")
    created, had_manifest = not out.exists(), (out / MANIFEST).exists()
    prepare(out, REPORT, overwrite=overwrite, resume=False)
    try:
        page_html = render(inp, methods, n_images, n_differ, device)
    except BaseException:
        _undo_prepare(out, created, had_manifest)
        raise
    atomic_write_text(out / "index.html", page_html)
    return out / "index.html"


def _undo_prepare(out: Path, created: bool, had_manifest: bool) -> None:
    """A report that failed leaves `out` as it found it: no half-made folder that a rerun would refuse."""
    if not had_manifest:
        (out / MANIFEST).unlink(missing_ok=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def render(inp: ReportInput, methods: list[str] | None, n_images: int, n_differ: int, device: str) -> str:
    """The page's HTML (see the module docstring for its sections)."""
    colour = plots.colours(inp.groups)
    rows, notes = compare.comparison(inp)
    notes = inp.notes + notes
    baseline = inp.baseline or ""
    sections = [_glance(inp, rows, colour), _gallery(inp, methods, n_images, n_differ, device, colour, notes),
                sections_.comparison_section(inp, rows, colour), sections_.curves_section(inp, colour),
                sections_.configuration_section(inp, colour)]
    if notes:
        sections.append('<section id="notes"><h2>Notes</h2><ul>' + "".join(f"<li>{esc(n)}</li>" for n in notes)
                        + "</ul></section>")
    nav = [("glance", "At a glance"), ("gallery", "Heatmaps"), ("comparison", "Comparison table"),
           ("curves", "Training"), ("config", "Configuration")] + ([("notes", "Notes")] if notes else [])
    if inp.kind == "study":
        title = f"sib report: study {inp.study_dir.name if inp.study_dir else ''}"
    else:
        labels = [r.label for r in inp.runs]
        title = "sib report: " + (" vs ".join(labels) if len(labels) <= 4 else f"{len(labels)} runs")
    compared = f"; differences are taken against <b>{esc(baseline)}</b>" if baseline else ""
    differing = sections_.differing_fields(inp)
    if differing:
        more = " ..." if len(differing) > 6 else ""
        compared += "; the runs' configurations differ in " + ", ".join(f"<code>{esc(k)}</code>"
                                                                         for k in differing[:6]) + more
    subtitle = ("inputs: " + ", ".join(f"<code>{esc(s)}</code>" for s in inp.sources) + compared)
    footer = (f"written by sib {esc(__version__)} on {datetime.datetime.now():%Y-%m-%d %H:%M}; one self-contained "
              "file (images embedded), nothing is loaded from the network")
    return page(title, subtitle, nav, sections, footer)


# --------------------------------------------------------------------------------------------- sections

def _quantity(r: dict[str, Any]) -> str:
    if r["metric"] == "accuracy":
        return f"accuracy · {r['split']}"
    return f"{r['metric'].replace('energy_pointing_game', 'EPG')} {r['method']} · {r['split']}"


def _key_table(inp: ReportInput, key: list[dict[str, Any]], colour: dict[str, str]) -> str:
    """Quantities (rows) x compared runs (columns): the value, and below it the difference to the baseline
    with its interval, the cell coloured by the difference's sign where the interval excludes zero."""
    order = {q: i for i, q in enumerate(dict.fromkeys(_quantity(r) for r in key))}
    quantities = sorted(order, key=lambda q: (not q.startswith("accuracy"), order[q]))
    runs = list(dict.fromkeys(r["run"] for r in key))
    index = {(_quantity(r), r["run"]): r for r in key}
    base = inp.baseline
    headers = [("quantity", "text")] + ([(f"baseline {base}", "num")] if base else [])
    headers += [(run, "num") for run in runs]
    body = []
    for q in quantities:
        first = next(index[(q, run)] for run in runs if (q, run) in index)
        cells = [cell(q)]
        if base:
            cells.append(cell(f"{num(first['base'], digits=3)}<br><span class=muted>"
                              f"{esc(interval(first['base_low'], first['base_high'], digits=3))}</span>",
                              first["base"], "num", raw=True))
        for run in runs:
            r = index.get((q, run))
            if r is None:
                cells.append(cell(""))
                continue
            sign = compare.sign(r)
            below = (f"{num(r['diff'], True, 3)} {interval(r['diff_low'], r['diff_high'], True, 3)}" if base
                     else interval(r["low"], r["high"], digits=3))
            cells.append(cell(f"{num(r['value'], digits=3)}<br><span class=small>{esc(below)}</span>", r["value"],
                              "num pos" if sign > 0 else "num neg" if sign < 0 else "num", raw=True))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return table(headers, body, "key-table", cls="key")


def _glance(inp: ReportInput, rows: list[dict[str, Any]], colour: dict[str, str]) -> str:
    parts = ['<section id="glance"><h2>At a glance</h2>']
    key = compare.key_rows(rows)
    if not rows:
        parts.append("<p>No run has an evaluation yet: run <code>sib evaluate --checkpoint RUN</code> to compare "
                     "explanations; the training curves and configurations are below.</p>")
    sentences = []
    noise = sections_.reseeded(inp)
    for run in dict.fromkeys(r["run"] for r in key if inp.baseline):
        mine = [r for r in key if r["run"] == run and finite(r["diff"])]
        up = sum(compare.sign(r) > 0 for r in mine)
        down = sum(compare.sign(r) < 0 for r in mine)
        what = (" <i>(the baseline's configuration with another seed: these differences are retraining noise)</i>"
                if run in noise else "")
        sentences.append(f"<li>{dot(colour.get(run, '#999'))}<b>{esc(run)}</b> vs {esc(inp.baseline)}{what}: of "
                         f"{len(mine)} key differences, "
                         f"<b>{up}</b> above zero and <b>{down}</b> below zero (95% interval excludes zero); "
                         f"{len(mine) - up - down} within the noise of image sampling</li>")
    if sentences:
        parts.append(f'<ul class="verdict">{"".join(sentences)}</ul>')
    if noise and rows:
        parts.append('<p class="caution"><b>Read with the reseeded run.</b> ' + ", ".join(
            f"<b>{esc(n)}</b>" for n in noise) + " trained the baseline's configuration again with another seed. "
            "Every difference it shows is what retraining alone moves; the intervals here cover only the sampling "
            "of images, so they miss it. A difference of another run is evidence only where it is clearly larger "
            "than the reseeded run's on the same row; to measure it properly, run a study with several seeds "
            "(<code>sib study</code>) and report that.</p>")
    if inp.kind == "runs" and rows:
        used = [f"<b>{esc(r.label)}</b> {esc(sections_.evaluated_weights(r))}" for r in inp.runs if r.evaluated]
        parts.append(f'<p class="legend">Evaluated weights: {"; ".join(used)}. best.pt is the epoch of best '
                     "validation accuracy (<code>sib evaluate --weights last</code> takes the last one).</p>")
    if key:
        parts.append(_key_table(inp, key, colour))
        parts.append('<p class="legend">' + (
            f"Each cell: the value, and below it the difference to the baseline <b>{esc(inp.baseline)}</b> with "
            "its 95% interval (" + ("over seeds; the per-image bootstrap where a setting has one seed" if
                                     inp.kind == "study" else "paired bootstrap over the images both runs "
                                     "evaluated: it covers the sampling of images, not the noise of training "
                                     "another seed; a study with several seeds tells whether a difference "
                                     "survives retraining") + "); blue: the interval is above zero, orange: "
            "below zero. "
            if inp.baseline else "Each cell: the value and its 95% interval over the evaluated images. ")
            + "Every metric, method and split is in the comparison table below.</p>")
    fig = plots.differences(key, inp.baseline or "", colour) if inp.baseline else None
    if fig:
        parts.append(img(fig, "differences to the baseline with 95% intervals"))
        parts.append('<p class="legend">The same differences as dots with their 95% interval; a filled dot: the '
                     "interval excludes zero.</p>")
    shifted = SHIFTED if any(r["split"] == "test_shifted" for r in rows) else ""
    parts.append(f'<p class="legend">{esc(GLOSSARY + shifted)}</p>')
    if inp.kind == "study":
        parts.append(_study(inp, colour))
    return "".join(parts) + "</section>"


def _study(inp: ReportInput, colour: dict[str, str]) -> str:
    assert inp.study is not None and inp.study_dir is not None
    study = inp.study
    figure = Path(inp.study_dir) / "dose_response.png"
    parts = ["<h3>Dose response</h3>"]
    drawn = figure.read_bytes() if figure.is_file() else _draw_dose_response(inp)
    if drawn:
        parts.append(img(drawn, "dose response: metrics against the swept weight"))
        parts.append('<p class="legend">Means over seeds with 95% intervals against the swept weight; dashed lines '
                     f"and bands: the baseline <b>{esc(inp.baseline)}</b>.</p>")
    else:
        parts.append(f"<p>No {esc(figure.name)} (no setting sweeps a weight, or the study has not finished).</p>")
    trade = Path(inp.study_dir) / "trade_off.png"
    parts.append("<h3>Accuracy vs EPG</h3>")
    if trade.is_file():
        parts.append(img(trade.read_bytes(), "accuracy against the energy pointing game averaged over the methods"))
        parts.append('<p class="legend">One point per setting: accuracy against the energy pointing game averaged '
                     "over the study's methods, means over seeds with 95% intervals over seeds; stars: Pareto-optimal "
                     f"settings (no other setting is better on both); dashed lines: the baseline "
                     f"<b>{esc(inp.baseline)}</b>. Numbers: trade_off.csv in the study folder.</p>")
    else:
        parts.append(f"<p>No {esc(trade.name)} yet (<code>sib study --summary-only</code> draws it).</p>")
    finished = {s["label"]: sum(1 for r in inp.runs if r.group == s["label"] and r.evaluated)
                for s in study["settings"]}
    n_seeds = len(study.get("seeds", []))
    rows = []
    for s in study["settings"]:
        dose = s.get("dose")
        rows.append(f"<tr><td>{dot(colour.get(s['label'], '#999'))}{esc(s['label'])}</td>"
                    + cell(value(s["overrides"])) + cell(format(dose, "g") if finite(dose) else "", dose, "num")
                    + cell(f"{finished[s['label']]} of {n_seeds}") + "</tr>")
    parts.append("<h3>Settings</h3>" + table([("setting", "text"), ("overrides of the base", "text"),
                                              ("dose", "num"), ("seeds evaluated", "text")], rows))
    parts.append(f'<p class="muted">base: <code>{esc(value(study.get("base", {})))}</code>; seeds '
                 f'{esc(value(study.get("seeds")))}; evaluation: <code>{esc(value(study.get("evaluate", {})))}'
                 "</code></p>")
    return "".join(parts)


def _draw_dose_response(inp: ReportInput) -> bytes | None:
    """The study's dose-response figure drawn from its runs, for a study that has not written it yet."""
    from sib.report.study_figures import dose_response

    assert inp.study is not None
    sweeps: dict[str, list[str]] = {}
    for s in inp.study["settings"]:
        if s.get("dose") is not None:
            sweeps.setdefault(f"{s['group']}: {s['dose_field']}", []).append(s["label"])
    rows, _ = compare.study_stats(inp)
    with tempfile.TemporaryDirectory() as tmp:
        path = dose_response(rows, sweeps, inp.baseline or "", Path(tmp) / "dose_response.png")
        return path.read_bytes() if path is not None else None


def _gallery_runs(inp: ReportInput, notes: list[str]) -> list[Run]:
    """The runs whose heatmaps are shown: evaluated, with weights; in a study one seed per setting."""
    runs = [r for r in inp.runs if r.evaluated and r.has_weights]
    if inp.kind == "study":
        seeds = sorted({r.seed for r in runs if r.group == inp.baseline and r.seed is not None})
        chosen: dict[str, Run] = {}
        for r in sorted(runs, key=lambda r: (r.seed != (seeds[0] if seeds else r.seed), r.seed or 0)):
            chosen.setdefault(r.group, r)
        runs = [dataclasses.replace(chosen[g], label=g) for g in inp.groups if g in chosen]
    if len(runs) > GALLERY_RUNS:
        notes.append(f"heatmaps: the first {GALLERY_RUNS} of {len(runs)} runs are shown "
                     f"(left out: {', '.join(r.label for r in runs[GALLERY_RUNS:])})")
        runs = runs[:GALLERY_RUNS]
    return runs


def _gallery(inp: ReportInput, methods: list[str] | None, n_images: int, n_differ: int, device: str,
             colour: dict[str, str], notes: list[str]) -> str:
    runs = _gallery_runs(inp, notes)
    if not runs:
        return sections_.gallery_section([], colour, "No run has an evaluation and weights: nothing to explain.")
    chosen = gallery.choose_methods(runs, methods)
    if not chosen:
        return sections_.gallery_section([], colour, "The runs' evaluations share no explanation method.")
    galleries = gallery.build(runs, chosen, n_images, n_differ, device)
    if inp.kind == "study":
        colour = {**colour, **{r.label: colour.get(r.group, "#999") for r in runs}}
    return sections_.gallery_section(galleries, colour, "The runs' evaluations share no split.")
