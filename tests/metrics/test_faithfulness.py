"""Perturbation metrics: hand-computed curves, a naive reference loop, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sib.metrics import faithfulness as FA
from sib.metrics import functional as MF
from sib.models import create_model

PERTURBATION = ["deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"]


class MeanLogit(nn.Module):
    """logits = [10 * mean(x), 0]: p(class 0) = sigmoid(10 * mean(x)), computable by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 10 * x.mean((1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], 1)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


ATTR = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
X = torch.ones(1, 1, 2, 2)
Y = torch.tensor([0])


def test_deletion_curve_and_auc_by_hand():
    curve = MF.deletion_curve(ATTR, model=MeanLogit(), x=X, target=Y, n_steps=4, baseline="zeros")
    want = [sigmoid(10 * (4 - s) / 4) for s in range(5)]  # s pixels of value 1 set to 0
    torch.testing.assert_close(curve, torch.tensor([want]))
    auc = sum((want[i] + want[i + 1]) / 2 for i in range(4)) / 4
    torch.testing.assert_close(MF.deletion_auc(ATTR, model=MeanLogit(), x=X, target=Y, n_steps=4),
                               torch.tensor([auc]))


def test_insertion_curve_by_hand_with_a_constant_baseline():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    curve = MF.insertion_curve(ATTR, model=MeanLogit(), x=x, target=Y, n_steps=2, baseline=-1.0)
    # step 1 inserts the two top pixels (values 1, 2); the rest stay -1
    want = [sigmoid(10 * -1), sigmoid(10 * (1 + 2 - 2) / 4), sigmoid(10 * 10 / 4)]
    torch.testing.assert_close(curve, torch.tensor([want]))


def test_constant_model_gives_flat_curve():
    class Flat(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 4) + 0 * x.sum()

    attr = torch.rand(3, 1, 8, 8)
    x = torch.randn(3, 3, 8, 8)
    for name in ("deletion_auc", "insertion_auc"):
        torch.testing.assert_close(getattr(MF, name)(attr, model=Flat(), x=x, target=torch.tensor([0, 1, 3])),
                                   torch.full((3,), 0.25))


def naive_curve(model, attr, x, target, n_steps, base, insert):
    """One image, one step at a time, pixels ordered by (-value, index) in plain Python."""
    n = attr[0].numel()
    values = attr.flatten().tolist()
    order = sorted(range(n), key=lambda i: (-values[i], i))
    out = []
    for s in range(n_steps + 1):
        img = (base if insert else x).clone().view(x.shape[0], -1)
        for p in order[: s * n // n_steps]:
            img[:, p] = (x if insert else base).view(x.shape[0], -1)[:, p]
        with torch.no_grad():
            out.append(model(img.view(1, *x.shape)).softmax(1)[0, target].item())
    return out


@pytest.mark.parametrize("insert", [False, True])
def test_curves_match_a_naive_loop(insert):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 6, 6, generator=g)
    attr = torch.randn(3, 1, 6, 6, generator=g).round(decimals=1)  # ties: broken by pixel index
    target = torch.tensor([0, 2, 1])
    fn = MF.insertion_curve if insert else MF.deletion_curve
    for baseline in ("zeros", "blur"):
        curve = fn(attr, model=model, x=x, target=target, n_steps=7, baseline=baseline, batch_size=5)
        assert curve.shape == (3, 8)
        base = torch.zeros_like(x) if baseline == "zeros" else None
        for i in range(3):
            b = base[i] if base is not None else _blur(x[i])
            want = naive_curve(model, attr[i], x[i], target[i].item(), 7, b, insert)
            torch.testing.assert_close(curve[i], torch.tensor(want), rtol=1e-5, atol=1e-6)


def _blur(img: torch.Tensor) -> torch.Tensor:
    """RISE's blur: 11x11 Gaussian, sigma 5, here with reflect padding written out by hand."""
    r = torch.arange(11, dtype=torch.float32) - 5
    k = torch.exp(-(r**2) / (2 * 25.0))
    k = k / k.sum()
    pad = torch.nn.functional.pad(img[None], (5, 5, 5, 5), mode="reflect")[0]
    rows = torch.stack([(pad[:, i:i + 11, :] * k[None, :, None]).sum(1) for i in range(img.shape[1])], 1)
    return torch.stack([(rows[:, :, j:j + 11] * k).sum(2) for j in range(img.shape[2])], 2)


