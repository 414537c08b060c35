"""CIFAR-100 (Krizhevsky, 2009), read from the "python version" the authors distribute.

    <root>/cifar-100-python/train, test   pickled dicts: data uint8 (N, 3072) (R, G, B planes of 32x32),
                                          fine_labels, coarse_labels, filenames
    <root>/cifar-100-python/meta          fine_label_names, coarse_label_names

`root` may also be the `cifar-100-python/` folder itself. Splits: "trainval" = the 50 000 training
images, "test" = the 10 000 test images. Labels: the fine labels 0..99 (`label_type="coarse"`: the 20
superclasses). No foreground masks. The default eval transform resizes the 32 px images to `image_size`
without a centre crop (a crop would cut the object at this resolution).

The files are unpickled with a restricted unpickler that only builds numpy arrays and plain containers,
so a file that is not a CIFAR pickle cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sib.data.common import MaskedImageDataset, Problem, Sample, download_or_explain, missing

FILES = ("train", "test", "meta")
LABEL_TYPES = ("fine", "coarse")
HOW_TO_GET = ("download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract "
              "it into the root, or pass download=True (`--download`).")
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR pickle")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict[str, Any]:
    """Unpickle a CIFAR file (written by Python 2 or 3) into a dict with str keys.

    Raises:
        ValueError: the file is truncated, not a pickle, or holds more than arrays and lists; names it.
    """
    try:
        with open(path, "rb") as f:
            # latin1 is how numpy arrays pickled by Python 2 must be decoded.
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot read CIFAR pickle {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


class CIFAR100(MaskedImageDataset):
    """CIFAR-100 from its pickled python version; yields masks of None.

    Args:
        root, split, transform: see `sib.data.common.MaskedImageDataset`.
        label_type: "fine" (100 classes, default) or "coarse" (20 superclasses).
        **options: image_size, normalization, val_fraction, seed, download, exclude (see the base class).
    """

    eval_whole_image = True
    check_files_exist = False  # the samples are rows of one file

    def __init__(self, root: str | Path | None, split: str = "train", transform: Any = None, *,
                 label_type: str = "fine", **options: Any) -> None:
        if label_type not in LABEL_TYPES:
            raise ValueError(f"label_type must be one of {', '.join(LABEL_TYPES)}, got {label_type!r}")
        self.label_type = label_type
        self._images: np.ndarray | None = None
        super().__init__(root, split, transform, **options)

    def _locate(self, root: Path, download: bool) -> Path:
        for candidate in (root / "cifar-100-python", root):
            if all((candidate / f).is_file() for f in FILES):
                return candidate
        if download:
            from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

            download_or_explain(lambda: TorchvisionCIFAR100(str(root), download=True), "cifar100", root,
                                HOW_TO_GET)
            return root / "cifar-100-python"
        raise missing(root, "cifar100", [f"cifar-100-python/{f}" for f in FILES], HOW_TO_GET)

    def _read_split(self, which: str) -> list[Sample]:
        meta = load_pickle(self.root / "meta")
        self.classes = [str(n) for n in meta[f"{self.label_type}_label_names"]]
        path = self.root / ("train" if which == "trainval" else "test")
        batch = load_pickle(path)
        data = np.asarray(batch.get("data"))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise ValueError(f"{path}: 'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}")
        labels = list(batch.get(f"{self.label_type}_labels", []))
        if len(labels) != len(data):
            raise ValueError(f"{path}: {len(labels)} {self.label_type}_labels for {len(data)} images")
        names = [str(n) for n in batch.get("filenames", [])] or [f"{i}.png" for i in range(len(data))]
        # (N, 3072) -> (N, 3, 32, 32) -> (N, 32, 32, 3): the rows hold R, G, B planes one after another.
        self._images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        samples = []
        for row, (label, name) in enumerate(zip(labels, names, strict=True)):
            if not 0 <= int(label) < len(self.classes):
                self.problems.append(Problem(f"{path}#{row}", f"label {label} out of range", "skipped"))
                continue
            samples.append(Sample(path / name, int(label), None, row))
        return samples

    def _load_image(self, sample: Sample, notes: list[str] | None = None) -> Image.Image:
        return Image.fromarray(self._images[sample.row])
