"""Explanation regularisers with one call signature, in one registry, trained by one loop.

    reg = create_regularizer("sib")
    x.requires_grad_(reg.needs_input_grad)
    logits = model(x)
    out = reg(x, logits, y, mask)        # RegOutput(loss, parts, maps)
    loss = cross_entropy(logits, y) + out.loss

`out.maps` holds the regulariser's own attribution map, detached, for diagnostics (sib.diagnostics):
"R" (B, C, H, W), the input-gradient map the regulariser shapes, and, for S-IB with the adaptive mask,
"M" (B, 1, H, W), the mask it derived from R. `reg.weights()` / `reg.set_weights()` read and set the
weights by their TrainConfig field names (what `--reg-calibrate` scales; the loss is linear in them).

Names (the same strings in configs, CLI, tables and reports):
- "none": plain cross-entropy (the baseline).
- "sib":  the Spatial Information Bottleneck (sib.loss.SpatialIB), adaptive mask; with
          `mask_source="gt"` the dataset's foreground masks replace the adaptive mask (a supervised
          variant the paper does not have).
- "rrr":  "Right for the Right Reasons" (Ross et al. 2017): squared input gradient of the summed
          log-probabilities outside the foreground mask, summed over pixels, averaged over the batch.
- "energy": one minus the energy pointing game of input-gradient attributions (Rao et al. 2023):
          attr = relu(sum over channels of d logit_y / dx); loss = mean(1 - sum(attr*fg) / sum(attr)).
- "sib_logp": ours, a variant of S-IB (not in the paper; `sib` stays as published). See below.

`sib_logp`, PAPER vs ours. Kept from the paper: the adaptive mask M derived from R (or the ground truth
with `mask_source="gt"`), the foreground HSIC between R*M and x*M, the background variance of R*(1-M), the
`exp`/`linear` forms and the weights (sib_bg_weight, sib_fg_weight, sib_window, sib_form, as `sib`).
Changed: the map. The paper's R = d(0.5 * sum_k p_k^2)/dx is label-free, and its cotangent on the logits,
p_j (p_j - sum_k p_k^2), is zero at any one-hot prediction (right or wrong) and at the uniform one: the
background term can be lowered by making predictions confident or uniform whatever the label, and it fades
on fitted samples (PAPER.md's "known weakness"; issue 9: at large weights the model collapses to chance
with bg -> 3e-10). `sib_logp` takes R = d log p_y / dx, the input gradient of the LABEL's log-probability:
its cotangent e_y - p is zero only when p_y = 1, so R stays alive on every sample not yet fitted and never
rewards a confidently wrong or uniform prediction; and with the label it is the input evidence for the
right class, as in RRR (whose map is also a gradient of log-probabilities). Its scale differs from the
paper's R (typically far larger), so the published weights are not calibrated for it: use
`--reg-calibrate`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sib.loss import SpatialIB, vjp_map
from sib.registry import Registry


class RegOutput(NamedTuple):
    """loss: 0-dim differentiable regulariser (already weighted); parts: detached 0-dim tensors to log;
    maps: detached attribution maps, "R" (B, C, H, W) and, for S-IB's adaptive mask, "M" (B, 1, H, W)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor] | None = None


