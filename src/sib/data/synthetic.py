"""The built-in benchmark: handwritten digits pasted onto procedural textures, with a spurious background cue.

Every sample is generated on the fly from `(seed, split, index)` alone (no files, no download), so any
access order, any number of DataLoader workers and any machine give identical tensors.

- Object (the real signal): class `c` is the digit `c` from scikit-learn's bundled 8x8 handwritten digits,
  one of ~180 writers' instances, drawn from a pool of its split: train, val and test have disjoint pools
  (train two thirds of each digit's instances, val one sixth, test the other sixth; test_shifted shares
  test's), so model selection on val never sees a test instance (`instance_pool`, `instance`). It is
  upscaled bilinearly to 45-70% of the image side and thresholded into a crisp binary shape,
  placed fully inside the image at a random position, in one flat light colour of random hue (every
  channel in [0.8, 1]; the background's stay in [0.15, 0.67], so the object always stands out and its
  edges have one polarity, which keeps the shape learnable by a small CNN in a few epochs).
- Background (the shortcut): one of `num_classes` texture families (stripes, checkerboard, dots, rings,
  ...), each with random frequency, phase, orientation jitter and two colours of moderate contrast. In
  "train", "val" and "test" the family equals the label with probability `rho` and is otherwise one of the
  other families uniformly; in "test_shifted" it is uniform over all families, independent of the label,
  so a model that reads backgrounds loses accuracy there.
- Mask: exactly the pasted object's pixels. Image pixels are multiples of 1/255 (stored as uint8), the
  image equals the object colour on the mask and `background(i)` everywhere else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sib.data.transforms import NORMALIZATIONS, normalize

SPLITS = ("train", "val", "test", "test_shifted")
# Which digit instances a split draws from: instance k (in file order, per digit) -> a pool by k % 6.
POOL_OF_SPLIT = {"train": "train", "val": "val", "test": "test", "test_shifted": "test"}
_POOL_RESIDUES = {"train": (1, 2, 4, 5), "val": (0,), "test": (3,)}
DEFAULT_NUM_SAMPLES = {"train": 1200, "val": 600, "test": 600, "test_shifted": 600}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FAMILIES = ("stripes_horizontal", "stripes_vertical", "checkerboard", "dots", "rings", "blobs", "waves",
            "stripes_diagonal", "grid", "gradient")
MAX_CLASSES = len(DIGIT_NAMES)  # one digit shape per class; there are as many texture families

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _sample_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed from (seed, split, index); blake2b, not Python's salted `hash()`, so it is stable."""
    digest = hashlib.blake2b(f"sib-synthetic/{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0, size: tuple[int, ...] = ()
             ) -> torch.Tensor:
    """Uniform draws in [low, high) from generator g: float32 of shape `size` (a scalar by default)."""
    return low + (high - low) * torch.rand(size, generator=g)


def _texture(family: int, g: torch.Generator, size: int) -> torch.Tensor:
    """One texture of a family as a pattern in [0, 1].

    Frequencies are in cycles per image side, so a family looks the same at 64 and 224 px.

    Returns:
        float32 (size, size) in [0, 1].
    """
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = u[:, None], u[None, :]  # broadcast to (size, size)
    f, phase = float(_uniform(g, 4.0, 7.0)), float(_uniform(g, 0.0, 2 * math.pi))
    name = FAMILIES[family]
    if name.startswith("stripes"):
        base = {"stripes_horizontal": 0.0, "stripes_vertical": 90.0, "stripes_diagonal": 45.0}[name]
        theta = math.radians(base + float(_uniform(g, -10.0, 10.0)))
        p = 0.5 + 0.5 * torch.sin(2 * math.pi * f * (y * math.cos(theta) + x * math.sin(theta)) + phase)
    elif name == "checkerboard":
        off = _uniform(g, size=(2,))
        p = ((torch.floor(f * y + off[0]) + torch.floor(f * x + off[1])) % 2).expand(size, size)
    elif name == "dots":
        off, radius = _uniform(g, size=(2,)), float(_uniform(g, 0.2, 0.32))
        dy, dx = (f * y + off[0]) % 1.0 - 0.5, (f * x + off[1]) % 1.0 - 0.5
        p = (dy**2 + dx**2 < radius**2).float()
    elif name == "rings":
        cy, cx = _uniform(g, size=(2,))
        p = 0.5 + 0.5 * torch.sin(2 * math.pi * f * torch.sqrt((y - cy) ** 2 + (x - cx) ** 2) + phase)
    elif name == "blobs":
        # Smooth random blobs: a coarse noise grid upsampled and sharpened into light/dark regions.
        coarse = torch.rand((1, 1, 5, 5), generator=g)
        smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
        p = torch.sigmoid(12.0 * (smooth - 0.5))
    elif name == "waves":
        amp, g_freq = float(_uniform(g, 1.5, 3.0)), float(_uniform(g, 1.5, 3.0))
        p = 0.5 + 0.5 * torch.sin(2 * math.pi * f * y + amp * torch.sin(2 * math.pi * g_freq * x) + phase)
    elif name == "grid":
        off, width = _uniform(g, size=(2,)), float(_uniform(g, 0.15, 0.25))
        p = (((f * y + off[0]) % 1.0 < width) | ((f * x + off[1]) % 1.0 < width)).float()
    else:  # gradient: a linear ramp in a random direction, the low-frequency family
        theta = float(_uniform(g, 0.0, 2 * math.pi))
        ramp = (y - 0.5) * math.cos(theta) + (x - 0.5) * math.sin(theta)
        p = (ramp / math.sqrt(0.5) + 0.5).clamp(0.0, 1.0)
    return p.expand(size, size)


