"""ImageNet: class folders for train and val, VOC boxes for val images as masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sib.data import create_dataset
from sib.data.common import DataWarning
from sib.data.transforms import create_transform

SIZE = (20, 16)
BOX = (3, 2, 11, 9)
WNIDS = ["n01440764", "n01443537", "n01484850"]
pytestmark = pytest.mark.filterwarnings("ignore::sib.data.common.DataWarning")


def _voc(objects) -> str:
    body = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return f"<annotation><size><width>{SIZE[0]}</width><height>{SIZE[1]}</height></size>{body}</annotation>"


@pytest.fixture
def imagenet_root(disk):
    fg = disk.box(SIZE, BOX)
    for k, wnid in enumerate(WNIDS):
        for n in range(10):
            disk.scene(f"train/{wnid}/{wnid}_{n}.JPEG", fg)
        for n in range(2):
            stem = f"ILSVRC2012_val_{k * 2 + n + 1:08d}"
            disk.scene(f"val/{wnid}/{stem}.JPEG", fg)
            # the image's own object, and another class's box elsewhere (not part of this image's mask)
            disk.text(f"val_boxes/{stem}.xml", _voc([(wnid, BOX), ("n09999999", (14, 10, 18, 14))]))
    (disk.root / "val_boxes/ILSVRC2012_val_00000006.xml").unlink()  # no boxes for one val image
    disk.text("train/n01440764/.DS_Store", "junk")  # not an image: ignored
    disk.text("train/n01440764/notes.txt", "junk")
    disk.text("LOC_synset_mapping.txt", "n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    return disk.root


def test_splits_classes_and_masks(imagenet_root, disk):
    counts = {s: len(create_dataset("imagenet", imagenet_root, s))
              for s in ("train", "val", "trainval", "test")}
    assert counts == {"train": 27, "val": 3, "trainval": 30, "test": 6}
    train = create_dataset("imagenet", imagenet_root, "train")
    assert train.classes == ["tench", "goldfish", "n01484850"] and not train.has_masks
    ignored = {p.file.rsplit("/", 1)[1] for p in train.problems if p.action == "ignored"}
    assert ignored == {".DS_Store", "notes.txt"}
    with pytest.warns(DataWarning, match="1 box annotation absent"):
        test = create_dataset("imagenet", imagenet_root, "test")
    assert test.has_masks and [s.label for s in test.samples] == [0, 0, 1, 1, 2, 2]
    _, m = test.read(0)
    np.testing.assert_array_equal(m, disk.box(SIZE, BOX))  # only the image's own wnid's box
    assert test.samples[5].mask is None


def test_masks_aligned_after_train_transform(imagenet_root, disk):
    ds = create_dataset("imagenet", imagenet_root, "test", transform=create_transform(True, image_size=16))
    for seed in range(4):
        torch.manual_seed(seed)
        x, _, m = ds[seed]
        disk.assert_aligned(x, m)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)train/<wnid>.*image-net.org"):
        create_dataset("imagenet", tmp_path, "train")
