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
- "l1":   Rao et al. 2023's L1: mean over pixels of |M - relu(A) / max relu(A)|.
- "rrr_star": Rao et al. 2023's RRR*: sum over the background of (relu(A) / max relu(A))^2.
- "hint": HINT (Selvaraju et al. 2019; Friedrich et al. 2023's typology): mean squared error between the
          max-normalised explanation and the mask.

Where and on what (sib.guidance): every regulariser takes `layer` ("input", "cam" or a module path) and the
mask-supervised ones an `explanation` ("gradient" of their own target, or the label's "grad_cam" at a layer).
`create_regularizer(name)` with the defaults is the published method at the input, unchanged (bitwise:
tests/test_guidance.py). At a layer: `energy` on Grad-CAM is Rao et al.'s final-layer Energy, `rrr` on Grad-CAM
the typology's RRR-G, `sib` / `sib_logp` S-IB's construction on the layer's VJP (see SIBRegularizer).

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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from sib.guidance import (
    Capture,
    capture,
    energy_loss,
    f32,
    grad_cam_map,
    gradient_map,
    hint_loss,
    l1_loss,
    mask_to_grid,
    resolve_layer,
    rrr_loss,
    rrr_star_loss,
    to_image,
)
from sib.loss import SpatialIB, vjp_map
from sib.registry import Registry


class RegOutput(NamedTuple):
    """loss: 0-dim differentiable regulariser (already weighted); parts: detached 0-dim tensors to log;
    maps: detached attribution maps, "R" (B, C, H, W) and, for S-IB's adaptive mask, "M" (B, 1, H, W)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor] | None = None


class Regularizer(nn.Module):
    """Base: `needs_mask` regularisers refuse datasets without foreground masks.

    `regularises`: False only for "none" (the trainer then runs plain steps). `layer` (sib.guidance): "input"
    (the published place), "cam" or a module path; at a layer the step's forward runs inside `capturing(model)`,
    which keeps that layer's output for `forward`. `needs_input_grad`: the step sets `x.requires_grad` (only
    when the explanation is taken at the input).
    """

    needs_mask: bool = False
    regularises: bool = True
    layer: str = "input"
    explanation: str = "gradient"
    _cap: Capture | None = None

    @property
    def needs_input_grad(self) -> bool:
        return self.regularises and self.layer == "input"

    @contextmanager
    def capturing(self, model: nn.Module) -> Iterator[None]:
        """Keep the regularised layer's output of the forward passes in the block (no-op at the input)."""
        if self.layer == "input":
            yield
            return
        with capture(model, resolve_layer(model, self.layer)) as cap:
            self._cap = cap
            try:
                yield
            finally:
                self._cap = None

    def _layer_output(self) -> tuple[torch.Tensor, Capture]:
        if self._cap is None:
            raise RuntimeError(f"{type(self).__name__} at --reg-layer {self.layer!r}: call the model inside "
                               "reg.capturing(model) (sib.step.step_loss does)")
        return self._cap.take(), self._cap

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
    regularises = False

    def forward(self, x, logits, y, mask):
        return RegOutput(logits.new_zeros(()).float(), {})


@REGULARIZERS.register("sib")
class SIBRegularizer(Regularizer):
    """S-IB (PAPER.md); parts logged: hsic (foreground), bg (background variance), coverage (mask mean).

    At a layer (`layer` "cam" or a module path; sib.guidance) the same construction runs on the layer: R is
    the VJP map w.r.t. the layer's activations A (B, K, h, w), the adaptive mask is derived from it at the
    layer's resolution (window 3 on an 8x8 grid: `default_window`), the HSIC pairs R*M with A*M, and the
    background term is the variance of R*(1-M). With `mask_source="gt"` the mask is area-pooled to the grid.
    `maps["R"]` is then sqrt(sum_k R^2) upsampled to the image (for the diagnostics), `maps["M"]` the mask on
    the grid.
    """

    explanation = "vjp"

    def __init__(self, mask_source: str = "adaptive", bg_weight: float = 1000.0, fg_weight: float = 0.01,
                 window: int | None = None, form: str = "exp", layer: str = "input") -> None:
        super().__init__()
        if mask_source not in ("adaptive", "gt"):
            raise ValueError(f"mask_source must be 'adaptive' or 'gt', got {mask_source!r}")
        self.mask_source = mask_source
        self.needs_mask = mask_source == "gt"
        self.layer = layer
        self.sib = SpatialIB(bg_weight=bg_weight, fg_weight=fg_weight, window=window, form=form)

    def attribution_map(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The map R the terms shape: the paper's label-free VJP map (sib.loss.vjp_map), (B, C, H, W)."""
        return vjp_map(logits, x)

    def forward(self, x, logits, y, mask):
        gt = self._require_mask(mask, x) if self.needs_mask else None
        if self.layer != "input":
            return self._at_layer(x, logits, y, gt)
        R = self.attribution_map(x, logits, y)
        t = self.sib(x, logits, mask=gt, R=R)
        maps = {"R": R.detach(), **({"M": t.mask} if gt is None else {})}
        return RegOutput(t.loss, {"hsic": t.hsic, "bg": t.background, "coverage": t.coverage}, maps)

    def _at_layer(self, x, logits, y, gt):
        acts, cap = self._layer_output()
        R = cap.to_grid(self.attribution_map(acts, logits, y))  # d/dA, (B, K, h, w)
        A = cap.to_grid(acts)
        t = self.sib(A, logits, mask=None if gt is None else mask_to_grid(gt, tuple(R.shape[-2:])), R=R)
        shown = to_image(R.detach().pow(2).sum(dim=1, keepdim=True).sqrt(), tuple(x.shape[-2:]))
        maps = {"R": shown, **({"M": t.mask} if gt is None else {})}
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
    """A ground-truth-mask regulariser with one weight, on an explanation at a layer.

    Subclasses give `_per_image(attr, fg)` (the loss per image, on a map at image resolution) and the
    explanation's target (`_score`: the label's logit unless overridden). At the input with the gradient
    (`layer="input"`, `explanation="gradient"`) `_published` keeps each method's original formula.

    Annotation budgets: with `partial=True` (a run with --reg-mask-fraction below 1) an image whose mask is
    empty counts as unannotated: the loss is the mean over the batch's annotated images only (0 when there are
    none), so those images are trained by the cross-entropy alone. Without it every image counts (the
    published methods' batch mean).
    """

    needs_mask = True
    explanations = ("gradient", "grad_cam")
    part_name = ""  # the log key of the (unweighted) loss: the registry name

    def __init__(self, weight: float = 1.0, layer: str = "input", explanation: str = "gradient",
                 partial: bool = False) -> None:
        super().__init__()
        self.weight, self.layer, self.explanation, self.partial = weight, layer, explanation, partial

    def weights(self) -> dict[str, float]:
        return {"reg_weight": self.weight}

    def _set_weights(self, weights: dict[str, float]) -> None:
        self.weight = weights["reg_weight"]

    def _score(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f32(logits).gather(1, y[:, None]).sum()

    def _published(self, x, logits, y, fg) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-image loss (B,), attribution map) of the input-gradient form; the generic one by default."""
        return self._generic(x, logits, y, fg.float())

    squared_gradient = False  # the "gradient" map is sum_k g_k^2 per cell (RRR) instead of sum_k g_k

    def _explain(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The explanation (B, 1, h, w) at the configured place, with its graph."""
        acts, cap = (x, Capture()) if self.layer == "input" else self._layer_output()
        if self.explanation == "grad_cam":
            return grad_cam_map(f32(logits).gather(1, y[:, None]).sum(), acts, cap)
        return gradient_map(self._score(logits, y), acts, cap, squared=self.squared_gradient)

    def _generic(self, x, logits, y, fg) -> tuple[torch.Tensor, torch.Tensor]:
        attr = to_image(self._explain(x, logits, y), tuple(x.shape[-2:]))
        return self._per_image(attr, fg), attr

    def _per_image(self, attr: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, logits, y, mask):
        fg = self._require_mask(mask, x)
        if self.layer == "input" and self.explanation == "gradient":
            per, R = self._published(x, logits, y, fg)
        else:
            per, R = self._generic(x, logits, y, fg.float())
        if self.partial:
            annotated = fg.flatten(1).any(dim=1)
            loss = torch.where(annotated, per, torch.zeros_like(per)).sum() / annotated.sum().clamp_min(1)
        else:
            loss = per.mean()
        return RegOutput(self.weight * loss, {self.part_name: loss.detach()}, {"R": R.detach()})


@REGULARIZERS.register("rrr")
class RRRRegularizer(_MaskSupervised):
    """Ross et al. 2017: weight * mean_b sum_{background pixels, channels} (d sum_k log p_k / dx)^2.

    At a layer: with `explanation="gradient"` the same on d sum_k log p_k / dA (sum_k of squares per cell,
    upsampled); with "grad_cam" it is the typology's RRR-G: sum over the background of Grad-CAM^2.
    """

    part_name = "rrr"
    squared_gradient = True

    def _score(self, logits, y):
        return torch.log_softmax(f32(logits), dim=1).sum()

    def _published(self, x, logits, y, fg):
        g = _input_grad(torch.log_softmax(logits.float(), dim=1).sum(), x)  # (B, C, H, W)
        return ((g * (~fg.bool()).float()) ** 2).flatten(1).sum(dim=1), g

    def _per_image(self, attr, fg):
        # the gradient map is already sum_k g_k^2; Grad-CAM is squared here (RRR-G)
        return rrr_loss(attr * attr if self.explanation == "grad_cam" else attr, fg)


@REGULARIZERS.register("energy")
class EnergyRegularizer(_MaskSupervised):
    """Rao et al. 2023: weight * mean_b (1 - EPG) of relu(channel-summed input gradient of logit_y); at a layer
    on the label's Grad-CAM (their final-layer Energy) or the layer gradient."""

    part_name = "energy"

    def _published(self, x, logits, y, fg):
        fg = fg.float()
        g = _input_grad(logits.float().gather(1, y[:, None]).sum(), x)  # (B, C, H, W)
        attr = torch.relu(g.sum(dim=1, keepdim=True))  # (B, 1, H, W)
        total = attr.flatten(1).sum(dim=1)
        inside = (attr * fg).flatten(1).sum(dim=1)
        # an all-zero attribution has no energy anywhere: count it as 0 on the object (loss 1)
        epg = torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))
        return 1 - epg, g

    def _per_image(self, attr, fg):
        return energy_loss(attr, fg)


