"""The linear-cost adaptive mask (running-sum box filter, one selection per soft quantile) against the
former direct form: `avg_pool2d` with a w x w kernel and one `kthvalue` pass per order statistic.

float64: the same numbers to 1e-12 (values; gradients relative to their largest entry).
float32: compared with the former form evaluated in float64 on the same float32 input (its exact value):
the former float32 mask is itself 1e-6 to 2e-5 away from that (a w x w float32 sum), ours ~1e-7. Values
to 1e-6. Gradients to 1e-5 of their largest entry: the gradient of each soft threshold is a sum over all
H*W pixels with heavy cancellation, so float32 gradients of *any* summation order differ at that level
at 448 px (measured: ours 3e-7 .. 4.5e-6, the former float32 mask up to 3e-2 where order statistics swap).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sib.loss import _order_statistic_indices, adaptive_mask, box_filter, default_window, soft_quantile


def _direct_box(h: torch.Tensor, window: int) -> torch.Tensor:
    """The former box filter: a window x window average, zero padding counted."""
    return F.avg_pool2d(h, kernel_size=window, stride=1, padding=window // 2)


def _kthvalue_soft_quantile(values: torch.Tensor, q: float, temperature: float = 0.1) -> torch.Tensor:
    """The former soft quantile: one kthvalue pass per order statistic near q(n-1), 2 on each side."""
    n = values.shape[1]
    centre = q * (n - 1)
    ranks = range(max(0, math.floor(centre) - 1), min(n - 1, math.floor(centre) + 2) + 1)
    logits = torch.tensor([-abs(i - centre) / temperature for i in ranks], dtype=torch.float64)
    out = values.new_zeros(values.shape[0])
    for rank, weight in zip(ranks, torch.softmax(logits, dim=0).tolist(), strict=True):
        out = out + weight * values.kthvalue(rank + 1, dim=1).values
    return out


def _direct_mask(R: torch.Tensor, window: int | None = None, temperature: float = 0.1,
                 slope: float = 10.0) -> torch.Tensor:
    """The former `adaptive_mask`, line for line."""
    B, _, H, W = R.shape
    window = default_window(H, W) if window is None else window

    def q(t: torch.Tensor, level: float) -> torch.Tensor:
        return _kthvalue_soft_quantile(t.flatten(1), level, temperature).view(B, 1, 1, 1)

    g = R.mean(dim=1, keepdim=True).abs()
    lo, hi = q(g, 0.05), q(g, 0.95)
    gn = (g - lo) / (hi - lo + 1e-8)
    h = torch.sigmoid(slope * (gn - q(gn, 0.8)))
    d = _direct_box(h, window)
    return torch.sigmoid(slope * (d - q(d, 0.8)))


def _structured_R(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A VJP-like map in float64: a signed blob (the 'object') plus per-channel noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    centre = torch.rand(b, 2, 1, 1, generator=g, dtype=torch.float64) - 0.5
    blob = torch.exp(-((yy - centre[:, :1]) ** 2 + (xx - centre[:, 1:]) ** 2) / 0.1)  # (B, 1, H, W)
    sign = torch.randn(b, 3, 1, 1, generator=g, dtype=torch.float64)
    return 0.05 * sign * blob + 0.01 * torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)


def _value_and_grad(fn, x: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and the vector-Jacobian product cotangent^T d fn / dx, both detached, as float64."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y, x, cotangent.to(y.dtype))
    return y.detach().double(), g.double()


def _compare(fast, direct, x: torch.Tensor, out_shape: tuple[int, ...], value_tol: float, grad_tol: float) -> None:
    """fast(x) against direct(x in float64): values (absolute) and gradients (relative to the largest entry)."""
    cot = torch.randn(out_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    v_fast, g_fast = _value_and_grad(fast, x, cot)
    v_ref, g_ref = _value_and_grad(direct, x.double(), cot)  # float32 inputs are exact in float64
    assert v_fast.shape == v_ref.shape
    assert (v_fast - v_ref).abs().max().item() <= value_tol
    assert g_ref.abs().max().item() > 0  # a vanishing gradient would make the comparison empty
    assert ((g_fast - g_ref).abs().max() / g_ref.abs().max()).item() <= grad_tol


# (H, W, window): even and odd sides at 64, 224 and 448 px with the default window; windows >= the side
SHAPES = [(64, 64, None), (63, 65, None), (224, 224, None), (225, 223, None), (448, 447, None),
          (64, 64, 65), (63, 63, 63), (64, 63, 95), (65, 64, 67)]
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5)}  # (values, gradients)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H,W,window", SHAPES + [(32, 32, 1), (31, 33, 3)])
def test_box_filter_equals_direct_avg_pool(H, W, window, dtype):
    window = default_window(H, W) if window is None else window
    B = 2 if H * W <= 70 * 70 else 1  # the former form costs window^2 per pixel
    h = torch.rand(B, 1, H, W, generator=torch.Generator().manual_seed(H + W), dtype=torch.float64).to(dtype)
    value_tol = 1e-12 if dtype == torch.float64 else 1e-6
    _compare(lambda t: box_filter(t, window), lambda t: _direct_box(t, window), h, (B, 1, H, W), value_tol, value_tol)
    assert box_filter(h, window).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H,W,window", SHAPES)
def test_adaptive_mask_equals_direct_form(H, W, window, dtype):
    B = 2 if H * W <= 70 * 70 else 1  # the former form costs window^2 per pixel
    R = _structured_R(B, H, W, seed=H + 3 * W).to(dtype)
    value_tol, grad_tol = TOLERANCES[dtype]
    _compare(lambda t: adaptive_mask(t, window), lambda t: _direct_mask(t, window), R, (B, 1, H, W),
             value_tol, grad_tol)
    assert _direct_mask(R.double(), window).std() > 0.01  # not constant (windows >= the side flatten it)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 1000])
@pytest.mark.parametrize("q", [0.0, 0.05, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_soft_quantile_equals_kthvalue_form(n, q, ties):
    """Same values as one kthvalue per order statistic (exactly), ties included; gradient mass = 1 per row."""
    gen = torch.Generator().manual_seed(n)
    v = torch.randint(0, 4, (3, n), generator=gen).double() if ties else torch.randn(3, n, generator=gen,
                                                                                       dtype=torch.float64)
    v.requires_grad_(True)
    ours = soft_quantile(v, q)
    torch.testing.assert_close(ours, _kthvalue_soft_quantile(v, q), atol=0, rtol=0)
    (g_ours,) = torch.autograd.grad(ours.sum(), v)
    torch.testing.assert_close(g_ours.sum(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-15, rtol=0)
    if not ties:  # distinct values: the gradient goes to the same elements with the same weights
        (g_ref,) = torch.autograd.grad(_kthvalue_soft_quantile(v, q).sum(), v)
        torch.testing.assert_close(g_ours, g_ref, atol=1e-15, rtol=0)


@pytest.mark.parametrize("levels", [2, 5, 1000])
def test_order_statistic_indices_are_the_sorted_ranks(levels):
    """Every window of consecutive ranks, ends included, with few or no ties: the values of sort()."""
    v = torch.randint(0, levels, (4, 50), generator=torch.Generator().manual_seed(levels)).float()
    s, _ = v.sort(dim=1)
    for count in (1, 2, 4):
        for lo in range(0, 50 - count + 1):
            idx = _order_statistic_indices(v, lo, count)
            assert idx.shape == (4, count)
            torch.testing.assert_close(v.gather(1, idx), s[:, lo:lo + count], atol=0, rtol=0)


def test_box_filter_rejects_even_window():
    with pytest.raises(ValueError, match="box_filter: window must be a positive odd integer, got 4"):
        box_filter(torch.zeros(1, 1, 8, 8), 4)
