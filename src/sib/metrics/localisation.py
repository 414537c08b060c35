"""Localisation metrics: does the attribution fall on the ground-truth foreground?

Every function takes `attr` float (B, 1, H, W) (any scale, unnormalised is fine) and `mask` bool
(B, 1, H, W) (True = foreground) and returns a (B,) float tensor, computed batched on the device without
host syncs. Shared conventions:

- Empty foreground mask: NaN, meaning "excluded" (never a hit, never a zero); the accumulating metrics
  in `sib.metrics.modules` skip and count such samples. AUROC is also NaN for an all-foreground mask
  (no background pixel: the ROC is undefined).
- Non-finite attribution (a NaN or +-inf anywhere in a sample's map): NaN, meaning "invalid", whatever the
  mask; every metric here and in `sib.metrics.faithfulness` does the same, and callers tell the two NaNs
  apart with `finite_rows(attr)` (the evaluator and `sib.metrics.modules` count "invalid" separately).
- Uninformative maps get the value of chance, never NaN: an all-zero map scores like a uniform map
  (EPG and relevance mass: |fg| / (H*W); ranks with ties share the tied slots, so a constant map gets
  the expected value under random tie-breaking: rank accuracy |fg| / (H*W), AUROC 0.5). The pointing
  game is the exception: a constant map points nowhere, so it is a miss (0).
- Ties elsewhere are handled the same way: top-k sets take tied pixels fractionally (expected overlap
  under random tie-breaking), AUROC uses mid-ranks (as scikit-learn's roc_auc_score).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sib.metrics._checks import check_attr_mask, finite_rows

REFERENCE_SIZE, REFERENCE_TOLERANCE = 224, 15  # the pointing game's customary 15 px, defined at 224 px


def default_tolerance(height: int, width: int) -> int:
    """The pointing game's default tolerance: 15 px at 224 px, scaled with the shorter side.

    round(15 * min(H, W) / 224) to the nearest whole pixel (halves up), the rule `sib.loss.default_window`
    uses for the S-IB window: 224 px -> 15, 64 px -> 4, 32 px -> 2. Unscaled, 15 px covers most of a
    small image, so a pure-noise map "hits" most of the time (docs/ARCHITECTURE.md, Metrics, has the
    measured rates on the built-in benchmark).
    """
    return math.floor(REFERENCE_TOLERANCE * min(height, width) / REFERENCE_SIZE + 0.5)


def _flat(attr: torch.Tensor, mask: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and flatten: (B, 1, H, W) -> (B, N) for attr and mask; |fg| (B,) in the output dtype; and
    the (B,) bool finite rows. Invalid rows of `a` are zeroed so the arithmetic stays finite (their
    values are replaced by NaN at the end, by `_excluded`)."""
    check_attr_mask(attr, mask)
    a, fg = attr.flatten(1), mask.flatten(1)  # (B, 1, H, W) -> (B, N)
    finite = finite_rows(attr)
    a = torch.where(finite[:, None], a, torch.zeros_like(a))
    return a, fg, fg.sum(1).to(_out_dtype(attr)), finite


def _out_dtype(attr: torch.Tensor) -> torch.dtype:
    return torch.promote_types(attr.dtype, torch.float32)