@REGULARIZERS.register("l1")
class L1Regularizer(_MaskSupervised):
    """Rao et al. 2023's L1: weight * mean_b mean_pixels |M - relu(A) / max relu(A)|."""

    part_name = "l1"

    def _per_image(self, attr, fg):
        return l1_loss(attr, fg)


@REGULARIZERS.register("rrr_star")
class RRRStarRegularizer(_MaskSupervised):
    """Rao et al. 2023's RRR*: weight * mean_b sum_{background} (relu(A) / max relu(A))^2."""

    part_name = "rrr_star"

    def _per_image(self, attr, fg):
        return rrr_star_loss(attr, fg)


@REGULARIZERS.register("hint")
class HINTRegularizer(_MaskSupervised):
    """HINT (Selvaraju et al. 2019; the typology): weight * mean_b mean_pixels (relu(A) / max relu(A) - M)^2,
    the label's explanation regressed onto the mask (rewarding attribution on the object, not only
    penalising it outside)."""

    part_name = "hint"

    def _per_image(self, attr, fg):
        return hint_loss(attr, fg)


def resolve_explanation(name: str, layer: str, explanation: str) -> str:
    """The explanation a (regulariser, layer, explanation) triple trains; a ValueError for a combination that
    has none. "auto": the regulariser's published map at the input (the gradient; S-IB's VJP), the label's
    Grad-CAM at a layer (S-IB: its VJP)."""
    cls = REGULARIZERS.get(name)
    if not cls.regularises:
        if layer != "input" or explanation not in ("auto", "gradient"):
            raise ValueError(f"--reg-layer / --reg-explanation apply to a regulariser, not to --regularizer {name}")
        return "gradient"
    if issubclass(cls, SIBRegularizer):
        if explanation not in ("auto", "vjp"):
            raise ValueError(f"--regularizer {name} shapes its own map (the VJP: --reg-explanation vjp), not "
                             f"{explanation!r}; the mask-supervised regularisers take gradient or grad_cam")
        return "vjp"
    if explanation == "auto":
        return "gradient" if layer == "input" else "grad_cam"
    allowed = getattr(cls, "explanations", ())
    if explanation not in allowed:
        raise ValueError(f"--regularizer {name} --reg-explanation {explanation!r}: valid values are auto, "
                         f"{', '.join(allowed)} (vjp is S-IB's: --regularizer sib or sib_logp)")
    if explanation == "grad_cam" and layer == "input":
        raise ValueError(f"--regularizer {name}: --reg-explanation grad_cam needs a layer (--reg-layer cam or a "
                         "module path); at the input use gradient")
    return explanation


def create_regularizer(name: str, mask_source: str = "adaptive", weight: float = 1.0,
                       sib_bg_weight: float = 1000.0, sib_fg_weight: float = 0.01,
                       sib_window: int | None = None, sib_form: str = "exp", layer: str = "input",
                       explanation: str = "auto", partial: bool = False) -> Regularizer:
    """Build a regulariser by registry name (see module docstring); `layer` / `explanation`: sib.guidance;
    `partial`: images with an empty mask are unannotated (an annotation budget, _MaskSupervised)."""
    cls = REGULARIZERS.get(name)
    explanation = resolve_explanation(name, layer, explanation)
    if issubclass(cls, SIBRegularizer):  # sib and sib_logp
        return cls(mask_source=mask_source, bg_weight=sib_bg_weight, fg_weight=sib_fg_weight,
                   window=sib_window, form=sib_form, layer=layer)
    if mask_source != "adaptive":
        raise ValueError(f"--mask-source {mask_source!r} applies to --regularizer sib only, not {name!r}")
    if issubclass(cls, _MaskSupervised):
        return cls(weight=weight, layer=layer, explanation=explanation, partial=partial)
    return cls()
