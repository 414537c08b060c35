"""Accumulating metrics (torchmetrics.Metric) that share the implementation of `sib.metrics.functional`.

Each `update(attr, mask, model=None, x=None, target=None)` evaluates the per-sample function on the
batch and adds the non-NaN values to on-device sums; NaN values are skipped and counted, in `invalid`
where the sample's attribution is not finite (NaN or +-inf anywhere in its map, whatever the mask), else
in `excluded` (empty foreground). `compute()` is the mean over counted samples (NaN if there are none);
`PointingGame` reports the mean over classes of the per-class hit rate, so it needs `target`.
States are sums, so they reduce across processes with "sum" (DDP-safe).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from sib.metrics import faithfulness as FA
from sib.metrics import localisation as LO
from sib.metrics._checks import finite_rows


def _skipped(v: torch.Tensor, attr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) bool masks of the values used, the invalid samples (non-finite attr) and the excluded ones."""
    invalid = ~finite_rows(attr).to(v.device)
    used = ~torch.isnan(v)
    return used, invalid & ~used, ~used & ~invalid


class _SampleMean(Metric):
    """Mean of a per-sample metric over everything seen; NaN samples are skipped and counted."""

    is_differentiable = False
    full_state_update = False
    higher_is_better: bool = True
    fn: Callable[..., torch.Tensor]
    needs_model = False

    def __init__(self, options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = options or {}
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("excluded", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("invalid", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def values(self, attr: torch.Tensor, mask: torch.Tensor | None, model: nn.Module | None = None,
               x: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample values (B,) of this batch, exactly as the functional form returns them."""
        fn = type(self).fn
        if self.needs_model:
            return fn(attr, mask, model=model, x=x, target=target, **self.options)
        return fn(attr, mask, **self.options)

    def update(self, attr: torch.Tensor, mask: torch.Tensor | None, model: nn.Module | None = None,
               x: torch.Tensor | None = None, target: torch.Tensor | None = None) -> None:
        v = self.values(attr, mask, model, x, target)
        used, invalid, excluded = _skipped(v, attr)
        self.total += torch.where(used, v, torch.zeros_like(v)).sum().double()
        self.count += used.sum()
        self.excluded += excluded.sum()
        self.invalid += invalid.sum()

    def compute(self) -> torch.Tensor:
        return torch.where(self.count > 0, self.total / self.count.clamp(min=1),
                           torch.full_like(self.total, math.nan))


def _metric(name: str, fn: Callable[..., torch.Tensor], higher: bool, needs_model: bool = False
            ) -> type[_SampleMean]:
    doc = (f"Accumulating form of `sib.metrics.functional.{fn.__name__}`; options (e.g. "
           f"`options={{...}}`) are passed to it. See `sib.metrics.modules`.")
    return type(name, (_SampleMean,), {"fn": staticmethod(fn), "higher_is_better": higher,
                                       "needs_model": needs_model, "__doc__": doc,
                                       "__module__": __name__})


EnergyPointingGame = _metric("EnergyPointingGame", LO.energy_pointing_game, True)
RelevanceMassAccuracy = _metric("RelevanceMassAccuracy", LO.relevance_mass_accuracy, True)
RelevanceRankAccuracy = _metric("RelevanceRankAccuracy", LO.relevance_rank_accuracy, True)
TopKIoU = _metric("TopKIoU", LO.topk_iou, True)
AttributionAUROC = _metric("AttributionAUROC", LO.auroc, True)
DeletionAUC = _metric("DeletionAUC", FA.deletion_auc, False, needs_model=True)
InsertionAUC = _metric("InsertionAUC", FA.insertion_auc, True, needs_model=True)
AverageDrop = _metric("AverageDrop", FA.average_drop, False, needs_model=True)
IncreaseInConfidence = _metric("IncreaseInConfidence", FA.increase_in_confidence, True, needs_model=True)


class PointingGame(Metric):
    """Pointing game accumulated per class; `compute()` is the mean over classes seen of the hit rate.

    Args:
        num_classes: number of classes K (targets must lie in [0, K)).
        tolerance: pixels, passed to `sib.metrics.functional.pointing_game`; None (default) scales 15 px at
            224 px to the image (`sib.metrics.localisation.default_tolerance`).
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, tolerance: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.tolerance = num_classes, tolerance
        self.add_state("hits", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("excluded", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("invalid", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, attr: torch.Tensor, mask: torch.Tensor, model: nn.Module | None = None,
               x: torch.Tensor | None = None, target: torch.Tensor | None = None) -> None:
        if target is None or target.shape != (attr.shape[0],):
            raise ValueError("PointingGame.update needs target= (B,) class indices for the per-class mean")
        v = LO.pointing_game(attr, mask, tolerance=self.tolerance)
        used, invalid, excluded = _skipped(v, attr)
        target = target.to(self.hits.device, torch.long)
        self.hits.index_add_(0, target, torch.where(used, v, torch.zeros_like(v)).double())
        self.seen.index_add_(0, target, used.long())
        self.excluded += excluded.sum()
        self.invalid += invalid.sum()

    def compute(self) -> torch.Tensor:
        seen = self.seen > 0
        rates = self.hits / self.seen.clamp(min=1)
        return torch.where(seen.any(), (rates * seen).sum() / seen.sum().clamp(min=1),
                           torch.full_like(rates[0], math.nan))
