"""A folder of class folders with a parallel folder of mask PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sib.data import create_dataset
from sib.data.common import MaskReadError
from sib.data.transforms import create_transform

SIZE = (18, 14)
BOX = (3, 3, 10, 9)
pytestmark = pytest.mark.filterwarnings("ignore::sib.data.common.DataWarning")


@pytest.fixture
def folder_root(disk):
    fg = disk.box(SIZE, BOX)
    for split, n in (("train", 5), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                disk.scene(f"{split}/{cls}/{i}.jpg", fg)
                disk.mask(f"masks/{split}/{cls}/{i}.png", fg.astype(np.uint8) * 255)
    disk.mask("masks/train/cat/1.png", fg.astype(np.uint8), mode="P")  # palette indices 0/1
    disk.mask("masks/train/cat/2.png", np.stack([fg * 200, np.full(fg.shape, 255)], -1), mode="LA")
    (disk.root / "masks/train/dog/0.png").unlink()  # no mask
    disk.text("masks/train/dog/3.png", "not a png")  # unreadable mask
    (disk.root / "train/bird").mkdir()  # empty class folder: still a class
    disk.scene("test/fish/0.jpg", fg)  # a class absent from train: skipped
    return disk.root


def test_classes_counts_and_masks(folder_root, disk):
    ds = create_dataset("image_folder", folder_root, "trainval")
    assert ds.classes == ["bird", "cat", "dog"] and len(ds) == 10 and ds.has_masks
    test = create_dataset("image_folder", folder_root, "test")
    assert test.classes == ds.classes and len(test) == 4
    assert any("not among the train classes" in p.what for p in test.problems)
    assert any(p.what == "class folder holds no image" for p in ds.problems)
    expected = disk.box(SIZE, BOX)
    for i in (0, 1, 2):  # L 0/255, palette 0/1, grey + alpha
        np.testing.assert_array_equal(ds.read(i)[1], expected)
    assert ds.samples[5].mask is None
    with pytest.raises(MaskReadError, match="3.png"):
        ds[8]


def test_explicit_val_folder_and_root_without_splits(folder_root, disk, tmp_path):
    assert len(create_dataset("image_folder", folder_root, "val")) == 2  # partition: 10 % of 5 rounds to 1
    disk.scene("val/cat/9.jpg", disk.box(SIZE, BOX))
    val = create_dataset("image_folder", folder_root, "val")
    train = create_dataset("image_folder", folder_root, "train")
    assert len(val) == 1 and len(train) == 10  # an explicit val/ is the val split; train keeps all
    flat = create_dataset("image_folder", folder_root / "train", "trainval")  # the root is the class tree
    assert flat.classes == ["bird", "cat", "dog"] and not flat.has_masks
    with pytest.raises(FileNotFoundError, match="test/<class>"):
        create_dataset("image_folder", folder_root / "train", "test")


def test_masks_aligned_after_train_transform(folder_root, disk):
    ds = create_dataset("image_folder", folder_root, "test", transform=create_transform(True, image_size=16))
    for seed in range(4):
        torch.manual_seed(seed)
        x, _, m = ds[seed]
        disk.assert_aligned(x, m)


def test_an_extreme_image_is_an_error_naming_its_file(disk):
    from sib.data.transforms import ImageSizeError

    for i in range(2):
        disk.scene(f"train/cat/{i}.jpg", np.ones((12, 12), bool))
    Image.new("RGB", (20000, 1)).save(disk.root / "train" / "cat" / "thin.png")  # resized: 37 x 740000 px
    ds = create_dataset("image_folder", disk.root, "trainval", transform=create_transform(False, image_size=32))
    thin = [i for i, s in enumerate(ds.samples) if s.path.name == "thin.png"][0]
    with pytest.raises(ImageSizeError, match=r"thin.png: image of 20000x1 px"):
        ds[thin]
    assert ds[1 - thin if thin < 2 else 0][0].shape == (3, 32, 32)  # the others read as before
