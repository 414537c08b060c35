"""Datasets: every dataset yields (image, label, fg_mask or None).

    image   float32 (3, H, W), already normalised (see sib.data.transforms.NORMALIZATIONS)
    label   int in [0, num_classes)
    fg_mask bool (1, H, W), True on the object; None where the dataset has no ground truth

Datasets are created by name: `create_dataset("synthetic", root=None, split="train")`. Each dataset class
takes `(root, split, transform=None, **options)` and exposes `num_classes`, `classes` (list of names) and
`has_masks` (bool).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from sib.registry import Registry

DATASETS: Registry[type] = Registry("dataset")
DATASETS.register("synthetic", "sib.data.synthetic:SyntheticBenchmark")
DATASETS.register("decoy_digits", "sib.data.decoy:DecoyDigits")
DATASETS.register("oxford_pets", "sib.data.oxford_pets:OxfordPets")
DATASETS.register("cub200", "sib.data.cub200:CUB200")
DATASETS.register("stanford_dogs", "sib.data.stanford_dogs:StanfordDogs")
DATASETS.register("cifar100", "sib.data.cifar100:CIFAR100")
DATASETS.register("imagenet", "sib.data.imagenet:ImageNet")
DATASETS.register("image_folder", "sib.data.image_folder:ImageFolderWithMasks")


def create_dataset(name: str, root: str | None = None, split: str = "train", transform: Any = None,
                   **options: Any) -> Dataset:
    """Create a dataset by registry name.

    Args:
        name: one of `DATASETS.names()`, e.g. "synthetic", "oxford_pets".
        root: folder in the dataset's original on-disk layout (unused by "synthetic").
        split: "train", "val", "test" (and "test_shifted" for "synthetic").
        transform: a paired transform `(PIL image, PIL mask or None) -> (tensor, tensor or None)`;
            None uses the dataset's default evaluation transform.
        **options: dataset-specific options (image_size, seed, ...).
    """
    cls = DATASETS.get(name)
    return cls(root, split, transform=transform, **options)


def collate(samples: list[tuple[torch.Tensor, int, torch.Tensor | None]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Batch samples into (x (B,3,H,W), y (B,) int64, mask (B,1,H,W) bool or None).

    The mask is None when no sample in the batch has one. In a batch where only some samples have a
    mask, the others get an all-False mask, which every localisation metric excludes (and counts) as empty.
    """
    images, labels, masks = zip(*samples, strict=True)
    x = torch.stack(images)
    y = torch.as_tensor(labels, dtype=torch.long)
    if all(m is None for m in masks):
        return x, y, None
    shape = (1, *x.shape[-2:])
    mask = torch.stack([m if m is not None else torch.zeros(shape, dtype=torch.bool) for m in masks])
    return x, y, mask


__all__ = ["DATASETS", "collate", "create_dataset"]
