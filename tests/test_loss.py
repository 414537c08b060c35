"""The S-IB regulariser against the reference's golden vectors, closed forms and autograd.

Golden data: tests/fixtures/sib_golden_s64.npz (two images of the reference's 64 px case: R and its mask M,
vendored from ../shared/golden, see tests/fixtures/make_sib_golden_s64.py) always runs; the full file in
../shared/golden (batch-level HSIC, background term and gradient, also at 224 px) runs where it is present
and is a failure, not a skip, under CI. The adaptive mask is also checked against a full-sort reference
written out here from PAPER.md.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sib.loss import (
    SpatialIB,
    adaptive_mask,
    background_term,
    default_window,
    hsic,
    soft_quantile,
    vjp_map,
)

VENDORED = Path(__file__).resolve().parent / "fixtures" / "sib_golden_s64.npz"


@pytest.fixture(scope="module")
def golden(shared_path):
    return np.load(shared_path("golden/sib_reference_vectors.npz"))


@pytest.fixture(scope="module")
def vendored():
    return np.load(VENDORED)


def _reference_soft_quantile(values: torch.Tensor, q: float, temperature: float = 0.1) -> torch.Tensor:
    """The reference's formula written out: full sort, softmax weights over all n ranks."""
    n = values.shape[1]
    s, _ = values.sort(dim=1)
    idx = torch.arange(n, dtype=values.dtype)
    w = torch.softmax(-(idx - q * (n - 1)).abs() / temperature, dim=0)
    return (s * w).sum(dim=1)


