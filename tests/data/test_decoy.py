"""Decoy digits (Ross et al. 2017's Decoy MNIST): the shade rule and its break, corners, masks, determinism, pools.

The expected patch geometry and shades are written here from the protocol (a 4/28-side square in a corner,
grey level 255 - 25 * label), and every check reads the rendered pixels, not the dataset's bookkeeping.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sib.config import TrainConfig
from sib.data import create_dataset
from sib.data.decoy import DecoyDigits
from sib.data.synthetic import _load_digits
from sib.runtime import make_dataset
from sib.train import train

SHADES = {255 - 25 * c: c for c in range(10)}  # grey level -> the label it encodes


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Normalised (3, S, S) image -> its grey levels, int64 (S, S); the three channels must agree."""
    v = torch.round((x * 0.5 + 0.5) * 255.0).long()  # undo the "half" normalisation exactly
    assert torch.equal(v[0], v[1]) and torch.equal(v[0], v[2])
    return v[0]


def _corner_boxes(size: int, p: int | None = None) -> dict[str, tuple[slice, slice]]:
    """The four corner squares of side p (default: the protocol's 4/28 of the side, at least 1 px)."""
    p = max(1, round(4 * size / 28)) if p is None else p
    near, far = slice(0, p), slice(size - p, size)
    return {"top_left": (near, near), "top_right": (near, far), "bottom_left": (far, near), "bottom_right": (far, far)}


