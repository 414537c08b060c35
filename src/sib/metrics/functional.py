"""Pure per-sample metric functions: `fn(attr (B,1,H,W), mask (B,1,H,W) bool, ...) -> (B,)`.

The localisation metrics take only `attr` and `mask`; the perturbation metrics also take the keywords
`model`, `x` and `target`. Conventions (empty masks are NaN = "excluded", non-finite attributions are NaN
= "invalid" (`finite_rows` tells them apart), uninformative maps get the chance value, tie rules) are in the
docstrings of `sib.metrics.localisation` and `sib.metrics.faithfulness`.
"""

from sib.metrics._checks import finite_rows
from sib.metrics.faithfulness import (
    average_drop,
    deletion_auc,
    deletion_curve,
    increase_in_confidence,
    insertion_auc,
    insertion_curve,
)
from sib.metrics.localisation import (
    auroc,
    default_tolerance,
    energy_pointing_game,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    topk_intersection,
    topk_iou,
)

__all__ = [
    "auroc",
    "average_drop",
    "default_tolerance",
    "deletion_auc",
    "deletion_curve",
    "energy_pointing_game",
    "finite_rows",
    "increase_in_confidence",
    "insertion_auc",
    "insertion_curve",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "topk_intersection",
    "topk_iou",
]
