"""Normalisation shared by every dataset, and paired transforms that move an image and its mask together.

A paired transform is a callable `(PIL image, PIL mask or None) -> (image, mask or None)`:

    image  float32 (3, S, S), normalised with one of `NORMALIZATIONS`
    mask   bool (1, S, S), True on the object; None when the input mask was None

Geometry is shared exactly: the mask rides through the torchvision `transforms.v2` pipeline as a fourth
channel (0 / 255) of the `tv_tensors.Image`, so a random crop or flip draws its parameters once and the
mask is resampled with the image's own antialiased bilinear filter; the output mask is that channel
thresholded at one half, i.e. an output pixel is foreground when most of its footprint in the input is.
So a pixel whose whole footprint is foreground stays foreground and one whose footprint is all
background stays background (tested), and the mask's area is preserved without bias.

Why not `tv_tensors.Mask`: torchvision resamples masks with legacy nearest neighbour, which samples at
floor(i * scale) while the image is sampled at pixel centres, shifting the mask up to one input pixel
(about half an output pixel at 500 -> 256 px) towards the top left of the image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# name -> (mean, std) per RGB channel. "half" is what the S-IB reference uses.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# torchvision's RandomResizedCrop defaults: area fraction and aspect ratio of the crop.
DEFAULT_CROP_SCALE = (0.08, 1.0)
DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# The evaluation transform resizes the shorter side first, so the longer one grows with the aspect ratio: a
# 200000 x 1 PNG of 275 bytes became 37 x 7.4M pixels, 2 GB (~4.4 bytes per resized pixel, measured). Bounds:
# 2**24 resized pixels (~75 MB; a 16:9 photo at a 2048 px run is 9.7M) and a 100:1 aspect ratio.
MAX_RESIZED_PIXELS = 2**24
MAX_ASPECT = 100


class ImageSizeError(ValueError):
    """An image whose shape the evaluation transform refuses (too thin, or too many pixels once resized)."""


class SizeLimit:
    """The first step of the evaluation geometry: refuse, before resizing, an image the resize would blow up.

    Args:
        resize: the side the shorter image side is resized to.
    """

    def __init__(self, resize: int, max_pixels: int = MAX_RESIZED_PIXELS, max_aspect: float = MAX_ASPECT) -> None:
        self.resize, self.max_pixels, self.max_aspect = resize, max_pixels, max_aspect

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        short, long = min(h, w), max(h, w)
        resized = self.resize * round(long * self.resize / short)
        if long > self.max_aspect * short or resized > self.max_pixels:
            raise ImageSizeError(f"image of {w}x{h} px (W x H): its aspect ratio {long / short:.4g}:1 would be "
                                 f"resized to {resized:,} pixels (shorter side {self.resize} px); the bounds are "
                                 f"{self.max_pixels:,} pixels and an aspect ratio of {self.max_aspect:g}:1; crop it "
                                 f"to the object first")
        return img

    def __repr__(self) -> str:
        return f"SizeLimit(max_pixels={self.max_pixels}, max_aspect={self.max_aspect:g})"


def _stats(name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {name!r}; valid names: {', '.join(sorted(NORMALIZATIONS))}")
    mean, std = NORMALIZATIONS[name]
    shape = (3, 1, 1) if like.dim() == 3 else (1, 3, 1, 1)
    return (torch.tensor(mean, dtype=like.dtype, device=like.device).view(shape),
            torch.tensor(std, dtype=like.dtype, device=like.device).view(shape))


def normalize(img: torch.Tensor, name: str = "half") -> torch.Tensor:
    """Map an image in [0, 1] ((3,H,W) or (B,3,H,W)) to the model's input space."""
    mean, std = _stats(name, img)
    return (img - mean) / std


def denormalize(x: torch.Tensor, name: str = "half") -> torch.Tensor:
    """Inverse of `normalize`: model input back to [0, 1] (clamped) for display."""
    mean, std = _stats(name, x)
    return (x * std + mean).clamp(0.0, 1.0)


def image_to_tensor(image: Image.Image) -> tv_tensors.Image:
    """PIL RGB image -> `tv_tensors.Image` uint8 (3, H, W) in [0, 255]."""
    if image.mode != "RGB":
        raise ValueError(f"paired transforms expect an RGB image, got mode {image.mode!r} "
                         "(sib.data.common.open_image converts every mode to RGB)")
    return tv_tensors.Image(TF.pil_to_tensor(image))


