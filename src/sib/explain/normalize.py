"""Per-sample normalisation of attribution maps, as an explicit, named step.

Explainers return unnormalised maps; metrics that care about scale say so. Constant maps (including
all-zero ones) are safe in every mode: they never produce NaN or inf.
"""

from __future__ import annotations

import torch

NORMALIZE_MODES = ("minmax", "max", "none")


def normalize_attr(attr: torch.Tensor, mode: str = "minmax", eps: float = 0.0) -> torch.Tensor:
    """Normalise each sample of a batch of maps on its own.

    Args:
        attr: float (B, ...) attribution maps, usually (B, 1, H, W).
        mode: "minmax": (a - min) / (max - min), in [0, 1]; a constant map becomes all zeros.
            "max": a / max|a|, in [-1, 1] (sign kept; Quantus' `normalise_by_max`); an all-zero map stays
            zero. "none": returned unchanged.
        eps: added to the denominator (pytorch-grad-cam uses 1e-7); 0 means exact division, with constant
            maps handled explicitly.

    Returns:
        float tensor, same shape, dtype and device as `attr`.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; valid modes: {', '.join(NORMALIZE_MODES)}")
    if mode == "none":
        return attr
    flat = attr.flatten(1)  # (B, ...) -> (B, N)
    view = (-1,) + (1,) * (attr.dim() - 1)
    if mode == "minmax":
        lo = flat.amin(1).view(view)
        span = flat.amax(1).view(view) - lo
        # A constant map has span 0: divide by 1 instead, giving (a - min) = 0 everywhere.
        return (attr - lo) / torch.where(span > 0, span + eps, torch.ones_like(span))
    scale = flat.abs().amax(1).view(view)
    return attr / torch.where(scale > 0, scale + eps, torch.ones_like(scale))
