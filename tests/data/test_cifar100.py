"""CIFAR-100: real pickles in the "python version" layout, written by the test."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from sib.data import create_dataset
from sib.data.transforms import create_transform


def _write(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.fixture
def cifar_root(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name, n in (("train", 40), ("test", 10)):
        fine = np.arange(n) % 4  # 4 classes present
        images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        images[:, 0] = (fine * 60)[:, None, None]  # red level encodes the class
        images[:, 1, :16] = 255  # green top half: tells rows from columns
        _write(base / name, {b"batch_label": b"training", b"data": images.reshape(n, 3072),
                             b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 2).tolist(),
                             b"filenames": [f"img_{i}.png".encode() for i in range(n)]})
    _write(base / "meta", {b"fine_label_names": [f"class{i}" for i in range(100)],
                           b"coarse_label_names": [f"super{i}" for i in range(20)]})
    return tmp_path


def test_counts_labels_and_pixels(cifar_root):
    counts = {s: len(create_dataset("cifar100", cifar_root, s)) for s in ("train", "val", "trainval", "test")}
    assert counts == {"train": 36, "val": 4, "trainval": 40, "test": 10}  # 10 % of each of 4 classes
    ds = create_dataset("cifar100", cifar_root / "cifar-100-python", "test", image_size=32)
    assert ds.num_classes == 100 and not ds.has_masks and ds.classes[3] == "class3"
    x, y, m = ds[3]
    assert m is None and y == 3 and x.shape == (3, 32, 32)  # whole image: resized to 32, not cropped
    rgb = (x + 1) / 2  # "half" normalisation back to [0, 1]
    torch.testing.assert_close(rgb[0], torch.full((32, 32), 180 / 255))
    assert (rgb[1, :16] == 1).all() and (rgb[1, 16:] == 0).all()  # planes and rows in the right order
    coarse = create_dataset("cifar100", cifar_root, "test", label_type="coarse")
    assert coarse.num_classes == 20 and [s.label for s in coarse.samples[:4]] == [0, 0, 1, 1]


def test_train_transform_and_upsampling(cifar_root):
    ds = create_dataset("cifar100", cifar_root, "train", transform=create_transform(True, image_size=64))
    x, _, m = ds[0]
    assert x.shape == (3, 64, 64) and m is None


def test_missing_truncated_and_hostile_pickles(cifar_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar-100-python/train.*toronto.edu.*download=True"):
        create_dataset("cifar100", tmp_path / "none", "train")
    train = cifar_root / "cifar-100-python" / "train"
    data = train.read_bytes()
    train.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read CIFAR pickle .*train"):
        create_dataset("cifar100", cifar_root, "train")
    _write(train, {"data": os.system})  # a pickle that would call a function: refused, not run
    with pytest.raises(ValueError, match="refusing to load"):
        create_dataset("cifar100", cifar_root, "train")
