"""Figures (matplotlib; the only package that draws): heatmap grids of inputs, masks and attributions, and
single attribution overlays (`sib explain`)."""

from __future__ import annotations

from pathlib import Path

import torch

from sib.io import atomic_write
from sib.report.mpl import matplotlib, plt  # Agg, text drawn as given (no TeX)


def heatmap_grid(images: torch.Tensor, masks: torch.Tensor | None, columns: dict[str, torch.Tensor],
                 path: Path, row_labels: list[str] | None = None, title: str | None = None) -> Path:
    """One row per image: the input, its ground-truth mask, then one heatmap per named column.

    Args:
        images: (N, 3, H, W) float in [0, 1] (denormalised).
        masks: (N, 1, H, W) bool ground truth, or None.
        columns: column title -> (N, 1, H, W) attribution, drawn over a faded copy of the input with the
            mask's outline: a non-negative map min-max normalised per image (jet), a signed map divided by
            its largest magnitude (blue negative, red positive).
        path: PNG file to write (atomically).
        row_labels: optional text left of each row (e.g. "label 3").
        title: optional figure title.
    """
    n = images.shape[0]
    ncols = 1 + (masks is not None) + len(columns)
    fig, axes = plt.subplots(n, ncols, figsize=(1.6 * ncols, 1.6 * n + (0.4 if title else 0)), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).cpu().numpy()  # (3, H, W) -> (H, W, 3)
        panels: list[tuple[str, object]] = [("input", None)]
        if masks is not None:
            panels.append(("ground truth", None))
        panels += list(columns.items())
        for j, (name, attr) in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
            if name == "input":
                ax.imshow(img)
                if row_labels:
                    ax.set_ylabel(row_labels[i], fontsize=7)
            elif name == "ground truth" and masks is not None:
                ax.imshow(masks[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                a = attr[i, 0].float()
                if (a < 0).any():  # signed map: keep zero at the centre of a diverging scale
                    a, cmap, vmin = a / a.abs().max().clamp_min(1e-12), "bwr", -1
                else:
                    a, cmap, vmin = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12), "jet", 0
                ax.imshow(img * 0.35 + 0.65 * img.mean(axis=2, keepdims=True) * 0.35)
                ax.imshow(a.cpu().numpy(), cmap=cmap, alpha=0.6, vmin=vmin, vmax=1)
                if masks is not None:
                    ax.contour(masks[i, 0].cpu().numpy().astype(float), levels=[0.5], colors="white",
                               linewidths=0.6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


OVERLAY_MIN_SIDE = 224  # overlays of small inputs are enlarged by a whole factor to at least this many pixels


def overlay(image: torch.Tensor, attr: torch.Tensor, path: Path, min_side: int = OVERLAY_MIN_SIDE,
            alpha: float = 0.5) -> Path:
    """One attribution map over the image it explains, as a PNG (written atomically); no axes, no text.

    The map is coloured as in `heatmap_grid`: a non-negative map min-max normalised (jet), a signed map divided
    by its largest magnitude (blue negative, red positive); non-finite pixels count as 0. Both are enlarged by
    the smallest whole factor k with k * min(H, W) >= `min_side` (bilinear), so a 32 px input gives 224 px.

    Args:
        image: (3, H, W) float in [0, 1] (denormalised: what the model saw).
        attr: (1, H, W) attribution at the image's resolution.
        path: PNG file to write.
        min_side: the overlay's shorter side is at least this (pixels).
        alpha: weight of the colour map over the image.

    Returns:
        `path`; the PNG is (k * H, k * W) RGB.
    """
    import numpy as np
    from PIL import Image

    height, width = image.shape[-2:]
    k = max(1, -(-min_side // min(height, width)))  # ceil(min_side / side)
    size = (k * height, k * width)
    img = torch.nn.functional.interpolate(image[None].float().cpu(), size, mode="bilinear", align_corners=False)
    a = torch.nan_to_num(attr.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    a = torch.nn.functional.interpolate(a[None], size, mode="bilinear", align_corners=False)[0, 0]  # (kH, kW)
    if (a < 0).any():  # signed map: zero at the centre of the diverging scale
        a, cmap = (a / a.abs().max().clamp_min(1e-12) + 1) / 2, "bwr"
    else:
        a, cmap = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12), "jet"
    heat = matplotlib.colormaps[cmap](a.numpy())[..., :3]  # (kH, kW, 4) -> (kH, kW, 3) in [0, 1]
    base = img[0].clamp(0, 1).permute(1, 2, 0).numpy()  # (3, kH, kW) -> (kH, kW, 3)
    rgb = np.clip(((1 - alpha) * base + alpha * heat) * 255 + 0.5, 0, 255).astype(np.uint8)
    path = Path(path)
    atomic_write(path, lambda f: Image.fromarray(rgb, "RGB").save(f, format="PNG"))
    return path
