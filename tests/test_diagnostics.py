"""Per-epoch diagnostics and --reg-calibrate: values measured independently, state untouched, real run folders."""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sib.data import collate, create_dataset
from sib.diagnostics import DIAGNOSTIC_KEYS, calibrate, diagnostics, r_in_gt
from sib.models import create_model
from sib.regularizers import create_regularizer
from sib.run_dir import load_checkpoint
from sib.train import train


def _batches(n=2, b=8, size=32, seed=0, split="train"):
    ds = create_dataset("synthetic", None, split, image_size=size, num_samples=n * b, seed=seed)
    return [collate([ds[i] for i in range(k * b, (k + 1) * b)]) for k in range(n)]


def _bn_model(seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", 6, 32)  # conv-BN-ReLU: running statistics to protect


def _independent_ratio(model, reg, batch):
    """||d reg/d theta|| / ||d ce/d theta|| by hand, on a copy of the model in train mode."""
    model = copy.deepcopy(model).train()
    x, y, mask = batch
    x = x.clone().requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    loss = reg(x, logits, y, mask).loss
    params = list(model.parameters())
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    g_reg = torch.autograd.grad(loss, params, allow_unused=True)

    def norm(gs):
        return math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs if g is not None))

    return norm(g_reg) / norm(g_ce)


@pytest.mark.parametrize("training", [True, False])
def test_diagnostics_leave_grads_buffers_mode_and_rng_untouched(training):
    model = _bn_model()
    (batch,) = _batches(n=1)
    x, y, mask = batch
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train(training)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    values = diagnostics(model, create_regularizer("sib"), x, y, mask)

    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert model.training is training
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    # the train-mode forward it ran does move the running statistics: the restore above is what kept them
    model.train()(x)
    assert not torch.equal(model.features[0][1].running_mean, buffers["features.0.1.running_mean"])
    assert set(values) == set(DIAGNOSTIC_KEYS) and all(math.isfinite(v) for v in values.values())


@pytest.mark.parametrize("name", ["sib", "sib_logp", "rrr", "energy"])
def test_diag_values_match_independent_measurements(name):
    model = _bn_model()
    (batch,) = _batches(n=1)
    x, y, mask = batch
    reg = create_regularizer(name)
    values = diagnostics(model, reg, x, y, mask)
    assert values["diag_grad_ratio"] == pytest.approx(_independent_ratio(model, reg, batch), rel=1e-4)
    # the map by hand: S-IB's label-free VJP map, sib_logp's d log p_y/dx, RRR's d sum_k log p_k/dx,
    # Energy's d logit_y/dx (model in train mode, as the diagnostics run it)
    probe = copy.deepcopy(model).train()
    xr = x.clone().requires_grad_(True)
    logits = probe(xr)
    target = {"sib": lambda: 0.5 * (torch.softmax(logits, 1) ** 2).sum(),
              "sib_logp": lambda: torch.log_softmax(logits, 1).gather(1, y[:, None]).sum(),
              "rrr": lambda: torch.log_softmax(logits, 1).sum(),
              "energy": lambda: logits.gather(1, y[:, None]).sum()}[name]()
    (R,) = torch.autograd.grad(target, xr)
    assert values["diag_r_abs_mean"] == pytest.approx(R.abs().mean().item(), rel=1e-4)
    energy = (R ** 2).sum(1)  # (B, H, W)
    share = ((energy * mask[:, 0]).sum((1, 2)) / energy.sum((1, 2))).mean().item()
    assert values["diag_r_in_gt"] == pytest.approx(share, rel=1e-4)
    if name.startswith("sib"):
        assert 0 < values["diag_coverage"] < 1
    else:
        assert math.isnan(values["diag_coverage"])


