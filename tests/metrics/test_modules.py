"""The METRICS registry, its calling convention, and the accumulating torchmetrics forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from sib.metrics import METRICS, MetricSpec, modules
from sib.metrics import functional as MF
from sib.models import create_model
from sib.registry import UnknownNameError

REQUIRED = ["energy_pointing_game", "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
            "topk_iou", "auroc", "deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"]


def inputs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", 3).eval()
    x = torch.randn(b, 3, 16, 16, generator=g)
    attr = torch.randn(b, 1, 16, 16, generator=g)
    mask = torch.rand(b, 1, 16, 16, generator=g) > 0.6
    mask[1] = False  # one excluded sample
    return model, x, attr, mask, torch.arange(b) % 3


def test_registry_holds_every_metric_with_its_function():
    assert set(REQUIRED) <= set(METRICS.names())
    for name in METRICS.names():
        spec = METRICS.get(name)
        assert isinstance(spec, MetricSpec) and spec.name == name
        assert spec.reduction in ("mean", "class_mean") and issubclass(spec.module, Metric)
        assert spec.fn.__name__ == name and getattr(MF, name) is not None
    assert METRICS.get("pointing_game").reduction == "class_mean"
    assert [n for n in METRICS.names() if METRICS.get(n).needs_model] == [
        "average_drop", "deletion_auc", "increase_in_confidence", "insertion_auc"]
    higher = {n: METRICS.get(n).higher_is_better for n in METRICS.names()}
    assert not higher["deletion_auc"] and not higher["average_drop"] and higher["insertion_auc"]


def test_unknown_metric_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: .*auroc.*pointing_game"):
        METRICS.get("iou")


def _blur(img: torch.Tensor) -> torch.Tensor:
    """RISE's blur of one image (C, H, W): 11x11 Gaussian, sigma 5, reflect padding, written out by hand."""
    r = torch.arange(11, dtype=torch.float32) - 5
    k = torch.exp(-(r**2) / 50.0)
    k = k / k.sum()
    pad = F.pad(img[None], (5, 5, 5, 5), mode="reflect")[0]
    rows = torch.stack([(pad[:, i:i + 11, :] * k[None, :, None]).sum(1) for i in range(img.shape[1])], 1)
    return torch.stack([(rows[:, :, j:j + 11] * k).sum(2) for j in range(img.shape[2])], 2)


