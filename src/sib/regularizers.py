"""Explanation regularisers with one call signature, in one registry, trained by one loop.

    reg = create_regularizer("sib")
    x.requires_grad_(reg.needs_input_grad)
    logits = model(x)
    out = reg(x, logits, y, mask)        # RegOutput(loss, parts)
    loss = cross_entropy(logits, y) + out.loss

Names (the same strings in configs, CLI, tables and reports):
- "none": plain cross-entropy (the baseline).
- "sib":  the Spatial Information Bottleneck (sib.loss.SpatialIB), adaptive mask; with
          `mask_source="gt"` the dataset's foreground masks replace the adaptive mask (a supervised
          variant the paper does not have).
- "rrr":  "Right for the Right Reasons" (Ross et al. 2017): squared input gradient of the summed
          log-probabilities outside the foreground mask, summed over pixels, averaged over the batch.
- "energy": one minus the energy pointing game of input-gradient attributions (Rao et al. 2023):
          attr = relu(sum over channels of d logit_y / dx); loss = mean(1 - sum(attr*fg) / sum(attr)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sib.loss import SpatialIB
from sib.registry import Registry


class RegOutput(NamedTuple):
    """loss: 0-dim differentiable regulariser (already weighted); parts: detached 0-dim tensors to log."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


class Regularizer(nn.Module):
    """Base: `needs_mask` regularisers refuse datasets without foreground masks."""

    needs_mask: bool = False
    needs_input_grad: bool = True

    def forward(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None) -> RegOutput:
        raise NotImplementedError

    def _require_mask(self, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if mask is None:
            raise ValueError(f"regulariser {type(self).__name__} needs foreground masks, but the batch has "
                             "none (use a dataset with masks, or --regularizer sib with --mask-source adaptive)")
        if mask.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"mask must be (B, 1, H, W) = {(x.shape[0], 1, *x.shape[2:])}, got {tuple(mask.shape)}")
        return mask


REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")


@REGULARIZERS.register("none")
class NoRegularizer(Regularizer):
    needs_input_grad = False

    def forward(self, x, logits, y, mask):
        return RegOutput(logits.new_zeros(()).float(), {})


@REGULARIZERS.register("sib")
class SIBRegularizer(Regularizer):
    """S-IB (PAPER.md); parts logged: hsic (foreground), bg (background variance), coverage (mask mean)."""

    def __init__(self, mask_source: str = "adaptive", bg_weight: float = 1000.0, fg_weight: float = 0.01,
                 window: int | None = None, form: str = "exp") -> None:
        super().__init__()
        if mask_source not in ("adaptive", "gt"):
            raise ValueError(f"mask_source must be 'adaptive' or 'gt', got {mask_source!r}")
        self.mask_source = mask_source
        self.needs_mask = mask_source == "gt"
        self.sib = SpatialIB(bg_weight=bg_weight, fg_weight=fg_weight, window=window, form=form)

    def forward(self, x, logits, y, mask):
        gt = self._require_mask(mask, x) if self.needs_mask else None
        t = self.sib(x, logits, mask=gt)
        return RegOutput(t.loss, {"hsic": t.hsic, "bg": t.background, "coverage": t.coverage})


def _input_grad(outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(outputs, x, create_graph=True)
    return g.float()


class _MaskSupervised(Regularizer):
    """A ground-truth-mask regulariser with one weight (RRR, energy)."""

    needs_mask = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight


@REGULARIZERS.register("rrr")
class RRRRegularizer(_MaskSupervised):
    """Ross et al. 2017: weight * mean_b sum_{background pixels, channels} (d sum_k log p_k / dx)^2."""

    def forward(self, x, logits, y, mask):
        fg = self._require_mask(mask, x)
        g = _input_grad(torch.log_softmax(logits.float(), dim=1).sum(), x)  # (B, C, H, W)
        penalty = ((g * (~fg.bool()).float()) ** 2).flatten(1).sum(dim=1).mean()
        return RegOutput(self.weight * penalty, {"rrr": penalty.detach()})


@REGULARIZERS.register("energy")
class EnergyRegularizer(_MaskSupervised):
    """Rao et al. 2023: weight * mean_b (1 - EPG) of relu(channel-summed input gradient of logit_y)."""

    def forward(self, x, logits, y, mask):
        fg = self._require_mask(mask, x).float()
        g = _input_grad(logits.float().gather(1, y[:, None]).sum(), x)  # (B, C, H, W)
        attr = torch.relu(g.sum(dim=1, keepdim=True))  # (B, 1, H, W)
        total = attr.flatten(1).sum(dim=1)
        inside = (attr * fg).flatten(1).sum(dim=1)
        # an all-zero attribution has no energy anywhere: count it as 0 on the object (loss 1)
        epg = torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))
        loss = (1 - epg).mean()
        return RegOutput(self.weight * loss, {"energy": loss.detach()})


def create_regularizer(name: str, mask_source: str = "adaptive", weight: float = 1.0,
                       sib_bg_weight: float = 1000.0, sib_fg_weight: float = 0.01,
                       sib_window: int | None = None, sib_form: str = "exp") -> Regularizer:
    """Build a regulariser by registry name (see module docstring)."""
    cls = REGULARIZERS.get(name)
    if cls is SIBRegularizer:
        return cls(mask_source=mask_source, bg_weight=sib_bg_weight, fg_weight=sib_fg_weight,
                   window=sib_window, form=sib_form)
    if mask_source != "adaptive":
        raise ValueError(f"--mask-source {mask_source!r} applies to --regularizer sib only, not {name!r}")
    if issubclass(cls, _MaskSupervised):
        return cls(weight=weight)
    return cls()
