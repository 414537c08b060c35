"""Decoy digits: the Decoy MNIST protocol of Ross, Hughes & Doshi-Velez (IJCAI 2017), scaled to the image size.

A positive control with a known answer in print: a model trained normally reads the decoy patch and loses
accuracy when the shortcut breaks; "Right for the Right Reasons" (RRR), told that the patch is off limits,
recovers it (their MLP: 0.52 -> 0.96 test accuracy, 0.99 when trained on clean data).

Every sample is generated on the fly from `(seed, split, index)` alone, like the `synthetic` benchmark.

- Object: one instance of scikit-learn's bundled 8x8 handwritten digits (read without importing
  scikit-learn), upscaled bilinearly to 20/28 of the side (MNIST draws its digits in a 20x20 box of a
  28x28 image) and thresholded into the digit's shape, centred on a black canvas; the stroke keeps the
  upscaled intensity (every object pixel is at least 77/255, every other pixel of the canvas is 0).
- Decoy: a square patch of side `max(1, round(4 * S / 28))` px (4x4 at the paper's 28 px) in one of the
  four corners, chosen uniformly. Its grey level in "train" and "val" is `255 - 25 * label` (a perfect
  shortcut; "val" follows train's rule, as the held-out split a practitioner selects models on would);
  in "test" it is the grey level of a uniformly drawn *other* label (`test_shade="other"`, the protocol as
  the issue and the paper's text state it; the authors' code, dtak/rrr `decoy_mnist.py`, draws from all
  ten labels, so a tenth of its test images keep the shortcut: `test_shade="any"`). The digit box never
  reaches the corner squares, so the patch never covers the object.
- Splits use disjoint instances of the bundled digits: per class, the instances at positions k with
  k % 5 in {0, 1, 2} go to "train", 3 to "val", 4 to "test" (1085 / 357 / 355 images).
- Masks (the third item of a sample, what mask-supervised regularisers are told is allowed):
  `annotation="patch"` (default; the paper's RRR annotation) makes the *train* split's mask everything but
  the patch; `annotation="object"` makes it the digit's pixels. The "val" and "test" masks are always
  the digit's pixels, the ground truth that localisation metrics (and the trainer's `diag_r_in_gt`) measure
  against; so one training configuration gives the paper's annotation to the regulariser and the object
  to the evaluation, with no per-evaluation option.

Differences from the paper's protocol: the digits are the 1797 bundled 8x8 scans (MNIST's are 28x28
anti-aliased, 60000 train / 10000 test), upscaled to the image size; images are grey levels repeated in
three channels (the models take RGB) with the "half" normalisation by default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sib.data.synthetic import DIGIT_NAMES, _load_digits
from sib.data.transforms import NORMALIZATIONS, normalize

SPLITS = ("train", "val", "test")
ANNOTATIONS = ("patch", "object")
TEST_SHADES = ("other", "any")
NUM_CLASSES = 10
PAPER_SIZE = 28  # the paper's image side; the patch and the digit box scale with the side from it
PAPER_PATCH = 4  # patch side at 28 px
PAPER_DIGIT = 20  # MNIST's digit box at 28 px
SHADE_STEP = 25  # grey level of label c's patch: 255 - SHADE_STEP * c
THRESHOLD = 0.3  # upscaled intensity (of 1) above which a pixel belongs to the digit, as in `synthetic`
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
_POOL_OF = {0: "train", 1: "train", 2: "train", 3: "val", 4: "test"}  # position within its class, mod 5

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def shade(label: int) -> int:
    """Grey level (0..255) of the decoy patch that encodes `label`: 255 - 25 * label."""
    return 255 - SHADE_STEP * label


def patch_side(image_size: int) -> int:
    """Side of the decoy patch in pixels: 4/28 of the image side, at least 1."""
    return max(1, round(PAPER_PATCH * image_size / PAPER_SIZE))


def _sample_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed from (seed, split, index); blake2b, not Python's salted `hash()`, so it is stable."""
    digest = hashlib.blake2b(f"sib-decoy/{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


_SOURCE: tuple[torch.Tensor, torch.Tensor] | None = None  # (1797, 8, 8) float32 in [0, 1], (1797,) int64
_POOLS: dict[str, torch.Tensor] = {}  # split -> indices into the source digits, interleaved by class
_CACHE: dict[tuple, dict[int, tuple[torch.Tensor, torch.Tensor, int]]] = {}
CACHE_LIMIT_SAMPLES = 200_000  # per stream; a 28 px sample takes ~1.6 kB


def clear_cache() -> None:
    """Free the generated samples that this process keeps (shared by all instances)."""
    _CACHE.clear()


def _source() -> tuple[torch.Tensor, torch.Tensor]:
    global _SOURCE
    if _SOURCE is None:
        pixels, target = _load_digits()
        _SOURCE = (torch.as_tensor(pixels, dtype=torch.float32).view(-1, 8, 8) / 16.0,  # values are 0..16
                   torch.as_tensor(target, dtype=torch.long))
    return _SOURCE


def split_pool(split: str) -> torch.Tensor:
    """Indices (into the bundled digits) of a split's instances, ordered so classes interleave.

    Per class, the instance at position k (in the bundled order) belongs to `_POOL_OF[k % 5]`; the pool
    lists rank 0 of every class (0..9), then rank 1 of every class, ..., so any prefix is balanced.

    Returns:
        int64 (n,), disjoint between splits.
    """
    if split not in _POOLS:
        _, target = _source()
        ranked = []  # (rank within the class's pool, class, source index)
        for c in range(NUM_CLASSES):
            members = [int(j) for k, j in enumerate(torch.nonzero(target == c).flatten()) if _POOL_OF[k % 5] == split]
            ranked += [(rank, c, j) for rank, j in enumerate(members)]
        _POOLS[split] = torch.tensor([j for _, _, j in sorted(ranked)], dtype=torch.long)
    return _POOLS[split]


class DecoyDigits(Dataset):
    """Digits with a corner patch whose grey level encodes the label (Decoy MNIST); yields (image, label, mask).

    Args:
        root: ignored (the dataset is generated); accepted for the `create_dataset` signature.
        split: "train", "val" (patch shade = the label's) or "test" (patch shade = another label's).
        transform: None, or a paired transform `transform(image01, mask) -> (image01, mask)` on the [0, 1]
            image (3,H,W) float32 and the mask (1,H,W) bool, before normalisation.
        num_samples: number of samples; default: the split's pool, every instance once. More samples cycle
            through the pool again (same digit, a new corner and, in "test", a new shade).
        image_size: side H = W in pixels (28, the paper's, by default; at least 12).
        patch_size: the patch's side in pixels; default `patch_side(image_size)` (4 at 28 px, the paper's).
            A larger patch shrinks the digit box to `image_size - 2 * patch_size` (at least 8 px), so the
            patch never covers the digit.
        annotation: the train split's mask: "patch" (everything but the patch; the paper's RRR annotation)
            or "object" (the digit). The other splits' masks are always the digit.
        test_shade: "other" (a uniformly drawn other label's shade) or "any" (any label's, the authors' code).
        seed: base seed; sample i of a split depends only on (seed, split, i).
        normalization: a name in `sib.data.transforms.NORMALIZATIONS`.
        cache: keep generated samples in memory (shared by instances of the same stream).
    """

    has_masks = True
    num_classes = NUM_CLASSES

    def __init__(self, root: str | None = None, split: str = "train", transform: Transform | None = None, *,
                 num_samples: int | None = None, image_size: int = PAPER_SIZE, patch_size: int | None = None,
                 annotation: str = "patch",
                 test_shade: str = "other", seed: int = 0, normalization: str = "half", cache: bool = True) -> None:
        for name, value, valid in (("split", split, SPLITS), ("annotation", annotation, ANNOTATIONS),
                                   ("test_shade", test_shade, TEST_SHADES),
                                   ("normalization", normalization, tuple(sorted(NORMALIZATIONS)))):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r} for 'decoy_digits'; valid values: {', '.join(valid)}")
        if image_size < 12:
            raise ValueError(f"image_size must be at least 12 for 'decoy_digits', got {image_size}")
        self.root, self.split, self.transform = root, split, transform
        self.pool = split_pool(split)
        self.num_samples = len(self.pool) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.image_size, self.annotation, self.test_shade = image_size, annotation, test_shade
        self.seed, self.normalization = seed, normalization
        self.classes = list(DIGIT_NAMES)
        self.patch = patch_side(image_size) if patch_size is None else int(patch_size)
        # The digit box stays clear of the corner squares, so a patch never covers the object.
        self.digit = min(round(PAPER_DIGIT * image_size / PAPER_SIZE), image_size - 2 * self.patch)
        if self.patch < 1 or self.digit < 8:
            raise ValueError(f"patch_size {patch_size} does not fit a {image_size} px image: it must be at least 1 "
                             f"and leave a digit box of at least 8 px (image_size - 2 * patch_size >= 8)")
        key = (seed, split, image_size, self.patch, test_shade)
        self._cache = _CACHE.setdefault(key, {}) if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, i: int) -> int:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return i % self.num_samples

    def source_index(self, i: int) -> int:
        """Index (into scikit-learn's bundled digits) of the digit instance drawn in sample i."""
        return int(self.pool[self._check_index(i) % len(self.pool)])

    def label(self, i: int) -> int:
        """Class of sample i (the digit); cheap (no rendering)."""
        return int(_source()[1][self.source_index(i)])

    def _draws(self, i: int) -> tuple[int, int]:
        """(corner index into CORNERS, label whose shade the patch has) of sample i; no rendering."""
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.split, self._check_index(i)))
        corner = int(torch.randint(4, (), generator=g))
        label = self.label(i)
        if self.split != "test":
            return corner, label
        if self.test_shade == "any":
            return corner, int(torch.randint(NUM_CLASSES, (), generator=g))
        return corner, (label + 1 + int(torch.randint(NUM_CLASSES - 1, (), generator=g))) % NUM_CLASSES

    def corner(self, i: int) -> str:
        """The corner of sample i's patch, a name in CORNERS."""
        return CORNERS[self._draws(i)[0]]

    def shade_label(self, i: int) -> int:
        """The label the patch of sample i encodes: the true label in train/val, another one in test."""
        return self._draws(i)[1]

    def _patch_box(self, corner: int) -> tuple[slice, slice]:
        size, p = self.image_size, self.patch
        rows = slice(0, p) if corner < 2 else slice(size - p, size)
        cols = slice(0, p) if corner % 2 == 0 else slice(size - p, size)
        return rows, cols

    def _render(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sample i before masks and transforms: uint8 grey image (H,W), bool object mask (H,W), corner."""
        corner, shade_of = self._draws(i)
        size, d = self.image_size, self.digit
        glyph = _source()[0][self.source_index(i)]
        up = F.interpolate(glyph[None, None], size=(d, d), mode="bilinear", align_corners=False)[0, 0]
        shape = up > THRESHOLD  # (d, d)
        top = (size - d) // 2
        obj = torch.zeros((size, size), dtype=torch.bool)
        obj[top:top + d, top:top + d] = shape
        image = torch.zeros((size, size), dtype=torch.uint8)
        stroke = torch.round(up.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
        image[top:top + d, top:top + d] = torch.where(shape, stroke, image[top:top + d, top:top + d])
        image[self._patch_box(corner)] = shade(shade_of)
        assert obj.any(), "a thresholded digit is never empty"
        return image, obj, corner

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Sample i.

        Returns:
            image: float32 (3, H, W), the grey image in three channels, normalised with `normalization`.
            label: int in [0, 10).
            mask: bool (1, H, W): in "train" with annotation "patch", True everywhere but the patch;
                otherwise True exactly on the digit.
        """
        i = self._check_index(i)
        cached = self._cache.get(i) if self._cache is not None else None
        if cached is None:
            cached = self._render(i)
            if self._cache is not None and len(self._cache) < CACHE_LIMIT_SAMPLES:
                self._cache[i] = cached
        grey, obj, corner = cached
        if self.split == "train" and self.annotation == "patch":
            mask = torch.ones_like(obj)
            mask[self._patch_box(corner)] = False
        else:
            mask = obj.clone()  # clone: callers may edit the mask in place
        image = (grey.float() / 255.0).expand(3, -1, -1).contiguous()  # (H, W) -> (3, H, W)
        mask = mask[None]  # (H, W) -> (1, H, W)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return normalize(image, self.normalization), self.label(i), mask

    def __repr__(self) -> str:
        return (f"DecoyDigits(split={self.split!r}, num_samples={self.num_samples}, image_size={self.image_size}, "
                f"patch_size={self.patch}, annotation={self.annotation!r}, test_shade={self.test_shade!r}, "
                f"seed={self.seed})")


__all__ = ["ANNOTATIONS", "CORNERS", "SPLITS", "DecoyDigits", "patch_side", "shade", "split_pool"]
