"""Input validation shared by all explainers: precise ValueErrors before any work is done."""

from __future__ import annotations

import torch


def check_inputs(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Validate `x` (B, C, H, W) float and `target` (B,) integer >= 0; return target on x.device as int64.

    The upper bound of `target` is only known from the logits; `check_logits` checks it.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float tensor (B, C, H, W); got {shape}")
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be an integer tensor (B,) = ({x.shape[0]},) of class indices; "
                         f"got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices; got dtype {target.dtype}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target must have shape (B,) = ({x.shape[0]},); got {tuple(target.shape)}")
    target = target.to(device=x.device, dtype=torch.long)
    # One host sync per call: a clear error is worth it (an out-of-range gather fails obscurely on GPU).
    if target.numel() and bool((target < 0).any()):
        raise ValueError(f"target holds negative class indices: {target.tolist()}")
    return target


def check_logits(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Check that the model returned (B, K) logits and that every target index is < K."""
    if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"the model must return logits (B, K) with B = {target.shape[0]}; "
                         f"got {tuple(logits.shape)}")
    if target.numel() and bool((target >= logits.shape[1]).any()):
        raise ValueError(f"target out of range: the model has {logits.shape[1]} classes "
                         f"(valid indices 0..{logits.shape[1] - 1}); got {target.tolist()}")
