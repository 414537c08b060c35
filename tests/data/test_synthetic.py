"""The built-in benchmark: determinism, exact masks, class balance, the measured background cue."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from sib.data import collate, create_dataset
from sib.data.synthetic import FAMILIES, SPLITS, SyntheticBenchmark, _load_digits
from sib.data.transforms import normalize


def _image01(x: torch.Tensor) -> torch.Tensor:
    """Undo the "half" normalisation exactly (no clamping, unlike `denormalize`)."""
    return x * 0.5 + 0.5


def test_sample_shapes_dtypes_ranges() -> None:
    ds = SyntheticBenchmark(None, "train", num_samples=12)
    assert len(ds) == 12 and ds.num_classes == 6 and len(ds.classes) == 6 and ds.has_masks
    for i in range(12):
        x, y, m = ds[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < 6
        assert m.shape == (1, 64, 64) and m.dtype == torch.bool
        img = _image01(x)
        assert img.min() >= 0.0 and img.max() <= 1.0
        # The object covers a real part of the image but not all of it.
        assert 0.02 < m.float().mean() < 0.6


def test_same_seed_identical_different_seed_or_split_different() -> None:
    # cache=False: with the process-wide cache, b would read a's tensors and never render anything itself
    a = SyntheticBenchmark(None, "train", num_samples=8, cache=False)
    b = SyntheticBenchmark(None, "train", num_samples=8, cache=False)
    other_seed = SyntheticBenchmark(None, "train", num_samples=8, seed=1)
    for i in range(8):
        xa, ya, ma = a[i]
        xb, yb, mb = b[i]
        assert torch.equal(xa, xb) and ya == yb and torch.equal(ma, mb)
        assert not torch.equal(xa, other_seed[i][0])
    test = SyntheticBenchmark(None, "test", num_samples=8)
    val = SyntheticBenchmark(None, "val", num_samples=8)
    for i in range(8):
        assert not torch.equal(a[i][0], test[i][0])
        assert not torch.equal(test[i][0], val[i][0])


def test_access_order_and_cache_do_not_matter() -> None:
    forward = SyntheticBenchmark(None, "test_shifted", num_samples=10)
    backward = SyntheticBenchmark(None, "test_shifted", num_samples=10, cache=False)
    first = [forward[i] for i in range(10)]
    for i in reversed(range(10)):
        x, y, m = backward[i]
        assert torch.equal(x, first[i][0]) and y == first[i][1] and torch.equal(m, first[i][2])
    # A second read (from the cache) is the same too, and editing a returned mask does not corrupt it.
    first[3][2].fill_(False)
    assert torch.equal(forward[3][2], backward[3][2]) and forward[3][2].any()


def _bbox(m: torch.Tensor) -> torch.Tensor:
    """The bool (h, w) array cropped to its True pixels' bounding box."""
    rows, cols = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
    return m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@pytest.mark.parametrize("digit", range(10))
def test_train_val_test_instance_pools_are_disjoint(digit: int) -> None:
    """Issue 8 item 9: before, val and test drew from the same held-out third of the instances."""
    pools = {split: set(SyntheticBenchmark.instance_pool(digit, split).tolist()) for split in SPLITS}
    assert pools["test_shifted"] == pools["test"]
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not pools[a] & pools[b], f"digit {digit}: {a} and {b} share instances {sorted(pools[a] & pools[b])}"
    everything = pools["train"] | pools["val"] | pools["test"]
    assert len(pools["val"]) >= 25 and len(pools["test"]) >= 25 and len(pools["train"]) >= 100
    # every instance of the digit belongs to a pool: the labels of the scikit-learn rows are the digit
    _, target = _load_digits()
    assert everything == set(np.flatnonzero(target == digit).tolist())


