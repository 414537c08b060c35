"""`sib report`: the HTML page of real tiny runs, read as HTML and opened from disk in headless Chromium.

The browser test drives Debian's `chromium` (or the executable named by SIB_CHROMIUM) with Playwright: the system
browser, never a download. Where the browser or Playwright is missing it is skipped on a developer's machine and
FAILS under CI (environment variable CI set): .ci/run installs the browser, the test extra installs Playwright.
Its full-page screenshot is kept in the test's tmp folder, and copied to $SIB_ARTEFACTS when that is set.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from sib.config import EvalConfig
from sib.evaluate import evaluate
from sib.report import sections
from sib.report.html import write_report
from sib.report.inputs import ReportInput, Run
from sib.train import train

SPLITS = ["test", "test_shifted"]
METHODS = ["grad_cam", "saliency"]
N_IMAGES, N_DIFFER = 3, 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory, make_tiny_config):
    """CE and S-IB, one epoch each on 32 px synthetic images, evaluated on 16 images of two splits."""
    root = tmp_path_factory.mktemp("pair")
    for name, regularizer in (("ce", "none"), ("sib", "sib")):
        train(make_tiny_config(root / name, regularizer=regularizer, profile_steps=0, tensorboard=False))
        evaluate(EvalConfig(checkpoint=str(root / name), splits=SPLITS, methods=METHODS,
                            metrics=["energy_pointing_game"], max_images=16, device="cpu"))
    return root


@pytest.fixture(scope="module")
def report(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    return write_report([pair / "ce", pair / "sib"], out, n_images=N_IMAGES, n_differ=N_DIFFER)


class Page(HTMLParser):
    """The parts of the page the tests read: images, tables (rows of cells with attributes), scripts, links."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, list[list[tuple[dict[str, str], str]]]] = {}
        self.external: list[str] = []
        self._table: str | None = None
        self._cell: tuple[dict[str, str], list[str]] | None = None
        self._in_body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        if tag in ("script", "link", "iframe") and (a.get("src") or a.get("href", "data:")).split(":")[0] != "data":
            self.external.append(f"{tag} {a}")
        if tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_body and self._table:
            self._cell = (a, [])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)


def _summary(run: Path) -> dict[tuple[str, str, str], dict]:
    return {(r["split"], r["method"], r["metric"]): r for r in json.loads((run / "eval" / "summary.json").read_text())}


def _run_level_keys(run: Path) -> set[str]:
    """Per-run rows of the table: the last epoch's diagnostics and summary.json's time per step."""
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    keys = {k for k, v in last.items() if k.startswith("diag_") and isinstance(v, float) and math.isfinite(v)}
    return keys | {"sec_per_step"}


def _epg(run: Path) -> dict[tuple[str, str, int], float]:
    rows = [json.loads(line) for line in (run / "eval" / "per_image.jsonl").read_text().splitlines() if line]
    return {(r["split"], r["method"], r["index"]): r["value"] for r in rows
            if r.get("metric") == "energy_pointing_game" and r.get("status") == "ok"}


# ------------------------------------------------------------------------------------------ HTML, no browser

def test_report_holds_every_comparison_row_with_values_from_the_evaluations(pair, report):
    page = Page(report.read_text())
    ce, sib = _summary(pair / "ce"), _summary(pair / "sib")
    rows = page.tables["comparison-table"]
    by_key = {(r[0][1], r[1][1], r[2][1], r[3][1]): r for r in rows}
    expected = {("sib", *k) for k in sib} | {("sib", "-", "-", k) for k in _run_level_keys(pair / "sib")}
    assert set(by_key) == expected and len(rows) == len(expected)
    for key, s in sib.items():
        cells = by_key[("sib", *key)]
        base, value, diff = (float(cells[i][0]["data-sort"]) for i in (4, 6, 8))
        assert base == pytest.approx(ce[key]["value"], abs=1e-12)
        assert value == pytest.approx(s["value"], abs=1e-12)
        assert diff == pytest.approx(s["value"] - ce[key]["value"], abs=1e-12)
    # a difference without an interval (one run each: time per step) is never coloured
    step = by_key[("sib", "-", "-", "sec_per_step")]
    assert step[8][1] and step[9][1] == "" and "pos" not in step[8][0]["class"] and "neg" not in step[8][0]["class"]


