"""CAM-family explainers: weighted sums of one layer's activation maps, ReLU'd, upsampled to the input.

Our own implementation rather than a library's, because the two candidates break our contract:
pytorch-grad-cam calls `model.eval()` and `model.zero_grad()` on the caller's model (mode and `param.grad`
change), moves every map to NumPy on the CPU and loops per sample; torchcam keeps hooks registered
between calls. What we keep from pytorch-grad-cam are its formulas and constants (eps values, Score-CAM's
align_corners=True mask upsampling and channel softmax), so that its output is our parity oracle
(tests/explain, `parity` marker): after per-sample min-max normalisation the maps agree to 1e-4.

Shared mechanics (`shared_pass`, also used by `sib.explain.many.explain_many` for several methods and
layers at once): one forward hook on the target layer, removed in a `finally`, that
stores a *clone* of the layer's output (DenseNet applies an in-place ReLU after `features`, which would
otherwise rewrite what we read); the gradient of the summed target logits w.r.t. that clone comes from
`torch.autograd.grad`, so `param.grad` is never written. The input is given `requires_grad` so that the
activations are differentiable even when every parameter is frozen.

All methods return float (B, 1, H, W) >= 0 on `x.device`; options: `target_layer=` (an `nn.Module` of
the model; default `sib.explain.layers.cam_target_layer(model)`), and for Score-CAM `batch_size=`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sib.explain._checks import check_inputs, check_logits
from sib.explain.layers import cam_reshape, cam_target_layer


def _to_grid(t: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Layer output as a grid (B, K, h, w); ViT tokens (B, 1+N, D) go through `cam_reshape`."""
    if t.dim() == 4:
        return t
    reshape = cam_reshape(model)
    if t.dim() == 3 and reshape is not None:
        return reshape(t)  # (B, 1+N, D) -> (B, D, h, w)
    raise ValueError(f"the CAM target layer returned a tensor of shape {tuple(t.shape)}; expected "
                     f"(B, K, h, w) maps (or ViT tokens); pass target_layer= a convolutional block")


