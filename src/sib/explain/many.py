"""Several explanations of one batch from shared model passes: `explain_many`.

Every single-pass method needs the same two things, so one forward and one backward serve them all:
the CAM layer's activations and the gradient of the summed target logits w.r.t. them (Grad-CAM,
Grad-CAM++, XGrad-CAM, LayerCAM; Eigen-CAM needs only the activations), and the gradient w.r.t. the
input from the same backward (saliency, input x gradient). Score-CAM takes its activations from the same
forward (its B*K masked passes remain). Multi-pass methods (integrated gradients, SmoothGrad) and any
method given options the shared pass does not take run as their single call, `explain(name, ...)`.

Each map equals the single-method call's (same formulas: `sib.explain.cam.*_map`; the input gradient is
the one Captum computes), and the explainer contract holds for the whole call: no hooks left (also after
an exception), `param.grad` and `requires_grad` untouched, `model.training` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sib.explain import EXPLAINERS, explain
from sib.explain._checks import check_inputs
from sib.explain.cam import (
    _finish,
    eigen_cam_map,
    grad_cam_map,
    grad_cam_pp_map,
    layer_cam_map,
    resolve_layer,
    score_cam_map,
    shared_pass,
    xgrad_cam_map,
)

# CAM method -> its map before the ReLU from (acts, grads), and whether it needs the gradient
CAM_MAPS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "grad_cam": (grad_cam_map, True),
    "grad_cam_pp": (grad_cam_pp_map, True),
    "xgrad_cam": (xgrad_cam_map, True),
    "layer_cam": (layer_cam_map, True),
    "eigen_cam": (eigen_cam_map, False),
    "score_cam": (score_cam_map, False),
}
CAM_OPTIONS = {"target_layer"}
INPUT_GRAD = ("saliency", "input_x_gradient")


def _shared_here(name: str, opts: dict[str, Any]) -> bool:
    """Whether `name` with options `opts` is served by the shared pass (else: its own call)."""
    if name == "score_cam":
        return set(opts) <= CAM_OPTIONS | {"batch_size"}
    if name in CAM_MAPS:
        return set(opts) <= CAM_OPTIONS
    return name in INPUT_GRAD and not opts


def explain_many(model: nn.Module, x: torch.Tensor, target: torch.Tensor, methods: Sequence[str],
                 options: dict[str, dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """The maps of several explainers for one batch, the single-pass ones from one forward and one backward.

    Args:
        model: classifier (B, C, H, W) -> (B, K), in the mode the caller wants (normally eval).
        x: float (B, C, H, W) input batch; never modified.
        target: int (B,) class indices in [0, K).
        methods: keys of `EXPLAINERS`; an unknown name raises an error listing the valid ones.
        options: per-method options, {name: {option: value}} (e.g. {"grad_cam": {"target_layer": m}}).

    Returns:
        {name: float (B, 1, H, W) unnormalised attribution on x.device}, in the order of `methods`, each
        equal to `explain(name, model, x, target, **options[name])`.
    """
    options = options or {}
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ValueError(f"options name {unknown}, which are not among the methods {list(methods)}")
    for name in methods:
        EXPLAINERS.get(name)  # unknown names fail before any work
    target = check_inputs(x, target)
    shared = [m for m in methods if _shared_here(m, options.get(m, {}))]
    layers: list[nn.Module] = []  # distinct CAM layers, each hooked once
    layer_index: dict[str, int] = {}
    for name in shared:
        if name in CAM_MAPS:
            layer = resolve_layer(model, options.get(name, {}).get("target_layer"))
            if not any(layer is seen for seen in layers):
                layers.append(layer)
            layer_index[name] = next(i for i, seen in enumerate(layers) if seen is layer)
        if name == "score_cam" and options.get(name, {}).get("batch_size", 256) < 1:
            raise ValueError(f"batch_size must be >= 1; got {options[name]['batch_size']}")
    acts, grads, input_grad = [], None, None
    if shared:
        with torch.enable_grad():  # also under the caller's no_grad, as the single calls
            acts, grads, input_grad = shared_pass(
                model, x, target, layers, layer_grad=any(CAM_MAPS[m][1] for m in shared if m in CAM_MAPS),
                input_grad=any(m in INPUT_GRAD for m in shared))
    maps: dict[str, torch.Tensor] = {}
    for name in methods:
        opts = options.get(name, {})
        if name not in shared:
            maps[name] = explain(name, model, x, target, **opts)
        elif name == "saliency":  # max over colour channels of |d logit / d x|
            maps[name] = input_grad.abs().amax(1, keepdim=True)  # (B, C, H, W) -> (B, 1, H, W)
        elif name == "input_x_gradient":  # signed, summed over colour channels
            maps[name] = (x.detach() * input_grad).sum(1, keepdim=True)
        elif name == "score_cam":
            a = acts[layer_index[name]]
            maps[name] = _finish(score_cam_map(a, model, x, target, opts.get("batch_size", 256)), x)
        else:
            i = layer_index[name]
            fn, needs_grad = CAM_MAPS[name]
            maps[name] = _finish(fn(acts[i], grads[i]) if needs_grad else fn(acts[i]), x)
    return maps
