"""Faithfulness metrics: does perturbing what the attribution ranks high change the model's output?

Every function takes `attr` float (B, 1, H, W), `mask` (unused here, may be None: these metrics do not
need ground truth, so an empty mask does not exclude a sample) and the keywords `model`, `x` float
(B, C, H, W) and `target` int (B,), and returns a (B,) float tensor. The model is run without
gradients, in the mode the caller left it (normally eval), on batches of at most `batch_size` images.

Pixel order: descending attribution, ties broken by pixel index (row-major) via a stable sort, so a
constant or all-zero map has a defined value (it deletes/inserts top-left first).

Non-finite attribution (a NaN or +-inf anywhere in a sample's map): NaN, meaning "invalid", as the
localisation metrics (`sib.metrics.localisation`); such a map does not order or weight any pixel (it is
replaced by zeros before the model runs, so no NaN reaches the model).
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.functional as TF
from torch import nn

from sib.explain.normalize import normalize_attr
from sib.metrics._checks import check_attr, check_attr_mask, check_model_inputs, finite_rows

BASELINES = ("zeros", "blur")


def _check(attr: torch.Tensor, mask: torch.Tensor | None, model: nn.Module | None, x: torch.Tensor | None,
           target: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        check_attr(attr)
    else:
        check_attr_mask(attr, mask)
    if model is None:
        raise ValueError("this metric perturbs the input: pass model=, x= and target=")
    check_model_inputs(attr, x, target)
    return target.to(device=x.device, dtype=torch.long)


def _baseline(x: torch.Tensor, baseline: str | float | torch.Tensor) -> torch.Tensor:
    """The image that deleted pixels take: zeros, a Gaussian blur of x (RISE: 11x11, sigma 5, reflect
    padding; smaller kernels for images under 6 px), a constant, or a tensor broadcastable to x."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
    if isinstance(baseline, int | float) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "blur":
        # Reflect padding needs the kernel radius below the image side: shrink it for tiny images.
        k = min(11, 2 * min(x.shape[-2:]) - 1)
        return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[5.0, 5.0])
    raise ValueError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}, a number or a tensor")