def _activations(model: nn.Module, x: torch.Tensor, target: torch.Tensor, target_layer: nn.Module | None,
                 with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run the model once; return the target layer's activations, their gradient and the checked target.

    Returns:
        acts: (B, K, h, w) activations of the target layer's last call in the forward pass.
        grads: (B, K, h, w) d(sum_i logit_i[target_i]) / d acts, or None when `with_grad` is False.
        target: (B,) int64 on x.device.
    """
    target = check_inputs(x, target)
    layer = resolve_layer(model, target_layer)
    acts, grads, _ = shared_pass(model, x, target, [layer], layer_grad=with_grad, input_grad=False)
    return acts[0], None if grads is None else grads[0], target


def resolve_layer(model: nn.Module, target_layer: nn.Module | None) -> nn.Module:
    """The CAM layer: `target_layer`, or the model family's default (`cam_target_layer`)."""
    layer = cam_target_layer(model) if target_layer is None else target_layer
    if not isinstance(layer, nn.Module):
        raise ValueError(f"target_layer must be an nn.Module of the model; got {type(layer).__name__}")
    return layer


def shared_pass(model: nn.Module, x: torch.Tensor, target: torch.Tensor, layers: list[nn.Module], *,
                layer_grad: bool, input_grad: bool
                ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor | None]:
    """One forward (and at most one backward) that feeds every single-pass explainer.

    Forward hooks on `layers` (removed in a `finally`) keep the output of each layer's last call; one
    `torch.autograd.grad` of the summed target logits gives the gradient w.r.t. all of them and, when
    `input_grad`, w.r.t. the input. `param.grad` is never written.

    Args:
        model: classifier (B, C, H, W) -> (B, K), used in its current mode.
        x: float (B, C, H, W); never modified.
        target: checked int64 (B,) on x.device (`check_inputs`).
        layers: distinct modules of the model (may be empty).
        layer_grad: also return d score / d activations.
        input_grad: also return d score / d x.

    Returns:
        acts: one (B, K, h, w) grid per layer (ViT tokens reshaped), detached.
        grads: the same shapes, or None unless `layer_grad`.
        input gradient: (B, C, H, W) or None unless `input_grad`.
    """
    captured: dict[int, list[torch.Tensor]] = {id(layer): [] for layer in layers}

    def keep_output(module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"the CAM target layer {type(module).__name__} returned "
                             f"{type(output).__name__}, not a tensor; pass another target_layer=")
        output = output.clone()  # in-place ops downstream (DenseNet's ReLU) must not rewrite it
        captured[id(module)].append(output)
        return output

    handles = [layer.register_forward_hook(keep_output) for layer in layers]
    with_grad = layer_grad or input_grad
    try:
        with torch.set_grad_enabled(with_grad):
            inp = x.detach().clone().requires_grad_(with_grad)  # a fresh leaf: x itself is never touched
            logits = model(inp)
            check_logits(logits, target)
            for layer in layers:
                if not captured[id(layer)]:
                    raise ValueError(f"the CAM target layer {type(layer).__name__} was not called by the "
                                     f"model's forward; pass target_layer= a module the forward uses")
            acts = [captured[id(layer)][-1] for layer in layers]
            wrt = (acts if layer_grad else []) + ([inp] if input_grad else [])
            grads: tuple[torch.Tensor, ...] = ()
            if wrt:
                score = logits.gather(1, target[:, None]).sum()  # samples are independent: one backward
                grads = torch.autograd.grad(score, wrt)
    finally:
        for handle in handles:
            handle.remove()
    layer_grads = [_to_grid(g, model).detach() for g in grads[:len(acts)]] if layer_grad else None
    return ([_to_grid(a, model).detach() for a in acts], layer_grads,
            grads[-1].detach() if input_grad else None)


def _finish(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, h, w) weighted map -> ReLU -> bilinear upsampling -> (B, 1, H, W) in x's dtype."""
    cam = F.relu(cam)[:, None]  # (B, h, w) -> (B, 1, h, w)
    if cam.shape[-2:] != x.shape[-2:]:
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam.to(x.dtype)


def _weighted(acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[b, k] * acts[b, k]: (B, K, h, w), (B, K) -> (B, h, w)."""
    return torch.einsum("bk,bkhw->bhw", weights, acts)


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
             target_layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of the gradient.

    Args:
        model: classifier (B, C, H, W) -> (B, K); used in its current mode.
        x: float (B, C, H, W).
        target: int64 (B,) class indices.
        target_layer: layer whose activations are weighted; default by model family.

    Returns:
        float (B, 1, H, W) >= 0, unnormalised.
    """
    acts, grads, _ = _activations(model, x, target, target_layer, with_grad=True)
    return _finish(grad_cam_map(acts, grads), x)


def grad_cam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's weighted map before the ReLU: acts, grads (B, K, h, w) -> (B, h, w)."""
    return _weighted(acts, grads.mean((2, 3)))


def grad_cam_pp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                target_layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), closed form for an exponential of the score.

    alpha = g^2 / (2 g^2 + sum_ij(A) g^3); weights = sum_ij alpha * relu(g). Same arguments and result
    as `grad_cam`.
    """
    acts, grads, _ = _activations(model, x, target, target_layer, with_grad=True)
    return _finish(grad_cam_pp_map(acts, grads), x)


def grad_cam_pp_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++'s weighted map before the ReLU: acts, grads (B, K, h, w) -> (B, h, w)."""
    g2 = grads.pow(2)
    sum_acts = acts.sum((2, 3), keepdim=True)  # (B, K, 1, 1)
    alpha = g2 / (2 * g2 + sum_acts * g2 * grads + 1e-6)  # eps as pytorch-grad-cam
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * F.relu(grads)).sum((2, 3))
    return _weighted(acts, weights)


def xgrad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
              target_layer: nn.Module | None = None) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): weights = sum_ij A * g / sum_ij A. Same arguments as `grad_cam`."""
    acts, grads, _ = _activations(model, x, target, target_layer, with_grad=True)
    return _finish(xgrad_cam_map(acts, grads), x)


def xgrad_cam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM's weighted map before the ReLU: acts, grads (B, K, h, w) -> (B, h, w)."""
    weights = (grads * acts / (acts.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3))
    return _weighted(acts, weights)


