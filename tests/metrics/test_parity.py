"""Parity with independent implementations: Quantus, scikit-learn, pytorch-grad-cam.

Every metric Quantus implements agrees within 1e-5 on the same inputs, except where Quantus is wrong;
each such case has a hand-computed test below that shows our value is right:

- PointingGame: an empty mask counts as a hit (it writes NaN into a bool array, which becomes True).
- AttributionLocalisation(weighted=True): the area ratio divides by `x_batch[2:].size`, which slices the
  batch axis, so a sample's score depends on the batch size (we do not offer the weighted variant).
- (not compared) ROAD averages only the first batch; we do not implement ROAD.
Intentional differences, not bugs: our pointing game has a tolerance (Quantus': none, so we compare at
tolerance 0) and scores a constant map as a miss; Quantus' TopKIntersection is our `topk_intersection`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import quantus
import torch
from sklearn.metrics import jaccard_score, roc_auc_score

from sib.explain import normalize_attr
from sib.metrics import functional as MF
from sib.models import create_model

pytestmark = pytest.mark.parity

OFF = {"normalise": False, "abs": False, "disable_warnings": True, "display_progressbar": False}


def sample(b: int = 6, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    attr = torch.randn(b, 1, size, size, generator=g)
    mask = torch.rand(b, 1, size, size, generator=g) > 0.7
    x = torch.randn(b, 3, size, size, generator=g)
    return attr, mask, x


def quantus_scores(metric, attr, mask, x, model=None, y=None, **call) -> np.ndarray:
    y = np.zeros(len(x), dtype=int) if y is None else y
    return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=attr.numpy(),
                             s_batch=mask.numpy().astype(float), channel_first=True, **call), dtype=float)


def check(ours: torch.Tensor, ref: np.ndarray, tol: float = 1e-5) -> float:
    ours = ours.double().numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    diff = np.nanmax(np.abs(ours - ref))
    print(f"max |ours - reference| = {diff:.2e}")
    assert diff <= tol, diff
    return float(diff)


def test_energy_pointing_game_matches_attribution_localisation():
    attr, mask, x = sample()
    ref = quantus_scores(quantus.AttributionLocalisation(positive_attributions=True, **OFF), attr, mask, x)
    check(MF.energy_pointing_game(attr, mask), ref)  # EPG = localisation of the positive part


def test_relevance_mass_accuracy_matches():
    attr, mask, x = sample()
    check(MF.relevance_mass_accuracy(attr, mask, abs=False),
          quantus_scores(quantus.RelevanceMassAccuracy(**OFF), attr, mask, x))
    check(MF.relevance_mass_accuracy(attr, mask, abs=True),
          quantus_scores(quantus.RelevanceMassAccuracy(**{**OFF, "abs": True}), attr, mask, x))


def test_relevance_rank_accuracy_matches():
    attr, mask, x = sample()
    check(MF.relevance_rank_accuracy(attr, mask),
          quantus_scores(quantus.RelevanceRankAccuracy(**OFF), attr, mask, x))


@pytest.mark.parametrize("k", [1, 20, 100])
def test_topk_intersection_matches(k):
    attr, mask, x = sample()
    check(MF.topk_intersection(attr, mask, k=k),
          quantus_scores(quantus.TopKIntersection(k=k, **OFF), attr, mask, x))


def test_auroc_matches_quantus_and_sklearn():
    attr, mask, x = sample()
    attr[0] = attr[0].round()  # ties: both use mid-ranks / the trapezoidal ROC
    ours = MF.auroc(attr, mask)
    check(ours, quantus_scores(quantus.AUC(**OFF), attr, mask, x))
    sk = [roc_auc_score(m.flatten().numpy(), a.flatten().numpy()) for a, m in zip(attr, mask, strict=True)]
    check(ours, np.array(sk))


def test_topk_iou_matches_sklearn_jaccard():
    attr, mask, _ = sample()
    k = 40
    ours = MF.topk_iou(attr, mask, k=k)
    ref = []
    for a, m in zip(attr, mask, strict=True):
        top = np.zeros(a.numel(), dtype=bool)
        top[np.argsort(-a.flatten().numpy(), kind="stable")[:k]] = True
        ref.append(jaccard_score(m.flatten().numpy(), top))
    check(ours, np.array(ref))


def test_pointing_game_matches_at_zero_tolerance():
    attr, mask, x = sample()
    ref = quantus_scores(quantus.PointingGame(**OFF), attr, mask, x)
    check(MF.pointing_game(attr, mask, tolerance=0), ref)


def test_quantus_pointing_game_counts_an_empty_mask_as_a_hit():
    attr = torch.zeros(1, 1, 4, 4)
    attr[..., 1, 1] = 1.0
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    # By hand: no foreground pixel, so the maximum cannot lie on one: excluded (NaN), never a hit.
    assert math.isnan(MF.pointing_game(attr, empty, tolerance=0)[0])
    ref = quantus_scores(quantus.PointingGame(**OFF), attr, empty, torch.zeros(1, 3, 4, 4))
    assert ref.tolist() == [1.0]  # Quantus' bug; when this fails, Quantus is fixed: drop the exception


def test_quantus_weighted_localisation_depends_on_batch_size():
    attr = torch.ones(4, 1, 4, 4)
    attr[..., 0, 0] = 2.0  # (Quantus refuses constant maps)
    mask = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    mask[..., 2:, :] = True  # bottom half of each image
    # By hand: inside ratio 8/17, weighted by the area share 8/16 = 0.5 -> 4/17 for every sample.
    x = torch.zeros(4, 3, 4, 4)
    metric = quantus.AttributionLocalisation(weighted=True, positive_attributions=True, **OFF)
    batch4 = quantus_scores(metric, attr, mask, x)
    batch3 = quantus_scores(metric, attr[:3], mask[:3], x[:3])
    torch.testing.assert_close(MF.energy_pointing_game(attr, mask), torch.full((4,), 8 / 17))  # unweighted
    assert not np.isclose(batch4[0], 4 / 17) and not np.isclose(batch4[0], batch3[0])  # Quantus' bug


def test_deletion_curve_matches_quantus_pixel_flipping():
    # One input channel: Quantus checks `features_in_step` against H*W but flips C*H*W features (the
    # map broadcast over channels), so with C = 3 its steps would not be whole pixels.
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3)).eval()
    attr, _, x = sample(3, size=8)
    x = x[:, :1]
    y = np.array([0, 2, 1])
    n_steps = 16  # 64 pixels: 4 per step
    ours = MF.deletion_curve(attr, model=model, x=x, target=torch.tensor(y), n_steps=n_steps)
    metric = quantus.PixelFlipping(features_in_step=64 // n_steps, perturb_baseline=0.0, **OFF)
    ref = quantus_scores(metric, attr, torch.zeros_like(attr, dtype=torch.bool), x, model=model, y=y,
                         softmax=True, device="cpu")
    check(ours[:, 1:], ref)  # Quantus' curve starts after the first step


def test_average_drop_matches_pytorch_grad_cam_confidence_change():
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3).eval()
    attr, _, x = sample(4)
    y = torch.tensor([0, 1, 2, 0])
    cams = normalize_attr(attr, mode="minmax")[:, 0].numpy()
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in y]
    change = CamMultImageConfidenceChange()(x, cams, targets, model).reshape(-1)  # O - Y
    with torch.no_grad():
        conf = model(x).softmax(1).gather(1, y[:, None]).squeeze(1).numpy()  # Y
    check(MF.average_drop(attr, model=model, x=x, target=y), np.maximum(-change, 0) / conf)
    check(MF.increase_in_confidence(attr, model=model, x=x, target=y), (change > 0).astype(float))