def test_report_is_self_contained_and_every_image_is_a_png(report):
    text = report.read_text()
    page = Page(text)
    assert page.external == [] and "http://" not in text and "https://" not in text
    assert len(page.images) > 20
    for im in page.images:
        prefix = "data:image/png;base64,"
        assert im["src"].startswith(prefix), im.get("alt")
        with Image.open(io.BytesIO(base64.b64decode(im["src"][len(prefix):]))) as png:
            assert png.format == "PNG" and png.width > 0 and png.height > 0
    assert sorted(p.name for p in report.parent.iterdir()) == [".sib_manifest.json", "index.html"]


def test_gallery_has_one_tile_per_image_run_method_and_the_images_that_differ_most(pair, report):
    page = Page(report.read_text())
    same = [(i["data-split"], i["data-image"], i["data-run"], i["data-method"]) for i in page.images
            if i.get("data-tile") == "same"]
    assert len(same) == len(set(same)) == len(SPLITS) * N_IMAGES * 2 * len(METHODS)
    assert {(s, int(i)) for s, i, _, _ in same} == {(s, i) for s in SPLITS for i in range(N_IMAGES)}
    # "where they differ most": the images with the largest |EPG(sib) - EPG(ce)|, from per_image.jsonl here
    ce, sib = _epg(pair / "ce"), _epg(pair / "sib")
    for split in SPLITS:
        for method in METHODS:
            spread = sorted((abs(sib[k] - ce[k]) for k in ce if k in sib and k[:2] == (split, method)), reverse=True)
            shown = {int(i["data-image"]) for i in page.images
                     if i.get("data-tile") == "differ" and (i["data-split"], i["data-method"]) == (split, method)}
            assert len(shown) == N_DIFFER
            got = sorted((abs(sib[(split, method, i)] - ce[(split, method, i)]) for i in shown), reverse=True)
            assert got == pytest.approx(spread[:N_DIFFER], abs=1e-12)


def test_configuration_differences_name_the_regulariser(report):
    page = Page(report.read_text())
    differing = [t for t in page.tables.values() if t and t[0][0][1] == "regularizer"]
    assert [[c[1] for c in row] for row in differing[0]] == [["regularizer", "none", "sib"]]


def _row(run, diff, low, high):
    return {"run": run, "split": "test", "method": "grad_cam", "metric": "energy_pointing_game", "base": 0.5,
            "base_low": 0.4, "base_high": 0.6, "value": 0.5 + diff, "low": 0.4, "high": 0.6, "diff": diff,
            "diff_low": low, "diff_high": high, "boot_low": low, "boot_high": high, "n": 10}


def test_difference_is_coloured_by_sign_only_where_its_interval_excludes_zero():
    rows = [_row("up", 0.2, 0.1, 0.3), _row("down", -0.2, -0.3, -0.1), _row("across", 0.05, -0.1, 0.2),
            _row("no interval", 0.3, math.nan, math.nan), _row("touches", 0.1, 0.0, 0.2)]
    inp = ReportInput("runs", [], [Run("base", Path("base"), "base")], "base")
    table = Page(sections.comparison_section(inp, rows, {})).tables["comparison-table"]
    classes = {r[0][1]: r[8][0]["class"].split() for r in table}
    assert classes == {"up": ["num", "pos"], "down": ["num", "neg"], "across": ["num"], "no interval": ["num"],
                       "touches": ["num"]}