def test_samples_show_an_instance_of_their_own_split() -> None:
    images, _ = _load_digits()
    used = {}
    for split in ("val", "test", "test_shifted"):
        ds = SyntheticBenchmark(None, split, num_samples=60, image_size=32, cache=False)
        shown_instances = [ds.instance(i) for i in range(len(ds))]
        used[split] = set(shown_instances)
        for i, row in enumerate(shown_instances):
            assert row in set(ds.instance_pool(ds.label(i), split).tolist())
        # the rendered object is that instance: its upscaled, thresholded shape (at one of the possible sizes)
        for i in range(0, 60, 12):
            glyph = torch.tensor(images[shown_instances[i]], dtype=torch.float32).view(1, 1, 8, 8) / 16.0
            shown = _bbox(ds[i][2][0])
            shapes = [_bbox(F.interpolate(glyph, size=(s, s), mode="bilinear", align_corners=False)[0, 0] > 0.3)
                      for s in range(8, 33)]
            assert any(sh.shape == shown.shape and torch.equal(sh, shown) for sh in shapes), f"{split} {i}"
    assert not used["val"] & used["test"] and not used["val"] & used["test_shifted"]


def test_dataloader_workers_give_the_same_samples() -> None:
    ds = SyntheticBenchmark(None, "train", num_samples=12, cache=False)
    x0, y0, m0 = collate([ds[i] for i in range(12)])
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    x1, y1, m1 = (torch.cat(t) for t in zip(*loader, strict=True))
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(m0, m1)


@pytest.mark.parametrize("image_size", [64, 224])
def test_mask_is_exactly_the_pasted_object(image_size: int) -> None:
    ds = SyntheticBenchmark(None, "test", num_samples=6, image_size=image_size)
    for i in range(6):
        x, _, m = ds[i]
        img = _image01(x)
        assert img.shape == (3, image_size, image_size) and m.shape == (1, image_size, image_size)
        # Inside the mask: one flat colour.
        inside = img[:, m[0]]  # (3, H, W) -> (3, n_fg)
        colour = inside[:, :1]
        assert torch.allclose(inside, colour.expand_as(inside), atol=1e-6)
        # Outside the mask: exactly the background rendered on its own (no object anywhere).
        bg = ds.background(i)
        assert torch.allclose(img[:, ~m[0]], bg[:, ~m[0]], atol=1e-6)
        # The object colour appears nowhere in the background, so the mask is the set of object pixels.
        is_colour = (img - colour[:, :, None]).abs().max(dim=0, keepdim=True).values < 1e-6
        assert torch.equal(is_colour, m)
        # Pixels are 8-bit values, as documented.
        assert torch.allclose(img * 255, (img * 255).round(), atol=1e-4)


