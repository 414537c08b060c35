"""`sib demo --quick` end to end, through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def test_quick_demo_prints_and_writes_the_comparison(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "sib", "demo", "--quick", "--out", str(out), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| split | method | metric | ce | sib | sib_minus_ce |" in res.stdout
    rows = json.loads((out / "comparison.json").read_text())
    keys = {(r["split"], r["method"], r["metric"]) for r in rows}
    for split in ("test", "test_shifted"):
        assert (split, "-", "accuracy") in keys
        assert (split, "grad_cam", "energy_pointing_game") in keys
        assert (split, "saliency", "energy_pointing_game") in keys
    for r in rows:
        assert abs(r["sib_minus_ce"] - (r["sib"] - r["ce"])) < 1e-12
    for split in ("test", "test_shifted"):
        with Image.open(out / f"heatmaps_{split}.png") as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300
    for run in ("ce", "sib"):
        assert json.loads((out / run / "config.json").read_text())["regularizer"] == {"ce": "none", "sib": "sib"}[run]
    # a second demo into the same folder is refused without --overwrite
    again = subprocess.run([sys.executable, "-m", "sib", "demo", "--quick", "--out", str(out)], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr
