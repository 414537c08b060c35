"""Shared reading rules: every image mode to RGB, errors naming files, mask fitting, boxes, splits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sib.data.common import (
    DataWarning,
    ImageReadError,
    MaskReadError,
    MaskSizeError,
    boxes_to_mask,
    fit_mask,
    open_image,
    read_mask_array,
    stratified_split,
)
from sib.data.stanford_dogs import read_voc_boxes


@pytest.mark.parametrize("mode, fmt, note", [
    ("L", "PNG", "mode L"), ("1", "PNG", "mode 1"), ("CMYK", "JPEG", "mode CMYK"), ("P", "GIF", "GIF data"),
    ("RGBA", "PNG", "mode RGBA"), ("LA", "PNG", "mode LA"), ("RGB", "WEBP", "WEBP data"),
    ("RGB", "BMP", "BMP"),
])
def test_every_mode_and_format_reads_as_rgb(disk, mode, fmt, note):
    fg = disk.box((12, 10), (2, 2, 6, 6))
    path = disk.scene("img.jpg", fg, mode=mode, fmt=fmt)
    notes: list[str] = []
    img = open_image(path, notes)
    assert img.mode == "RGB" and img.size == (12, 10)
    assert any(note in n for n in notes)
    a = np.asarray(img).astype(int)
    if mode not in ("L", "1", "LA"):  # colour survives: object redder than the background
        assert (a[3, 3, 0] - a[3, 3, 2]) > 100 and (a[8, 10, 2] - a[8, 10, 0]) > 100


def test_alpha_is_composited_on_white_and_16_bit_grey_scaled(disk):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba).save(disk.path("a.png"))
    a = np.asarray(open_image(disk.root / "a.png"))
    assert (a[:2] == [255, 0, 0]).all() and (a[2:] == 255).all()
    grey = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    Image.fromarray(grey).save(disk.path("g16.png"))  # mode I;16 (or I)
    g = np.asarray(open_image(disk.root / "g16.png"))
    assert g[0, 0, 0] == 0 and g[3, 3, 0] == 255 and g[1, 2, 1] == round(6 * 4369 / 257)


@pytest.mark.parametrize("content", [b"", b"this is not an image", None])
def test_unreadable_images_raise_naming_the_file(disk, content):
    path = disk.path("bad.jpg")
    if content is None:
        path = disk.truncated("bad.jpg", np.ones((30, 40), dtype=bool))
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.jpg"):
        open_image(path)
    with pytest.raises(ImageReadError, match="absent.jpg"):
        open_image(disk.root / "absent.jpg")
    with pytest.raises(MaskReadError, match="bad.jpg"):
        read_mask_array(path)


def test_fit_mask():
    m = np.zeros((5, 8), dtype=bool)
    m[1:3, 2:6] = True
    assert fit_mask(m, (8, 5), "m.png") is m
    with pytest.warns(DataWarning, match="m.png.*resized"):
        up = fit_mask(m, (16, 10), "m.png")
    assert up.shape == (10, 16) and up.sum() == 4 * m.sum()
    notes: list[str] = []
    fit_mask(m, (16, 10), "m.png", notes)
    assert notes and "resized" in notes[0]
    with pytest.raises(MaskSizeError, match="m.png is 8x5 but its image is 5x8"):
        fit_mask(m, (5, 8), "m.png")


def test_boxes_to_mask_inclusive_clipped_union():
    m = boxes_to_mask([(1, 1, 2, 3), (-5, 8, 100, 100), (6.5, 0, 7.2, 3)], (10, 10))
    expected = np.zeros((10, 10), dtype=bool)
    expected[1:4, 1:3] = True  # rows 1..3, columns 1..2 inclusive
    expected[8:, :] = True  # clipped to the image
    expected[0:4, 6:9] = True  # fractional ends round outwards (6.5 -> 6, 7.2 -> 8)
    np.testing.assert_array_equal(m, expected)
    assert not boxes_to_mask([], (3, 2)).any() and boxes_to_mask([], (3, 2)).shape == (2, 3)


def test_read_voc_errors_name_the_file(disk):
    disk.text("bad.xml", "<annotation><object><bndbox><xmin>1</xmin></bndbox></object></annotation>")
    with pytest.raises(MaskReadError, match="bad.xml.*lacks"):
        read_voc_boxes(disk.root / "bad.xml")
    disk.text("ok.xml", "<annotation><size><width>0</width><height>0</height></size></annotation>")
    assert read_voc_boxes(disk.root / "ok.xml") == (None, [])


def test_stratified_split():
    labels = [0] * 20 + [1] * 9 + [2] * 1
    train, val = stratified_split(labels, 0.1, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(30)) and not set(train) & set(val)
    assert np.bincount(np.asarray(labels)[val], minlength=3).tolist() == [2, 1, 0]
    again, _ = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(train, again)
    # a class's draw does not depend on the other classes
    _, val_alone = stratified_split([0] * 20, 0.1, seed=0)
    assert val[val < 20].tolist() == val_alone.tolist()
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0, seed=0)
