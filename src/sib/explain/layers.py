"""The layer each model family's CAM methods read, and how token layers become a grid.

Here, on the explainers' side of the models/explainers boundary, because the choice is the CAM methods'
(which activations they weight) and its error names the methods that do work on a model without a spatial
layer: `sib.models` builds networks and knows nothing of explainers, so importing it never imports these.
Used by the CAM explainers (`sib.explain.cam`), guidance at a layer (`sib.guidance`) and the public API.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from sib.explain import EXPLAINERS  # its entries are "module:name" strings: no method module is imported here
from sib.models import MLP, SmallCNN, TinyCNN


def cam_target_layer(model: nn.Module) -> nn.Module:
    """The layer whose activations CAM methods weight, chosen by model family.

    ResNet: layer4; DenseNet: features (ends with norm5); VGG and our CNNs: features; ViT: the last
    encoder block's first LayerNorm (tokens; see `cam_reshape`). The MLP has no spatial layer: a ValueError
    names the methods that do work on it. Other families raise a ValueError asking for an explicit
    `target_layer`.
    """
    m = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    if isinstance(m, MLP):
        cams, others = _methods_by_kind()
        raise ValueError(f"model 'mlp' has no convolutional layer, so the CAM methods ({', '.join(cams)}) do not "
                         f"apply to it; use a gradient method: {', '.join(others)}")
    if isinstance(m, torchvision.models.ResNet):
        return m.layer4
    if isinstance(m, torchvision.models.VisionTransformer):
        return m.encoder.layers[-1].ln_1
    if isinstance(m, (torchvision.models.DenseNet, torchvision.models.VGG, TinyCNN, SmallCNN)):
        return m.features
    raise ValueError(f"no default CAM target layer for {type(m).__name__}; pass target_layer= "
                     f"(the last convolutional block, as an nn.Module of the model)")


def _methods_by_kind() -> tuple[list[str], list[str]]:
    """(CAM methods, the other explainers) among the registered explainers' names."""
    cams = [n for n in EXPLAINERS.names() if EXPLAINERS.get(n).__module__ == "sib.explain.cam"]
    return cams, [n for n in EXPLAINERS.names() if n not in cams]


def cam_reshape(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For token models, a function mapping activations (B, 1+N, D) to a grid (B, D, h, w); else None."""
    m = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    if not isinstance(m, torchvision.models.VisionTransformer):
        return None
    side = m.image_size // m.patch_size

    def to_grid(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, 1:, :]  # drop the class token: (B, 1+N, D) -> (B, N, D)
        return grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], side, side)  # -> (B, D, h, w)

    return to_grid
