"""Layer-level guidance, counterexamples and annotation budgets through the real trainer (tiny runs)."""

from __future__ import annotations

import json
import math

import pytest

from sib.train import train


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_cam_layer_energy_trains_with_calibration_diagnostics_and_every(tiny_cfg):
    cfg = tiny_cfg(regularizer="energy", reg_layer="cam", reg_calibrate=1.0, every=2, epochs=2, model="small_cnn")
    result = train(cfg)
    rows = _log(result.out)
    calibration = json.loads((result.out / "calibration.json").read_text())
    assert calibration["target_ratio"] == 1.0 and math.isfinite(calibration["factor"])
    for row in rows:
        assert 0 < row["reg_steps"] < row["step"] - (row["epoch"] - 1) * (rows[0]["step"])  # --every 2
        assert 0.0 <= row["energy"] <= 1.0
        for key in ("diag_grad_ratio", "diag_r_abs_mean", "diag_r_in_gt"):
            assert math.isfinite(row[key]), key
    # the first diagnostic ratio is measured after one epoch, near the calibrated 1x
    assert 0.01 < rows[0]["diag_grad_ratio"] < 100
    saved = json.loads((result.out / "config.json").read_text())
    assert (saved["reg_layer"], saved["reg_explanation"]) == ("cam", "auto")


@pytest.mark.parametrize("options", [
    {"regularizer": "none", "counterexamples": 0.5},
    {"regularizer": "hint", "reg_layer": "features.1", "reg_mask_fraction": 0.25},
    {"regularizer": "rrr", "reg_layer": "cam", "reg_explanation": "grad_cam", "reg_annotation": "box"},
    {"regularizer": "sib", "reg_layer": "cam", "mask_source": "gt", "sib_bg_weight": 1.0, "sib_fg_weight": 1.0},
])
def test_new_settings_train_end_to_end(tiny_cfg, options):
    result = train(tiny_cfg(model="small_cnn", epochs=1, **options))
    row = _log(result.out)[0]
    assert math.isfinite(row["ce"]) and row["skipped"] == 0


@pytest.mark.parametrize("options,message", [
    ({"regularizer": "sib", "reg_mask_fraction": 0.5}, "--reg-mask-fraction .*sib .*uses no mask"),
    ({"regularizer": "sib", "mask_source": "gt", "reg_mask_fraction": 0.5}, "cannot leave images out"),
    ({"regularizer": "energy", "reg_explanation": "grad_cam"}, "grad_cam needs a layer"),
    ({"regularizer": "energy", "reg_layer": "block9"}, "--reg-layer 'block9'"),
    ({"regularizer": "none", "counterexamples": -0.1}, "--counterexamples -0.1"),
])
def test_bad_guidance_options_are_refused_naming_the_flag(tiny_cfg, options, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_cfg(model="small_cnn", epochs=1, **options))


def test_a_mask_budget_smaller_than_a_batch_trains(tiny_cfg):
    """5% of 64 images annotated: most batches of 16 hold no annotated image at all (they add 0, no error)."""
    result = train(tiny_cfg(model="small_cnn", epochs=1, regularizer="energy", reg_layer="cam",
                            reg_mask_fraction=0.05, reg_calibrate=1.0))
    row = _log(result.out)[0]
    assert row["skipped"] == 0 and math.isfinite(row["ce"]) and row["reg_steps"] == row["step"]
