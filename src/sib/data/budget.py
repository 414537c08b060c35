"""What a training run is given of its objects: annotation budgets, boxes, and the typology's counterexamples.

`TrainingAnnotations` wraps the *training* split (evaluation splits are never wrapped) of a dataset with masks:

- counterexamples (`counterexamples=p`, Friedrich et al. 2023's "CE": no explanation loss, the confounder
  randomised in the training data): a fixed share p of the training images has its background replaced, through
  its mask M_i, by the background of another training image j drawn uniformly (any class, so that background
  and label become independent on those images): x = M_i x_i + (1 - M_i) b_j, where b_j is x_j outside j's
  own object and, on j's object (a hole in j's background), the mean colour of j's background. It works for
  any dataset with masks: on decoy digits, whose training mask is "everything but the decoy patch", it
  replaces the patch, the confounder there.
- annotation budget (`mask_fraction=f < 1`): a fixed random subset of round(f N) training images (at least one)
  keeps its mask; the others yield an empty (all-False) mask, so that a batch without any annotated image still
  carries a mask tensor, and a regulariser built with `partial=True` leaves images with an empty mask to the
  cross-entropy alone (sib.regularizers).
- boxes (`annotation="box"`): each mask is replaced by its bounding box (after the training transform, so the
  box is the box of what the model sees).

Which images are swapped, their partners and which keep a mask depend only on (seed, dataset length): the same
for every epoch, process and resume (a fixed augmented training set, as in the typology).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def box_of(mask: torch.Tensor) -> torch.Tensor:
    """The bounding box of a (1, H, W) bool mask as a (1, H, W) bool mask (an empty mask stays empty)."""
    rows, cols = mask.any(dim=-1)[0], mask.any(dim=-2)[0]
    if not bool(rows.any()):
        return mask.clone()
    r = torch.nonzero(rows).flatten()
    c = torch.nonzero(cols).flatten()
    box = torch.zeros_like(mask)
    box[:, int(r[0]):int(r[-1]) + 1, int(c[0]):int(c[-1]) + 1] = True
    return box


def replace_background(x: torch.Tensor, mask: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor
                       ) -> torch.Tensor:
    """x on its object, `other`'s background elsewhere; other's object pixels filled with the mean colour of
    other's background (its image mean when it has no background). All (C, H, W) / (1, H, W) bool."""
    bg = ~other_mask
    if bool(bg.any()):
        fill = (other * bg).flatten(1).sum(dim=1) / bg.flatten(1).sum(dim=1).clamp_min(1)
    else:
        fill = other.flatten(1).mean(dim=1)
    background = torch.where(other_mask, fill[:, None, None].to(other.dtype), other)
    return torch.where(mask, x, background)


class TrainingAnnotations(Dataset):
    """The training split with counterexamples, an annotation budget and/or boxes (module docstring).

    Args:
        ds: a dataset yielding (image (3, H, W), label, mask (1, H, W) bool or None).
        counterexamples: share of images whose background is replaced, in [0, 1].
        mask_fraction: share of images that keep their mask, in (0, 1].
        annotation: "mask" or "box".
        seed: the run's seed.
    """

    def __init__(self, ds: Dataset, *, counterexamples: float = 0.0, mask_fraction: float = 1.0,
                 annotation: str = "mask", seed: int = 0) -> None:
        if not 0.0 <= counterexamples <= 1.0:
            raise ValueError(f"--counterexamples {counterexamples}: must be a share in [0, 1]")
        if not 0.0 < mask_fraction <= 1.0:
            raise ValueError(f"--reg-mask-fraction {mask_fraction}: must be a share in (0, 1]")
        if annotation not in ("mask", "box"):
            raise ValueError(f"--reg-annotation {annotation!r}: valid values are mask, box")
        self.ds, self.annotation = ds, annotation
        n = len(ds)
        rng = np.random.default_rng([seed, 0x5B1B])
        swapped = rng.permutation(n)[:round(counterexamples * n)]
        partners = (swapped + rng.integers(1, max(n, 2), size=len(swapped))) % max(n, 1)  # never itself
        self.partner = dict(zip(swapped.tolist(), partners.tolist(), strict=True))
        keep = max(1, round(mask_fraction * n)) if mask_fraction < 1 else n
        self.annotated = np.zeros(n, dtype=bool)
        self.annotated[rng.permutation(n)[:keep]] = True

    def __len__(self) -> int:
        return len(self.ds)

    def __getattr__(self, name: str) -> Any:  # num_classes, classes, has_masks, ... of the wrapped dataset
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        x, y, mask = self.ds[i]
        j = self.partner.get(int(i))
        if j is not None:
            if mask is None:
                raise ValueError(f"--counterexamples: training image {i} of {self.ds!r} has no mask; counterexamples "
                                 "need the object's mask of every training image")
            xj, _, mj = self.ds[j]
            if mj is None:
                raise ValueError(f"--counterexamples: training image {j} of {self.ds!r} has no mask")
            x = replace_background(x, mask.bool(), xj, mj.bool())
        if mask is not None and not self.annotated[i]:
            mask = torch.zeros_like(mask)  # empty, not None: a batch of unannotated images still has a mask tensor
        elif mask is not None and self.annotation == "box":
            mask = box_of(mask.bool())
        return x, y, mask