def test_invalid_maps_are_said_in_the_comparison_table():
    rows = [{**_row("all invalid", math.nan, math.nan, math.nan), "value": math.nan, "invalid": 12},
            {**_row("some invalid", 0.1, 0.0, 0.2), "invalid": 4}, _row("none", 0.1, 0.0, 0.2)]
    inp = ReportInput("runs", [], [Run("base", Path("base"), "base")], "base")
    table = Page(sections.comparison_section(inp, rows, {})).tables["comparison-table"]
    cells = {r[0][1]: (r[6][1], r[10][1]) for r in table}
    assert cells == {"all invalid": ("invalid", "10 (12 invalid)"), "some invalid": ("0.6000", "10 (4 invalid)"),
                     "none": ("0.6000", "10")}


def test_bad_inputs_are_named(tmp_path, pair):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"photos: not a run, demo or study folder \(it holds: cat.jpg\)"):
        write_report([tmp_path / "photos"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        write_report([pair / "ce", tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(ValueError, match="cat.jpg: a file, not a folder"):
        write_report([tmp_path / "photos" / "cat.jpg"], tmp_path / "out")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text('{"settings": [], "seeds": [0]}')
    with pytest.raises(ValueError, match="study is a study folder: report a study on its own"):
        write_report([pair / "ce", tmp_path / "study"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for bad input
    res = subprocess.run([sys.executable, "-m", "sib", "report", str(tmp_path / "photos"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("sib report: error: report input ")
    assert str(tmp_path / "photos") in res.stderr and not (tmp_path / "out").exists()


def test_labels_are_literal_text_and_a_failed_report_leaves_no_folder(tmp_path, pair, make_tiny_config):
    odd = tmp_path / "cost_$5_vs_$10"  # matplotlib would read $5_vs_$ as TeX and fail on it
    shutil.copytree(pair / "sib", odd)
    res = subprocess.run([sys.executable, "-m", "sib", "report", str(pair / "ce"), str(odd), "--out",
                          str(tmp_path / "r"), "--images", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cost_$5_vs_$10" in (tmp_path / "r" / "index.html").read_text()
    # a report that fails after its folder was made (here: the gallery cannot load a damaged checkpoint)
    broken = tmp_path / "broken"
    shutil.copytree(pair / "sib", broken)
    (broken / "best.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        existed = out.exists()
        res = subprocess.run([sys.executable, "-m", "sib", "report", str(pair / "ce"), str(broken), "--out", str(out),
                              "--images", "1"], capture_output=True, text=True, timeout=600)
        assert res.returncode == 2 and "best.pt" in res.stderr, res.stderr[-2000:]
        assert out.exists() == existed and (not existed or not any(out.iterdir())), out  # left as it was


def test_output_folder_rules(tmp_path, pair):
    out = tmp_path / "r"
    write_report([pair / "ce"], out, n_images=1, n_differ=0)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_report([pair / "ce"], out, n_images=1, n_differ=0)
    write_report([pair / "ce"], out, n_images=1, n_differ=0, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "index.html").is_file()
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>my page</p>")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="index.html that sib did not write"):
            write_report([pair / "ce"], site, overwrite=overwrite)
    assert (site / "index.html").read_text() == "<p>my page</p>"
    with pytest.raises(FileExistsError, match="not a report one"):
        write_report([pair / "ce"], pair / "sib", overwrite=True)


def test_one_run_report_has_values_and_no_differences(tmp_path, pair):
    page = Page(write_report([pair / "sib"], tmp_path / "one", n_images=1, n_differ=2).read_text())
    rows = page.tables["comparison-table"]
    assert {len(r) for r in rows} == {7}  # run, split, method, metric, value, 95% CI, images
    assert not [i for i in page.images if i.get("data-tile") == "differ"]
    assert len([i for i in page.images if i.get("data-tile") == "same"]) == len(SPLITS) * len(METHODS)


def test_a_run_without_evaluation_is_named_and_the_table_compares_the_others(tmp_path, pair, make_tiny_config):
    train(make_tiny_config(tmp_path / "fresh", profile_steps=0, tensorboard=False))
    text = write_report([tmp_path / "fresh", pair / "sib"], tmp_path / "r", n_images=1, n_differ=1).read_text()
    page = Page(text)
    assert f"fresh: no evaluation in {tmp_path / 'fresh' / 'eval'}" in text
    assert {r[0][1] for r in page.tables["comparison-table"]} == {"sib"}
    assert {len(r) for r in page.tables["comparison-table"]} == {7}  # one evaluated run: values, no differences
    assert {i["data-run"] for i in page.images if i.get("data-tile")} == {"sib"}
    assert [r[0][1] for r in page.tables["runs-table"]] == ["fresh", "sib"]  # its configuration and curves stay


def test_a_reseeded_baseline_is_named_as_retraining_noise(tmp_path, pair, make_tiny_config):
    """A run with the baseline's configuration and another seed (the demo's ce_reseed) measures what
    retraining alone moves; the page says so in its verdict and tells the reader to compare against it."""
    seed = json.loads((pair / "ce" / "config.json").read_text())["seed"]
    again = tmp_path / "again"
    train(make_tiny_config(again, regularizer="none", seed=seed + 1, profile_steps=0, tensorboard=False))
    evaluate(EvalConfig(checkpoint=str(again), splits=SPLITS, methods=METHODS, metrics=["energy_pointing_game"],
                        max_images=16, device="cpu"))
    text = write_report([pair / "ce", pair / "sib", again], tmp_path / "r", n_images=1, n_differ=0).read_text()
    verdicts = [li for li in text.split("<li>")[1:] if " vs ce" in li]
    assert len(verdicts) == 2
    assert "retraining noise" in next(v for v in verdicts if "<b>again</b>" in v)
    assert "retraining noise" not in next(v for v in verdicts if "<b>sib</b>" in v)
    assert '<p class="caution"><b>Read with the reseeded run.</b> <b>again</b> trained' in text
    # the S-IB run differs in its regulariser, so a two-run report has no such note
    assert "Read with the reseeded run" not in write_report([pair / "ce", pair / "sib"], tmp_path / "r2",
                                                            n_images=1, n_differ=0).read_text()


# ------------------------------------------------------------------------------------------ real browser

def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _browser() -> str:
    """The system Chromium and Playwright, or a skip (a failure under CI)."""
    exe = os.environ.get("SIB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    missing = []
    if exe is None:
        missing.append("Debian's chromium (apt-get install chromium; .ci/run installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install -e '.[test]')")
    if missing:
        why = "the browser test needs " + " and ".join(missing)
        if _ci():
            pytest.fail(f"{why}; CI is set, where a skip counts as a failure", pytrace=False)
        pytest.skip(why)
    return exe


def _column(page, col: int) -> list[str]:
    js = f"rows => rows.map(r => r.cells[{col}].dataset.sort ?? r.cells[{col}].textContent)"
    return page.eval_on_selector_all("#comparison-table tbody tr", js)


def test_report_in_headless_chromium(pair, report, tmp_path):
    exe = _browser()
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(report.resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "ims => ims.map(i => [i.alt, i.complete, i.naturalWidth])")
            assert len(images) > 20 and [i for i in images if not (i[1] and i[2] > 0)] == []

            n_rows = len(_summary(pair / "sib")) + len(_run_level_keys(pair / "sib"))
            assert page.locator("#comparison-table tbody tr").count() == n_rows
            # metric (text): the table lists accuracy again after each split's explanation rows, so it is unsorted
            before = _column(page, 3)
            assert before != sorted(before)
            page.click("#comparison-table thead th:nth-child(4)")
            after = _column(page, 3)
            assert after == sorted(before) and page.get_attribute(
                "#comparison-table thead th:nth-child(4)", "aria-sort") == "ascending"
            # Δ (numbers): ascending, blanks last; a second click: descending
            delta = "#comparison-table thead th:nth-child(9)"
            assert page.inner_text(delta).startswith("Δ")
            for order in (1, -1):
                page.click(delta)
                column = _column(page, 8)
                values = [float(v) for v in column if v != ""]
                assert values == sorted(values, key=lambda v: order * v) and len(values) >= 6
                assert column[len(values):] == [""] * (n_rows - len(values))  # blanks last
            page.fill("input.filter", "saliency test_shifted")
            assert page.locator("#comparison-table tbody tr:not([hidden])").count() == 1

            tiles = page.eval_on_selector_all(
                "img[data-tile=same]", "ims => ims.map(i => [i.dataset.split, i.dataset.image, i.dataset.run, "
                                       "i.dataset.method, i.getBoundingClientRect().width])")
            assert len({tuple(t[:4]) for t in tiles}) == len(tiles) == len(SPLITS) * N_IMAGES * 2 * len(METHODS)
            assert min(t[4] for t in tiles) >= 64  # upscaled for the eye, not shown at 32 px
            page.fill("input.filter", "")
            page.evaluate("window.scrollTo(0, 0)")  # the sticky bar and headers where a reader first sees them
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True, timeout=120_000)
        finally:
            browser.close()
    assert problems == []
    with Image.open(shot) as im:
        assert im.width >= 1400 and im.height > 2000
    if os.environ.get("SIB_ARTEFACTS"):
        dest = Path(os.environ["SIB_ARTEFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "report.png")


# ------------------------------------------------------------------------------------------ a study

@pytest.mark.slow
def test_study_report_has_the_dose_response_the_settings_and_the_study_statistics(tmp_path):
    import yaml

    from sib.study import run_study

    base = {"dataset": "synthetic", "model": "tiny_cnn", "image_size": 32, "batch_size": 16, "epochs": 1, "lr": 0.01,
            "dataset_options": {"num_samples": 64}, "device": "cpu", "eval_splits": ["test"], "profile_steps": 0,
            "tensorboard": False}
    study = {"base": base, "seeds": [0, 1], "baseline": "ce",
             "evaluate": {"splits": ["test"], "methods": ["saliency"], "metrics": ["energy_pointing_game"],
                          "max_images": 16},
             "settings": [{"label": "ce", "regularizer": "none"},
                          {"label": "sib", "regularizer": "sib", "sweep": {"sib_bg_weight": [1000.0, 100000.0]},
                           "sweep_labels": ["x1", "x100"]}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    run_study(tmp_path / "study.yaml", tmp_path / "study")
    stats = json.loads((tmp_path / "study" / "summary.json").read_text())
    expected = {(s["setting"], s["split"], s["method"], s["metric"]): s for s in stats if s["setting"] != "ce"}

    def check(page: Page) -> None:
        rows = {tuple(c[1] for c in r[:4]): r for r in page.tables["comparison-table"]}
        assert set(rows) == set(expected)
        for key, s in expected.items():
            mean, diff = (rows[key][i][0]["data-sort"] for i in (6, 8))
            assert float(mean) == pytest.approx(s["mean"], abs=1e-12)
            assert (diff == "" and not math.isfinite(s["diff"])) or float(diff) == pytest.approx(s["diff"], abs=1e-12)
        assert [i["alt"] for i in page.images].count("dose response: metrics against the swept weight") == 1
        tiles = {(i["data-image"], i["data-run"], i["data-method"]) for i in page.images
                 if i.get("data-tile") == "same"}
        assert tiles == {(str(k), run, "saliency") for k in range(2) for run in ("ce", "sib/x1", "sib/x100")}
        settings = [t for t in page.tables.values() if t and t[0][0][1] == "ce" and len(t[0]) == 4]
        assert [[c[1] for c in row][-1] for row in settings[0]] == ["2 of 2"] * 3

    page = Page(write_report([tmp_path / "study"], tmp_path / "report", n_images=2, n_differ=1).read_text())
    check(page)
    trade = "accuracy against the energy pointing game averaged over the methods"
    assert [i["alt"] for i in page.images].count(trade) == 1
    # a study still running (no summary.json, no figure yet): the same table from its runs, and the figure drawn
    for name in ("summary.json", "summary.csv", "summary.md", "dose_response.png", "trade_off.png"):
        (tmp_path / "study" / name).unlink()
    text = write_report([tmp_path / "study"], tmp_path / "report", n_images=2, n_differ=1, overwrite=True).read_text()
    check(Page(text))
    assert "summary.json not written yet" in text
    assert "No trade_off.png yet" in text and trade not in text