def _excluded(values: torch.Tensor, n_fg: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """NaN where the foreground is empty (excluded) or the attribution is not finite (invalid)."""
    return torch.where((n_fg > 0) & finite, values, torch.full_like(values, math.nan))


def _share(inside: torch.Tensor, total: torch.Tensor, n_fg: torch.Tensor, n: int) -> torch.Tensor:
    """inside / total, or the uniform map's value |fg| / N where total is 0."""
    ok = total != 0
    return torch.where(ok, inside / torch.where(ok, total, torch.ones_like(total)), n_fg / n)


def energy_pointing_game(attr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Energy pointing game (Wang et al. 2020, Score-CAM): share of the positive energy on the object.

    EPG = sum(relu(attr) * fg) / sum(relu(attr)); a map with no positive energy scores |fg| / (H*W).

    Args:
        attr: float (B, 1, H, W).
        mask: bool (B, 1, H, W), True on the foreground.

    Returns:
        (B,) in [0, 1]; NaN where the mask is empty or attr is not finite.
    """
    a, fg, n_fg, finite = _flat(attr, mask)
    energy = F.relu(a).to(n_fg.dtype)
    return _excluded(_share((energy * fg).sum(1), energy.sum(1), n_fg, a.shape[1]), n_fg, finite)


def relevance_mass_accuracy(attr: torch.Tensor, mask: torch.Tensor, *, abs: bool = True) -> torch.Tensor:
    """Relevance mass accuracy (Arras et al. 2022): sum(r * fg) / sum(r).

    Args:
        attr: float (B, 1, H, W).
        mask: bool (B, 1, H, W).
        abs: r = |attr| (default; in [0, 1]); False uses the signed attr as is (Quantus' default), whose
            ratio is unbounded when positive and negative mass nearly cancel.

    Returns:
        (B,); |fg| / (H*W) where sum(r) == 0; NaN where the mask is empty or attr is not finite.
    """
    a, fg, n_fg, finite = _flat(attr, mask)
    r = (a.abs() if abs else a).to(n_fg.dtype)
    return _excluded(_share((r * fg).sum(1), r.sum(1), n_fg, a.shape[1]), n_fg, finite)


def _topk_overlap(a: torch.Tensor, fg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Expected |top-k(a) ∩ fg| under random tie-breaking: (B, N), (B, N) bool, (B,) int -> (B,).

    Pixels above the k-th largest value count fully; the pixels tied with it share the remaining
    k - |above| slots in proportion. Rows with k == 0 return 0.
    """
    desc = a.sort(1, descending=True).values
    kth = desc.gather(1, (k - 1).clamp(min=0)[:, None])  # (B, 1) k-th largest value
    above, tied = a > kth, a == kth
    n_above, n_tied = above.sum(1), tied.sum(1).clamp(min=1)
    fg_above, fg_tied = (above & fg).sum(1), (tied & fg).sum(1)
    overlap = fg_above + fg_tied * (k - n_above).to(a.dtype) / n_tied
    return torch.where(k > 0, overlap, torch.zeros_like(overlap))


def relevance_rank_accuracy(attr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relevance rank accuracy (Arras et al. 2022): |top-K pixels ∩ fg| / K with K = |fg|.

    Args:
        attr: float (B, 1, H, W).
        mask: bool (B, 1, H, W).

    Returns:
        (B,) in [0, 1]; a constant map gets |fg| / (H*W); NaN where the mask is empty or attr is not
        finite.
    """
    a, fg, n_fg, finite = _flat(attr, mask)
    overlap = _topk_overlap(a.to(n_fg.dtype), fg, fg.sum(1))
    return _excluded(overlap / n_fg.clamp(min=1), n_fg, finite)


def _k_pixels(k: int | float, n: int) -> int:
    """k as a pixel count: an int is a count, a float in (0, 1] a fraction of the N pixels."""
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise ValueError(f"k must be an int pixel count or a float fraction in (0, 1]; got {k!r}")
    count = k if isinstance(k, int) else round(k * n)
    if isinstance(k, float) and not 0 < k <= 1 or not 1 <= count <= n:
        raise ValueError(f"k={k!r} selects {count} of {n} pixels; use an int in [1, {n}] or a float in "
                         f"(0, 1]")
    return count


def topk_intersection(attr: torch.Tensor, mask: torch.Tensor, *, k: int | float = 0.25) -> torch.Tensor:
    """Top-k intersection (Theiner et al. 2021, Quantus' TopKIntersection): |top-k ∩ fg| / k.

    Args:
        attr: float (B, 1, H, W).
        mask: bool (B, 1, H, W).
        k: pixel count (int) or fraction of the image (float in (0, 1]).

    Returns:
        (B,) in [0, 1]; NaN where the mask is empty or attr is not finite.
    """
    a, fg, n_fg, finite = _flat(attr, mask)
    kk = _k_pixels(k, a.shape[1])
    overlap = _topk_overlap(a.to(n_fg.dtype), fg, torch.full_like(fg[:, 0], kk, dtype=torch.long))
    return _excluded(overlap / kk, n_fg, finite)


def topk_iou(attr: torch.Tensor, mask: torch.Tensor, *, k: int | float = 0.25) -> torch.Tensor:
    """IoU of the top-k pixels of attr with the foreground: I / (k + |fg| - I), I = |top-k ∩ fg|.

    Args:
        attr: float (B, 1, H, W).
        mask: bool (B, 1, H, W).
        k: pixel count (int) or fraction of the image (float in (0, 1]).

    Returns:
        (B,) in [0, 1]; ties share slots (see module docstring); NaN where the mask is empty or attr is not
        finite.
    """
    a, fg, n_fg, finite = _flat(attr, mask)
    kk = _k_pixels(k, a.shape[1])
    inter = _topk_overlap(a.to(n_fg.dtype), fg, torch.full_like(fg[:, 0], kk, dtype=torch.long))
    return _excluded(inter / (kk + n_fg - inter), n_fg, finite)


def auroc(attr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of attr as a per-pixel detector of the foreground.

    Mann-Whitney form with mid-ranks for ties, in float64: equals scikit-learn's roc_auc_score(fg, attr).

    Args:
        attr: float (B, 1, H, W).
        mask: bool (B, 1, H, W).

    Returns:
        (B,) in [0, 1]; 0.5 for a constant map; NaN where the mask is empty or all foreground, or attr is
        not finite.
    """
    a, fg, n_fg, finite = _flat(attr, mask)
    a64 = a.double()
    asc = a64.sort(1).values
    # 1-based mid-rank of every pixel: ties get the mean of the ranks they span.
    rank = (torch.searchsorted(asc, a64) + torch.searchsorted(asc, a64, right=True) + 1).double() / 2
    pos = fg.sum(1).double()
    neg = a.shape[1] - pos
    u = (rank * fg).sum(1) - pos * (pos + 1) / 2
    value = (u / (pos * neg).clamp(min=1)).to(n_fg.dtype)
    return torch.where((pos > 0) & (neg > 0) & finite, value, torch.full_like(value, math.nan))


def _disk(radius: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, 2r+1, 2r+1) indicator of the pixel offsets within Euclidean distance `radius`."""
    r = int(math.floor(radius))
    off = torch.arange(-r, r + 1, device=device, dtype=dtype)
    return ((off[:, None] ** 2 + off[None, :] ** 2) <= radius**2).to(dtype)[None, None]


def pointing_game(attr: torch.Tensor, mask: torch.Tensor, *, tolerance: float | None = None) -> torch.Tensor:
    """Pointing game (Zhang et al. 2018): a hit if the maximum of attr lies within `tolerance` pixels
    (Euclidean) of the foreground.

    With several maximal pixels, any of them may hit (as Quantus); a constant map points nowhere and is
    a miss. Report the per-class mean of hits (`METRICS["pointing_game"].reduction == "class_mean"`).

    Args:
        attr: float (B, 1, H, W).
        mask: bool (B, 1, H, W).
        tolerance: radius in pixels, >= 0; 0 means the maximum must lie on the foreground. None (default):
            `default_tolerance(H, W)`, 15 px at 224 px scaled to the image (4 px at 64 px).

    Returns:
        (B,) of 1.0 (hit) / 0.0 (miss); NaN where the mask is empty (excluded, never a hit) or attr is not
        finite (invalid, never a miss).
    """
    a, fg, n_fg, finite = _flat(attr, mask)
    if tolerance is None:
        tolerance = default_tolerance(*attr.shape[-2:])
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels; got {tolerance}")
    hi, lo = a.amax(1, keepdim=True), a.amin(1, keepdim=True)
    near = mask
    if tolerance >= 1:
        # Dilate the foreground by a disk: near[p] iff some fg pixel lies within `tolerance` of p.
        disk = _disk(tolerance, torch.float32, attr.device)
        near = F.conv2d(mask.float(), disk, padding=disk.shape[-1] // 2) > 0.5
    hit = ((a == hi) & near.flatten(1)).any(1) & (hi > lo).squeeze(1)
    return _excluded(hit.to(n_fg.dtype), n_fg, finite)
