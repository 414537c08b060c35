"""Writers of real files (PNG, JPEG, GIF via PIL) for the dataset tests, and alignment checks.

Test images paint the object red and the background blue, so after any transform the image itself says
where the object is, independently of the mask the loader produced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sib.data.transforms import denormalize

RED, BLUE = (230, 20, 20), (20, 20, 230)


class Disk:
    """Writes files under a root, creating folders as needed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, rel: str | Path) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def text(self, rel: str | Path, text: str) -> Path:
        p = self.path(rel)
        p.write_text(text)
        return p

    def scene(self, rel: str | Path, fg: np.ndarray, mode: str = "RGB", fmt: str | None = None) -> Path:
        """Save an image, red where `fg` (bool (H, W)) else blue, converted to `mode`, as `fmt`."""
        rgb = np.where(fg[..., None], np.array(RED, np.uint8), np.array(BLUE, np.uint8))
        img = Image.fromarray(rgb.astype(np.uint8))
        if mode == "RGBA":
            img = img.convert("RGBA")
        elif mode != "RGB":
            img = img.convert(mode)
        p = self.path(rel)
        fmt = fmt or _format_of(p)
        img.save(p, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return p

    def mask(self, rel: str | Path, values: np.ndarray, mode: str = "L") -> Path:
        p = self.path(rel)
        Image.fromarray(values.astype(np.uint8)).convert(mode).save(p, format="PNG")
        return p

    # The helpers below are reached through the fixture: with --import-mode=importlib tests cannot
    # import conftest by name.
    box = staticmethod(lambda size, box: box_mask(size, box))
    assert_aligned = staticmethod(lambda x, mask, norm="half": assert_aligned(x, mask, norm))

    def truncated(self, rel: str | Path, fg: np.ndarray) -> Path:
        """A JPEG cut after half its bytes (what an interrupted copy leaves)."""
        p = self.scene(rel, fg, fmt="JPEG")
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p


def _format_of(p: Path) -> str:
    return Image.registered_extensions()[p.suffix.lower()]


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """bool (H, W) for size (W, H), True on rows y0..y1, columns x0..x1 (inclusive)."""
    w, h = size
    m = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


def assert_aligned(x: torch.Tensor, mask: torch.Tensor, normalization: str = "half") -> None:
    """The mask agrees with the red object painted in the image wherever the image is unambiguous.

    Args:
        x: float32 (3, S, S) normalised image of a red object on blue.
        mask: bool (1, S, S).
    """
    rgb = denormalize(x, normalization)
    redness = (rgb[0] - rgb[2]) / ((RED[0] - RED[2]) / 255)  # 1 on the object, -1 on the background
    surely_fg, surely_bg = redness > 0.9, redness < -0.9
    assert mask.dtype == torch.bool and mask.shape == (1, *x.shape[-2:])
    assert bool(mask[0][surely_fg].all()), "an object pixel lost its foreground label"
    assert not bool(mask[0][surely_bg].any()), "a background pixel became foreground"


@pytest.fixture
def disk(tmp_path: Path) -> Disk:
    return Disk(tmp_path)


# ------------------------------------------------------------------------------------ Oxford-IIIT Pet

PET_SIZE = (24, 20)  # (W, H) of the fixture images
PET_BOX = (6, 5, 15, 13)  # the pet, inclusive (x0, y0, x1, y1)
PET_CLASSES = {"Abyssinian": (1, 1, 1), "american_bulldog": (2, 2, 1), "Bengal": (6, 1, 2)}


def trimap(size: tuple[int, int] = PET_SIZE, box: tuple[int, int, int, int] = PET_BOX) -> np.ndarray:
    """uint8 (H, W): 1 in the box, 3 on a one-pixel ring around it, 2 elsewhere."""
    x0, y0, x1, y1 = box
    t = np.full((size[1], size[0]), 2, dtype=np.uint8)
    t[y0 - 1:y1 + 2, x0 - 1:x1 + 2] = 3
    t[y0:y1 + 1, x0:x1 + 1] = 1
    return t


@pytest.fixture
def pets_root(disk: Disk) -> Path:
    """A tiny Oxford-IIIT Pet folder: 3 breeds (class ids 1, 2, 6), 5 trainval + 2 test each, and one of
    each irregularity (see the comments); returns the root."""
    fg = box_mask(PET_SIZE, PET_BOX)
    lines = {"trainval": [], "test": []}
    for breed, (cid, species, bid) in PET_CLASSES.items():
        for n in range(1, 8):
            name = f"{breed}_{n}"
            lines["trainval" if n <= 5 else "test"].append(f"{name} {cid} {species} {bid}")
            disk.scene(f"images/{name}.jpg", fg, fmt="JPEG")
            disk.mask(f"annotations/trimaps/{name}.png", trimap())
    disk.scene("images/Abyssinian_1.jpg", fg, fmt="PNG")  # PNG data under .jpg
    disk.scene("images/Abyssinian_2.jpg", fg, mode="CMYK", fmt="JPEG")
    disk.scene("images/Abyssinian_3.jpg", fg, mode="L", fmt="JPEG")  # grey
    disk.scene("images/Abyssinian_4.jpg", fg, mode="P", fmt="GIF")  # palette GIF under .jpg
    disk.scene("images/Bengal_1.jpg", fg, mode="RGBA", fmt="PNG")
    for gone in ("images/Abyssinian_5.jpg", "annotations/trimaps/Abyssinian_5.png",  # listed, absent
                 "annotations/trimaps/american_bulldog_1.png"):  # trimap absent
        (disk.root / gone).unlink()
    half = (PET_SIZE[0] // 2, PET_SIZE[1] // 2)
    disk.mask("annotations/trimaps/american_bulldog_2.png", trimap(half, (3, 3, 7, 6)))  # half size
    disk.mask("annotations/trimaps/american_bulldog_3.png", trimap()[:, ::-1].T.copy())  # transposed
    disk.truncated("images/american_bulldog_4.jpg", fg)
    disk.mask("annotations/trimaps/american_bulldog_5.png", np.full((PET_SIZE[1], PET_SIZE[0]), 2))  # empty
    disk.scene("images/Bengal_9.jpg", fg)  # on disk, in no list
    disk.mask("annotations/trimaps/Bengal_9.png", trimap())
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    disk.text("annotations/trainval.txt", "\n".join(lines["trainval"]) + "\n")
    disk.text("annotations/test.txt", "\n".join(lines["test"]) + "\n")
    disk.text("annotations/list.txt", header + "\n".join(lines["trainval"] + lines["test"]) + "\n")
    return disk.root
