"""CUB-200-2011: a generated folder in the authors' layout, segmentations beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sib.data import create_dataset
from sib.data.common import DataWarning
from sib.data.transforms import create_transform

SIZE = (20, 16)  # (W, H)
BOX = (4, 3, 12, 10)  # inclusive (x0, y0, x1, y1)
CLASSES = {1: "001.Black_footed_Albatross", 3: "003.Sooty_Albatross"}
pytestmark = pytest.mark.filterwarnings("ignore::sib.data.common.DataWarning")


def _soft_segmentation() -> np.ndarray:
    """Grey (H, W): 255 in the box, 153 (3 of 5 annotators) in the column right of it, 102 below it."""
    x0, y0, x1, y1 = BOX
    s = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    s[y0:y1 + 1, x0:x1 + 1] = 255
    s[y0:y1 + 1, x1 + 1] = 153
    s[y1 + 1, x0:x1 + 1] = 102
    return s


@pytest.fixture
def cub_root(disk):
    """Root holding CUB_200_2011/ and segmentations/; ids 1-8, classes 1 and 3, id 4 and 8 are test."""
    base = "CUB_200_2011"
    fg = disk.box(SIZE, BOX)
    images, labels, split, boxes = [], [], [], []
    image_id = 0
    for cid, folder in CLASSES.items():
        for n in range(4):
            image_id += 1
            rel = f"{folder}/{folder.split('.')[1]}_{n:04d}_{image_id}.jpg"
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
            split.append(f"{image_id} {int(n < 3)}")
            x0, y0, x1, y1 = BOX
            boxes.append(f"{image_id} {x0}.0 {y0}.0 {x1 - x0 + 1}.0 {y1 - y0 + 1}.0")
            disk.scene(f"{base}/images/{rel}", fg)
            seg = _soft_segmentation()
            if image_id == 2:  # grey + alpha
                disk.mask(f"segmentations/{rel[:-4]}.png", np.stack([seg, np.full_like(seg, 255)], -1), "LA")
            elif image_id != 3:  # id 3: segmentation absent
                disk.mask(f"segmentations/{rel[:-4]}.png", seg)
    (disk.root / base / "images" / images[4].split()[1]).unlink()  # id 5: listed, absent
    images.append("9 001.Black_footed_Albatross/unlabelled.jpg")  # id 9: no label, no split line
    disk.text(f"{base}/images.txt", "\n".join(images) + "\n")
    disk.text(f"{base}/image_class_labels.txt", "\n".join(labels) + "\n")
    disk.text(f"{base}/train_test_split.txt", "\n".join(split) + "\n")
    disk.text(f"{base}/bounding_boxes.txt", "\n".join(boxes) + "\n")
    disk.text(f"{base}/classes.txt", "\n".join(f"{k} {v}" for k, v in CLASSES.items()) + "\n")
    return disk.root


def test_counts_labels_and_problems(cub_root):
    with pytest.warns(DataWarning, match="listed but absent"):
        ds = create_dataset("cub200", cub_root, "trainval")
    test = create_dataset("cub200", cub_root / "CUB_200_2011", "test")  # either root works
    assert len(ds) == 5 and len(test) == 2  # 6 train ids, id 5 absent; ids 4 and 8
    assert ds.classes == ["Black_footed_Albatross", "Sooty_Albatross"] and ds.mask_source == "segmentation"
    assert [s.label for s in ds.samples] == [0, 0, 0, 1, 1] and [s.label for s in test.samples] == [0, 1]
    whats = {p.what for p in ds.problems}
    assert {"listed but absent", "segmentation absent", "image id 9 has no class label or no split"} <= whats


def test_segmentation_threshold_grey_alpha_and_box(cub_root, disk):
    ds = create_dataset("cub200", cub_root, "trainval")
    expected = _soft_segmentation() > 127
    for i in (0, 1):  # L, and grey + alpha
        _, m = ds.read(i)
        np.testing.assert_array_equal(m, expected)  # 153 (3 of 5 annotators) in, 102 out
    _, m = create_dataset("cub200", cub_root, "trainval", seg_threshold=0.3).read(0)
    np.testing.assert_array_equal(m, _soft_segmentation() > 0.3 * 255)
    assert ds.samples[2].mask is None  # id 3 has no segmentation file
    boxes = create_dataset("cub200", cub_root, "trainval", mask_source="box")
    _, m = boxes.read(0)
    np.testing.assert_array_equal(m, disk.box(SIZE, BOX))  # (x, y, w, h) -> exactly the box's pixels
    assert create_dataset("cub200", cub_root, "trainval", mask_source="none").samples[0].mask is None


def test_masks_aligned_after_train_transform(cub_root, disk):
    ds = create_dataset("cub200", cub_root, "trainval", mask_source="box",
                        transform=create_transform(True, image_size=16))
    for seed in range(4):
        torch.manual_seed(seed)
        x, y, m = ds[seed % len(ds)]
        disk.assert_aligned(x, m)


def test_missing_files_and_options(cub_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)images.txt.*caltech.edu"):
        create_dataset("cub200", tmp_path / "empty", "train")
    with pytest.raises(FileNotFoundError, match="segmentations"):
        create_dataset("cub200", cub_root, "train", mask_source="segmentation",
                       segmentations_root=tmp_path / "x")
    with pytest.raises(ValueError, match="mask_source"):
        create_dataset("cub200", cub_root, "train", mask_source="polygon")