def test_transform_runs_on_image01_and_mask_before_normalisation() -> None:
    seen: list[tuple[float, float]] = []

    def hflip(img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((float(img.min()), float(img.max())))
        return img.flip(-1), mask.flip(-1)

    plain = SyntheticBenchmark(None, "train", num_samples=3)
    flipped = SyntheticBenchmark(None, "train", transform=hflip, num_samples=3)
    for i in range(3):
        x, y, m = plain[i]
        xf, yf, mf = flipped[i]
        assert torch.allclose(xf, x.flip(-1)) and yf == y and torch.equal(mf, m.flip(-1))
    assert all(0.0 <= lo and hi <= 1.0 for lo, hi in seen) and len(seen) == 3


@pytest.mark.parametrize(("split", "n", "k"), [("train", 1200, 6), ("test", 600, 6), ("val", 600, 6),
                                                 ("test_shifted", 600, 6), ("train", 100, 10)])
def test_classes_are_balanced(split: str, n: int, k: int) -> None:
    ds = SyntheticBenchmark(None, split, num_classes=k)
    if n != len(ds):
        ds = SyntheticBenchmark(None, split, num_classes=k, num_samples=n)
    counts = Counter(ds.label(i) for i in range(n))
    assert sorted(counts) == list(range(k))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_default_sizes_follow_the_documented_defaults() -> None:
    sizes = {split: len(SyntheticBenchmark(None, split)) for split in SPLITS}
    assert sizes == {"train": 1200, "val": 600, "test": 600, "test_shifted": 600}


def _agreement(ds: SyntheticBenchmark) -> tuple[float, Counter]:
    families = [ds.background_family(i) for i in range(len(ds))]
    agree = sum(f == ds.label(i) for i, f in enumerate(families)) / len(ds)
    return agree, Counter(families)


@pytest.mark.parametrize(("split", "rho"), [("train", 0.9), ("test", 0.9), ("train", 0.5)])
def test_measured_rho_matches_within_binomial_noise(split: str, rho: float) -> None:
    ds = SyntheticBenchmark(None, split, rho=rho)
    agree, families = _agreement(ds)
    sigma = math.sqrt(rho * (1 - rho) / len(ds))
    assert abs(agree - rho) < 4 * sigma, (agree, rho)
    assert sorted(families) == list(range(6))
    # Disagreeing samples get one of the *other* families, uniformly: each of the 5 gets ~1/5 of them.
    misses = [ds.background_family(i) - ds.label(i) for i in range(len(ds))
              if ds.background_family(i) != ds.label(i)]
    offsets = Counter(d % 6 for d in misses)
    assert 0 not in offsets and sorted(offsets) == [1, 2, 3, 4, 5]
    expected = len(misses) / 5
    assert all(abs(c - expected) < 4 * math.sqrt(expected) + 1 for c in offsets.values()), offsets


def test_test_shifted_background_is_independent_of_the_label() -> None:
    ds = SyntheticBenchmark(None, "test_shifted")
    agree, families = _agreement(ds)
    p = 1 / 6
    assert abs(agree - p) < 4 * math.sqrt(p * (1 - p) / len(ds)), agree
    expected = len(ds) / 6
    assert all(abs(c - expected) < 4 * math.sqrt(expected) for c in families.values()), families
    assert sorted(families) == list(range(6))


def test_ten_classes_have_ten_distinct_texture_families() -> None:
    assert len(FAMILIES) >= 10 and len(set(FAMILIES)) == len(FAMILIES)
    ds = SyntheticBenchmark(None, "test_shifted", num_classes=10, num_samples=40)
    families = {ds.background_family(i) for i in range(40)}
    assert families == set(range(10))
    backgrounds = [ds.background(i) for i in range(40)]
    # Two samples of the same family differ (random phase/frequency/colour): families, not fixed images.
    same = [i for i in range(40) if ds.background_family(i) == ds.background_family(0)]
    assert len(same) >= 2 and not torch.equal(backgrounds[same[0]], backgrounds[same[1]])


def test_bad_arguments_raise_precise_errors() -> None:
    with pytest.raises(ValueError, match="train, val, test, test_shifted"):
        SyntheticBenchmark(None, "validation")
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticBenchmark(None, "train", num_classes=11)
    with pytest.raises(ValueError, match="rho"):
        SyntheticBenchmark(None, "train", rho=1.5)
    with pytest.raises(ValueError, match="half"):
        SyntheticBenchmark(None, "train", normalization="nope")
    with pytest.raises(IndexError):
        SyntheticBenchmark(None, "train", num_samples=5)[5]


def test_created_through_the_registry() -> None:
    ds = create_dataset("synthetic", None, "train", num_samples=6, image_size=32, seed=3)
    assert isinstance(ds, SyntheticBenchmark) and ds.seed == 3
    x, y, m = ds[0]
    assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32) and y == 0
    direct = SyntheticBenchmark(None, "train", num_samples=6, image_size=32, seed=3)
    assert torch.equal(x, direct[0][0])
    with pytest.raises(ValueError, match="test_shifted"):
        create_dataset("synthetic", None, "holdout")
    half = create_dataset("synthetic", None, "train", num_samples=1)[0][0]
    imagenet = create_dataset("synthetic", None, "train", num_samples=1, normalization="imagenet")[0][0]
    assert torch.allclose(imagenet, normalize(_image01(half), "imagenet"), atol=1e-5)
    assert not torch.allclose(imagenet, half, atol=1e-2)
