"""Non-finite attributions are "invalid": NaN from every metric, counted apart from "excluded" (empty mask).

Issue 8, item 8: before, one NaN pixel gave NaN for EPG and relevance mass (counted as "excluded"), 0.0 for
the pointing game and finite numbers for rank accuracy, top-k IoU, AUROC and the faithfulness metrics.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sib.config import EvalConfig
from sib.demo import demo_configs
from sib.evaluate import SUMMARY_COLUMNS, _evaluate_batch, evaluate, summarise
from sib.metrics import METRICS
from sib.metrics import functional as MF
from sib.models import create_model
from sib.train import train

B = 5  # samples: 0 one NaN pixel, 1 one +inf pixel, 2 one -inf pixel, 3 finite, 4 finite with an empty mask


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", 3).eval()
    x = torch.randn(B, 3, 16, 16, generator=g)
    attr = torch.randn(B, 1, 16, 16, generator=g)
    attr[0, 0, 3, 4], attr[1, 0, 7, 7], attr[2, 0, 0, 0] = math.nan, math.inf, -math.inf
    mask = torch.zeros(B, 1, 16, 16, dtype=torch.bool)
    mask[:4, :, 4:10, 4:12] = True
    return model, x, attr, mask, torch.arange(B) % 3


@pytest.mark.parametrize("name", sorted(METRICS.names()))
def test_every_metric_gives_nan_for_a_non_finite_map(name):
    spec = METRICS.get(name)
    model, x, attr, mask, y = batch()
    values = spec.fn(attr, mask, model=model, x=x, target=y)
    assert torch.isnan(values[:3]).all(), f"{name}: {values[:3].tolist()} for maps with NaN / +inf / -inf"
    assert not math.isnan(values[3])
    assert math.isnan(values[4]) == spec.uses_mask  # the empty mask: excluded where the mask matters
    # the invalid samples do not change the others' values (a finite map in their place gives the same)
    clean = attr.clone()
    clean[:3] = 0.0
    torch.testing.assert_close(spec.fn(clean, mask, model=model, x=x, target=y)[3:], values[3:], equal_nan=True)
    assert MF.finite_rows(attr).tolist() == [False, False, False, True, True]


def test_deletion_curve_row_is_nan_for_a_non_finite_map():
    model, x, attr, mask, y = batch()
    curve = MF.deletion_curve(attr, model=model, x=x, target=y, n_steps=4)
    assert torch.isnan(curve[:3]).all() and not torch.isnan(curve[3:]).any()


@pytest.mark.parametrize("name", sorted(METRICS.names()))
def test_accumulating_metrics_count_invalid_apart_from_excluded(name):
    spec = METRICS.get(name)
    metric = spec.module(num_classes=3) if name == "pointing_game" else spec.module()
    model, x, attr, mask, y = batch()
    metric.update(attr, mask, model=model, x=x, target=y)
    assert metric.invalid.item() == 3
    assert metric.excluded.item() == (1 if spec.uses_mask else 0)
    if name != "pointing_game":  # (class mean: checked by hand in test_modules)
        finite = spec.fn(attr, mask, model=model, x=x, target=y)[3:]
        torch.testing.assert_close(metric.compute().float(), finite.nanmean())


class NaNInputGradient(torch.autograd.Function):
    """Identity forward; backward puts a NaN into the input gradient of sample 0 (a broken explainer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[0, 0, 2, 2] = math.nan
        return grad


def test_evaluator_rows_and_summary_count_invalid_per_method():
    model, x, _, mask, y = batch()
    # gradients w.r.t. the input (saliency) see the NaN; the CAM's layer gradient does not
    model.register_forward_pre_hook(lambda module, args: (NaNInputGradient.apply(args[0]),))
    metrics = ["energy_pointing_game", "pointing_game", "auroc", "deletion_auc"]
    rows = _evaluate_batch(model, x, y, mask, ["saliency", "grad_cam"], metrics, "label")
    for r in rows:
        r["split"] = "test"
    status = {(r["method"], r["metric"], r["index"]): r["status"] for r in rows}
    for metric in metrics:
        uses_mask = METRICS.get(metric).uses_mask
        assert status[("saliency", metric, 0)] == "invalid"
        assert status[("grad_cam", metric, 0)] == "ok"
        assert status[("saliency", metric, 4)] == status[("grad_cam", metric, 4)] == (
            "excluded" if uses_mask else "ok")
        assert all(status[(m, metric, i)] == "ok" for m in ("saliency", "grad_cam") for i in (1, 2, 3))
    assert all(r["status"] == "ok" for r in rows if r["metric"] == "accuracy")
    summary = {(r["method"], r["metric"]): r for r in summarise(rows, "run")}
    for metric in metrics:
        masked = int(METRICS.get(metric).uses_mask)
        sal, cam = summary[("saliency", metric)], summary[("grad_cam", metric)]
        assert (sal["n"], sal["excluded"], sal["invalid"]) == (B - 1 - masked, masked, 1)
        assert (cam["n"], cam["excluded"], cam["invalid"]) == (B - masked, masked, 0)
    assert SUMMARY_COLUMNS[SUMMARY_COLUMNS.index("excluded") + 1] == "invalid"


def test_summary_file_states_invalid_and_the_tolerance_used(tmp_path, make_tiny_config):
    """A real run at 32 px: summary.md has the invalid column and the pointing game's radius, 2 px."""
    run = tmp_path / "run"
    train(make_tiny_config(run, epochs=1))
    ev = evaluate(EvalConfig(checkpoint=str(run), splits=["test"], methods=["grad_cam"], max_images=16,
                             metrics=["energy_pointing_game", "pointing_game"], batch_size=16, device="cpu",
                             out=str(tmp_path / "ev")))
    header = (ev.out / "summary.md").read_text().splitlines()[0]
    assert "| excluded | invalid | tolerance_px |" in header
    by_metric = {r["metric"]: r for r in json.loads((ev.out / "summary.json").read_text())}
    assert by_metric["pointing_game"]["tolerance_px"] == 2 == MF.default_tolerance(32, 32)
    assert by_metric["energy_pointing_game"]["tolerance_px"] is None and by_metric["pointing_game"]["invalid"] == 0
    rows = [json.loads(line) for line in (ev.out / "per_image.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows if "value" in r} == {"ok"}


def test_demo_relies_on_the_scaled_default_tolerance():
    _, ev = demo_configs(quick=False, seed=0, device="cpu", epochs=None)
    assert "pointing_game" in ev.metrics and "pointing_game" not in ev.metric_options
    assert MF.default_tolerance(64, 64) == 4  # what the demo passed explicitly before
