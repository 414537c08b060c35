"""Input validation shared by the metric functions: precise ValueErrors, no host syncs; finiteness."""

from __future__ import annotations

import torch


def check_attr(attr: torch.Tensor) -> None:
    """`attr` must be a float tensor (B, 1, H, W)."""
    if not isinstance(attr, torch.Tensor) or attr.dim() != 4 or attr.shape[1] != 1:
        shape = tuple(attr.shape) if isinstance(attr, torch.Tensor) else type(attr).__name__
        raise ValueError(f"attr must be a tensor (B, 1, H, W); got {shape}")
    if not attr.is_floating_point():
        raise ValueError(f"attr must be a float tensor; got dtype {attr.dtype}")


def check_attr_mask(attr: torch.Tensor, mask: torch.Tensor) -> None:
    """`attr` float (B, 1, H, W) and `mask` bool of exactly the same shape."""
    check_attr(attr)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool tensor (B, 1, H, W) = {tuple(attr.shape)}; "
                         f"got {type(mask).__name__}")
    if mask.shape != attr.shape:
        raise ValueError(f"attr and mask shapes differ: attr {tuple(attr.shape)}, mask {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor; got dtype {mask.dtype}")


def check_model_inputs(attr: torch.Tensor, x: torch.Tensor | None, target: torch.Tensor | None) -> None:
    """Perturbation metrics: x (B, C, H, W) float matching attr's batch and size, target (B,) integer."""
    if x is None or target is None:
        raise ValueError("this metric perturbs the input: pass model=, x= and target=")
    if x.dim() != 4 or x.shape[0] != attr.shape[0] or x.shape[-2:] != attr.shape[-2:]:
        raise ValueError(f"x must be (B, C, H, W) with the batch and size of attr {tuple(attr.shape)}; "
                         f"got {tuple(x.shape)}")
    if target.shape != (x.shape[0],) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor (B,) = ({x.shape[0]},); got "
                         f"{tuple(target.shape)} {target.dtype}")


def finite_rows(attr: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where every value of a sample's attribution (B, ...) is finite.

    A sample with a NaN or +-inf anywhere in its map is "invalid": every metric returns NaN for it, and
    the evaluator and the accumulating metrics count it apart from "excluded" (empty mask).
    """
    return torch.isfinite(attr.flatten(1)).all(1)
