"""Oxford-IIIT Pet (Parkhi et al., CVPR 2012), read from the authors' layout.

    <root>/images/<Breed>_<n>.jpg
    <root>/annotations/trainval.txt, test.txt, list.txt   lines "Image CLASS-ID SPECIES BREED-ID"
    <root>/annotations/trimaps/<Breed>_<n>.png            1 = pet, 2 = background, 3 = border / unclassified

Lines starting with "#" (the full dataset's list.txt header) are skipped. `root` may also be the folder
above `oxford-iiit-pet/` (where torchvision's downloader puts it).

Splits: the list files are the source of truth ("trainval" = trainval.txt, "test" = test.txt; "train" /
"val" partition trainval.txt). Labels: the dataset's CLASS-IDs (1..37) present in list.txt (or, without
list.txt, in the split files), sorted, mapped to 0..K-1; `classes[k]` is the breed, taken from the image
names ("Abyssinian", "american_bulldog"). The 3-breed oxford-pets-mini has K = 3.

Mask: `trimap == 1` by default (`border="background"`: the unclassified border around the pet is not
object); `border="foreground"` also counts the border (trimap in {1, 3}). Trimap values outside 1..3
are background. A listed image without a trimap keeps no mask (a counted warning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sib.data.common import (
    IMAGE_EXTENSIONS,
    MaskedImageDataset,
    Problem,
    Sample,
    download_or_explain,
    missing,
    read_mask_array,
)

BORDERS = ("background", "foreground")
HOW_TO_GET = ("download images.tar.gz and annotations.tar.gz from "
              "https://www.robots.ox.ac.uk/~vgg/data/pets/ and extract both into the root (giving images/ "
              "and annotations/), or pass download=True (`--download`).")


def read_pet_list(path: Path, problems: list[Problem]) -> list[tuple[str, int]]:
    """Parse an Oxford-IIIT Pet list file into [(image name, CLASS-ID)], in file order.

    Blank and "#" lines are skipped; malformed lines and repeated names are recorded as problems.
    """
    entries: list[tuple[str, int]] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2 or not fields[1].isdigit():
            problems.append(Problem(str(path), f"line {number} is not 'Image CLASS-ID ...': {line!r}",
                                    "skipped"))
        elif fields[0] in seen:
            problems.append(Problem(str(path), f"line {number}: {fields[0]} listed twice", "skipped"))
        else:
            seen.add(fields[0])
            entries.append((fields[0], int(fields[1])))
    return entries


class OxfordPets(MaskedImageDataset):
    """Oxford-IIIT Pet with trimap foreground masks.

    Args:
        root, split, transform: see `sib.data.common.MaskedImageDataset`.
        border: "background" (default: mask = trimap == 1) or "foreground" (mask = trimap in {1, 3}).
        **options: image_size, normalization, val_fraction, seed, download, exclude (see the base class).
    """

    has_masks = True

    def __init__(self, root: str | Path | None, split: str = "train", transform: Any = None, *,
                 border: str = "background", **options: Any) -> None:
        if border not in BORDERS:
            raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r} (a bool mask "
                             "cannot mark pixels as ignored; 'background' keeps the border out of the pet)")
        self.border = border
        super().__init__(root, split, transform, **options)

    def _locate(self, root: Path, download: bool) -> Path:
        for candidate in (root, root / "oxford-iiit-pet"):
            if (candidate / "annotations" / "trainval.txt").is_file():
                return candidate
        if download:
            from torchvision.datasets import OxfordIIITPet

            download_or_explain(lambda: OxfordIIITPet(str(root), download=True), "oxford_pets", root,
                                HOW_TO_GET)
            return root / "oxford-iiit-pet"
        expected = ["images/*.jpg", "annotations/trainval.txt", "annotations/test.txt",
                    "annotations/list.txt", "annotations/trimaps/*.png"]
        raise missing(root, "oxford_pets", expected, HOW_TO_GET)

    def _read_split(self, which: str) -> list[Sample]:
        ann = self.root / "annotations"
        split_file = ann / f"{which}.txt"
        if not split_file.is_file():
            raise missing(self.root, "oxford_pets", [f"annotations/{which}.txt"], HOW_TO_GET)
        entries = read_pet_list(split_file, self.problems)
        # Class ids and names come from list.txt (all splits), so train and test share one label map.
        catalogue = ann / "list.txt"
        if catalogue.is_file():
            known = read_pet_list(catalogue, [])
        else:
            known = [e for f in ("trainval.txt", "test.txt") if (ann / f).is_file()
                     for e in read_pet_list(ann / f, [])]
        names: dict[int, str] = {}
        for image, class_id in known:
            names.setdefault(class_id, image.rsplit("_", 1)[0])
        ids = sorted(names)
        self.classes = [names[i] for i in ids]
        label_of = {class_id: k for k, class_id in enumerate(ids)}
        listed_id = dict(known)
        samples = []
        for image, class_id in entries:
            if class_id not in label_of:
                self.problems.append(Problem(str(split_file), f"{image}: class id {class_id} not in list.txt",
                                             "skipped"))
                continue
            if listed_id.get(image, class_id) != class_id:
                self.problems.append(Problem(str(split_file), f"{image}: class id {class_id} here, "
                                             f"{listed_id[image]} in list.txt; {which}.txt is used", "kept"))
            path, trimap = self.root / "images" / f"{image}.jpg", ann / "trimaps" / f"{image}.png"
            has_trimap = trimap.is_file()
            if not has_trimap and path.is_file():  # an absent image is reported once, as absent
                self.problems.append(Problem(str(trimap), "trimap absent", "no mask"))
            samples.append(Sample(path, label_of[class_id], trimap if has_trimap else None))
        return samples

    def _load_mask(self, sample: Sample, size: tuple[int, int], notes: list[str] | None) -> np.ndarray:
        trimap = read_mask_array(sample.mask)
        if notes is not None:
            odd = sorted(set(np.unique(trimap).tolist()) - {1, 2, 3})
            if odd:
                notes.append(f"trimap values {odd} outside 1/2/3 counted as background")
        if self.border == "foreground":
            return (trimap == 1) | (trimap == 3)
        return trimap == 1

    def unlisted(self) -> list[Problem]:
        ann = self.root / "annotations"
        listed = {image for f in ("list.txt", "trainval.txt", "test.txt") if (ann / f).is_file()
                  for image, _ in read_pet_list(ann / f, [])}
        problems = []
        for folder, kind in ((self.root / "images", "image"), (ann / "trimaps", "trimap")):
            for p in sorted(folder.iterdir()) if folder.is_dir() else []:
                if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                    problems.append(Problem(str(p), "not an image file (by name)", "ignored"))
                elif p.stem not in listed:
                    problems.append(Problem(str(p), f"{kind} in no list file{self._describe(p, kind)}",
                                            "ignored"))
        return problems

    def _describe(self, path: Path, kind: str) -> str:
        """What a check of an unlisted trimap finds, so the report shows all of a folder's oddities."""
        if kind != "trimap":
            return ""
        try:
            return "" if (read_mask_array(path) == 1).any() else "; empty: no pet pixel"
        except OSError as e:
            return f"; {e}"
