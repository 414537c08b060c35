"""How many images one forward pass takes when a method or metric runs many of them (perturbations, IG steps,
noisy copies): a memory budget of input bytes per pass.

On a CPU a forward pass costs the least per image for batches of about 16-32 images at 64 px (ResNet-18,
small_cnn: 256-image batches cost 1.3-2.6x more per image; their activations leave the caches), so the
budget is 1 MiB of input there (21 images at 64 px, 85 at 32 px, and at least 8); on a GPU, where larger
batches keep the device busy, 64 MiB (111 images at 224 px). `batch_size=` options override it.
"""

from __future__ import annotations

import torch

# input bytes per forward pass, by device type ("default": any device not listed)
BATCH_BYTES = {"cuda": 64 << 20, "default": 1 << 20}
MIN_AUTO_BATCH = 8


def images_per_forward(x: torch.Tensor, batch_size: int | None) -> int:
    """`batch_size` (checked >= 1), or for None as many images like x[0] as fit `BATCH_BYTES` (at least 8).

    Args:
        x: float (B, C, H, W) batch; its device and image size set the budget.
        batch_size: an explicit number of images per forward pass, or None.
    """
    if batch_size is None:
        budget = BATCH_BYTES.get(x.device.type, BATCH_BYTES["default"])
        return max(MIN_AUTO_BATCH, budget // max(1, x[0].numel() * x.element_size()))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None; got {batch_size}")
    return batch_size