def mask_to_tensor(mask: Image.Image | np.ndarray) -> torch.Tensor:
    """Binary mask (PIL image of any mode, or (H, W) array) -> uint8 (1, H, W): 255 foreground, 0 background.

    Any non-zero pixel is foreground. 255 rather than 1 so that the mask, resampled as an image channel,
    keeps 8 bits of sub-pixel coverage before it is thresholded.
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a mask must be single-channel (H, W), got an array of shape {array.shape}")
    return torch.from_numpy((array != 0).astype(np.uint8) * 255)[None]


class PairedTransform:
    """Apply one geometric pipeline to an image and its mask, then scale and normalise the image.

    Args:
        geometry: geometric `transforms.v2` transforms (crop, resize, flip, ...); they see one uint8
            `tv_tensors.Image` of 3 channels, or 4 with the mask, so their random parameters are drawn
            once per call. Photometric transforms do not belong here (they would alter the mask channel).
        normalization: a key of `NORMALIZATIONS`.
    """

    def __init__(self, geometry: list[Any], normalization: str = "half") -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {normalization!r}; "
                             f"valid names: {', '.join(sorted(NORMALIZATIONS))}")
        mean, std = NORMALIZATIONS[normalization]
        self.normalization = normalization
        self.geometry = v2.Compose(geometry)
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __call__(self, image: Image.Image, mask: Image.Image | np.ndarray | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transform a PIL RGB image (W, H) and an optional binary mask of the same size.

        Returns:
            image float32 (3, S, S) normalised; mask bool (1, S, S) or None.
        """
        img = image_to_tensor(image)  # uint8 (3, H, W)
        if mask is None:
            return self.finish(self.geometry(img)).as_subclass(torch.Tensor), None
        m = mask_to_tensor(mask)  # uint8 (1, H, W)
        if m.shape[-2:] != img.shape[-2:]:
            raise ValueError(f"mask size {tuple(m.shape[-2:])} differs from image size "
                             f"{tuple(img.shape[-2:])} (H, W); datasets fit masks before transforming")
        both = self.geometry(tv_tensors.Image(torch.cat([img, m])))  # (4, H, W) -> (4, S, S)
        out = self.finish(both[:3]).as_subclass(torch.Tensor)
        return out, both[3:].as_subclass(torch.Tensor) >= 128  # (1, S, S) bool: most of the footprint

    def __repr__(self) -> str:
        return f"PairedTransform({self.geometry!r}, normalization={self.normalization!r})"


def create_transform(train: bool, image_size: int = 224, resize_size: int | None = None,
                     normalization: str = "half", crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
                     flip: bool = True) -> PairedTransform:
    """Create the paired train or eval transform.

    Args:
        train: True for random resized crop + horizontal flip; False for resize + centre crop (an image
            beyond `MAX_RESIZED_PIXELS` once resized, or `MAX_ASPECT`, raises ImageSizeError first; the random
            crop comes before its resize, so training needs no bound).
        image_size: side S of the square output.
        resize_size: eval only: the shorter side is resized to this before the centre crop; None means
            round(image_size * 256 / 224) (256 for 224, the ImageNet convention). `resize_size ==
            image_size` keeps the whole shorter side (no border cropped away).
        normalization: "half" (mean 0.5, std 0.5, the reference's) or "imagenet".
        crop_scale: train only: range of the crop's area as a fraction of the image's.
        flip: train only: random horizontal flip with probability 0.5.

    Returns:
        A `PairedTransform`: `(PIL image, PIL mask or None) -> (float32 (3,S,S), bool (1,S,S) or None)`.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if train:
        geometry: list[Any] = [v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=DEFAULT_CROP_RATIO,
                                                    antialias=True)]
        if flip:
            geometry.append(v2.RandomHorizontalFlip(0.5))
    else:
        resize = round(image_size * 256 / 224) if resize_size is None else resize_size
        if resize < image_size:
            raise ValueError(f"resize_size {resize} is smaller than image_size {image_size}")
        geometry = [SizeLimit(resize), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    return PairedTransform(geometry, normalization)


__all__ = ["MAX_ASPECT", "MAX_RESIZED_PIXELS", "NORMALIZATIONS", "ImageSizeError", "PairedTransform", "SizeLimit",
           "create_transform", "denormalize", "image_to_tensor", "mask_to_tensor", "normalize"]
