"""What every on-disk dataset shares: robust image/mask reading, problem records, splits, the base class.

Robustness policy (one row per irregularity; `sib data check` reports every row it meets):

    irregularity                                  what a dataset does
    --------------------------------------------  ----------------------------------------------------------
    list names a file that is absent              skipped at construction; one DataWarning per dataset
                                                  summarises the count and first names; kept in `problems`
    malformed or repeated list line               skipped; counted in the same DataWarning
    file on disk absent from every list           ignored (the lists are the source of truth); check reports
    non-image file in a class folder (.DS_Store)  ignored; check reports
    content differs from the extension            read by content (PIL sniffs the format); check reports
    grey / RGBA / CMYK / palette / 16-bit image   converted to RGB (alpha composited on white); check reports
    truncated, empty or unreadable image          `ImageReadError` naming the file when the sample is read
                                                  (a run must not silently change its data); check finds it
                                                  ahead of time; `exclude=[...]` drops named files
    mask file absent                              sample kept without a mask (collate gives it an empty
                                                  mask, which metrics exclude and count); counted warning
    unreadable mask                               `MaskReadError` naming the file when the sample is read
    mask size differs from the image              same aspect ratio (within 2%): resized with nearest
                                                  neighbour and a DataWarning; otherwise `MaskSizeError`
    empty mask (no foreground pixel)              kept as an all-False mask (metrics exclude and count it)

EXIF orientation is not applied: every annotation of these datasets is in stored-pixel coordinates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sib.data.transforms import ImageSizeError, create_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "val", "trainval", "test")
MASK_ASPECT_TOLERANCE = 0.02  # relative aspect-ratio difference under which a mask is resized, not refused
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as an image viewer does


class DataWarning(UserWarning):
    """A dataset skipped, converted or resized something; details are in `dataset.problems`."""


class ImageReadError(OSError):
    """An image file that cannot be decoded (truncated, empty, not an image); the message names it."""


class MaskReadError(OSError):
    """A mask or annotation file that cannot be read; the message names it."""


class MaskSizeError(ValueError):
    """A mask whose size cannot be reconciled with its image's; the message names both files."""


@dataclass(frozen=True)
class Problem:
    """One irregularity found in a dataset folder.

    Attributes:
        file: the file concerned (absolute path, or the list file for a bad line).
        what: what is wrong, in words.
        action: what the loader does: "skipped", "ignored", "converted", "resized", "no mask",
            "kept" (e.g. an empty mask) or "error" (reading this sample raises).
    """

    file: str
    what: str
    action: str


@dataclass
class Sample:
    """One listed image: its file, its contiguous label, where its mask comes from (loader-specific: a mask
    file, a list of boxes, an XML file; None when the sample has no ground truth), and for formats that
    pack many images in one file (CIFAR), the image's row in it."""

    path: Path
    label: int
    mask: Any = None
    row: int | None = None


# ---------------------------------------------------------------------------------------------- images

def _format_matches_extension(fmt: str | None, path: Path) -> bool:
    registered = Image.registered_extensions().get(path.suffix.lower())
    # Cameras write multi-picture JPEGs (MPO) under .jpg: same decoder, not an irregularity.
    return fmt == registered or (fmt == "MPO" and registered == "JPEG")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit or float greyscale: PIL's convert("RGB") would clip at 255; scale to 8 bits instead.
        a = np.asarray(im, dtype=np.float32)
        a = a / 257.0 if (mode.startswith("I") and a.max() > 255) else a * 255.0 if a.max() <= 1 else a
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK), YCbCr


def open_image(path: str | Path, notes: list[str] | None = None) -> Image.Image:
    """Read an image file as an RGB PIL image, whatever its extension or mode says.

    Args:
        path: the image file.
        notes: if given, receives a sentence per conversion made (format differing from the extension,
            non-RGB mode, animated image); `sib data check` prints them.

    Returns:
        PIL image, mode "RGB", size (W, H) as stored (EXIF orientation is not applied).

    Raises:
        ImageReadError: the file is absent, empty, truncated or not a decodable image; names the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: a truncated file fails here, not later inside a transform
            fmt, mode, frames = im.format, im.mode, getattr(im, "n_frames", 1)
            rgb = _to_rgb(im)
            if rgb is im:
                rgb = im.copy()  # the file is closed when the with-block ends
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    if notes is not None:
        if not _format_matches_extension(fmt, path):
            notes.append(f"{fmt} data under extension {path.suffix!r}: read by content")
        if mode != "RGB":
            notes.append(f"mode {mode} converted to RGB")
        if frames > 1:
            notes.append(f"{frames} frames: the first is used")
    return rgb


# ----------------------------------------------------------------------------------------------- masks

def read_mask_array(path: str | Path) -> np.ndarray:
    """Read a single-channel annotation image as its stored values.

    Returns:
        (H, W) array: grey levels for "L" (and the grey channel of "LA", alpha dropped), palette
        indices for "P", booleans for "1", 16-bit values for "I;16"; RGB(A) masks are converted to grey.

    Raises:
        MaskReadError: the file cannot be decoded; names the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("LA", "PA"):
                im = im.getchannel(0)
            elif im.mode not in ("1", "L", "P", "I", "F") and not im.mode.startswith("I;16"):
                im = im.convert("L")
            return np.array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MaskReadError(f"cannot read mask {path}: {e}") from e


