"""Stanford Dogs: real .mat lists (scipy.io.savemat) and VOC XML annotations written by the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.io import savemat

from sib.data import create_dataset
from sib.data.common import DataWarning, MaskReadError
from sib.data.transforms import create_transform

SIZE = (24, 18)  # (W, H)
BREEDS = {1: "n02085620-Chihuahua", 4: "n02086240-Shih-Tzu"}  # label ids 1 and 4 (not contiguous)
BOX_A, BOX_B = (2, 2, 8, 9), (14, 6, 20, 14)  # two dogs, inclusive VOC boxes
pytestmark = pytest.mark.filterwarnings("ignore::sib.data.common.DataWarning")


def _voc(boxes, size=SIZE) -> str:
    objects = "".join(f"<object><name>dog</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                      f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    return f"<annotation><folder>x</folder>{size_xml}{objects}</annotation>"


def _cell(strings) -> np.ndarray:
    """A MATLAB cell array of strings, (N, 1), as lists.tar's .mat files hold them."""
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = s
    return cell


@pytest.fixture
def dogs_root(disk):
    fg = disk.box(SIZE, BOX_A) | disk.box(SIZE, BOX_B)
    lists = {"train": [], "test": []}
    for label, folder in BREEDS.items():
        wnid = folder.split("-")[0]
        for n in range(5):
            stem = f"{folder}/{wnid}_{n}"
            lists["train" if n < 4 else "test"].append((stem, label))
            disk.scene(f"Images/{stem}.jpg", fg)
            disk.text(f"Annotation/{stem}", _voc([BOX_A, BOX_B]))
    first, second = BREEDS[1], BREEDS[4]
    disk.text(f"Annotation/{first}/n02085620_1", _voc([(1, 1, 4, 4), (7, 3, 10, 7)], (12, 9)))  # half scale
    (disk.root / f"Annotation/{first}/n02085620_2").unlink()  # no annotation
    disk.text(f"Annotation/{first}/n02085620_3", "<annotation><object>")  # malformed XML
    disk.text(f"Annotation/{second}/n02086240_0", _voc([BOX_A, BOX_B], None))  # no <size>
    (disk.root / f"Images/{second}/n02086240_1.jpg").unlink()  # listed, absent
    for split, items in lists.items():
        savemat(disk.path(f"{split}_list.mat"), {
            "file_list": _cell([f"{s}.jpg" for s, _ in items]),
            "annotation_list": _cell([s for s, _ in items]),
            "labels": np.array([[float(label)] for _, label in items])})
    return disk.root


def test_counts_labels_classes(dogs_root):
    with pytest.warns(DataWarning, match=r"1 annotation absent \(no mask\); 1 listed but absent \(skipped\)"):
        ds = create_dataset("stanford_dogs", dogs_root, "trainval")
    test = create_dataset("stanford_dogs", dogs_root, "test")
    assert len(ds) == 7 and len(test) == 2 and ds.has_masks
    assert ds.classes == ["Chihuahua", "Shih-Tzu"]
    assert [s.label for s in ds.samples] == [0, 0, 0, 0, 1, 1, 1]
    assert [s.label for s in test.samples] == [0, 1]


def test_union_of_boxes_scaled_and_sizeless_annotations(dogs_root, disk):
    ds = create_dataset("stanford_dogs", dogs_root, "trainval")
    union = disk.box(SIZE, BOX_A) | disk.box(SIZE, BOX_B)
    _, m = ds.read(0)
    np.testing.assert_array_equal(m, union)
    _, m = ds.read(4)  # Shih-Tzu_0: XML without <size>: drawn at the image's size
    np.testing.assert_array_equal(m, union)
    with pytest.warns(DataWarning, match="resized"):
        _, m = ds.read(1)  # XML for a half-size image: scaled, still two separate boxes
    assert m[3, 3] and m[10, 16] and not m[0, 12] and m.shape == (SIZE[1], SIZE[0])
    assert ds.samples[2].mask is None  # no annotation: no mask
    with pytest.raises(MaskReadError, match="n02085620_3"):
        ds[3]


def test_masks_aligned_after_train_transform(dogs_root, disk):
    ds = create_dataset("stanford_dogs", dogs_root, "test", transform=create_transform(True, image_size=16))
    for seed in range(4):
        torch.manual_seed(seed)
        x, _, m = ds[seed % 2]
        disk.assert_aligned(x, m)


def test_missing_and_no_annotation_folder(dogs_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)train_list.mat.*stanford.edu"):
        create_dataset("stanford_dogs", tmp_path / "empty", "train")
    import shutil

    shutil.rmtree(dogs_root / "Annotation")
    ds = create_dataset("stanford_dogs", dogs_root, "test")
    assert not ds.has_masks and ds[0][2] is None
    with pytest.raises(FileNotFoundError, match="Annotation"):
        create_dataset("stanford_dogs", dogs_root, "test", mask_source="box")
