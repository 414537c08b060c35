"""Oxford-IIIT Pet: a generated folder with every irregularity, and the real oxford-pets-mini."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sib.data import collate, create_dataset
from sib.data.common import DataWarning, ImageReadError, MaskSizeError, download_or_explain
from sib.data.transforms import create_transform

BROKEN = ["american_bulldog_3.jpg", "american_bulldog_4.jpg"]  # transposed trimap, truncated JPEG
# The fixture's absent file warns at every construction; tests that are about the warning catch it.
pytestmark = pytest.mark.filterwarnings("ignore::sib.data.common.DataWarning")


def _index(ds, name: str) -> int:
    return next(i for i, s in enumerate(ds.samples) if s.path.stem == name)


def test_counts_labels_and_classes(pets_root):
    with pytest.warns(DataWarning, match=r"1 listed but absent \(skipped\).*Abyssinian_5"):
        ds = create_dataset("oxford_pets", pets_root, "trainval", image_size=16)
    test = create_dataset("oxford_pets", pets_root, "test", image_size=16)
    assert len(ds) == 14 and len(test) == 6  # 15 listed trainval, one absent
    assert ds.classes == test.classes == ["Abyssinian", "american_bulldog", "Bengal"]  # ids 1, 2, 6
    assert ds.num_classes == 3 and ds.has_masks
    for s in ds.samples + test.samples:
        assert s.label == ds.classes.index(s.path.stem.rsplit("_", 1)[0])
    skipped = [p.file for p in ds.problems if p.action == "skipped"]
    assert skipped == [str(pets_root / "images/Abyssinian_5.jpg")]
    assert [Path(p.file).name for p in ds.problems if p.action == "no mask"] == ["american_bulldog_1.png"]


def test_train_val_partition_is_stratified_disjoint_and_seeded(pets_root):
    def names(split, **kw):
        ds = create_dataset("oxford_pets", pets_root, split, val_fraction=0.2, **kw)
        return {s.path.stem for s in ds.samples}

    train, val, trainval = names("train"), names("val"), names("trainval")
    listed = trainval | {"Abyssinian_5"}  # the partition is drawn on the list, then the absent file drops
    assert not train & val and train | val | {"Abyssinian_5"} == listed
    val_ds = create_dataset("oxford_pets", pets_root, "val", val_fraction=0.2)
    drawn = val | {Path(p.file).stem for p in val_ds.problems if p.what == "listed but absent"}
    assert sorted(n.rsplit("_", 1)[0] for n in drawn) == ["Abyssinian", "Bengal", "american_bulldog"]
    assert names("val") == val  # deterministic
    assert any(names("val", seed=seed) != val for seed in range(1, 6))  # and the seed matters


def test_converted_images_read_as_rgb_with_aligned_masks(pets_root, disk):
    ds = create_dataset("oxford_pets", pets_root, "trainval", transform=create_transform(True, image_size=16))
    for name in ("Abyssinian_1", "Abyssinian_2", "Abyssinian_4", "Bengal_1"):  # PNG, CMYK, GIF, RGBA
        for seed in range(3):
            torch.manual_seed(seed)
            x, y, m = ds[_index(ds, name)]
            disk.assert_aligned(x, m)
    image, mask = ds.read(_index(ds, "Abyssinian_3"))  # grey: channels equal, mask = the box
    a = np.asarray(image)
    assert image.mode == "RGB" and (a[..., 0] == a[..., 2]).all()
    np.testing.assert_array_equal(mask, disk.box((24, 20), (6, 5, 15, 13)))


def test_border_option(pets_root):
    bg = create_dataset("oxford_pets", pets_root, "trainval", border="background")
    fg = create_dataset("oxford_pets", pets_root, "trainval", border="foreground")
    i = _index(bg, "Bengal_2")
    _, m_bg = bg.read(i)
    _, m_fg = fg.read(i)
    assert m_bg.sum() == 10 * 9 and m_fg.sum() == 12 * 11  # the box; the box and its one-pixel ring
    with pytest.raises(ValueError, match="border must be one of"):
        create_dataset("oxford_pets", pets_root, "test", border="ignore")


def test_mask_irregularities(pets_root, disk):
    ds = create_dataset("oxford_pets", pets_root, "trainval", image_size=16)
    _, _, m = ds[_index(ds, "american_bulldog_1")]
    assert m is None  # trimap absent: no mask; collate turns it into an empty one
    _, _, mask = collate([ds[_index(ds, "american_bulldog_1")], ds[_index(ds, "Bengal_2")]])
    assert not mask[0].any() and mask[1].any()
    _, m = ds.read(_index(ds, "american_bulldog_5"))
    assert not m.any()  # empty trimap: an all-False mask
    with pytest.warns(DataWarning, match="american_bulldog_2.png.*resized"):
        image, m = ds.read(_index(ds, "american_bulldog_2"))
    assert m.shape == (20, 24) and m[10, 12] and not m[0, 0]  # half-size trimap scaled to the image


@pytest.mark.parametrize("name, error", [("american_bulldog_3", MaskSizeError),
                                         ("american_bulldog_4", ImageReadError)])
def test_unreadable_samples_raise_naming_the_file(pets_root, name, error):
    ds = create_dataset("oxford_pets", pets_root, "trainval")
    with pytest.raises(error, match=name):
        ds[_index(ds, name)]


def test_exclude_makes_every_sample_readable(pets_root):
    with pytest.warns(DataWarning):
        ds = create_dataset("oxford_pets", pets_root, "trainval", image_size=16, exclude=BROKEN)
    assert len(ds) == 12
    batches = list(DataLoader(ds, batch_size=5, collate_fn=collate))
    x, y, m = batches[0]
    assert x.shape == (5, 3, 16, 16) and m.shape == (5, 1, 16, 16) and sum(len(b[1]) for b in batches) == 12


def test_missing_root_and_download_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*annotations/trainval.txt.*robots.ox.ac.uk"):
        create_dataset("oxford_pets", tmp_path / "nowhere", "test")

    def offline():
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(RuntimeError, match="download into .* failed.*by hand"):
        download_or_explain(offline, "oxford_pets", tmp_path, "get it")


def test_torchvision_download_layout_is_found(pets_root, tmp_path):
    # torchvision's downloader puts the dataset in <root>/oxford-iiit-pet
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "oxford-iiit-pet").symlink_to(pets_root, target_is_directory=True)
    assert len(create_dataset("oxford_pets", parent, "test")) == 6


# ------------------------------------------------------------------------------------- real folder

@pytest.fixture
def mini(shared_path) -> Path:
    """The real oxford-pets-mini in ../shared/data (a skip where absent, a failure under CI)."""
    return shared_path("data/oxford-pets-mini")


def test_mini_counts_labels_and_the_irregular_files(mini):
    counts = {s: len(create_dataset("oxford_pets", mini, s)) for s in ("train", "val", "trainval", "test")}
    assert counts == {"train": 270, "val": 30, "trainval": 300, "test": 199}
    ds = create_dataset("oxford_pets", mini, "test")
    assert ds.classes == ["Abyssinian", "american_bulldog", "Bengal"]  # class ids 1, 2, 6
    assert np.bincount([s.label for s in ds.samples]).tolist() == [66, 67, 66]
    names = {Path(p.file).name: p.what for p in ds.unlisted()}
    assert set(names) == {"Abyssinian_34.jpg", "Abyssinian_82.jpg", "Abyssinian_34.png", "Abyssinian_82.png"}


@pytest.mark.parametrize("train", [False, True])
def test_mini_masks_aligned_after_transforms(train, mini):
    ds = create_dataset("oxford_pets", mini, "trainval", transform=create_transform(train, image_size=64))
    reference = create_transform(train, image_size=64)
    for i in range(0, len(ds), 60):
        s = ds.samples[i]
        with Image.open(s.path) as im:
            image = im.convert("RGB")
        with Image.open(s.mask) as tm:
            fg = Image.fromarray((np.asarray(tm) == 1).astype(np.uint8))
        torch.manual_seed(i)
        x, y, m = ds[i]
        torch.manual_seed(i)
        x_ref, m_ref = reference(image, fg)
        assert y == ds.classes.index(s.path.stem.rsplit("_", 1)[0])
        torch.testing.assert_close(x, x_ref)
        assert torch.equal(m, m_ref)
        assert train or 0.02 < m.float().mean() < 0.98  # a random crop may lie inside the pet