def fit_mask(mask: np.ndarray, size: tuple[int, int], file: str | Path, notes: list[str] | None = None
             ) -> np.ndarray:
    """Bring a bool mask to the image's size, or refuse.

    Args:
        mask: bool (h, w).
        size: the image's (W, H), PIL order.
        file: the mask's source, for messages.
        notes: if given, a resize is noted here instead of warned about.

    Returns:
        bool (H, W): the mask itself, or resized with nearest neighbour when only the scale differs.

    Raises:
        MaskSizeError: the aspect ratios differ by more than `MASK_ASPECT_TOLERANCE` (a transposed or
            foreign mask would put the object in the wrong place).
    """
    width, height = size
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask
    if h == 0 or w == 0 or abs((w / h) / (width / height) - 1.0) > MASK_ASPECT_TOLERANCE:
        raise MaskSizeError(f"mask {file} is {w}x{h} but its image is {width}x{height} (W x H): "
                            "different aspect ratio, so it cannot be aligned")
    message = f"mask {w}x{h} resized to the image's {width}x{height} (nearest neighbour)"
    if notes is not None:
        notes.append(message)
    else:
        warnings.warn(f"{file}: {message}", DataWarning, stacklevel=2)
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def boxes_to_mask(boxes: Iterable[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """Union of boxes as a bool mask.

    Args:
        boxes: (xmin, ymin, xmax, ymax) in pixels, both ends inclusive (VOC style), clipped to the image.
        size: (W, H) of the mask.

    Returns:
        bool (H, W), True inside any box; all False for no boxes or boxes outside the image.
    """
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        # Inclusive ends, rounded outwards: a pixel the box touches is foreground.
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), width - 1), min(int(np.ceil(y1)), height - 1)
        if c1 >= c0 and r1 >= r0:
            mask[r0:r1 + 1, c0:c1 + 1] = True
    return mask


# ---------------------------------------------------------------------------------------------- splits

