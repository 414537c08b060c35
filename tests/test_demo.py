"""`sib demo --quick` end to end, through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from sib.demo import RUNS
from sib.run_dir import DEMO
from sib.train import train


def _demo(out, *flags):
    return subprocess.run([sys.executable, "-m", "sib", "demo", "--quick", "--out", str(out), "--device", "cpu",
                           *flags], capture_output=True, text=True, timeout=600)


def test_quick_demo_prints_and_writes_the_comparison_and_runs_again_with_overwrite(tmp_path):
    out = tmp_path / "demo"
    res = _demo(out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| split | method | metric | ce | ce_ci95 | sib_minus_ce | l1_cam_cal_minus_ce | ce_reseed_minus_ce |" \
        in res.stdout
    # the last line printed is the report's path, and the page is there
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("open the report: ") and last.endswith("index.html")
    assert (out / "report" / "index.html").samefile(last.removeprefix("open the report: "))
    rows = json.loads((out / "comparison.json").read_text())
    keys = {(r["split"], r["method"], r["metric"]) for r in rows}
    for split in ("test", "test_shifted"):
        assert (split, "-", "accuracy") in keys
        assert (split, "grad_cam", "energy_pointing_game") in keys
        assert (split, "saliency", "energy_pointing_game") in keys
    # each column comes from its own run's evaluation summary, not from the comparison table itself
    runs = {name: {(r["split"], r["method"], r["metric"]): r["value"]
                   for r in json.loads((out / name / "eval" / "summary.json").read_text())} for name in RUNS}
    assert len(rows) == len(runs["ce"]) == len(runs["sib"]) == len(runs["l1_cam_cal"]) == len(runs["ce_reseed"])
    for r in rows:
        key = (r["split"], r["method"], r["metric"])
        assert r["ce"] == runs["ce"][key]
        for name in ("sib", "l1_cam_cal", "ce_reseed"):
            assert r[name] == runs[name][key] and r[f"{name}_minus_ce"] == runs[name][key] - runs["ce"][key]
    for split in ("test", "test_shifted"):
        with Image.open(out / f"heatmaps_{split}.png") as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300
    configs = {run: json.loads((out / run / "config.json").read_text()) for run in RUNS}
    assert {run: (c["regularizer"], c["seed"], c["reg_calibrate"]) for run, c in configs.items()} == {
        "ce": ("none", 0, None), "sib": ("sib", 0, None), "l1_cam_cal": ("l1", 0, 1.0),
        "ce_reseed": ("none", 1, None)}
    assert configs["l1_cam_cal"]["reg_layer"] == "cam"
    assert (out / "l1_cam_cal" / "calibration.json").is_file()
    assert "Read with the reseeded run." in (out / "report" / "index.html").read_text()
    # a second demo into the same folder is refused without --overwrite
    again = subprocess.run([sys.executable, "-m", "sib", "demo", "--quick", "--out", str(out)], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # `make demo` twice: --overwrite replaces the demo's files and keeps the user's
    (out / "notes.txt").write_text("mine")
    (out / "ce" / "notes.txt").write_text("mine too")
    ce_log = (out / "ce" / "log.jsonl").read_text()
    res = _demo(out, "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine" and (out / "ce" / "notes.txt").read_text() == "mine too"
    assert (out / "ce" / "log.jsonl").read_text() != ce_log  # rewritten (each row carries its measured step time)
    assert (out / "comparison.json").is_file()


def test_demo_without_overwrite_leaves_an_existing_run_alone(tmp_path, make_tiny_config):
    """The demo used to pass overwrite=True to its sub-runs, wiping `out/ce` without being asked."""
    out = tmp_path / "demo"
    train(make_tiny_config(out / "ce", profile_steps=0))
    (out / "ce" / "thesis.tex").write_text("chapter 1")
    before = {p: p.read_bytes() for p in (out / "ce").rglob("*") if p.is_file()}  # tensorboard/ too
    res = _demo(out)
    assert res.returncode == 2 and "sib demo: error: --out" in res.stderr and "choose another --out" in res.stderr
    assert {p: p.read_bytes() for p in (out / "ce").rglob("*") if p.is_file()} == before


def test_demo_folder_kind_knows_the_demo_runs():
    assert set(DEMO.children) == set(RUNS)