def _patch(grey: torch.Tensor, p: int | None = None) -> tuple[str, int]:
    """(corner, grey level) of the one non-black corner square of side p, which must be uniform."""
    lit = {name: grey[box] for name, box in _corner_boxes(grey.shape[-1], p).items() if bool(grey[box].any())}
    assert len(lit) == 1, f"expected exactly one non-black corner square, got {sorted(lit)}"
    (name, square), = lit.items()
    assert bool((square == square.flatten()[0]).all()), "the patch is not one grey level"
    return name, int(square.flatten()[0])


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("split", ["train", "val"])
def test_train_and_val_patch_has_the_labels_own_shade(split: str, size: int) -> None:
    ds = DecoyDigits(split=split, image_size=size, num_samples=150)
    for i in range(len(ds)):
        x, y, _ = ds[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert _patch(_grey(x))[1] == 255 - 25 * y


def test_test_patch_has_another_labels_shade() -> None:
    ds = DecoyDigits(split="test")  # the whole test pool
    offsets = Counter()
    for i in range(len(ds)):
        x, y, _ = ds[i]
        level = _patch(_grey(x))[1]
        assert level in SHADES, f"sample {i}: grey level {level} is no label's shade"
        assert SHADES[level] != y, f"sample {i}: the patch kept its own label's shade"
        offsets[(SHADES[level] - y) % 10] += 1
    assert set(offsets) == set(range(1, 10))  # every other label is drawn, none favoured much
    assert max(offsets.values()) < 3 * min(offsets.values())


def test_test_shade_any_is_the_authors_code_rule() -> None:
    """dtak/rrr draws the test shade from all ten labels: about a tenth keep their own."""
    ds = DecoyDigits(split="test", test_shade="any")
    own = sum(SHADES[_patch(_grey(ds[i][0]))[1]] == ds[i][1] for i in range(len(ds)))
    assert 0.04 < own / len(ds) < 0.18


def test_patch_in_each_of_the_four_corners() -> None:
    ds = DecoyDigits(split="train", num_samples=400)
    corners = Counter()
    for i in range(len(ds)):
        name, _ = _patch(_grey(ds[i][0]))
        assert ds.corner(i) == name
        corners[name] += 1
    assert set(corners) == {"top_left", "top_right", "bottom_left", "bottom_right"}
    assert min(corners.values()) > 0.15 * len(ds)  # uniform: 25% each


@pytest.mark.parametrize(("size", "p"), [(28, None), (32, None), (64, None), (28, 10)])
def test_masks_patch_annotation_is_all_but_the_patch_and_the_object_is_the_digit(size: int, p: int | None) -> None:
    boxes = _corner_boxes(size, p)
    for split in ("train", "val", "test"):
        # annotation "patch" (the default)
        ds = DecoyDigits(split=split, image_size=size, patch_size=p, num_samples=40)
        ds_obj = DecoyDigits(split=split, image_size=size, patch_size=p, num_samples=40, annotation="object")
        for i in range(len(ds)):
            x, y, mask = ds[i]
            grey = _grey(x)
            corner, level = _patch(grey, p)
            assert (level == 255 - 25 * y) == (split != "test")
            patch = torch.zeros(size, size, dtype=torch.bool)
            patch[boxes[corner]] = True
            digit = (grey > 0) & ~patch  # everything lit outside the patch is the digit
            assert mask.shape == (1, size, size) and mask.dtype == torch.bool
            # the annotation is what training is told; the evaluation splits always carry the digit
            assert torch.equal(mask[0], ~patch if split == "train" else digit)
            obj = ds_obj[i][2][0]
            assert torch.equal(obj, digit) and bool(obj.any())
            assert bool((grey[obj] >= 77).all())  # the digit is drawn where the mask says, never faintly
            assert not bool((obj & patch).any())


def test_determinism_without_cache_and_in_any_order() -> None:
    a = DecoyDigits(split="test", cache=False, num_samples=50)
    b = DecoyDigits(split="test", cache=False, num_samples=50)
    first = {i: a[i] for i in range(50)}
    for i in [37, 0, 49, 12, 12]:
        x, y, m = b[i]
        assert torch.equal(x, first[i][0]) and y == first[i][1] and torch.equal(m, first[i][2])
    cached = create_dataset("decoy_digits", split="test", num_samples=50)
    assert all(torch.equal(cached[i][0], first[i][0]) for i in range(50))
    reseeded = DecoyDigits(split="test", cache=False, num_samples=50, seed=1)
    assert [reseeded[i][1] for i in range(50)] == [first[i][1] for i in range(50)]  # the same digits
    assert sum(not torch.equal(reseeded[i][0], first[i][0]) for i in range(50)) > 25  # new corners/shades


def test_disjoint_instance_pools() -> None:
    splits = {s: DecoyDigits(split=s) for s in ("train", "val", "test")}
    used = {s: [ds.source_index(i) for i in range(len(ds))] for s, ds in splits.items()}
    for s, idx in used.items():
        assert len(set(idx)) == len(idx), f"{s}: an instance is used twice in one pass"
    assert not set(used["train"]) & set(used["val"])
    assert not set(used["train"]) & set(used["test"])
    assert not set(used["val"]) & set(used["test"])
    assert sum(map(len, used.values())) == 1797  # every bundled digit, once
    # The rendered digits agree: a test digit's pixels appear in train only where the 8x8 scans are equal.
    pixels, _ = _load_digits()
    train_scans = {pixels[j].tobytes() for j in used["train"]}

    def digit_pixels(ds: DecoyDigits, i: int) -> bytes:
        grey = _grey(ds[i][0])
        grey[_corner_boxes(28)[_patch(grey)[0]]] = 0
        return grey.numpy().tobytes()

    train_digits = {digit_pixels(splits["train"], i) for i in range(len(splits["train"]))}
    for i in range(len(splits["test"])):
        if pixels[used["test"][i]].tobytes() not in train_scans:
            assert digit_pixels(splits["test"], i) not in train_digits


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown split 'test_shifted'.*train, val, test"):
        DecoyDigits(split="test_shifted")
    with pytest.raises(ValueError, match="unknown annotation 'box'.*patch, object"):
        DecoyDigits(annotation="box")
    with pytest.raises(ValueError, match="unknown test_shade"):
        DecoyDigits(test_shade="same")
    with pytest.raises(ValueError, match="image_size must be at least 12"):
        DecoyDigits(image_size=8)
    with pytest.raises(ValueError, match="patch_size 11 does not fit a 28 px image"):
        DecoyDigits(patch_size=11)


def test_trainer_generates_it_at_the_configured_size_and_rrr_trains_on_its_masks(tmp_path) -> None:
    """`make_dataset` builds it like `synthetic` (no random-crop transform), and an MLP trains with RRR."""
    cfg = TrainConfig(dataset="decoy_digits", image_size=20, model="mlp", regularizer="rrr", reg_weight=10.0,
                      epochs=1, batch_size=32, max_steps_per_epoch=3, eval_batches=1, device="cpu",
                      out=str(tmp_path / "run"), eval_splits=["test"], tensorboard=False, profile_steps=0)
    ds = make_dataset(cfg, "train", train=True)
    plain = DecoyDigits(split="train", image_size=20)
    for i in range(5):
        assert torch.equal(ds[i][0], plain[i][0]) and torch.equal(ds[i][2], plain[i][2])
    row = train(cfg).history[0]
    assert row["reg_steps"] == 3 and row["rrr"] > 0.0
