"""Explanations at a layer, as a quantity a regulariser can train: the layer choice, the capture, the maps.

A regulariser shapes an explanation (`explanation`) taken at a place (`layer`):

    layer        "input"              the image (every regulariser's published place)
                 "cam"                the model family's CAM layer (`sib.explain.layers.cam_target_layer`: ResNet's
                                      layer4, our CNNs' and VGG's / DenseNet's `features`, ViT's last ln_1)
                 a module path        any named module of the model ("layer3", "features.2", ...)
    explanation  "gradient"           the input/layer gradient of the regulariser's own target
                 "grad_cam"           the label's Grad-CAM at the layer (a layer only)
                 "vjp"                S-IB's map (sib: the label-free VJP; sib_logp: d log p_y / d A)

The layer's output is captured by a forward hook during the training step's own forward (one model call:
`capture`), kept with its graph, and the explanation is differentiated with `create_graph=True`.

Grad-CAM here vs Captum's `LayerGradCam`. Captum computes alpha_k = mean_hw(d y_c / d A_k) with
`torch.autograd.grad` and no graph: the channel weights are constants, and the map can only be trained
through the activations A. For guidance the weights must be trainable too (Rao et al. 2023 differentiate
the whole attribution): we keep the graph of the gradient, so d loss / d theta flows through both alpha
(the double backward, through the part of the model after the layer only) and A. The forward values are
the same as Captum's (tests/test_guidance.py compares them).

How masks and maps meet: the layer's map (B, 1, h, w) is upsampled bilinearly to the image (B, 1, H, W)
before the loss, as Rao et al. do and as `sib evaluate` does when it scores a CAM against the mask, so the
quantity trained is the quantity measured, and a mask keeps its full resolution (pooling the mask to an
8x8 layer would turn a thin object into a few half-covered cells). S-IB at a layer is the exception: its
terms (HSIC of R*M with A*M, variance of R*(1-M)) live in the layer's channel space, so there the
ground-truth mask is area-pooled to the layer's grid (a soft mask in [0, 1], the same role as S-IB's own
soft adaptive mask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from sib.explain.layers import cam_reshape, cam_target_layer


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (the model itself otherwise)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def resolve_layer(model: nn.Module, spec: str) -> nn.Module | None:
    """The module `spec` names in `model` (None for "input"); a clear ValueError for an unknown path."""
    m = unwrap(model)
    if spec == "input":
        return None
    if spec == "cam":
        return cam_target_layer(m)
    try:
        return m.get_submodule(spec)
    except AttributeError:
        names = [n for n, _ in m.named_modules() if n and n.count(".") <= 1]
        shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
        raise ValueError(f"--reg-layer {spec!r}: {type(m).__name__} has no module of that name; use input, cam or "
                         f"one of its module paths: {shown}") from None


class Capture:
    """The output of one module during a forward pass, with its graph (see `capture`)."""

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None
        self.grid: Callable[[torch.Tensor], torch.Tensor] | None = None

    def take(self) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError("the regularised layer was not called by the model's forward: choose a --reg-layer "
                               "that the forward uses")
        return self.output

    def to_grid(self, t: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) unchanged; ViT tokens (B, 1+N, D) -> (B, D, h, w)."""
        if t.dim() == 4:
            return t
        if t.dim() == 3 and self.grid is not None:
            return self.grid(t)
        raise ValueError(f"the regularised layer returned a tensor of shape {tuple(t.shape)}; a layer-level "
                         f"explanation needs (B, K, h, w) maps (or ViT tokens): choose a convolutional block")