def _background(family: int, g: torch.Generator, size: int) -> torch.Tensor:
    """A texture in two colours of moderate contrast (channels in [0.15, 0.67]).

    Returns:
        uint8 (3, size, size); values are the [0, 1] image times 255.
    """
    low = _uniform(g, 0.15, 0.45, (3,))
    high = low + _uniform(g, 0.12, 0.22, (3,))  # moderate: the object must stay the thing to read
    if bool(torch.rand((), generator=g) < 0.5):
        low, high = high, low
    p = _texture(family, g, size)[None]  # (H, W) -> (1, H, W)
    rgb = low[:, None, None] * (1.0 - p) + high[:, None, None] * p  # (3, H, W)
    return torch.round(rgb * 255.0).to(torch.uint8)


CACHE_LIMIT_BYTES = 1 << 30  # stop caching new samples beyond 1 GiB (e.g. many large 224 px splits)
_SHARED_CACHE: dict[tuple, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}


def _cache_bytes() -> int:
    # (3,H,W) uint8 image + (1,H,W) bool mask = 4 bytes per pixel per sample
    return sum(4 * key[2] ** 2 * len(samples) for key, samples in _SHARED_CACHE.items())


def clear_cache() -> None:
    """Free the generated samples that this process keeps (shared by all instances)."""
    _SHARED_CACHE.clear()


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as (pixels (1797, 64), target (1797,)).

    Read straight from the CSV that scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`), located
    without importing scikit-learn: importing it costs ~3 s per process, more than generating a dataset.
    Falls back to `sklearn.datasets.load_digits` if the file is not where that version keeps it.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target


class SyntheticBenchmark(Dataset):
    """Digits on textures with a background shortcut; yields (image, label, mask).

    Args:
        root: ignored (the benchmark is generated); accepted for the `create_dataset` signature.
        split: "train", "val", "test" (same distribution as "val", different samples) or "test_shifted"
            (background independent of the label). Each split has its own stream of samples.
        transform: None, or a paired transform called as `transform(image01, mask) -> (image01, mask)` on
            the [0, 1] image (3,H,W) float32 and the mask (1,H,W) bool before normalisation.
        num_samples: number of samples; default 1200 for "train", 600 for the other splits.
        image_size: side H = W in pixels (64 default; 224 works).
        num_classes: K in [2, 10]; class c is the digit c, texture family c is its background cue.
        rho: probability that the background family equals the label (not in "test_shifted").
        train_rho: the "train" split's rho when given (val and test keep `rho`): 1 / num_classes makes the
            training backgrounds independent of the label (the unconfounded-training ceiling of a study).
        seed: base seed; sample i of a split depends only on (seed, split, i).
        normalization: a name in `sib.data.transforms.NORMALIZATIONS`.
        cache: keep generated samples (uint8 image, bool mask) in memory; transforms are not cached.
    """

    has_masks = True

    def __init__(self, root: str | None = None, split: str = "train", transform: Transform | None = None, *,
                 num_samples: int | None = None, image_size: int = 64, num_classes: int = 6,
                 rho: float = 0.9, seed: int = 0, normalization: str = "half", cache: bool = True,
                 train_rho: float | None = None) -> None:
        if split == "train" and train_rho is not None:
            rho = float(train_rho)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for 'synthetic'; valid splits: {', '.join(SPLITS)}")
        if not 2 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {normalization!r}; valid names: "
                             f"{', '.join(sorted(NORMALIZATIONS))}")
        self.root, self.split, self.transform = root, split, transform
        self.num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.image_size, self.num_classes, self.rho, self.seed = image_size, num_classes, rho, seed
        self.normalization = normalization
        self.classes = list(DIGIT_NAMES[:num_classes])
        # Shared by every instance of the same stream in this process: the demo builds each split several
        # times (two training runs, two evaluations, the figure) and generation dominates small runs.
        key = (seed, split, image_size, num_classes, rho)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            _SHARED_CACHE.setdefault(key, {}) if cache else None)

    _images: torch.Tensor | None = None  # (1797, 8, 8) float32 in [0, 1]: every digit instance; loaded once
    _rows: list[torch.Tensor] | None = None  # per digit: int64 row indices into _images, in file order

    @classmethod
    def _load(cls) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if cls._images is None or cls._rows is None:
            pixels, target = _load_digits()
            cls._images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 8, 8) / 16.0  # values are 0..16
            targets = torch.as_tensor(target)
            cls._rows = [torch.nonzero(targets == d).flatten() for d in range(MAX_CLASSES)]
        return cls._images, cls._rows

    @classmethod
    def instance_pool(cls, digit: int, split: str) -> torch.Tensor:
        """The digit instances a split draws from, as row indices into scikit-learn's digits (int64 (n,)).

        A digit's k-th instance (file order) belongs to val if k % 6 == 0, to test (and test_shifted) if
        k % 6 == 3, to train otherwise: three disjoint pools, ~2/3, 1/6, 1/6 of ~180 instances.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for 'synthetic'; valid splits: {', '.join(SPLITS)}")
        rows = cls._load()[1][digit]
        k = torch.arange(len(rows)) % 6
        keep = torch.isin(k, torch.tensor(_POOL_RESIDUES[POOL_OF_SPLIT[split]]))
        return rows[keep]
    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, i: int) -> int:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return i % self.num_samples

    def label(self, i: int) -> int:
        """Class of sample i: `i % num_classes`, so classes are exactly balanced (to within one)."""
        return self._check_index(i) % self.num_classes

    def _start(self, i: int) -> tuple[torch.Generator, int, int]:
        """Generator for sample i after the family draw, its label and background family.

        The family is drawn first, so `background_family` needs no rendering.
        """
        i = self._check_index(i)
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.split, i))
        label, k = i % self.num_classes, self.num_classes
        u, other = float(torch.rand((), generator=g)), int(torch.randint(k - 1, (), generator=g))
        if self.split == "test_shifted":
            family = int(torch.randint(k, (), generator=g))
        else:  # agree with probability rho, else one of the *other* families, uniformly
            family = label if u < self.rho else (label + 1 + other) % k
        return g, label, family

    def background_family(self, i: int) -> int:
        """Index (into `FAMILIES`) of the texture family behind sample i; cheap (no rendering)."""
        return self._start(i)[2]

    def background(self, i: int) -> torch.Tensor:
        """The background of sample i alone, as the [0, 1] image outside the mask equals it.

        Returns:
            float32 (3, H, W) in [0, 1].
        """
        g, _, family = self._start(i)
        return _background(family, g, self.image_size).float() / 255.0

    def _instance_after_background(self, i: int) -> tuple[torch.Generator, int, torch.Tensor, int]:
        """Generator after the background and instance draws, label, background uint8 (3,H,W), instance row."""
        g, label, family = self._start(i)
        image = _background(family, g, self.image_size)  # same draws as `background(i)`, so the two agree exactly
        pool = self.instance_pool(label, self.split)
        return g, label, image, int(pool[int(torch.randint(len(pool), (), generator=g))])

    def instance(self, i: int) -> int:
        """Which digit instance sample i shows: its row index in scikit-learn's digits (in `instance_pool`)."""
        return self._instance_after_background(i)[3]

    def _render(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i before any transform: uint8 image (3,H,W) and bool mask (1,H,W)."""
        g, _, image, row = self._instance_after_background(i)
        size = self.image_size
        glyph = self._load()[0][row]
        side = max(8, round(float(_uniform(g, 0.45, 0.70)) * size))
        # Bilinear upscaling then a threshold turns the blurry 8x8 digit into a crisp binary shape.
        up = F.interpolate(glyph[None, None], size=(side, side), mode="bilinear", align_corners=False)
        shape = up[0, 0] > 0.3  # (1, 1, s, s) -> (s, s)
        top, left = (int(torch.randint(size - side + 1, (), generator=g)) for _ in range(2))
        mask = torch.zeros((1, size, size), dtype=torch.bool)
        mask[0, top:top + side, left:left + side] = shape
        # A light colour of random hue: every channel above the background's, so edges have one polarity.
        colour = _uniform(g, 0.80, 1.0, (3,))
        colour_u8 = torch.round(colour * 255.0).to(torch.uint8)
        image = torch.where(mask, colour_u8[:, None, None], image)  # (1,H,W) mask broadcast over (3,H,W)
        assert mask.any(), "a thresholded digit is never empty"
        return image, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Sample i.

        Returns:
            image: float32 (3, H, W), normalised with `normalization` (from [0, 1]).
            label: int in [0, num_classes).
            mask: bool (1, H, W), True exactly on the pasted object.
        """
        i = self._check_index(i)
        cached = self._cache.get(i) if self._cache is not None else None
        if cached is None:
            cached = self._render(i)
            if self._cache is not None and _cache_bytes() < CACHE_LIMIT_BYTES:
                self._cache[i] = cached
        image_u8, mask = cached
        image, mask = image_u8.float() / 255.0, mask.clone()  # clone: callers may edit the mask in place
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return normalize(image, self.normalization), i % self.num_classes, mask

    def __repr__(self) -> str:
        return (f"SyntheticBenchmark(split={self.split!r}, num_samples={self.num_samples}, "
                f"image_size={self.image_size}, num_classes={self.num_classes}, rho={self.rho}, "
                f"seed={self.seed})")


__all__ = ["FAMILIES", "SPLITS", "SyntheticBenchmark"]