def test_average_drop_and_increase_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]])
    attr = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    y = torch.tensor([0, 0])
    # sample 0: E = [0, .25, .5, 1]: x * E = [0, .5, 1.5, 4] -> mean 1.5 vs 2.5
    y0, o0 = sigmoid(25.0), sigmoid(15.0)
    # sample 1: constant map -> E = 0 -> all-zero image: O = sigmoid(0) = .5 > Y = sigmoid(-10)
    y1, o1 = sigmoid(-10.0), 0.5
    drop = MF.average_drop(attr, model=MeanLogit(), x=x, target=y)
    torch.testing.assert_close(drop, torch.tensor([(y0 - o0) / y0, 0.0]))
    inc = MF.increase_in_confidence(attr, model=MeanLogit(), x=x, target=y)
    assert inc.tolist() == [float(o0 > y0), float(o1 > y1)] == [0.0, 1.0]


@pytest.mark.parametrize("name", PERTURBATION)
def test_mask_is_optional_and_checked(name):
    model = MeanLogit()
    kw = {"model": model, "x": X, "target": Y}
    fn = getattr(MF, name)
    a = fn(ATTR, None, **kw)
    b = fn(ATTR, torch.zeros(1, 1, 2, 2, dtype=torch.bool), **kw)  # an empty mask excludes nothing here
    assert not torch.isnan(a).any() and torch.equal(a, b)
    with pytest.raises(ValueError, match=r"attr \(1, 1, 2, 2\), mask \(1, 1, 3, 3\)"):
        fn(ATTR, torch.zeros(1, 1, 3, 3, dtype=torch.bool), **kw)


@pytest.mark.parametrize("name", PERTURBATION)
def test_missing_or_mismatched_model_inputs(name):
    fn = getattr(MF, name)
    with pytest.raises(ValueError, match="model="):
        fn(ATTR, None)
    with pytest.raises(ValueError, match="x must be"):
        fn(ATTR, None, model=MeanLogit(), x=torch.ones(1, 1, 3, 3), target=Y)
    with pytest.raises(ValueError, match="target"):
        fn(ATTR, None, model=MeanLogit(), x=X, target=torch.tensor([0.0]))


@pytest.mark.parametrize("name", PERTURBATION)
def test_batched_and_chunked_equal_per_sample(name):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3).eval()
    g = torch.Generator().manual_seed(1)
    x, attr = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    attr[2] = 0.0  # an all-zero map has a defined value
    y = torch.tensor([0, 1, 2, 0])
    fn = getattr(MF, name)
    full = fn(attr, model=model, x=x, target=y)
    chunked = fn(attr, model=model, x=x, target=y, batch_size=3)
    singles = torch.cat([fn(attr[i:i + 1], model=model, x=x[i:i + 1], target=y[i:i + 1]) for i in range(4)])
    assert torch.isfinite(full).all() and full.shape == (4,)
    torch.testing.assert_close(full, singles)
    torch.testing.assert_close(full, chunked)


def test_model_mode_is_left_alone():
    torch.manual_seed(0)
    model = create_model("small_cnn", 3).train()
    x, attr = torch.randn(2, 3, 16, 16), torch.rand(2, 1, 16, 16)
    MF.deletion_auc(attr, model=model, x=x, target=torch.tensor([0, 1]), n_steps=2)
    assert model.training


def test_unknown_baseline_lists_valid():
    with pytest.raises(ValueError, match="zeros, blur"):
        MF.deletion_auc(ATTR, model=MeanLogit(), x=X, target=Y, baseline="noise")