@contextmanager
def capture(model: nn.Module, layer: nn.Module) -> Iterator[Capture]:
    """Keep `layer`'s output (its last call) during the forward passes inside the block.

    The hook returns a clone of the output, which then feeds the rest of the network: an in-place operation
    after the layer (DenseNet's ReLU after `features`) cannot rewrite what the regulariser differentiates.
    The hook is removed on exit. The values of the forward are unchanged.
    """
    cap = Capture()
    cap.grid = cam_reshape(unwrap(model))

    def keep(module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"the regularised layer {type(module).__name__} returned {type(output).__name__}, "
                             f"not a tensor; choose another --reg-layer")
        cap.output = output.clone()
        return cap.output

    handle = layer.register_forward_hook(keep)
    try:
        yield cap
    finally:
        handle.remove()


def f32(t: torch.Tensor) -> torch.Tensor:
    """float32 (float64 stays float64: the finite-difference tests run in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def grad_cam_map(score: torch.Tensor, acts: torch.Tensor, cap: Capture) -> torch.Tensor:
    """Differentiable Grad-CAM: relu(sum_k mean_hw(d score / d A_k) A_k), (B, 1, h, w), float32 (or float64).

    Args:
        score: 0-dim sum over the batch of each image's target logit (images are independent).
        acts: the captured layer output (its graph kept), (B, K, h, w) or ViT tokens.
        cap: the capture (for the token grid).
    """
    (g,) = torch.autograd.grad(score, acts, create_graph=True)
    a, g = f32(cap.to_grid(acts)), f32(cap.to_grid(g))
    alpha = g.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    return F.relu((alpha * a).sum(dim=1, keepdim=True))


def gradient_map(score: torch.Tensor, acts: torch.Tensor, cap: Capture, squared: bool = False) -> torch.Tensor:
    """The gradient of `score` w.r.t. the layer, summed over channels (B, 1, h, w) (sum of squares if `squared`)."""
    (g,) = torch.autograd.grad(score, acts, create_graph=True)
    g = f32(cap.to_grid(g))
    return (g * g).sum(dim=1, keepdim=True) if squared else g.sum(dim=1, keepdim=True)


def to_image(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) -> (B, 1, H, W), bilinear (align_corners=False, as the CAM explainers)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def mask_to_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) bool -> (B, 1, h, w) float in [0, 1]: the share of each cell on the object (area pooling)."""
    return F.adaptive_avg_pool2d(mask.float(), size)


# ---------------------------------------------------------------------------------------------------------------
# losses on a map at image resolution: `attr` (B, 1, H, W) float, `fg` (B, 1, H, W) float {0, 1}; each returns
# the per-image loss (B,) so that annotation budgets can leave images out (sib.regularizers).

def _max_normalised(attr: torch.Tensor) -> torch.Tensor:
    """relu(attr) / its per-image max (an all-zero map stays zero)."""
    a = F.relu(attr)
    return a / a.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None, None]


def energy_loss(attr: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """1 - EPG of relu(attr) (Rao et al. 2023); an all-zero map counts as 0 on the object (loss 1)."""
    a = F.relu(attr)
    total, inside = a.flatten(1).sum(dim=1), (a * fg).flatten(1).sum(dim=1)
    return 1 - torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def l1_loss(attr: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Rao et al.'s L1: mean over pixels of |M - relu(attr) / max relu(attr)|."""
    return (fg - _max_normalised(attr)).abs().flatten(1).mean(dim=1)


def rrr_star_loss(attr: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Rao et al.'s RRR*: sum over background pixels of (relu(attr) / max relu(attr))^2."""
    return ((1 - fg) * _max_normalised(attr) ** 2).flatten(1).sum(dim=1)


def hint_loss(attr: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """HINT (Selvaraju et al. 2019, the typology's): mean squared error of the max-normalised map to the mask."""
    return ((_max_normalised(attr) - fg) ** 2).flatten(1).mean(dim=1)


def rrr_loss(attr: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """RRR's penalty on an already-squared map: sum over background pixels of `attr`. The caller squares:
    Grad-CAM^2 for the typology's RRR-G, sum_k g_k^2 of a layer gradient for RRR at a layer."""
    return ((1 - fg) * attr).flatten(1).sum(dim=1)