def _reference_adaptive_mask(R: torch.Tensor, window: int, temperature: float = 0.1,
                             slope: float = 10.0) -> torch.Tensor:
    """PAPER.md's adaptive mask step by step: full-sort soft quantiles, avg_pool2d counting zero padding."""
    B = R.shape[0]

    def q(t: torch.Tensor, level: float) -> torch.Tensor:  # (B, 1, H, W) -> (B, 1, 1, 1)
        return _reference_soft_quantile(t.flatten(1), level, temperature).view(B, 1, 1, 1)

    g = R.mean(dim=1, keepdim=True).abs()  # |mean over channels|: mean first, then abs
    lo, hi = q(g, 0.05), q(g, 0.95)
    gn = (g - lo) / (hi - lo + 1e-8)
    h = torch.sigmoid(slope * (gn - q(gn, 0.8)))
    d = F.avg_pool2d(h, kernel_size=window, stride=1, padding=window // 2, count_include_pad=True)
    return torch.sigmoid(slope * (d - q(d, 0.8)))


def _structured_R(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A VJP-like map: a signed blob (the 'object') with per-channel noise, so the mask is not trivial."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    centre = torch.rand(b, 2, 1, 1, generator=g, dtype=torch.float64) - 0.5
    blob = torch.exp(-((yy - centre[:, :1]) ** 2 + (xx - centre[:, 1:]) ** 2) / 0.1)  # (B, 1, H, W)
    sign = torch.randn(b, 3, 1, 1, generator=g, dtype=torch.float64)
    return 0.05 * sign * blob + 0.01 * torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)


def _regulariser_on_R(R: torch.Tensor, x: torch.Tensor, window: int = 31):
    M = adaptive_mask(R, window=window)
    a = F.normalize((R * M).flatten(1), dim=1)
    b = F.normalize((x * M).flatten(1), dim=1)
    h = hsic(a, b)
    bg = background_term(R, M)
    return M, h, bg, 1000 * torch.exp(bg) + 0.01 * torch.exp(-h)


@pytest.mark.parametrize("case", ["s64", "s224"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden_vectors(golden, case, dtype):
    R = torch.tensor(golden[f"{case}_R"], dtype=dtype, requires_grad=True)
    x = torch.tensor(golden[f"{case}_x"], dtype=dtype)
    M, h, bg, reg = _regulariser_on_R(R, x)
    reg.backward()
    assert M.shape == (R.shape[0], 1, *R.shape[2:])
    np.testing.assert_allclose(M[:, 0].detach().double().numpy(), golden[f"{case}_mask"], atol=1e-5, rtol=0)
    assert abs(h.item() - float(golden[f"{case}_hsic"])) < 1e-5
    # relative: bg is ~3e-4, and a batch-pooled variance is within 1e-5 of it (2.6% off) at 64 px
    assert bg.item() == pytest.approx(float(golden[f"{case}_bg"]), rel=1e-4)
    assert abs(reg.item() - float(golden[f"{case}_reg"])) < 1e-3  # dominated by 1000*exp(~0)
    g_ref = torch.tensor(golden[f"{case}_dreg_dR"], dtype=torch.float64)
    cos = F.cosine_similarity(R.grad.double().flatten(), g_ref.flatten(), dim=0)
    assert cos >= 0.999


def test_spatial_ib_matches_golden_parts(golden):
    """The module's parts are the same numbers as the pure functions (given R directly)."""
    R = torch.tensor(golden["s64_R"], dtype=torch.float64)
    x = torch.tensor(golden["s64_x"], dtype=torch.float64)
    terms = SpatialIB(window=31)(x, logits=torch.zeros(R.shape[0], 3), R=R)
    assert abs(terms.hsic.item() - float(golden["s64_hsic"])) < 1e-5
    assert terms.background.item() == pytest.approx(float(golden["s64_bg"]), rel=1e-4)
    assert abs(terms.loss.item() - float(golden["s64_reg"])) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adaptive_mask_matches_vendored_golden(vendored, dtype):
    """The reference's own masks of two 64 px images (window 31), in the repository: no ../shared needed."""
    R = torch.tensor(vendored["R"], dtype=dtype)
    M = adaptive_mask(R, window=int(vendored["window"]))
    assert M.shape == (2, 1, 64, 64) and M.dtype == dtype
    np.testing.assert_allclose(M[:, 0].double().numpy(), vendored["mask"], atol=1e-5, rtol=0)
    assert 0.05 < float(vendored["mask"].mean()) < 0.95 and vendored["mask"].std() > 0.1  # not a constant mask


def test_background_term_on_vendored_golden_mask(vendored):
    """bg = mean over images of each image's unbiased variance of R * (1 - M), here from the golden M."""
    R = torch.tensor(vendored["R"], dtype=torch.float64)
    M = torch.tensor(vendored["mask"], dtype=torch.float64)[:, None]
    per_image = [np.var((r * (1 - m)).ravel(), ddof=1) for r, m in zip(vendored["R"].astype(np.float64),
                                                                       vendored["mask"].astype(np.float64)[:, None],
                                                                       strict=True)]
    assert background_term(R, M).item() == pytest.approx(float(np.mean(per_image)), rel=1e-9)


def test_background_term_is_the_mean_of_per_image_variances():
    """Closed form: two constant images (each variance 0) and one +-1 checkerboard (variance n / (n-1))."""
    R = torch.zeros(3, 3, 4, 4, dtype=torch.float64)
    R[0], R[1] = 2.0, -2.0  # a batch-pooled variance would be ~8/3 here; per image it is 0
    R[2] = torch.where((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 == 0, 1.0, -1.0)
    n = 3 * 4 * 4
    want = (0 + 0 + n / (n - 1)) / 3
    assert background_term(R, torch.zeros(3, 1, 4, 4, dtype=torch.float64)).item() == pytest.approx(want, rel=1e-12)
    half = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    half[..., :2] = 1.0  # M = 1 on the left half: R * (1 - M) keeps the right half only, zeros elsewhere
    kept = (R * (1 - half)).flatten(1)
    want = sum(float(np.var(k.numpy(), ddof=1)) for k in kept) / 3
    assert background_term(R, half).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("shape,window", [((2, 16, 16), 5), ((3, 64, 64), None), ((2, 64, 64), 31),
                                          ((2, 24, 40), 7), ((2, 32, 32), 1)])
def test_adaptive_mask_equals_full_sort_reference(shape, window):
    """Independent of sib.loss: full sort for every quantile, avg_pool2d counting the zero padding."""
    b, h, w = shape
    R = _structured_R(b, h, w, seed=h + w).requires_grad_(True)
    ours = adaptive_mask(R, window=window)
    ref = _reference_adaptive_mask(R, default_window(h, w) if window is None else window)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert ref.std() > 0.1  # not a constant mask: a wrong quantile or pooling moves it
    (g1,) = torch.autograd.grad((ours * torch.linspace(0, 1, ours.numel(), dtype=ours.dtype).view_as(ours)).sum(), R)
    (g2,) = torch.autograd.grad((ref * torch.linspace(0, 1, ref.numel(), dtype=ref.dtype).view_as(ref)).sum(), R)
    torch.testing.assert_close(g1, g2, atol=1e-6 * g2.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("q", [0.05, 0.8, 0.95, 0.0, 1.0, 0.5])
def test_soft_quantile_equals_full_sort_formula(q):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 1000, generator=g, dtype=torch.float64, requires_grad=True)
    ours = soft_quantile(v, q)
    ref = _reference_soft_quantile(v, q)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)  # weights left out: < e^-15
    (g1,) = torch.autograd.grad(ours.sum(), v)
    (g2,) = torch.autograd.grad(ref.sum(), v)
    torch.testing.assert_close(g1, g2, atol=1e-8, rtol=0)  # each weight left out is < e^-20 = 2.1e-9


def test_default_window_rule():
    assert default_window(224, 224) == 31
    assert default_window(64, 64) == 9
    assert default_window(32, 32) == 5
    assert default_window(448, 448) == 63
    assert default_window(8, 8) == 3
    assert default_window(224, 300) == 31  # the shorter side decides
    for s in range(8, 600, 7):
        assert default_window(s, s) % 2 == 1


def test_adaptive_mask_rejects_even_window():
    with pytest.raises(ValueError, match="odd"):
        adaptive_mask(torch.randn(2, 3, 16, 16), window=4)


class SmoothNet(nn.Module):
    """Smooth (tanh) tiny conv net, so finite differences are meaningful in gradcheck."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


def test_vjp_map_equals_autograd_vjp_closed_form():
    torch.manual_seed(0)
    model = SmoothNet().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    R = vjp_map(model(x), x)
    # independent route: d(0.5 sum p^2)/dz_j = p_j (p_j - sum_k p_k^2), then a VJP through the model
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
        cot = p * (p - (p * p).sum(dim=1, keepdim=True))
    _, R_ref = torch.autograd.functional.vjp(model, x.detach(), v=cot)
    # float64 logits keep float64 (the layer-level finite-difference tests need it): exact to rounding
    torch.testing.assert_close(R, R_ref, atol=1e-12, rtol=1e-10)
    assert R.dtype == torch.float64 and R.shape == x.shape
    x32 = x.detach().float().requires_grad_()
    R32 = vjp_map(model.float()(x32), x32)
    assert R32.dtype == torch.float32
    torch.testing.assert_close(R32.double(), R_ref, atol=1e-6, rtol=1e-5)


def test_vjp_map_requires_grad_on_input():
    model = SmoothNet()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="requires_grad"):
        vjp_map(model(x), x)


def test_gradcheck_whole_regulariser_wrt_parameters():
    """float64 gradcheck of the full S-IB regulariser (R, mask, both terms) w.r.t. model parameters."""
    torch.manual_seed(0)
    model = SmoothNet().double()
    x0 = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    names, params = zip(*model.named_parameters(), strict=True)

    def reg(*ps):
        x = x0.clone().requires_grad_(True)
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        p = torch.softmax(out, dim=1)
        (R,) = torch.autograd.grad(0.5 * (p * p).sum(), x, create_graph=True)
        M = adaptive_mask(R, window=3)
        a = F.normalize((R * M).flatten(1), dim=1)
        b = F.normalize((x * M).flatten(1), dim=1)
        return 1000 * torch.exp(background_term(R, M)) + 0.01 * torch.exp(-hsic(a, b))

    ps = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(reg, ps, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_module_gradient_reaches_parameters_and_equals_functional():
    torch.manual_seed(0)
    model = SmoothNet()
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    terms = SpatialIB()(x, model(x))
    terms.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    x2 = x.detach().clone().requires_grad_(True)
    R = vjp_map(model(x2), x2)
    _, h, bg, _ = _regulariser_on_R(R, x2, window=default_window(16, 16))
    torch.testing.assert_close(terms.hsic, h.detach())
    torch.testing.assert_close(terms.background, bg.detach())
    assert 0 < terms.coverage < 1 and terms.mask.shape == (4, 1, 16, 16)


def test_no_overflow_when_R_is_large():
    torch.manual_seed(0)
    R = (torch.randn(4, 3, 16, 16) * 1e3).requires_grad_(True)
    x = torch.randn(4, 3, 16, 16)
    terms = SpatialIB()(x, torch.zeros(4, 3), R=R)
    assert terms.background > 1e5  # exp of this overflows float32 (and float64) in the reference
    assert math.isfinite(terms.loss.item())
    terms.loss.backward()
    assert torch.isfinite(R.grad).all() and R.grad.abs().sum() > 0


def test_safe_exp_equals_exp_below_threshold():
    R = torch.randn(4, 3, 16, 16) * 0.05
    x = torch.randn(4, 3, 16, 16)
    terms = SpatialIB()(x, torch.zeros(4, 3), R=R)
    expected = 1000 * torch.exp(terms.background) + 0.01 * torch.exp(-terms.hsic)
    torch.testing.assert_close(terms.loss, expected)


def test_batch_of_one_drops_foreground_term_with_warning():
    torch.manual_seed(0)
    model = SmoothNet()
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="batch of 1"):
        terms = SpatialIB()(x, model(x))
    assert torch.isnan(terms.hsic)
    torch.testing.assert_close(terms.loss, 1000 * torch.exp(terms.background))
    terms.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_pure_hsic_rejects_batch_of_one():
    with pytest.raises(ValueError, match="B >= 2"):
        hsic(torch.randn(1, 5), torch.randn(1, 5))


def test_hsic_closed_form_small_batch():
    # B = 2: H K H has entries +-(K11 + K22 - 2 K12) / 4
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    ka = (1 + 1 - 0) / 4
    kb = (1 + 1 - 2 * 0.6) / 4
    assert abs(hsic(a, b).item() - 4 * ka * kb / 1) < 1e-12


def test_ground_truth_mask_variant_and_shape_error():
    torch.manual_seed(0)
    model = SmoothNet()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    gt = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    gt[:, :, 4:12, 4:12] = True
    terms = SpatialIB()(x, model(x), mask=gt)
    assert terms.coverage.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="mask must be"):
        SpatialIB()(x, model(x), mask=gt[:, :, :8])


def test_linear_form():
    R = torch.randn(4, 3, 16, 16) * 0.05
    x = torch.randn(4, 3, 16, 16)
    terms = SpatialIB(form="linear")(x, torch.zeros(4, 3), R=R)
    torch.testing.assert_close(terms.loss, 1000 * terms.background - 0.01 * terms.hsic)
    with pytest.raises(ValueError, match="form"):
        SpatialIB(form="log")


def test_bf16_autocast_keeps_R_and_terms_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        R = vjp_map(logits, x)
        terms = SpatialIB()(x, logits, R=R)
    assert R.dtype == torch.float32 and terms.loss.dtype == torch.float32
    assert torch.isfinite(terms.loss)
    x32 = x.detach().clone().requires_grad_(True)
    R32 = vjp_map(model(x32), x32)
    assert F.cosine_similarity(R.flatten(), R32.flatten(), dim=0) > 0.95  # bf16 has ~3 significant digits