class CountingModel(nn.Module):
    """tiny_cnn that records the number of images of every forward pass (the test's own wrapper)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.sizes = create_model("tiny_cnn", 3).eval(), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.inner(x)


def _setup(b: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, 3, size, size, generator=g)
    attrs = [torch.randn(b, 1, size, size, generator=g).round(decimals=1) for _ in range(2)]
    attrs[1][0] = math.nan  # an invalid map stays NaN through the shared passes
    return CountingModel(), x, attrs, torch.tensor([0, 1, 2, 0][:b])


def _all_four(attr, model, x, y, cache=None, n_steps=4):
    kw = {"model": model, "x": x, "target": y, "cache": cache}
    return [MF.deletion_auc(attr, **kw, n_steps=n_steps), MF.insertion_auc(attr, **kw, n_steps=n_steps),
            MF.insertion_auc(attr, **kw, n_steps=n_steps, baseline="zeros"),
            MF.average_drop(attr, **kw), MF.increase_in_confidence(attr, **kw)]


def test_shared_cache_gives_the_same_values_with_fewer_forwards():
    model, x, attrs, y = _setup()
    b = x.shape[0]
    alone = [_all_four(a, model, x, y) for a in attrs]
    images_alone = sum(model.sizes)
    model.sizes.clear()
    with torch.no_grad():
        clean = FA.target_probability(model(x), y)  # the caller's own forward, as the evaluator's
    model.sizes.clear()
    cache = FA.PerturbationCache(model, x, y, clean=clean)
    shared = [_all_four(a, model, x, y, cache) for a in attrs]
    for want, got in zip(alone, shared, strict=True):
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, equal_nan=True)
    assert torch.isnan(shared[1][0][0]) and torch.isfinite(shared[0][0]).all()
    # alone, per map: 3 curves x (4 steps + 1) x B images, and x, x * E for each of AD and IC
    assert images_alone == 2 * (3 * 5 * b + 2 * 2 * b)
    # shared: the zeros and blur baselines once; per map 3 curves x 3 partial steps, and one x * E
    assert sum(model.sizes) == 2 * b + 2 * (3 * 3 * b + b)


def test_cache_of_another_batch_is_refused():
    model, x, attrs, y = _setup()
    cache = FA.PerturbationCache(model, x, y)
    with pytest.raises(ValueError, match="another \\(model, x, target\\)"):
        MF.deletion_auc(attrs[0], model=model, x=x.clone(), target=y, cache=cache)
    with pytest.raises(ValueError, match="clean must be the \\(B,\\)"):
        FA.PerturbationCache(model, x, y, clean=torch.zeros(3))


@pytest.mark.parametrize("insert", [False, True])
def test_more_steps_than_pixels_still_match_the_naive_loop(insert):
    """Steps that change no pixel or every pixel come from the shared passes; the rest are perturbed."""
    model, _, _, _ = _setup()
    g = torch.Generator().manual_seed(3)
    x, attr = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    target = torch.tensor([1, 2])
    fn = MF.insertion_curve if insert else MF.deletion_curve
    curve = fn(attr, model=model, x=x, target=target, n_steps=7, baseline="zeros")
    for i in range(2):
        want = naive_curve(model, attr[i], x[i], target[i].item(), 7, torch.zeros_like(x[i]), insert)
        torch.testing.assert_close(curve[i], torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_default_batches_fill_a_memory_budget_across_images_and_steps():
    model, _, _, _ = _setup()
    g = torch.Generator().manual_seed(4)
    x, attr = torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 1, 64, 64, generator=g)
    curve = MF.deletion_curve(attr, model=model, x=x, target=torch.tensor([0, 1, 2, 0]), n_steps=20)
    # 1 MiB of 64 px float32 images (48 KiB each) is 21 images: the 19 partial steps x 4 images = 76
    # perturbed images run as 21, 21, 21, 13 (after x and the baseline, 4 each)
    assert FA.BATCH_BYTES["default"] == 1 << 20 and model.sizes == [4, 4, 21, 21, 21, 13]
    explicit = MF.deletion_curve(attr, model=model, x=x, target=torch.tensor([0, 1, 2, 0]), n_steps=20,
                                 batch_size=256)
    torch.testing.assert_close(curve, explicit)
    with pytest.raises(ValueError, match="batch_size must be >= 1 or None"):
        MF.deletion_curve(attr, model=model, x=x, target=torch.tensor([0, 1, 2, 0]), batch_size=0)
