"""ImageNet-1k (ILSVRC 2012) in the usual extracted layout, with optional validation boxes as masks.

    <root>/train/<wnid>/<wnid>_<n>.JPEG
    <root>/val/<wnid>/ILSVRC2012_val_<n>.JPEG        class folders (e.g. after the common valprep.sh)
    <root>/val_boxes/ILSVRC2012_val_<n>.xml           optional: PASCAL VOC boxes, one XML per val image
                                                      (ILSVRC2012_bbox_val_v3.tgz); or `boxes_root`
    <root>/LOC_synset_mapping.txt                     optional: "<wnid> <names>" lines give `classes`

Splits: the test labels are not public, so "test" is the official validation set; "trainval" is the
official training set and "train" / "val" partition it (checkpoints are chosen on that held-out part,
never on "test"). Labels: the train folder's wnids, sorted (the standard 0..999 order).

Masks exist for "test" only: the union of the XML's boxes of the image's own wnid (of all boxes when none
carries it), fitted to the image like any mask. A val image without its XML keeps no mask (a counted
warning). Train images have no masks here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sib.data.common import MaskedImageDataset, Problem, Sample, boxes_to_mask, missing
from sib.data.image_folder import scan_class_folders
from sib.data.stanford_dogs import read_voc_boxes

HOW_TO_GET = ("ImageNet cannot be downloaded automatically: get ILSVRC2012_img_train.tar and "
              "ILSVRC2012_img_val.tar from https://image-net.org (after registering), extract train/ into "
              "class folders and sort val/ into class folders (valprep.sh); for masks extract "
              "ILSVRC2012_bbox_val_v3.tgz into val_boxes/.")


class ImageNet(MaskedImageDataset):
    """ImageNet-1k class folders; the "test" split (official val) has box masks where boxes are present.

    Args:
        root, split, transform: see `sib.data.common.MaskedImageDataset`.
        boxes_root: folder of val XMLs (`<stem>.xml`, flat or in `<wnid>/`); None: <root>/val_boxes
            if present.
        **options: image_size, normalization, val_fraction, seed, download, exclude (see the base class).
    """

    check_files_exist = False  # the samples come from a directory scan

    def __init__(self, root: str | Path | None, split: str = "train", transform: Any = None, *,
                 boxes_root: str | Path | None = None, **options: Any) -> None:
        self._boxes_option = None if boxes_root is None else Path(boxes_root)
        super().__init__(root, split, transform, **options)

    def _locate(self, root: Path, download: bool) -> Path:
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise missing(root, "imagenet", ["train/<wnid>/*.JPEG", "val/<wnid>/*.JPEG"], HOW_TO_GET)
        boxes = self._boxes_option if self._boxes_option is not None else root / "val_boxes"
        if self._boxes_option is not None and not boxes.is_dir():
            raise FileNotFoundError(f"imagenet: boxes_root {boxes} is not a folder")
        self.boxes_root = boxes if boxes.is_dir() else None
        self.has_masks = self.boxes_root is not None and self.split == "test"
        return root

    def _read_split(self, which: str) -> list[Sample]:
        wnids = sorted(e.name for e in (self.root / "train").iterdir() if e.is_dir() and e.name[0] != ".")
        folder = self.root / ("train" if which == "trainval" else "val")
        wnids, items, problems = scan_class_folders(folder, wnids)
        self.problems += problems
        self.wnids = wnids
        self.classes = self._names(wnids)
        with_boxes = which == "test" and self.boxes_root is not None
        return [Sample(p, label, self._box_file(p) if with_boxes else None) for p, label in items]

    def _names(self, wnids: list[str]) -> list[str]:
        mapping = self.root / "LOC_synset_mapping.txt"
        if not mapping.is_file():
            return list(wnids)
        names = dict(line.split(maxsplit=1) for line in mapping.read_text().splitlines() if " " in line)
        return [names.get(w, w).split(",")[0].strip() for w in wnids]

    def _box_file(self, image: Path) -> Path | None:
        for candidate in (self.boxes_root / f"{image.stem}.xml",
                          self.boxes_root / image.parent.name / f"{image.stem}.xml"):
            if candidate.is_file():
                return candidate
        self.problems.append(Problem(str(self.boxes_root / f"{image.stem}.xml"), "box annotation absent",
                                     "no mask"))
        return None

    def _load_mask(self, sample: Sample, size: tuple[int, int], notes: list[str] | None) -> np.ndarray:
        xml_size, boxes = read_voc_boxes(sample.mask)
        own = [b for name, b in boxes if name == self.wnids[sample.label]]
        if notes is not None and not boxes:
            notes.append("annotation has no <object> box")
        return boxes_to_mask(own or [b for _, b in boxes], xml_size or size)
