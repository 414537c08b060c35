"""Metrics of explanations by name: pure per-sample functions, accumulating forms, and their registry.

The evaluator looks a metric up in `METRICS` and calls
`spec.fn(attr, mask, model=model, x=x, target=target)` when `spec.needs_model`, else `spec.fn(attr,
mask)`; it gets (B,) values and aggregates them with `spec.reduction`, ignoring NaN. A NaN is "invalid"
where the sample's attribution is not finite (`functional.finite_rows(attr)` is False: a NaN or +-inf
anywhere in its map, whatever the mask), else "excluded" (an empty foreground mask); the two are counted
apart. Every `spec.fn` also accepts and ignores `model`, `x`, `target` where it does not need them, so
calling all metrics the model way is safe. Options (`tolerance=`, `n_steps=`, ...) go through as keywords;
the pointing game's default tolerance scales with the image (`functional.default_tolerance`).

Reductions: "mean" = mean over non-NaN samples; "class_mean" = mean over classes of the per-class mean
over non-NaN samples (grouped by `target`; the pointing game, as in Zhang et al. 2018).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torchmetrics import Metric

from sib.metrics import functional, modules
from sib.registry import Registry


@dataclass(frozen=True)
class MetricSpec:
    """How the evaluator runs and reads one metric.

    Attributes:
        name: registry key, also the column name in tables ("pointing_game").
        fn: per-sample function (attr, mask, **kw) -> (B,) float; NaN = excluded or invalid (see above).
        needs_model: True if fn needs `model=`, `x=`, `target=` (perturbation metrics).
        higher_is_better: direction of improvement.
        reduction: "mean" or "class_mean" (see module docstring).
        module: the accumulating torchmetrics.Metric class sharing fn's implementation.
        uses_mask: False for metrics that ignore ground truth (an empty mask does not exclude them).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs_model: bool
    higher_is_better: bool
    reduction: Literal["mean", "class_mean"]
    module: type[Metric]
    uses_mask: bool = True


def _ignoring_model(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn(attr, mask, **opts), also callable with (unused) model=, x=, target= keywords."""

    @functools.wraps(fn)
    def call(attr: torch.Tensor, mask: torch.Tensor, *, model: Any = None, x: Any = None,
             target: Any = None, **options: Any) -> torch.Tensor:
        return fn(attr, mask, **options)

    return call


METRICS: Registry[MetricSpec] = Registry("metric")

for _spec in (
    MetricSpec("energy_pointing_game", _ignoring_model(functional.energy_pointing_game), False, True, "mean",
               modules.EnergyPointingGame),
    MetricSpec("pointing_game", _ignoring_model(functional.pointing_game), False, True, "class_mean",
               modules.PointingGame),
    MetricSpec("relevance_mass_accuracy", _ignoring_model(functional.relevance_mass_accuracy), False, True,
               "mean", modules.RelevanceMassAccuracy),
    MetricSpec("relevance_rank_accuracy", _ignoring_model(functional.relevance_rank_accuracy), False, True,
               "mean", modules.RelevanceRankAccuracy),
    MetricSpec("topk_iou", _ignoring_model(functional.topk_iou), False, True, "mean", modules.TopKIoU),
    MetricSpec("auroc", _ignoring_model(functional.auroc), False, True, "mean", modules.AttributionAUROC),
    MetricSpec("deletion_auc", functional.deletion_auc, True, False, "mean", modules.DeletionAUC, False),
    MetricSpec("insertion_auc", functional.insertion_auc, True, True, "mean", modules.InsertionAUC, False),
    MetricSpec("average_drop", functional.average_drop, True, False, "mean", modules.AverageDrop, False),
    MetricSpec("increase_in_confidence", functional.increase_in_confidence, True, True, "mean",
               modules.IncreaseInConfidence, False),
):
    METRICS.register(_spec.name, _spec)

__all__ = ["METRICS", "MetricSpec", "functional", "modules"]