def test_r_in_gt_hand_computed():
    R = torch.zeros(3, 2, 2, 2)
    R[0, 0] = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    R[0, 1] = torch.tensor([[0.0, 0.0], [2.0, 1.0]])  # energy sum_c R^2: [[1, 4], [4, 10]], total 19
    R[1, 0] = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # energy only at (1, 1)
    mask = torch.zeros(3, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, :] = True  # image 0: top row, 5 / 19
    mask[1, 0, 0, 0] = True  # image 1: (0, 0), where R has no energy: 0
    # image 2: empty mask, excluded
    assert r_in_gt(R, mask) == pytest.approx((5 / 19 + 0) / 2)
    assert math.isnan(r_in_gt(R, None))
    assert r_in_gt(torch.zeros(1, 3, 2, 2), mask[:1]) == pytest.approx(2 / 4)  # no energy: chance, |fg| / N


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_diagnostic_keys_in_the_log_of_regularised_runs_only(tiny_cfg, tmp_path):
    sib = train(tiny_cfg(regularizer="sib", epochs=2, profile_steps=0, out=str(tmp_path / "sib")))
    rows = _log(sib.out)
    for row in rows:
        assert all(math.isfinite(row[k]) for k in DIAGNOSTIC_KEYS), row
        assert 0 < row["diag_r_in_gt"] < 1 and row["diag_grad_ratio"] > 0
    # the same fixed batch every epoch, the model changes: the values move
    assert rows[0]["diag_r_abs_mean"] != rows[1]["diag_r_abs_mean"]
    rrr = _log(train(tiny_cfg(regularizer="rrr", profile_steps=0, out=str(tmp_path / "rrr"))).out)[0]
    assert math.isnan(rrr["diag_coverage"]) and math.isfinite(rrr["diag_grad_ratio"])
    none = _log(train(tiny_cfg(regularizer="none", profile_steps=0, out=str(tmp_path / "none"))).out)[0]
    assert not set(DIAGNOSTIC_KEYS) & set(none) and "reg_scale" not in none


@pytest.mark.parametrize("name", ["sib", "sib_logp", "rrr", "energy"])
def test_calibrate_reaches_the_target_ratio(name):
    model = _bn_model()
    batches = _batches(n=3, b=4)
    reg = create_regularizer(name)
    before = reg.weights()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    result = calibrate(model, reg, batches, 0.25)
    assert reg.weights() == result["weights"] == {k: v * result["factor"] for k, v in before.items()}
    measured = [_independent_ratio(model, reg, b) for b in batches]
    assert statistics.median(measured) == pytest.approx(0.25, rel=1e-3)
    assert result["ratios"] == pytest.approx([m / result["factor"] for m in measured], rel=1e-3)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)


def test_calibrate_refuses_a_regulariser_with_zero_gradient_and_bad_ratios():
    model = _bn_model()
    batches = _batches(n=2)
    everywhere = [(x, y, torch.ones_like(m)) for x, y, m in batches]  # all foreground: RRR penalises nothing
    with pytest.raises(ValueError, match="'rrr' cannot be calibrated.*zero"):
        calibrate(model, create_regularizer("rrr"), everywhere, 0.1, name="rrr")
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="--reg-calibrate"):
            calibrate(model, create_regularizer("sib"), batches, bad)
    with pytest.raises(ValueError, match="'none' has no weight"):
        calibrate(model, create_regularizer("none"), batches, 0.1, name="none")


def test_calibrated_run_persists_and_resume_reuses_it_bitwise(tiny_cfg, tmp_path, capsys):
    opts = dict(regularizer="sib", reg_calibrate=0.5, profile_steps=0)
    straight = train(tiny_cfg(epochs=2, out=str(tmp_path / "a"), **opts))
    train(tiny_cfg(epochs=1, out=str(tmp_path / "b"), **opts))
    saved = (tmp_path / "b" / "calibration.json").read_text()
    capsys.readouterr()
    resumed = train(tiny_cfg(epochs=2, out=str(tmp_path / "b"), resume=True, **opts))
    assert "reusing" in capsys.readouterr().out
    assert (tmp_path / "b" / "calibration.json").read_text() == saved  # not recalibrated on the trained model
    cal = json.loads(saved)
    assert cal["weights_before"] == {"sib_bg_weight": 1000.0, "sib_fg_weight": 0.01}
    assert cal["weights"]["sib_bg_weight"] == pytest.approx(1000.0 * cal["factor"])
    assert cal["median_ratio"] * cal["factor"] == pytest.approx(0.5)
    assert [r["reg_scale"] for r in _log(tmp_path / "b")] == [cal["factor"]] * 2
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["reg_scale"] == cal["factor"] and summary["reg_weights"] == cal["weights"]
    wa, wb = load_checkpoint(tmp_path / "a")["model"], load_checkpoint(tmp_path / "b")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = [{k: v for k, v in r.items() if k != "sec_per_step"} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k != "sec_per_step"} for r in resumed.history]


