"""A folder of class folders, with an optional parallel folder of mask PNGs.

    <root>/train/<class>/<image>     the train(val) images (required; see below for a root without it)
    <root>/val/<class>/<image>       optional: if present it IS the "val" split, and "train" = all of train/
    <root>/test/<class>/<image>      optional: the "test" split
    <masks>/<split>/<class>/<stem>.png   optional masks, one per image, mirroring the image's path under
                                         the root; <masks> = `mask_root`, default <root>/masks if present

A root without `train/` is itself the class-folder tree: it is the "trainval" list and has no test split.
Classes are the train folder's sub-folder names, sorted (as torchvision's ImageFolder); a test or val
class folder absent from train is skipped. Files without an image extension (.DS_Store, notes) are
ignored; an empty class folder is kept as a class (so indices stay stable) and reported.

Mask pixels above `mask_threshold` (default 0: any non-zero grey value or palette index) are foreground;
RGB(A) masks are converted to grey, the alpha of grey + alpha masks is dropped. An image without a mask
file keeps no mask (a counted warning).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sib.data.common import IMAGE_EXTENSIONS, MaskedImageDataset, Problem, Sample, missing, read_mask_array

HOW_TO_GET = "arrange the images as <root>/train/<class>/<image> (and <root>/test/<class>/<image>)."


def scan_class_folders(folder: Path, classes: Sequence[str] | None = None, skip: Path | None = None
                       ) -> tuple[list[str], list[tuple[Path, int]], list[Problem]]:
    """List `folder/<class>/**/<image>` files in sorted order, skipping non-image files.

    Args:
        folder: a folder of class folders.
        classes: fixed class names (the train folder's, when scanning a test folder); None: the sorted
            sub-folder names of `folder`.
        skip: a sub-folder that is not a class (the mask folder, when the root is the class tree).

    Returns:
        (classes, [(image path, class index)], problems: non-image files ignored, empty class folders
        kept, class folders not in `classes` skipped).
    """
    found = sorted(e.name for e in os.scandir(folder)
                   if e.is_dir() and not e.name.startswith(".") and Path(e.path) != skip)
    classes = list(found if classes is None else classes)
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[Path, int]] = []
    problems: list[Problem] = []
    for name in found:
        if name not in index:
            problems.append(Problem(str(folder / name), "class folder not among the train classes",
                                    "skipped"))
            continue
        n_before = len(items)
        # os.walk uses scandir's cached file types: no stat per file, which matters for 1.3 M images.
        for directory, subdirs, files in os.walk(folder / name):
            subdirs.sort()
            for f in sorted(files):
                p = Path(directory) / f
                if f.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                    problems.append(Problem(str(p), "not an image file (by name)", "ignored"))
                else:
                    items.append((p, index[name]))
        if len(items) == n_before:
            problems.append(Problem(str(folder / name), "class folder holds no image", "kept"))
    for name in classes:
        if name not in found:
            problems.append(Problem(str(folder / name), "class folder absent", "kept"))
    return classes, items, problems


class ImageFolderWithMasks(MaskedImageDataset):
    """Class folders with optional mask PNGs (see the module docstring for the layout).

    Args:
        root, split, transform: see `sib.data.common.MaskedImageDataset`.
        mask_root: the folder mirroring the image tree with .png masks; None: <root>/masks if present.
        mask_threshold: a mask pixel is foreground where its stored value exceeds this.
        **options: image_size, normalization, val_fraction, seed, download, exclude (see the base class).
    """

    check_files_exist = False  # the samples come from a directory scan

    def __init__(self, root: str | Path | None, split: str = "train", transform: Any = None, *,
                 mask_root: str | Path | None = None, mask_threshold: float = 0, **options: Any) -> None:
        self._mask_root_option = None if mask_root is None else Path(mask_root)
        self.mask_threshold = mask_threshold
        super().__init__(root, split, transform, **options)

    def _locate(self, root: Path, download: bool) -> Path:
        if not root.is_dir():
            raise missing(root, "image_folder", ["train/<class>/<image>"], HOW_TO_GET)
        self.mask_root = self._mask_root_option
        if self.mask_root is None and (root / "masks").is_dir():
            self.mask_root = root / "masks"
        elif self.mask_root is not None and not self.mask_root.is_dir():
            raise FileNotFoundError(f"image_folder: mask_root {self.mask_root} is not a folder")
        self.has_masks = self.mask_root is not None
        # Without train/, the root itself is the class-folder tree.
        self._folders = {"trainval": root / "train" if (root / "train").is_dir() else root,
                         "val": root / "val", "test": root / "test"}
        return root

    def _select(self, split: str, val_fraction: float, seed: int) -> list[Sample]:
        if split in ("train", "val") and self._folders["val"].is_dir():
            return self._read_split("trainval" if split == "train" else "val")
        return super()._select(split, val_fraction, seed)

    def _read_split(self, which: str) -> list[Sample]:
        folder = self._folders[which]
        if not folder.is_dir():
            raise missing(self.root, "image_folder", [f"{which}/<class>/<image>"], HOW_TO_GET)
        train_classes = None
        if which != "trainval":
            train_classes = [e.name for e in os.scandir(self._folders["trainval"])
                             if e.is_dir() and not e.name.startswith(".") and Path(e.path) != self.mask_root]
            train_classes.sort()
        self.classes, items, problems = scan_class_folders(folder, train_classes, skip=self.mask_root)
        self.problems += problems
        return [Sample(p, label, self._mask_spec(p)) for p, label in items]

    def _mask_spec(self, image: Path) -> Path | None:
        if self.mask_root is None:
            return None
        mask = (self.mask_root / image.relative_to(self.root)).with_suffix(".png")
        if mask.is_file():
            return mask
        self.problems.append(Problem(str(mask), "mask absent", "no mask"))
        return None

    def _load_mask(self, sample: Sample, size: tuple[int, int], notes: list[str] | None) -> np.ndarray:
        return read_mask_array(sample.mask) > self.mask_threshold