class Regularizer(nn.Module):
    """Base: `needs_mask` regularisers refuse datasets without foreground masks."""

    needs_mask: bool = False
    needs_input_grad: bool = True

    def forward(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None) -> RegOutput:
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """The loss weights by TrainConfig field name; the loss is linear in each (empty: nothing to scale)."""
        return {}

    def set_weights(self, weights: dict[str, float]) -> None:
        """Set the weights returned by `weights()` (same keys), e.g. after `--reg-calibrate`."""
        if set(weights) != set(self.weights()):
            raise ValueError(f"{type(self).__name__}: weights must have the keys {sorted(self.weights())}, "
                             f"got {sorted(weights)}")
        self._set_weights({k: float(v) for k, v in weights.items()})

    def _set_weights(self, weights: dict[str, float]) -> None:
        pass

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

    def attribution_map(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The map R the terms shape: the paper's label-free VJP map (sib.loss.vjp_map), (B, C, H, W)."""
        return vjp_map(logits, x)

    def forward(self, x, logits, y, mask):
        gt = self._require_mask(mask, x) if self.needs_mask else None
        R = self.attribution_map(x, logits, y)
        t = self.sib(x, logits, mask=gt, R=R)
        maps = {"R": R.detach(), **({"M": t.mask} if gt is None else {})}
        return RegOutput(t.loss, {"hsic": t.hsic, "bg": t.background, "coverage": t.coverage}, maps)

    def weights(self) -> dict[str, float]:
        return {"sib_bg_weight": self.sib.bg_weight, "sib_fg_weight": self.sib.fg_weight}

    def _set_weights(self, weights: dict[str, float]) -> None:
        self.sib.bg_weight, self.sib.fg_weight = weights["sib_bg_weight"], weights["sib_fg_weight"]


def label_logp_map(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, create_graph: bool = True
                   ) -> torch.Tensor:
    """R = d log softmax(logits)_y / dx, the input gradient of each image's label log-probability.

    Args:
        logits: (B, K) computed from `x`; the softmax runs in float32 (float64 stays float64).
        y: (B,) int64 labels.
        x: (B, C, H, W) input with `requires_grad=True`.
        create_graph: keep the graph of R (double backprop).

    Returns:
        (B, C, H, W), float32 (float64 for float64 logits). Per image it is sum_j (e_y - p)_j dz_j/dx: zero
        only where p_y = 1 (images do not interact: the sum over the batch separates).
    """
    if not x.requires_grad:
        raise ValueError("label_logp_map: x must have requires_grad=True before the forward pass")
    if logits.dim() != 2 or y.shape != (logits.shape[0],) or logits.shape[0] != x.shape[0]:
        raise ValueError(f"label_logp_map: logits must be (B, K) and y (B,) with B = {x.shape[0]}, got "
                         f"{tuple(logits.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        logp_y = torch.log_softmax(logits.to(dtype), dim=1).gather(1, y[:, None]).sum()
    (R,) = torch.autograd.grad(logp_y, x, create_graph=create_graph)
    return R.to(dtype)


@REGULARIZERS.register("sib_logp")
class SIBLogpRegularizer(SIBRegularizer):
    """Ours: S-IB's mask, HSIC and background terms and weights on R = d log p_y / dx (module docstring).

    The paper's R = d(0.5 sum_k p_k^2)/dx vanishes at one-hot (right or wrong) and uniform predictions, so
    S-IB can be satisfied by confident or uniform outputs regardless of the label; the label's
    log-probability gradient vanishes only when the label is predicted with certainty, and is the evidence
    for the right class (as RRR's map). Everything else is `sib`'s, including `mask_source`.
    """

    def attribution_map(self, x, logits, y):
        return label_logp_map(logits, y, x)


def _input_grad(outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(outputs, x, create_graph=True)
    return g.float()


class _MaskSupervised(Regularizer):
    """A ground-truth-mask regulariser with one weight (RRR, energy)."""

    needs_mask = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def weights(self) -> dict[str, float]:
        return {"reg_weight": self.weight}

    def _set_weights(self, weights: dict[str, float]) -> None:
        self.weight = weights["reg_weight"]


@REGULARIZERS.register("rrr")
class RRRRegularizer(_MaskSupervised):
    """Ross et al. 2017: weight * mean_b sum_{background pixels, channels} (d sum_k log p_k / dx)^2."""

    def forward(self, x, logits, y, mask):
        fg = self._require_mask(mask, x)
        g = _input_grad(torch.log_softmax(logits.float(), dim=1).sum(), x)  # (B, C, H, W)
        penalty = ((g * (~fg.bool()).float()) ** 2).flatten(1).sum(dim=1).mean()
        return RegOutput(self.weight * penalty, {"rrr": penalty.detach()}, {"R": g.detach()})


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
        return RegOutput(self.weight * loss, {"energy": loss.detach()}, {"R": g.detach()})


def create_regularizer(name: str, mask_source: str = "adaptive", weight: float = 1.0,
                       sib_bg_weight: float = 1000.0, sib_fg_weight: float = 0.01,
                       sib_window: int | None = None, sib_form: str = "exp") -> Regularizer:
    """Build a regulariser by registry name (see module docstring)."""
    cls = REGULARIZERS.get(name)
    if issubclass(cls, SIBRegularizer):  # sib and sib_logp
        return cls(mask_source=mask_source, bg_weight=sib_bg_weight, fg_weight=sib_fg_weight,
                   window=sib_window, form=sib_form)
    if mask_source != "adaptive":
        raise ValueError(f"--mask-source {mask_source!r} applies to --regularizer sib only, not {name!r}")
    if issubclass(cls, _MaskSupervised):
        return cls(weight=weight)
    return cls()