def reference(name: str, model, x: torch.Tensor, attr: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> list:
    """Each metric's definition evaluated one sample at a time with plain loops and sorting, for continuous
    (tie-free) maps and the registry's default options; NaN where a localisation metric's mask is empty."""

    def prob(img: torch.Tensor, c: int) -> float:
        with torch.no_grad():
            return model(img[None]).softmax(1)[0, c].item()

    out = []
    for a, m, xi, c in zip(attr[:, 0], mask[:, 0], x, y.tolist(), strict=True):
        a, fg, n = a.flatten(), m.flatten(), a.numel()
        order = sorted(range(n), key=lambda p, a=a: -a[p].item())  # descending, tie-free
        fg_set = set(torch.nonzero(fg).flatten().tolist())
        if name in ("deletion_auc", "insertion_auc"):
            src, dst = (_blur(xi), xi) if name == "insertion_auc" else (xi, torch.zeros_like(xi))
            curve = []
            for s in range(21):  # n_steps = 20: the top floor(s * n / 20) pixels changed
                img = src.clone().flatten(1)
                idx = order[:s * n // 20]
                img[:, idx] = dst.flatten(1)[:, idx]
                curve.append(prob(img.view_as(xi), c))
            out.append(sum((curve[i] + curve[i + 1]) / 2 for i in range(20)) / 20)
        elif name in ("average_drop", "increase_in_confidence"):
            e = (a - a.min()) / (a.max() - a.min())
            y_, o = prob(xi, c), prob(xi * e.view(1, *xi.shape[1:]), c)
            out.append(max(0.0, y_ - o) / y_ if name == "average_drop" else float(o > y_))
        elif not fg_set:
            out.append(math.nan)
        elif name == "energy_pointing_game":
            pos = a.clamp(min=0)
            out.append((pos * fg).sum().item() / pos.sum().item())
        elif name == "relevance_mass_accuracy":
            out.append((a.abs() * fg).sum().item() / a.abs().sum().item())
        elif name == "relevance_rank_accuracy":
            out.append(len(set(order[:len(fg_set)]) & fg_set) / len(fg_set))
        elif name == "topk_iou":
            k = round(0.25 * n)
            out.append(len(set(order[:k]) & fg_set) / len(set(order[:k]) | fg_set))
        elif name == "auroc":
            pos, neg = a[fg], a[~fg]
            out.append((pos[:, None] > neg[None, :]).float().mean().item())
        elif name == "pointing_game":  # 16 px: the default radius is round(15 * 16 / 224) = 1 px
            w = attr.shape[-1]
            py, px = divmod(order[0], w)
            out.append(float(any((py - q // w) ** 2 + (px - q % w) ** 2 <= 1 for q in fg_set)))
    return out


@pytest.mark.parametrize("name", REQUIRED)
def test_evaluator_calling_convention(name):
    model, x, attr, mask, y = inputs()
    spec = METRICS.get(name)
    values = spec.fn(attr, mask, model=model, x=x, target=y)  # the evaluator's call, for every metric
    assert values.shape == (4,) and values.dtype == torch.float32
    if not spec.needs_model:  # localisation metrics take (attr, mask) alone
        torch.testing.assert_close(spec.fn(attr, mask), values, equal_nan=True)
    # the registered function computes the metric its name says, with the documented defaults
    torch.testing.assert_close(values, torch.tensor(reference(name, model, x, attr, mask, y)), rtol=1e-4,
                               atol=1e-5, equal_nan=True)
    assert math.isnan(values[1]) == spec.uses_mask  # empty mask: excluded where the mask matters


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "pointing_game"])
def test_accumulated_mean_equals_nanmean_of_functional(name):
    spec = METRICS.get(name)
    metric = spec.module()
    seen = []
    for seed in (0, 1, 2):
        model, x, attr, mask, y = inputs(seed=seed)
        metric.update(attr, mask, model=model, x=x, target=y)
        kw = {"model": model, "x": x, "target": y} if spec.needs_model else {}
        seen.append(getattr(MF, name)(attr, mask, **kw))
    values = torch.cat(seen)
    torch.testing.assert_close(metric.compute().float(), values.nanmean())
    assert metric.excluded.item() == int(torch.isnan(values).sum())
    assert metric.excluded.item() == (3 if spec.uses_mask else 0)


def test_options_reach_the_function():
    _, _, attr, mask, _ = inputs()
    metric = modules.TopKIoU(options={"k": 10})
    metric.update(attr, mask)
    torch.testing.assert_close(metric.compute().float(), MF.topk_iou(attr, mask, k=10).nanmean())


def test_pointing_game_class_mean_by_hand():
    metric = modules.PointingGame(num_classes=3, tolerance=0)
    attr = torch.zeros(5, 1, 4, 4)
    attr[:, :, 0, 0] = 1.0  # every map points at the top-left pixel
    mask = torch.zeros(5, 1, 4, 4, dtype=torch.bool)
    mask[[0, 1, 3], :, 0, 0] = True  # hits: samples 0, 1, 3; sample 2 misses; sample 4 is empty
    mask[2, :, 3, 3] = True
    y = torch.tensor([0, 0, 1, 1, 2])
    metric.update(attr, mask, target=y)
    # class 0: 2/2, class 1: 1/2, class 2: only an empty mask -> not a class seen
    assert metric.compute().item() == pytest.approx((1.0 + 0.5) / 2)
    assert metric.excluded.item() == 1
    with pytest.raises(ValueError, match="target"):
        metric.update(attr, mask)


def test_only_excluded_samples_give_nan():
    attr, empty = torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    epg, pg = modules.EnergyPointingGame(), modules.PointingGame(num_classes=2)
    epg.update(attr, empty)
    pg.update(attr, empty, target=torch.tensor([0, 1]))
    assert math.isnan(epg.compute()) and math.isnan(pg.compute())
    assert epg.excluded.item() == pg.excluded.item() == 2
