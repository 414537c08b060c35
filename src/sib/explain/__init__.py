"""Post-hoc explanation methods by name: one signature, one registry.

Every explainer is `fn(model, x, target, **options) -> attr`:

- `model`: an `nn.Module` mapping x to logits (B, K). Explainers use it as the caller left it: they never
  change `model.training` (run them on an eval-mode model; putting it there is the caller's job), never
  write `param.grad` or `requires_grad`, and leave no hooks behind, also when they raise.
- `x`: float tensor (B, C, H, W), normalised images; never modified.
- `target`: integer tensor (B,) of class indices in [0, K); a bad shape, dtype or range is a ValueError.
- `attr`: float tensor (B, 1, H, W) at input resolution, on `x.device`, detached and *unnormalised*.
  Normalising is an explicit, named step: `normalize_attr(attr, mode="minmax" | "max" | "none")`.

Sign and channel conventions (what one pixel of `attr` means):

- CAM family (`grad_cam`, `grad_cam_pp`, `xgrad_cam`, `layer_cam`, `score_cam`, `eigen_cam`): a weighted
  sum of the target layer's activation maps, ReLU'd as in the original papers (so `attr >= 0`), then
  bilinearly upsampled (align_corners=False) to (H, W). The layer is `sib.explain.layers.cam_target_layer(model)`
  unless `target_layer=` names one; token layers (ViT) go through `sib.explain.layers.cam_reshape`.
- `saliency`: max over colour channels of |d logit_target / d x| (Simonyan et al. 2014); `attr >= 0`.
- `input_x_gradient`, `integrated_gradients`, `smoothgrad`: signed, summed over colour channels, so
  that summing a map over pixels gives the method's total contribution (completeness for IG).

Several methods of one batch: `explain_many(model, x, target, methods, options)` returns them all, the
single-pass ones (CAMs, saliency, input x gradient) from one shared forward and backward (`sib.explain.many`).

Example:
    >>> attr = explain("grad_cam", model.eval(), x, y)           # (B, 1, H, W), >= 0
    >>> heat = normalize_attr(attr, mode="minmax")                 # per sample, in [0, 1]
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from sib.explain.normalize import NORMALIZE_MODES, normalize_attr
from sib.registry import Registry


class Explainer(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, **options: Any
                 ) -> torch.Tensor: ...


EXPLAINERS: Registry[Explainer] = Registry("explainer")

# Lazy entries: importing sib.explain must not import Captum until a gradient method is used.
for _name in ("grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "score_cam", "eigen_cam"):
    EXPLAINERS.register(_name, f"sib.explain.cam:{_name}")
for _name in ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"):
    EXPLAINERS.register(_name, f"sib.explain.gradient:{_name}")


def explain(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, **options: Any
            ) -> torch.Tensor:
    """Run the explainer registered as `name`; see the module docstring for the contract.

    Args:
        name: a key of `EXPLAINERS` ("grad_cam", "integrated_gradients", ...); an unknown name raises an
            error listing the valid ones.
        model: classifier (B, C, H, W) -> (B, K), in the mode the caller wants (normally eval).
        x: float (B, C, H, W) input batch.
        target: int64 (B,) class indices in [0, K).
        **options: method options (e.g. `target_layer=`, `n_steps=`, `batch_size=`).

    Returns:
        float (B, 1, H, W) unnormalised attribution on `x.device`.
    """
    return EXPLAINERS.get(name)(model, x, target, **options)


def __getattr__(name: str) -> Any:
    # `explain_many` (sib.explain.many) imports the CAM module and torchvision: loaded on first use only.
    if name == "explain_many":
        from sib.explain.many import explain_many

        return explain_many
    raise AttributeError(f"module 'sib.explain' has no attribute {name!r}")


__all__ = ["EXPLAINERS", "NORMALIZE_MODES", "Explainer", "explain", "explain_many", "normalize_attr"]
