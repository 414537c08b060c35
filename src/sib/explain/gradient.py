"""Gradient-family explainers: functions of d logit_target / d x, reduced over colour channels.

`saliency`, `input_x_gradient` and `integrated_gradients` are Captum's (correct, maintained, and as fast
as a hand-written version: one batched backward, IG's steps batched by `internal_batch_size`). Captum
computes input gradients with `torch.autograd.grad`, so `param.grad` is untouched, and these methods
register no hooks. We only wrap the model so that the target range is checked with a clear ValueError.

`smoothgrad` is our own: Captum's `NoiseTunnel` draws the noise for the whole batch from the global RNG,
so a sample's map depends on its batch neighbours and on unrelated RNG use (no batch invariance, no
reproducibility). Ours draws one noise pattern per `seed` from a private generator and applies the same
pattern to every sample, scaled per sample; `fn(x)[i] == fn(x[i:i+1])` holds.

Channel rules (module docstring of `sib.explain`): saliency = max_c |g_c|; the others sum the signed
per-channel values, so a map sums to the method's total contribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sib.batching import images_per_forward
from sib.explain._checks import check_inputs


def _checked_forward(model: nn.Module, target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as Captum's forward_func; the first call checks that target indices are < K."""
    checked = False

    def forward(inp: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        logits = model(inp)
        if not checked:
            if logits.dim() != 2:
                raise ValueError(f"the model must return logits (B, K); got {tuple(logits.shape)}")
            if target.numel() and bool((target >= logits.shape[1]).any()):
                raise ValueError(f"target out of range: the model has {logits.shape[1]} classes "
                                 f"(valid indices 0..{logits.shape[1] - 1}); got {target.tolist()}")
            checked = True
        return logits

    return forward


def _leaf(x: torch.Tensor) -> torch.Tensor:
    # A fresh leaf that requires grad: the caller's tensor is never modified, and Captum does not warn.
    return x.detach().clone().requires_grad_(True)


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Vanilla gradient (Simonyan et al. 2014): max over channels of |d logit_target / d x|.

    Args:
        model: classifier (B, C, H, W) -> (B, K); used in its current mode.
        x: float (B, C, H, W).
        target: int64 (B,) class indices.

    Returns:
        float (B, 1, H, W) >= 0, unnormalised.
    """
    from captum.attr import Saliency

    target = check_inputs(x, target)
    with torch.enable_grad():
        grads = Saliency(_checked_forward(model, target)).attribute(_leaf(x), target=target, abs=True)
    return grads.detach().amax(1, keepdim=True)  # (B, C, H, W) -> (B, 1, H, W)


def input_x_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Input x gradient (Shrikumar et al. 2016): sum over channels of x * d logit_target / d x, signed.

    For a linear model this is each pixel's exact contribution to the logit. Same arguments as
    `saliency`; returns float (B, 1, H, W), signed.
    """
    from captum.attr import InputXGradient

    target = check_inputs(x, target)
    with torch.enable_grad():
        attr = InputXGradient(_checked_forward(model, target)).attribute(_leaf(x), target=target)
    return attr.detach().sum(1, keepdim=True)


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, n_steps: int = 50,
                         baseline: float | torch.Tensor = 0.0, method: str = "gausslegendre",
                         batch_size: int | None = None) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017), summed over channels, signed.

    Completeness: `attr[i].sum()` approximates logit_t(x_i) - logit_t(baseline_i), to the accuracy of
    the `n_steps`-point quadrature.

    Args:
        model, x, target: as `saliency`.
        n_steps: quadrature points along the straight path.
        baseline: scalar or tensor broadcastable to x (0.0 is the dataset mean for normalised inputs).
        method: Captum's quadrature ("gausslegendre", "riemann_trapezoid", ...).
        batch_size: images per forward pass (Captum's internal_batch_size; at least B); None: a memory
            budget (`sib.batching.images_per_forward`), so the B * n_steps images run in passes of that size.

    Returns:
        float (B, 1, H, W), signed, unnormalised.
    """
    from captum.attr import IntegratedGradients

    target = check_inputs(x, target)
    if isinstance(baseline, torch.Tensor):
        baseline = baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
    with torch.enable_grad():
        attr = IntegratedGradients(_checked_forward(model, target)).attribute(
            _leaf(x), baselines=baseline, target=target, n_steps=n_steps, method=method,
            internal_batch_size=max(images_per_forward(x, batch_size), x.shape[0]))
    return attr.detach().sum(1, keepdim=True)


def _input_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit_target / d x for a batch: (N, C, H, W), (N,) -> (N, C, H, W); one backward pass."""
    with torch.enable_grad():
        inp = _leaf(x)
        logits = _checked_forward(model, target)(inp)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), inp)
    return grad


def smoothgrad(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, n_samples: int = 25,
               noise_level: float = 0.15, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): mean gradient over noisy copies, summed over channels, signed.

    Noise: `n_samples` standard-normal patterns (C, H, W) from `torch.Generator().manual_seed(seed)` on
    the CPU (the same numbers on every device), shared by all samples and scaled per sample by
    sigma_i = noise_level * (max(x_i) - min(x_i)).

    Args:
        model, x, target: as `saliency`.
        n_samples: noisy copies per image.
        noise_level: noise std as a fraction of each image's value range.
        seed: seed of the noise patterns.
        batch_size: images per forward pass; None: a memory budget (`sib.batching.images_per_forward`).

    Returns:
        float (B, 1, H, W), signed, unnormalised.
    """
    target = check_inputs(x, target)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1; got {n_samples}")
    b = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((n_samples, *x.shape[1:]), generator=gen).to(device=x.device, dtype=x.dtype)
    sigma = noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))  # (B,)
    per_chunk = max(1, images_per_forward(x, batch_size) // max(b, 1))  # noise patterns per forward pass
    total = torch.zeros_like(x)
    for start in range(0, n_samples, per_chunk):
        eps = noise[start:start + per_chunk]  # (n, C, H, W)
        noisy = x[None] + sigma[None, :, None, None, None] * eps[:, None]  # (n, B, C, H, W)
        grads = _input_grad(model, noisy.flatten(0, 1), target.repeat(eps.shape[0]))  # (n*B, C, H, W)
        total += grads.view(eps.shape[0], b, *x.shape[1:]).sum(0)
    return (total / n_samples).sum(1, keepdim=True)