def layer_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
              target_layer: nn.Module | None = None) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): per-location weights, sum_k relu(g) * A. Same arguments as grad_cam."""
    acts, grads, _ = _activations(model, x, target, target_layer, with_grad=True)
    return _finish(layer_cam_map(acts, grads), x)


def layer_cam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """LayerCAM's map before the ReLU: acts, grads (B, K, h, w) -> (B, h, w)."""
    return (F.relu(grads) * acts).sum(1)


def eigen_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
              target_layer: nn.Module | None = None) -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): projection of the centred activations on their first
    principal component. Class-agnostic: `target` is validated but does not change the map.

    The SVD's sign is arbitrary; we fix it as Seg-Eigen-CAM (Chung & Ying 2025, Eq. 13) does: flip the
    projection when |min| > |max|, so that the salient side is positive before the ReLU. Same arguments
    and result as `grad_cam`.
    """
    acts, _, _ = _activations(model, x, target, target_layer, with_grad=False)
    return _finish(eigen_cam_map(acts), x)


def eigen_cam_map(acts: torch.Tensor, grads: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen-CAM's sign-corrected projection before the ReLU: acts (B, K, h, w) -> (B, h, w); no gradient."""
    b, _, h, w = acts.shape
    feats = acts.flatten(2).transpose(1, 2)  # (B, K, h, w) -> (B, h*w, K)
    feats = feats - feats.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(feats, full_matrices=False)  # vh: (B, min(h*w, K), K)
    proj = (feats @ vh[:, 0, :, None]).squeeze(2)  # (B, h*w)
    flip = proj.amin(1, keepdim=True).abs() > proj.amax(1, keepdim=True).abs()
    proj = torch.where(flip, -proj, proj)
    return proj.view(b, h, w)


def score_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
              target_layer: nn.Module | None = None, batch_size: int = 256) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020): weight each channel by the target logit of the input masked by it.

    Each activation map is upsampled (bilinear, align_corners=True, as pytorch-grad-cam), min-max
    normalised to [0, 1] (a constant map becomes an all-zero mask) and multiplies the input; the target
    logits of the B*K masked inputs, softmaxed over the K channels, are the weights. Costs B*K forward
    passes, run `batch_size` at a time without gradients.

    Args:
        model, x, target, target_layer: as `grad_cam`.
        batch_size: masked images per forward pass.

    Returns:
        float (B, 1, H, W) >= 0, unnormalised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    acts, _, target = _activations(model, x, target, target_layer, with_grad=False)
    return _finish(score_cam_map(acts, model, x, target, batch_size), x)


def score_cam_map(acts: torch.Tensor, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                  batch_size: int = 256) -> torch.Tensor:
    """Score-CAM's weighted map before the ReLU, from the target layer's acts (B, K, h, w) -> (B, h, w).

    `target` is the checked int64 (B,) on x.device; runs the B*K masked forward passes.
    """
    b, k = acts.shape[:2]
    flat_acts = acts.flatten(0, 1)[:, None]  # (B, K, h, w) -> (B*K, 1, h, w)
    sample = torch.arange(b, device=x.device).repeat_interleave(k)  # (B*K,) sample of each masked image
    scores = []
    with torch.no_grad():
        for start in range(0, b * k, batch_size):
            idx = slice(start, start + batch_size)
            masks = F.interpolate(flat_acts[idx], size=x.shape[-2:], mode="bilinear", align_corners=True)
            lo = masks.amin((2, 3), keepdim=True)
            hi = masks.amax((2, 3), keepdim=True)
            masks = (masks - lo) / (hi - lo + 1e-8)  # (n, 1, H, W) in [0, 1]
            logits = model(x[sample[idx]] * masks)
            scores.append(logits.gather(1, target[sample[idx], None]).squeeze(1))
    weights = torch.cat(scores).view(b, k).softmax(1)  # (B*K,) -> (B, K)
    return _weighted(acts, weights.to(acts.dtype))
