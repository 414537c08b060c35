"""CUB-200-2011 (Wah et al., 2011), read from the authors' layout.

    <root>/images.txt               "<image id> <class dir>/<file>.jpg"
    <root>/image_class_labels.txt   "<image id> <class id 1..200>"
    <root>/train_test_split.txt     "<image id> <1 train | 0 test>"
    <root>/bounding_boxes.txt       "<image id> <x> <y> <width> <height>" (pixels, float)
    <root>/classes.txt              "<class id> <NNN.Name>"  (optional: names only)
    <root>/images/<class dir>/<file>.jpg
    segmentations/<class dir>/<file>.png   distributed separately (segmentations.tgz); looked for in
                                           <root>/segmentations, then beside <root>; or `segmentations_root`

`root` may also be the folder above `CUB_200_2011/`. Labels: class ids sorted and mapped to 0..K-1
(0..199 on the full dataset). Splits: "trainval" = the images marked 1, "test" = those marked 0.

Masks (`mask_source`): "segmentation" thresholds the soft greyscale segmentation (several annotators'
masks averaged; stored as "L" or grey + alpha, whose alpha is ignored): foreground where the grey value
exceeds `seg_threshold * 255` (default 0.5: more than half of the annotators). "box" fills the bounding
box. "auto" (default) uses segmentations where the folder exists, else boxes. "none": no masks. An image
without a segmentation file or box line keeps no mask (a counted warning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sib.data.common import MaskedImageDataset, Problem, Sample, boxes_to_mask, missing, read_mask_array

MASK_SOURCES = ("auto", "segmentation", "box", "none")
REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
HOW_TO_GET = ("download CUB_200_2011.tgz (and segmentations.tgz for pixel masks) from "
              "https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract them side by side; "
              "there is no downloader for this format.")


def read_id_table(path: Path, n_values: int, problems: list[Problem]) -> dict[str, list[str]]:
    """Parse "<image id> <value> ..." lines into {id: [values]}; bad lines are recorded and dropped."""
    table: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split(maxsplit=n_values)
        if not fields:
            continue
        if len(fields) != n_values + 1:
            problems.append(Problem(str(path), f"line {number} has {len(fields) - 1} values, not {n_values}: "
                                    f"{line!r}", "skipped"))
        elif fields[0] in table:
            problems.append(Problem(str(path), f"line {number}: image id {fields[0]} repeated", "skipped"))
        else:
            table[fields[0]] = fields[1:]
    return table


class CUB200(MaskedImageDataset):
    """CUB-200-2011 with segmentation or bounding-box foreground masks.

    Args:
        root, split, transform: see `sib.data.common.MaskedImageDataset`.
        mask_source: "auto" (default), "segmentation", "box" or "none" (see the module docstring).
        seg_threshold: a segmentation pixel is foreground where grey > seg_threshold * 255.
        segmentations_root: the folder holding `<class dir>/<file>.png`, if not in a default place.
        **options: image_size, normalization, val_fraction, seed, download, exclude (see the base class).
    """

    def __init__(self, root: str | Path | None, split: str = "train", transform: Any = None, *,
                 mask_source: str = "auto", seg_threshold: float = 0.5,
                 segmentations_root: str | Path | None = None, **options: Any) -> None:
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {', '.join(MASK_SOURCES)}, got {mask_source!r}")
        if not 0.0 <= seg_threshold < 1.0:
            raise ValueError(f"seg_threshold must be in [0, 1), got {seg_threshold}")
        self.mask_source = mask_source
        self.seg_threshold = seg_threshold
        self._segmentations_root = None if segmentations_root is None else Path(segmentations_root)
        super().__init__(root, split, transform, **options)

    def _locate(self, root: Path, download: bool) -> Path:
        for candidate in (root, root / "CUB_200_2011"):
            if all((candidate / f).is_file() for f in REQUIRED):
                break
        else:
            raise missing(root, "cub200", [*REQUIRED, "bounding_boxes.txt", "images/"], HOW_TO_GET)
        segs = self._segmentations_root
        if segs is None:
            segs = next((p for p in (candidate / "segmentations", candidate.parent / "segmentations")
                         if p.is_dir()), None)
        elif not segs.is_dir():
            raise FileNotFoundError(f"cub200: segmentations_root {segs} is not a folder")
        if self.mask_source == "auto":
            self.mask_source = "segmentation" if segs is not None else "box"
        if self.mask_source == "segmentation" and segs is None:
            raise missing(candidate, "cub200", ["segmentations/ (here or beside this folder)"],
                          "Extract segmentations.tgz from https://www.vision.caltech.edu/datasets/"
                          "cub_200_2011/ or pass segmentations_root=, or use mask_source='box'.")
        if self.mask_source == "box" and not (candidate / "bounding_boxes.txt").is_file():
            raise missing(candidate, "cub200", ["bounding_boxes.txt"], HOW_TO_GET)
        self.segmentations_root = segs
        self.has_masks = self.mask_source != "none"
        return candidate

    def _read_split(self, which: str) -> list[Sample]:
        tables = {f: read_id_table(self.root / f, 1, self.problems) for f in REQUIRED}
        paths, labels, is_train = (tables[f] for f in REQUIRED)
        boxes = (read_id_table(self.root / "bounding_boxes.txt", 4, self.problems)
                 if self.mask_source == "box" else {})
        class_ids = sorted({int(v[0]) for v in labels.values()})
        label_of = {c: k for k, c in enumerate(class_ids)}
        self.classes = self._class_names(class_ids)
        wanted = "1" if which == "trainval" else "0"
        samples = []
        for image_id, (rel,) in paths.items():
            if image_id not in labels or image_id not in is_train:
                self.problems.append(Problem(str(self.root / "images" / rel),
                                             f"image id {image_id} has no class label or no split",
                                             "skipped"))
                continue
            if is_train[image_id][0] != wanted:
                continue
            samples.append(Sample(self.root / "images" / rel, label_of[int(labels[image_id][0])],
                                  self._mask_spec(image_id, rel, boxes)))
        return samples

    def _class_names(self, class_ids: list[int]) -> list[str]:
        names = {}
        if (self.root / "classes.txt").is_file():
            names = {int(k): v[0].split(".", 1)[-1] for k, v in
                     read_id_table(self.root / "classes.txt", 1, self.problems).items() if k.isdigit()}
        return [names.get(c, str(c)) for c in class_ids]

    def _mask_spec(self, image_id: str, rel: str, boxes: dict[str, list[str]]) -> Any:
        if self.mask_source == "segmentation":
            seg = self.segmentations_root / Path(rel).with_suffix(".png")
            if seg.is_file():
                return seg
            self.problems.append(Problem(str(seg), "segmentation absent", "no mask"))
        elif self.mask_source == "box":
            if image_id in boxes:
                x, y, w, h = (float(v) for v in boxes[image_id])
                # CUB boxes are (x, y, width, height) with exclusive far edge: last pixel is x + w - 1.
                return [(x, y, x + w - 1, y + h - 1)]
            self.problems.append(Problem(str(self.root / "bounding_boxes.txt"),
                                         f"no box for image id {image_id}", "no mask"))
        return None

    def _load_mask(self, sample: Sample, size: tuple[int, int], notes: list[str] | None) -> np.ndarray:
        if isinstance(sample.mask, list):
            return boxes_to_mask(sample.mask, size)
        grey = read_mask_array(sample.mask)
        scale = 65535 if grey.dtype == np.uint16 else 1 if grey.dtype == bool else 255
        return grey > self.seg_threshold * scale
