"""Paired transforms: image and mask move together; a foreground pixel stays foreground."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sib.data.transforms import NORMALIZATIONS, create_transform, denormalize, normalize


def _scene(fg: np.ndarray) -> tuple[Image.Image, Image.Image]:
    rgb = np.where(fg[..., None], np.array([230, 20, 20], np.uint8), np.array([20, 20, 230], np.uint8))
    return Image.fromarray(rgb.astype(np.uint8)), Image.fromarray(fg.astype(np.uint8) * 255)


def _blobs(h: int, w: int, seed: int) -> np.ndarray:
    """Irregular foreground: a few random rectangles and a disc, bool (H, W)."""
    rng = np.random.default_rng(seed)
    fg = np.zeros((h, w), dtype=bool)
    for _ in range(3):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        fg[y0:y0 + rng.integers(4, 20), x0:x0 + rng.integers(4, 20)] = True
    yy, xx = np.mgrid[:h, :w]
    fg |= (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 5) ** 2
    return fg


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [(48, 40), (41, 67), (96, 30)])
def test_mask_follows_image_through_every_transform(disk, train, size):
    h, w = size
    tf = create_transform(train, image_size=32)
    for seed in range(8):
        image, mask = _scene(_blobs(h, w, seed))
        torch.manual_seed(seed)
        x, m = tf(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        disk.assert_aligned(x, m)


def test_flip_moves_both():
    fg = np.zeros((20, 20), dtype=bool)
    fg[:, :5] = True  # object on the left edge
    image, mask = _scene(fg)
    tf = create_transform(True, image_size=20, crop_scale=(1.0, 1.0))
    sides = set()
    for seed in range(16):
        torch.manual_seed(seed)
        x, m = tf(image, mask)
        left, right = bool(m[0, :, :3].all()), bool(m[0, :, -3:].all())
        assert left != right  # exactly one side holds the object
        assert (x[0, :, :3].mean() > x[2, :, :3].mean()) == left  # and the image's red side is that side
        sides.add(left)
    assert sides == {True, False}  # both outcomes drawn in 16 tries (p of failure 2 * 2**-16)


def test_eval_is_resize_then_centre_crop():
    # 60x30 (W x H): shorter side 30 -> 37 (round(32 * 256 / 224)), long side 74, centre crop 32.
    fg = np.zeros((30, 60), dtype=bool)
    fg[:, 28:32] = True  # a vertical stripe in the middle survives the centre crop
    fg[:, :4] = True  # one at the left edge does not
    x, m = create_transform(False, image_size=32)(*_scene(fg))
    assert m.shape == (1, 32, 32)
    cols = m[0].any(dim=0).nonzero().flatten()
    assert 13 <= cols.min() and cols.max() <= 18  # only the middle stripe, near the centre column 16
    assert m[0, :, cols].all()  # over the full height


def test_whole_image_when_resize_equals_size():
    fg = np.zeros((32, 32), dtype=bool)
    fg[:, :4] = True
    _, m = create_transform(False, image_size=64, resize_size=64)(*_scene(fg))
    assert m[0, :, :8].all() and not m[0, :, 8:].any()  # exact 2x nearest upsampling, nothing cropped


def test_no_mask_and_normalisations():
    grey = Image.new("RGB", (10, 12), (128, 128, 128))
    x, m = create_transform(False, image_size=8, normalization="half")(grey, None)
    assert m is None and x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5))
    x, _ = create_transform(False, image_size=8, normalization="imagenet")(grey)
    mean, std = NORMALIZATIONS["imagenet"]
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x[:, 0, 0], expected)
    torch.testing.assert_close(denormalize(x, "imagenet"), torch.full_like(x, 128 / 255), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(denormalize(x, "imagenet"), "imagenet"), x, atol=1e-5, rtol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown normalisation"):
        create_transform(False, normalization="unit")
    with pytest.raises(ValueError, match="RGB"):
        create_transform(False, image_size=8)(Image.new("L", (10, 10)))
    with pytest.raises(ValueError, match="differs from image size"):
        create_transform(False, image_size=8)(Image.new("RGB", (10, 10)), Image.new("L", (10, 11)))
    with pytest.raises(ValueError, match="smaller than image_size"):
        create_transform(False, image_size=32, resize_size=16)


def test_eval_refuses_an_image_whose_resize_would_be_huge_or_too_thin():
    """Resizing the short side of a 200000 x 1 image to 37 px makes 37 x 7.4M pixels (2 GB of memory)."""
    from sib.data.transforms import MAX_ASPECT, MAX_RESIZED_PIXELS, ImageSizeError

    t = create_transform(False, image_size=32)
    for w, h, why in ((200000, 1, "pixels"), (1, 40000, "pixels"), (50 * MAX_ASPECT + 50, 50, "aspect ratio")):
        with pytest.raises(ImageSizeError, match=rf"image of {w}x{h} px \(W x H\).*{why}"):
            t(Image.new("RGB", (w, h)))
    assert MAX_RESIZED_PIXELS == 2**24 and MAX_ASPECT == 100
    x, _ = t(Image.new("RGB", (37 * 99, 37)))  # just inside both bounds: resized as before
    assert x.shape == (3, 32, 32)
    train = create_transform(True, image_size=32)  # crops before resizing: bounded whatever the shape
    assert train(Image.new("RGB", (200000, 1)))[0].shape == (3, 32, 32)