def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified partition of a list into train and validation indices.

    Each class's indices are permuted by a generator seeded with (seed, class), and the first
    round(n_class * val_fraction) go to validation, so a class's split does not depend on the others.

    Returns:
        (train indices, val indices), int64, each in increasing (list) order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(np.floor(len(idx) * val_fraction + 0.5))
        is_val[np.random.default_rng([seed, int(c)]).permutation(idx)[:n_val]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def missing(root: Path, dataset: str, expected: Sequence[str], how: str) -> FileNotFoundError:
    """The error for a folder that does not hold a dataset: names the root, the files, how to get them."""
    return FileNotFoundError(f"{dataset}: {root} does not hold the expected files ({', '.join(expected)}). "
                             f"{how}")


def download_or_explain(fetch: Callable[[], Any], dataset: str, root: Path, how: str) -> None:
    """Run a torchvision downloader; turn a network failure into an error that says what to do instead."""
    try:
        fetch()
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError; torchvision raises RuntimeError
        raise RuntimeError(f"{dataset}: download into {root} failed ({e}); without network, get the files "
                           f"by hand: {how}") from e


# ------------------------------------------------------------------------------------------ base class

class MaskedImageDataset(Dataset):
    """Base of the on-disk datasets: yields (image float32 (3,S,S), label int, mask bool (1,S,S) or None).

    A subclass reads its format: `_locate` (resolve the root, or raise `missing(...)`), `_read_split`
    (the official "trainval" or "test" list as `Sample`s; sets `classes` and `has_masks`), `_load_mask`
    (a sample's bool mask at its own size) and optionally `_load_image`, `unlisted`. This class does the
    rest: the train/val partition, dropping absent files, warnings, reading, fitting masks, transforms.

    Args:
        root: the dataset's folder in its authors' layout.
        split: "train" / "val" (a seeded class-stratified partition of the official train(val) list),
            "trainval" (the whole official list) or "test" (the official test list).
        transform: paired `(PIL image, PIL mask or None) -> (tensor, tensor or None)`; None: the eval
            transform at `image_size` (`sib.data.transforms.create_transform(False, image_size)`).
        image_size: output side of the default transform.
        normalization: "half" or "imagenet", for the default transform.
        val_fraction: share of each class held out as "val".
        seed: seed of the train/val partition.
        download: fetch the files where a downloader exists for the format (never otherwise).
        exclude: files to drop (absolute paths, paths relative to the root, or bare file names), e.g. the
            unreadable files `sib data check` found.
    """

    has_masks: bool = False
    eval_whole_image: ClassVar[bool] = False  # True: the default transform resizes to image_size, no crop
    check_files_exist: ClassVar[bool] = True  # False where samples come from a directory scan

    def __init__(self, root: str | Path | None, split: str = "train", transform: Any = None, *,
                 image_size: int = 224, normalization: str = "half", val_fraction: float = 0.1,
                 seed: int = 0, download: bool = False, exclude: Iterable[str | Path] = ()) -> None:
        name = type(self).__name__
        if split not in SPLITS:
            raise ValueError(f"{name}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if root is None:
            raise ValueError(f"{name} reads a folder from disk: pass root=")
        self.split = split
        self.classes: list[str] = []
        self.problems: list[Problem] = []
        self.root = self._locate(Path(root).expanduser(), download)
        self.samples = self._drop(self._select(split, val_fraction, seed), exclude)
        resize = image_size if self.eval_whole_image else None
        self.transform = transform if transform is not None else create_transform(
            False, image_size, resize, normalization)
        self._warn_problems()

    # -- the subclass's part
    def _locate(self, root: Path, download: bool) -> Path:
        raise NotImplementedError

    def _read_split(self, which: str) -> list[Sample]:
        raise NotImplementedError

    def _load_mask(self, sample: Sample, size: tuple[int, int], notes: list[str] | None) -> np.ndarray:
        """A sample's mask as bool (h, w) at its own size (fitted to the image afterwards)."""
        raise NotImplementedError

    def _select(self, split: str, val_fraction: float, seed: int) -> list[Sample]:
        """The split's samples: an official list, or a part of the train(val) list."""
        listed = self._read_split("test" if split == "test" else "trainval")
        if split in ("train", "val"):
            # Partition the list before dropping absent files: repairing a file later moves nothing.
            train_idx, val_idx = stratified_split([s.label for s in listed], val_fraction, seed)
            listed = [listed[i] for i in (train_idx if split == "train" else val_idx)]
        return listed

    def _load_image(self, sample: Sample, notes: list[str] | None = None) -> Image.Image:
        return open_image(sample.path, notes)

    def mask_file(self, sample: Sample) -> str:
        """The file a sample's mask comes from, for messages (the image itself for box lists)."""
        return str(sample.mask) if isinstance(sample.mask, (str, Path)) else str(sample.path)

    def unlisted(self) -> list[Problem]:
        """Files on disk that no list names (found by `sib data check`, not at construction)."""
        return []

    # -- shared machinery
    def _drop(self, samples: list[Sample], exclude: Iterable[str | Path]) -> list[Sample]:
        excluded = {str(Path(e)) for e in exclude}
        kept = []
        for s in samples:
            if excluded and ({str(s.path), s.path.name} & excluded or
                             str(s.path.relative_to(self.root)) in excluded):
                self.problems.append(Problem(str(s.path), "excluded by the exclude option", "skipped"))
            elif self.check_files_exist and not s.path.is_file():
                self.problems.append(Problem(str(s.path), "listed but absent", "skipped"))
            else:
                kept.append(s)
        return kept

    def _warn_problems(self) -> None:
        shown = [p for p in self.problems if p.action in ("skipped", "no mask") and "exclude" not in p.what]
        if not shown:
            return
        kinds: dict[str, int] = {}
        for p in shown:
            kinds[f"{p.what} ({p.action})"] = kinds.get(f"{p.what} ({p.action})", 0) + 1
        summary = "; ".join(f"{n} {k}" for k, n in kinds.items())
        first = ", ".join(Path(p.file).name for p in shown[:5]) + (", ..." if len(shown) > 5 else "")
        warnings.warn(f"{type(self).__name__}(split={self.split!r}) at {self.root}: {summary}. "
                      f"First: {first}. See the dataset's `problems`, or run `sib data check`.",
                      DataWarning, stacklevel=3)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int, notes: list[str] | None = None) -> tuple[Image.Image, np.ndarray | None]:
        """Sample `index` before the transform: (PIL RGB image, bool (H, W) mask fitted to it, or None)."""
        sample = self.samples[index]
        image = self._load_image(sample, notes)
        if sample.mask is None:
            return image, None
        mask = fit_mask(self._load_mask(sample, image.size, notes), image.size, self.mask_file(sample), notes)
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        image, mask = self.read(index)
        try:
            x, m = self.transform(image, None if mask is None else Image.fromarray(mask.astype(np.uint8) * 255))
        except ImageSizeError as err:  # the transform sees pixels, not files: name the file here
            raise ImageSizeError(f"{self.samples[index].path}: {err}") from err
        return x, self.samples[index].label, m

    def inspect(self, index: int) -> list[Problem]:
        """Read sample `index` fully and return every irregularity met (what `sib data check` runs)."""
        sample = self.samples[index]
        notes: list[str] = []
        try:
            image = self._load_image(sample, notes)
        except ImageReadError as e:
            return [Problem(str(sample.path), str(e), "error")]
        problems = [Problem(str(sample.path), n, "converted") for n in notes]
        if sample.mask is None:
            return problems
        notes = []
        mask_file = self.mask_file(sample)
        try:
            mask = fit_mask(self._load_mask(sample, image.size, notes), image.size, mask_file, notes)
        except (MaskReadError, MaskSizeError) as e:
            return [*problems, Problem(mask_file, str(e), "error")]
        problems += [Problem(mask_file, n, "resized" if "resized" in n else "converted") for n in notes]
        if not mask.any():
            problems.append(Problem(mask_file, "empty mask: no foreground pixel", "kept"))
        return problems

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, masks={self.has_masks})")
