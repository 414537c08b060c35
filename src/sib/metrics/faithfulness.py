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

Shared passes: every metric takes `cache=` a `PerturbationCache` of the same (model, x, target), which
keeps what does not depend on the attribution or the metric: the target probability of the unperturbed
x (deletion's first column, insertion's last, Y of average drop and increase in confidence; the evaluator
fills it from the forward it makes anyway), of each baseline image (deletion's last column, insertion's
first), and O of a map (average drop and increase in confidence read the same forward). Only the steps
that change some but not all pixels are run per map. Without `cache=` a call makes its own.

Batches: the perturbed images of all samples and steps are made and run `batch_size` at a time (only one
chunk exists at once); `batch_size=None` takes as many as fit a memory budget of input bytes,
`sib.batching.BATCH_BYTES` (1 MiB on a CPU: 21 images at 64 px, where the per-image cost of a forward is
lowest; 64 MiB on a GPU), at least 8.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torchvision.transforms.functional as TF
from torch import nn

from sib.batching import BATCH_BYTES, images_per_forward
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
            out.append(target_probability(logits, target[start:start + batch_size]))
    return torch.cat(out)


def target_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[target]: (N, K), (N,) int64 -> (N,). The one formula every metric (and a cache
    filled from the caller's own forward) uses."""
    return logits.softmax(1).gather(1, target[:, None]).squeeze(1)


class PerturbationCache:
    """Target probabilities shared by the perturbation metrics of one batch: the unperturbed x, each
    baseline image, and O (x times the min-max map) per map. Valid for one (model, x, target) only: a
    metric given a cache of other objects raises a ValueError.

    Args:
        model: the classifier the metrics run.
        x: float (B, C, H, W), the batch.
        target: int (B,) class indices (the same tensor object the metrics get).
        clean: optional float (B,) `target_probability(model(x), target)` from the caller's own forward.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                 clean: torch.Tensor | None = None) -> None:
        if clean is not None and clean.shape != (x.shape[0],):
            raise ValueError(f"clean must be the (B,) = ({x.shape[0]},) target probabilities of x; "
                             f"got {tuple(clean.shape)}")
        self.model, self.x, self.target = model, x, target
        self._clean = None if clean is None else clean.detach()
        self._baselines: list[tuple[Any, torch.Tensor, torch.Tensor]] = []  # (key, image, probabilities)
        self._confidence: list[tuple[torch.Tensor, torch.Tensor]] = []  # (attr, O), by attr identity

    def _check(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
        if model is not self.model or x is not self.x or target is not self.target:
            raise ValueError("cache= was made for another (model, x, target): make one PerturbationCache "
                             "per batch and pass that batch's model, x and target to every metric")

    def clean(self, target: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B,) probability of the target on the unperturbed x."""
        if self._clean is None:
            self._clean = _probs(self.model, self.x, target, batch_size)
        return self._clean

    def baseline(self, baseline: str | float | torch.Tensor, target: torch.Tensor, batch_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The baseline image (B, C, H, W) and its (B,) target probability."""
        for key, image, probs in self._baselines:
            if key is baseline or (not isinstance(key, torch.Tensor) and not isinstance(baseline, torch.Tensor)
                                   and key == baseline):
                return image, probs
        image = _baseline(self.x, baseline)
        probs = _probs(self.model, image, target, batch_size)
        self._baselines.append((baseline, image, probs))
        return image, probs

    def confidence(self, attr: torch.Tensor, explanation: torch.Tensor, target: torch.Tensor, batch_size: int
                   ) -> torch.Tensor:
        """(B,) target probability on x * explanation, remembered for this `attr` object."""
        for seen, probs in self._confidence:
            if seen is attr:
                return probs
        probs = _probs(self.model, self.x * explanation, target, batch_size)
        self._confidence.append((attr, probs))
        return probs


def _cache_for(cache: PerturbationCache | None, model: nn.Module, x: torch.Tensor, target: torch.Tensor
               ) -> PerturbationCache:
    if cache is None:
        return PerturbationCache(model, x, target)
    cache._check(model, x, target)
    return cache


def _curve(attr: torch.Tensor, mask: torch.Tensor | None, model: nn.Module | None, x: torch.Tensor | None,
           target: torch.Tensor | None, n_steps: int, baseline: str | float | torch.Tensor,
           batch_size: int | None, insert: bool, cache: PerturbationCache | None) -> torch.Tensor:
    checked = _check(attr, mask, model, x, target)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1; got {n_steps}")
    batch_size = images_per_forward(x, batch_size)
    cache = _cache_for(cache, model, x, target)
    target = checked
    attr, finite = _finite(attr)
    b, n = attr.shape[0], attr[0].numel()
    base, p_base = cache.baseline(baseline, target, batch_size)
    p_x = cache.clean(target, batch_size)
    src, dst, p_src, p_dst = (base, x, p_base, p_x) if insert else (x, base, p_x, p_base)
    counts = [s * n // n_steps for s in range(n_steps + 1)]  # pixels changed after each step
    curve = torch.empty(b, n_steps + 1, dtype=p_x.dtype, device=x.device)
    # a step that changes no pixel is the source image, one that changes all of them the destination
    for s, c in enumerate(counts):
        if c in (0, n):
            curve[:, s] = p_src if c == 0 else p_dst
    middle = [s for s, c in enumerate(counts) if 0 < c < n]
    if middle:
        order = attr.flatten(1).argsort(dim=1, descending=True, stable=True)  # (B, N) pixel indices, best first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
        steps = torch.tensor(middle, device=x.device)  # (S,)
        changed_counts = torch.tensor(counts, device=x.device)[steps]  # (S,)
        total = b * len(middle)  # perturbed images, step-major: image j is sample j % B at step j // B
        probs = []
        for start in range(0, total, batch_size):
            j = torch.arange(start, min(start + batch_size, total), device=x.device)
            i, k = j % b, j // b
            changed = (rank[i] < changed_counts[k][:, None]).view(-1, 1, *attr.shape[-2:])  # (J, 1, H, W)
            images = torch.where(changed, dst[i], src[i])  # (J, C, H, W)
            probs.append(_probs(model, images, target[i], batch_size))
        curve[:, middle] = torch.cat(probs).view(len(middle), b).T  # (S*B,) -> (B, S)
    return _invalid_to_nan(curve, finite)  # (B, n_steps + 1)


def deletion_curve(attr: torch.Tensor, mask: torch.Tensor | None = None, *, model: nn.Module | None = None,
                   x: torch.Tensor | None = None, target: torch.Tensor | None = None, n_steps: int = 20,
                   baseline: str | float | torch.Tensor = "zeros", batch_size: int | None = None,
                   cache: PerturbationCache | None = None) -> torch.Tensor:
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
        batch_size: images per forward pass; None: a memory budget (`BATCH_BYTES`).
        cache: a `PerturbationCache` of the same (model, x, target), shared with other metrics of the batch.

    Returns:
        float (B, n_steps + 1) probabilities in [0, 1]; column 0 is the unperturbed input; a row of NaN
        where attr is not finite (invalid).
    """
    return _curve(attr, mask, model, x, target, n_steps, baseline, batch_size, False, cache)


def insertion_curve(attr: torch.Tensor, mask: torch.Tensor | None = None, *, model: nn.Module | None = None,
                    x: torch.Tensor | None = None, target: torch.Tensor | None = None, n_steps: int = 20,
                    baseline: str | float | torch.Tensor = "blur", batch_size: int | None = None,
                    cache: PerturbationCache | None = None) -> torch.Tensor:
    """Target-class probability as the top-attributed pixels of x are pasted into the baseline (RISE).

    Same arguments as `deletion_curve` (default baseline "blur", as RISE); column 0 is the baseline,
    the last column x itself.
    """
    return _curve(attr, mask, model, x, target, n_steps, baseline, batch_size, True, cache)


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
                 x: torch.Tensor | None, target: torch.Tensor | None, batch_size: int | None,
                 cache: PerturbationCache | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target probability on x (Y) and on x * E, E = the per-sample min-max normalised map (O); the
    (B,) bool finite rows of attr."""
    checked = _check(attr, mask, model, x, target)
    batch_size = images_per_forward(x, batch_size)
    cache = _cache_for(cache, model, x, target)
    finite_attr, finite = _finite(attr)
    explanation = normalize_attr(finite_attr, mode="minmax").to(x.dtype)  # (B, 1, H, W) in [0, 1]
    return cache.clean(checked, batch_size), cache.confidence(attr, explanation, checked, batch_size), finite


def average_drop(attr: torch.Tensor, mask: torch.Tensor | None = None, *, model: nn.Module | None = None,
                 x: torch.Tensor | None = None, target: torch.Tensor | None = None,
                 batch_size: int | None = None, cache: PerturbationCache | None = None) -> torch.Tensor:
    """Drop in confidence (Chattopadhay et al. 2018): max(0, Y - O) / Y per sample; lower is better.

    Y is the target probability on x, O on x * E with E the map min-max normalised to [0, 1] per sample
    (a constant map gives E = 0, i.e. the all-zero image). The paper's "Average Drop %" is 100 x the
    mean of these values.

    Args:
        attr: float (B, 1, H, W). mask: ignored (may be None).
        model, x, target, batch_size, cache: as `deletion_curve`.

    Returns:
        float (B,) in [0, 1]; NaN where attr is not finite (invalid).
    """
    y, o, finite = _confidences(attr, mask, model, x, target, batch_size, cache)
    return _invalid_to_nan((y - o).clamp(min=0) / y.clamp(min=torch.finfo(y.dtype).tiny), finite)


def increase_in_confidence(attr: torch.Tensor, mask: torch.Tensor | None = None, *,
                           model: nn.Module | None = None, x: torch.Tensor | None = None,
                           target: torch.Tensor | None = None, batch_size: int | None = None,
                           cache: PerturbationCache | None = None) -> torch.Tensor:
    """Increase in confidence (Chattopadhay et al. 2018): 1.0 where O > Y, else 0.0; higher is better.

    Y and O as in `average_drop` (same arguments); the mean over samples is the paper's rate.

    Returns:
        float (B,) of 0.0 / 1.0; NaN where attr is not finite (invalid).
    """
    y, o, finite = _confidences(attr, mask, model, x, target, batch_size, cache)
    return _invalid_to_nan((o > y).to(y.dtype), finite)


__all__ = ["BASELINES", "BATCH_BYTES", "PerturbationCache", "average_drop", "deletion_auc", "deletion_curve",
           "images_per_forward", "increase_in_confidence", "insertion_auc", "insertion_curve", "target_probability"]