def _finite(attr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attr with its invalid samples zeroed, and the (B,) bool finite rows."""
    finite = finite_rows(attr)
    return torch.where(finite.view(-1, *([1] * (attr.dim() - 1))), attr, torch.zeros_like(attr)), finite


def _invalid_to_nan(values: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """NaN on the rows (dim 0) of `values` whose attribution was not finite."""
    return torch.where(finite.view(-1, *([1] * (values.dim() - 1))), values, torch.full_like(values, math.nan))


def _probs(model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Softmax probability of `target`: images (N, C, H, W), target (N,) -> (N,), no gradients."""
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = model(images[start:start + batch_size])
            out.append(logits.softmax(1).gather(1, target[start:start + batch_size, None]).squeeze(1))
    return torch.cat(out)


def _curve(attr: torch.Tensor, mask: torch.Tensor | None, model: nn.Module | None, x: torch.Tensor | None,
           target: torch.Tensor | None, n_steps: int, baseline: str | float | torch.Tensor,
           batch_size: int, insert: bool) -> torch.Tensor:
    target = _check(attr, mask, model, x, target)
    if n_steps < 1 or batch_size < 1:
        raise ValueError(f"n_steps and batch_size must be >= 1; got {n_steps}, {batch_size}")
    attr, finite = _finite(attr)
    b, n = attr.shape[0], attr[0].numel()
    base = _baseline(x, baseline)
    order = attr.flatten(1).argsort(dim=1, descending=True, stable=True)  # (B, N) pixel indices, best first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
    counts = torch.arange(n_steps + 1, device=x.device) * n // n_steps  # pixels changed after each step
    per_chunk = max(1, batch_size // b)  # steps whose B images go through the model together
    probs = []
    for start in range(0, n_steps + 1, per_chunk):
        m = counts[start:start + per_chunk]  # (S,)
        changed = (rank[:, None, :] < m[None, :, None]).view(b, -1, 1, *attr.shape[-2:])  # (B, S, 1, H, W)
        src, dst = (base, x) if insert else (x, base)
        images = torch.where(changed, dst[:, None], src[:, None])  # (B, S, C, H, W)
        p = _probs(model, images.flatten(0, 1), target.repeat_interleave(m.numel()), batch_size)
        probs.append(p.view(b, m.numel()))
    return _invalid_to_nan(torch.cat(probs, 1), finite)  # (B, n_steps + 1)


def deletion_curve(attr: torch.Tensor, mask: torch.Tensor | None = None, *, model: nn.Module | None = None,
                   x: torch.Tensor | None = None, target: torch.Tensor | None = None, n_steps: int = 20,
                   baseline: str | float | torch.Tensor = "zeros", batch_size: int = 256) -> torch.Tensor:
    """Target-class probability as the top-attributed pixels are replaced by the baseline (RISE).

    Step s (0..n_steps) has the first floor(s * H*W / n_steps) pixels of the order replaced (all
    channels of a pixel together).

    Args:
        attr: float (B, 1, H, W) attribution.
        mask: ignored (may be None); checked for shape if given.
        model: classifier (B, C, H, W) -> logits (B, K).
        x: float (B, C, H, W) inputs the attribution explains.
        target: int (B,) class indices.
        n_steps: number of perturbation steps.
        baseline: "zeros" (the dataset mean for normalised inputs), "blur", a number, or a tensor.
        batch_size: images per forward pass.

    Returns:
        float (B, n_steps + 1) probabilities in [0, 1]; column 0 is the unperturbed input; a row of NaN
        where attr is not finite (invalid).
    """
    return _curve(attr, mask, model, x, target, n_steps, baseline, batch_size, insert=False)


def insertion_curve(attr: torch.Tensor, mask: torch.Tensor | None = None, *, model: nn.Module | None = None,
                    x: torch.Tensor | None = None, target: torch.Tensor | None = None, n_steps: int = 20,
                    baseline: str | float | torch.Tensor = "blur", batch_size: int = 256) -> torch.Tensor:
    """Target-class probability as the top-attributed pixels of x are pasted into the baseline (RISE).

    Same arguments as `deletion_curve` (default baseline "blur", as RISE); column 0 is the baseline,
    the last column x itself.
    """
    return _curve(attr, mask, model, x, target, n_steps, baseline, batch_size, insert=True)


def _auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under a curve sampled at n+1 equally spaced points of [0, 1]: (B, n+1) -> (B,)."""
    return (curve[:, 1:] + curve[:, :-1]).sum(1) / (2 * (curve.shape[1] - 1))


def deletion_auc(attr: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Area under `deletion_curve` over the deleted fraction [0, 1]; lower is better.

    Takes the arguments of `deletion_curve`. Returns float (B,) in [0, 1]; NaN where attr is not finite.
    """
    return _auc(deletion_curve(attr, mask, **kwargs))


def insertion_auc(attr: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Area under `insertion_curve` over the inserted fraction [0, 1]; higher is better.

    Takes the arguments of `insertion_curve`. Returns float (B,) in [0, 1]; NaN where attr is not finite.
    """
    return _auc(insertion_curve(attr, mask, **kwargs))


def _confidences(attr: torch.Tensor, mask: torch.Tensor | None, model: nn.Module | None,
                 x: torch.Tensor | None, target: torch.Tensor | None, batch_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target probability on x (Y) and on x * E, E = the per-sample min-max normalised map (O); the
    (B,) bool finite rows of attr."""
    target = _check(attr, mask, model, x, target)
    attr, finite = _finite(attr)
    explanation = normalize_attr(attr, mode="minmax").to(x.dtype)  # (B, 1, H, W) in [0, 1]
    probs = _probs(model, torch.cat([x, x * explanation]), target.repeat(2), batch_size)
    return probs[: x.shape[0]], probs[x.shape[0]:], finite


def average_drop(attr: torch.Tensor, mask: torch.Tensor | None = None, *, model: nn.Module | None = None,
                 x: torch.Tensor | None = None, target: torch.Tensor | None = None,
                 batch_size: int = 256) -> torch.Tensor:
    """Drop in confidence (Chattopadhay et al. 2018): max(0, Y - O) / Y per sample; lower is better.

    Y is the target probability on x, O on x * E with E the map min-max normalised to [0, 1] per sample
    (a constant map gives E = 0, i.e. the all-zero image). The paper's "Average Drop %" is 100 x the
    mean of these values.

    Args:
        attr: float (B, 1, H, W). mask: ignored (may be None).
        model, x, target, batch_size: as `deletion_curve`.

    Returns:
        float (B,) in [0, 1]; NaN where attr is not finite (invalid).
    """
    y, o, finite = _confidences(attr, mask, model, x, target, batch_size)
    return _invalid_to_nan((y - o).clamp(min=0) / y.clamp(min=torch.finfo(y.dtype).tiny), finite)


def increase_in_confidence(attr: torch.Tensor, mask: torch.Tensor | None = None, *,
                           model: nn.Module | None = None, x: torch.Tensor | None = None,
                           target: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    """Increase in confidence (Chattopadhay et al. 2018): 1.0 where O > Y, else 0.0; higher is better.

    Y and O as in `average_drop` (same arguments); the mean over samples is the paper's rate.

    Returns:
        float (B,) of 0.0 / 1.0; NaN where attr is not finite (invalid).
    """
    y, o, finite = _confidences(attr, mask, model, x, target, batch_size)
    return _invalid_to_nan((o > y).to(y.dtype), finite)