def test_calibration_equals_setting_the_weights_by_hand(tiny_cfg, tmp_path):
    """Calibrating leaves no trace but the weights: no RNG draw, no BatchNorm statistic, no step."""
    opts = dict(regularizer="sib", model="small_cnn", profile_steps=0, dataset_options={"num_samples": 32},
                eval_splits=[])
    cal = train(tiny_cfg(out=str(tmp_path / "cal"), reg_calibrate=0.2, **opts))
    weights = json.loads((cal.out / "calibration.json").read_text())["weights"]
    by_hand = train(tiny_cfg(out=str(tmp_path / "hand"), **weights, **opts))
    wa, wb = load_checkpoint(cal.out)["model"], load_checkpoint(by_hand.out)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_changed_or_dropped_calibration(tiny_cfg):
    train(tiny_cfg(regularizer="sib", reg_calibrate=0.5, profile_steps=0))
    for other in (None, 0.7):
        with pytest.raises(ValueError, match="reg.calibrate"):
            train(tiny_cfg(regularizer="sib", reg_calibrate=other, resume=True, epochs=2))


def _killed_before_the_first_checkpoint(run):
    """What a run killed after calibrating and before its first epoch ended leaves: no checkpoint, no log."""
    for name in ("checkpoint.pt", "best.pt", "log.jsonl", "summary.json"):
        (run / name).unlink()


def test_a_changed_configuration_is_recalibrated_when_nothing_was_trained(tiny_cfg, tmp_path, capsys):
    opts = dict(regularizer="sib", reg_calibrate=0.5, profile_steps=0, tensorboard=False, eval_splits=[])
    train(tiny_cfg(out=str(tmp_path / "cut"), **opts))
    _killed_before_the_first_checkpoint(tmp_path / "cut")
    old = json.loads((tmp_path / "cut" / "calibration.json").read_text())
    other = dict(model="small_cnn", seed=3, batch_size=8, **opts)
    capsys.readouterr()
    train(tiny_cfg(out=str(tmp_path / "cut"), resume=True, **other))
    said = capsys.readouterr().out
    assert "recalibrating" in said and "model='tiny_cnn' -> model='small_cnn'" in said and "seed=0 -> seed=3" in said
    fresh = train(tiny_cfg(out=str(tmp_path / "fresh"), **other))
    now = json.loads((tmp_path / "cut" / "calibration.json").read_text())
    assert now["factor"] == json.loads((fresh.out / "calibration.json").read_text())["factor"] != old["factor"]
    assert now["config"]["model"] == "small_cnn" and now["config"]["seed"] == 3


def test_a_calibration_of_another_configuration_is_refused_on_a_resume(tiny_cfg, tmp_path):
    opts = dict(regularizer="sib", reg_calibrate=0.5, profile_steps=0, tensorboard=False, eval_splits=[])
    train(tiny_cfg(**opts))
    path = tmp_path / "run" / "calibration.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "config": {**saved["config"], "batch_size": 4}}))  # measured elsewhere
    with pytest.raises(ValueError, match=r"calibration.json was measured under other options \(batch_size=4 -> "
                                         r"batch_size=16\).*trained"):
        train(tiny_cfg(resume=True, epochs=2, **opts))


def _object_everywhere(root, n=8, size=32):
    """An image folder of two classes whose masks cover every pixel: RRR has nothing to penalise."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for k in range(n):
            for folder, pixels in ((root / "train" / c, rng.integers(0, 255, (size, size, 3), np.uint8)),
                                   (root / "masks" / "train" / c, np.full((size, size), 255, np.uint8))):
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    return root


def test_a_failed_calibration_leaves_no_run_behind(tiny_cfg, tmp_path):
    root = _object_everywhere(tmp_path / "data")
    cfg = tiny_cfg(dataset="image_folder", root=str(root), dataset_options={}, eval_splits=[], batch_size=4,
                   regularizer="rrr", reg_calibrate=1.0, profile_steps=0, tensorboard=False)
    for _ in range(2):  # the same command again gets the same error, not "already holds a sib train run"
        with pytest.raises(ValueError, match="'rrr' cannot be calibrated.*zero"):
            train(cfg)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".sib_manifest.json"]


def test_bad_reg_calibrate_is_refused_before_anything_runs(tiny_cfg, tmp_path):
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="--reg-calibrate"):
            train(tiny_cfg(regularizer="sib", reg_calibrate=bad, out=str(tmp_path / "bad")))
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="'none' has no weight"):
        train(tiny_cfg(regularizer="none", reg_calibrate=1.0))
    res = subprocess.run([sys.executable, "-m", "sib", "train", "--regularizer", "sib", "--reg-calibrate", "-1",
                          "--out", str(tmp_path / "cli")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "--reg-calibrate -1.0: must be a positive" in res.stderr
