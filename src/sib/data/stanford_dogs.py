"""Stanford Dogs (Khosla et al., 2011), read from the authors' layout.

    <root>/train_list.mat, test_list.mat      MATLAB files (lists.tar): file_list, annotation_list, labels
    <root>/Images/<wnid>-<Breed>/<wnid>_<n>.jpg
    <root>/Annotation/<wnid>-<Breed>/<wnid>_<n>   PASCAL VOC XML without extension (annotation.tar)

Labels: the .mat `labels` (1..120) present in either list, sorted, mapped to 0..K-1; `classes[k]` is the
breed from the folder name ("n02085620-Chihuahua" -> "Chihuahua"). Splits: "trainval" = train_list.mat,
"test" = test_list.mat.

Mask: the union of every <object> box of the image's XML (an image may show several dogs), both ends
inclusive. When the XML's <size> differs from the image's, the box mask is drawn at the XML's size and
then fitted like any mask (rescaled when only the scale differs, refused otherwise). `mask_source="auto"`
(default) uses boxes where `Annotation/` exists; "box" requires it; "none" yields no masks. An image
without its XML keeps no mask (a counted warning).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from sib.data.common import (
    MaskedImageDataset,
    MaskReadError,
    Problem,
    Sample,
    boxes_to_mask,
    missing,
)

MASK_SOURCES = ("auto", "box", "none")
HOW_TO_GET = ("download images.tar, annotation.tar and lists.tar from http://vision.stanford.edu/aditya86/"
              "ImageNetDogs/ and extract them into the root (giving Images/, Annotation/, train_list.mat, "
              "test_list.mat); there is no downloader for this format.")


def read_voc_boxes(path: str | Path) -> tuple[tuple[int, int] | None, list[tuple[str, tuple[float, ...]]]]:
    """Parse a PASCAL VOC annotation.

    Returns:
        ((W, H) from <size>, or None where absent or zero), [(object name, (xmin, ymin, xmax, ymax))].

    Raises:
        MaskReadError: unreadable or malformed XML; names the file.
    """
    try:
        tree = ET.parse(path)
        size_node = tree.find("size")
        size = None
        if size_node is not None:
            w, h = int(float(size_node.findtext("width", "0"))), int(float(size_node.findtext("height", "0")))
            size = (w, h) if w > 0 and h > 0 else None
        boxes = []
        for obj in tree.iter("object"):
            box = obj.find("bndbox")
            if box is not None:
                coords = tuple(float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
                if any(np.isnan(coords)):
                    raise ValueError("a <bndbox> lacks one of xmin, ymin, xmax, ymax")
                boxes.append(((obj.findtext("name") or "").strip(), coords))
    except (OSError, ET.ParseError, ValueError) as e:
        raise MaskReadError(f"cannot read annotation {path}: {e}") from e
    return size, boxes


def read_mat_list(path: Path) -> tuple[list[str], list[str], list[int]]:
    """Read a Stanford Dogs .mat list: (image paths, annotation paths, 1-based labels)."""
    from scipy.io import loadmat  # scipy is needed for this format only

    try:
        mat = loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... for a damaged file
        raise ValueError(f"cannot read list {path}: {e}") from e
    if "file_list" not in mat or "labels" not in mat:
        found = ", ".join(k for k in mat if not k.startswith("_"))
        raise ValueError(f"{path} lacks 'file_list' or 'labels' (has: {found})")

    def strings(key: str) -> list[str]:
        # A MATLAB cell array of strings loads as an object array of 1-element string arrays.
        return [str(np.asarray(e).ravel()[0]) for e in mat[key].ravel()] if key in mat else []

    files = strings("file_list")
    annotations = strings("annotation_list") or [str(Path(f).with_suffix("")) for f in files]
    labels = [int(v) for v in np.asarray(mat["labels"]).ravel()]
    if len(annotations) != len(files) or len(labels) != len(files):
        raise ValueError(f"{path}: file_list, annotation_list and labels differ in length")
    return files, annotations, labels


class StanfordDogs(MaskedImageDataset):
    """Stanford Dogs with the union of the VOC boxes as foreground mask.

    Args:
        root, split, transform: see `sib.data.common.MaskedImageDataset`.
        mask_source: "auto" (default), "box" or "none".
        **options: image_size, normalization, val_fraction, seed, download, exclude (see the base class).
    """

    def __init__(self, root: str | Path | None, split: str = "train", transform: Any = None, *,
                 mask_source: str = "auto", **options: Any) -> None:
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {', '.join(MASK_SOURCES)}, got {mask_source!r}")
        self.mask_source = mask_source
        super().__init__(root, split, transform, **options)

    def _locate(self, root: Path, download: bool) -> Path:
        if not ((root / "train_list.mat").is_file() or (root / "test_list.mat").is_file()):
            expected = ["train_list.mat", "test_list.mat", "Images/", "Annotation/"]
            raise missing(root, "stanford_dogs", expected, HOW_TO_GET)
        has_annotation = (root / "Annotation").is_dir()
        if self.mask_source == "box" and not has_annotation:
            raise missing(root, "stanford_dogs", ["Annotation/"], HOW_TO_GET)
        if self.mask_source == "auto":
            self.mask_source = "box" if has_annotation else "none"
        self.has_masks = self.mask_source == "box"
        return root

    def _read_split(self, which: str) -> list[Sample]:
        wanted = self.root / ("train_list.mat" if which == "trainval" else "test_list.mat")
        if not wanted.is_file():
            raise missing(self.root, "stanford_dogs", [wanted.name], HOW_TO_GET)
        lists = {p: read_mat_list(p) for p in (self.root / "train_list.mat", self.root / "test_list.mat")
                 if p.is_file()}
        # One label map over both lists, so train and test agree.
        folder_of: dict[int, str] = {}
        for files, _, labels in lists.values():
            for f, label in zip(files, labels, strict=True):
                folder_of.setdefault(label, Path(f).parts[0])
        class_ids = sorted(folder_of)
        label_of = {c: k for k, c in enumerate(class_ids)}
        self.classes = [folder_of[c].split("-", 1)[-1] for c in class_ids]

        files, annotations, labels = lists[wanted]
        samples = []
        for f, a, label in zip(files, annotations, labels, strict=True):
            samples.append(Sample(self.root / "Images" / f, label_of[label], self._mask_spec(a)))
        return samples

    def _mask_spec(self, annotation: str) -> Path | None:
        if self.mask_source != "box":
            return None
        xml = self.root / "Annotation" / annotation
        for candidate in (xml, xml.with_name(xml.name + ".xml")):
            if candidate.is_file():
                return candidate
        self.problems.append(Problem(str(xml), "annotation absent", "no mask"))
        return None

    def _load_mask(self, sample: Sample, size: tuple[int, int], notes: list[str] | None) -> np.ndarray:
        xml_size, boxes = read_voc_boxes(sample.mask)
        if notes is not None and not boxes:
            notes.append("annotation has no <object> box")
        return boxes_to_mask([b for _, b in boxes], xml_size or size)
