"""Correctness of every explainer against closed forms and independent implementations.

Gradient methods that use Captum are checked against plain `torch.autograd` (closed forms on linear
models, an own Gauss-Legendre quadrature for IG); CAM methods against hand-evaluated formulas on a
global-average-pooling model, and (marker `parity`) against pytorch-grad-cam; our own SmoothGrad against
Captum's NoiseTunnel fed the same noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sib.explain import EXPLAINERS, explain, normalize_attr

# Every registered explainer -> the tests in this module that check its values (not just its contract).
REFERENCE_TESTS = {
    "saliency": ["test_gradient_methods_on_a_linear_model", "test_gradient_methods_match_autograd"],
    "input_x_gradient": ["test_gradient_methods_on_a_linear_model", "test_gradient_methods_match_autograd"],
    "integrated_gradients": ["test_gradient_methods_on_a_linear_model", "test_ig_completeness",
                             "test_ig_matches_own_quadrature"],
    "smoothgrad": ["test_gradient_methods_on_a_linear_model", "test_smoothgrad_matches_captum"],
    "grad_cam": ["test_cams_on_a_gap_model", "test_cams_match_pytorch_grad_cam"],
    "grad_cam_pp": ["test_cams_on_a_gap_model", "test_cams_match_pytorch_grad_cam"],
    "xgrad_cam": ["test_cams_on_a_gap_model", "test_cams_match_pytorch_grad_cam"],
    "layer_cam": ["test_cams_on_a_gap_model", "test_cams_match_pytorch_grad_cam"],
    "eigen_cam": ["test_cams_on_a_gap_model", "test_cams_match_pytorch_grad_cam"],
    "score_cam": ["test_cams_on_a_gap_model", "test_cams_match_pytorch_grad_cam"],
}


def test_every_explainer_has_a_reference_test():
    assert set(REFERENCE_TESTS) == set(EXPLAINERS.names()), "add a correctness test for each new explainer"
    for tests in REFERENCE_TESTS.values():
        assert all(callable(globals().get(t)) for t in tests)


def data(n: int = 2, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.tensor([2, 0, 1, 2][:n])


# ---------------------------------------------------------------- gradient family: closed forms


def test_gradient_methods_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    x, y = data()
    w = model[1].weight[y].detach().view(2, 3, 8, 8)  # d logit_y / d x, exactly
    expected = {
        "saliency": w.abs().amax(1, keepdim=True),
        "input_x_gradient": (w * x).sum(1, keepdim=True),  # each pixel's exact share of the logit
        "integrated_gradients": (w * x).sum(1, keepdim=True),  # zero baseline: IG == x * w on a linear model
        "smoothgrad": w.sum(1, keepdim=True),  # the gradient does not depend on the noise
    }
    for name, want in expected.items():
        torch.testing.assert_close(explain(name, model, x, y), want, rtol=1e-5, atol=1e-6)


class Smooth(nn.Module):
    """A smooth (tanh, softplus) conv net: IG's quadrature converges, gradients are informative."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.softplus(torch.tanh(self.conv(x))).flatten(1))


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, y[:, None]).sum(), x)
    return g


def test_gradient_methods_match_autograd():
    torch.manual_seed(0)
    model = Smooth().eval()
    x, y = data()
    g = input_grad(model, x, y)
    torch.testing.assert_close(explain("saliency", model, x, y), g.abs().amax(1, keepdim=True),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(explain("input_x_gradient", model, x, y), (g * x).sum(1, keepdim=True),
                               rtol=1e-5, atol=1e-7)


def test_ig_completeness():
    torch.manual_seed(0)
    model = Smooth().eval()
    x, y = data()
    attr = explain("integrated_gradients", model, x, y, n_steps=64)
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(attr.sum((1, 2, 3)), gap, rtol=1e-4, atol=1e-5)
    shifted = explain("integrated_gradients", model, x, y, n_steps=64, baseline=0.5)
    with torch.no_grad():
        gap = (model(x) - model(torch.full_like(x, 0.5))).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(shifted.sum((1, 2, 3)), gap, rtol=1e-4, atol=1e-5)


def test_ig_matches_own_quadrature():
    torch.manual_seed(0)
    model = Smooth().eval()
    x, y = data()
    nodes, weights = np.polynomial.legendre.leggauss(16)  # on [-1, 1] -> map to [0, 1]
    total = torch.zeros_like(x)
    for t, w in zip((nodes + 1) / 2, weights / 2, strict=True):
        total += float(w) * input_grad(model, float(t) * x, y)
    want = (x * total).sum(1, keepdim=True)
    got = explain("integrated_gradients", model, x, y, n_steps=16, method="gausslegendre")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parity
def test_smoothgrad_matches_captum():
    from captum.attr import NoiseTunnel, Saliency

    torch.manual_seed(0)
    model = Smooth().eval()
    x, y = data(1)
    ours = explain("smoothgrad", model, x, y, n_samples=8, noise_level=0.2, seed=3)
    sigma = 0.2 * (x.max() - x.min()).item()
    torch.manual_seed(3)  # Captum draws its noise from the global RNG: the same numbers as our generator
    ref = NoiseTunnel(Saliency(model)).attribute(x.clone().requires_grad_(True), nt_type="smoothgrad",
                                                 nt_samples=8, stdevs=sigma, target=y, abs=False)
    torch.testing.assert_close(ours, ref.sum(1, keepdim=True), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours, explain("smoothgrad", model, x, y, n_samples=8, noise_level=0.2, seed=4))


# ---------------------------------------------------------------- CAM family: hand-evaluated formulas


def test_cams_on_a_gap_model(build):
    """tiny_cnn is features (full resolution) -> global average pool -> linear: d logit / d A = w / hw."""
    model = build("tiny_cnn")
    x, y = data(2, size=8)
    with torch.no_grad():
        acts = model.features(x)  # (B, K, H, W), >= 0 (ReLU)
    hw = 64
    g = model.fc.weight[y].detach() / hw  # (B, K): the gradient, constant over positions
    s = acts.sum((2, 3))  # (B, K)

    def weighted(wts: torch.Tensor) -> torch.Tensor:
        return F.relu((wts[:, :, None, None] * acts).sum(1, keepdim=True))

    alpha = g**2 / (2 * g**2 + s * g**3 + 1e-6)  # Grad-CAM++ with a constant gradient per channel
    want = {
        "grad_cam": weighted(g),
        "xgrad_cam": weighted(g * s / (s + 1e-7)),
        "layer_cam": weighted(F.relu(g)),
        "grad_cam_pp": weighted(hw * alpha * F.relu(g)),
    }
    for name, expected in want.items():
        torch.testing.assert_close(explain(name, model, x, y), expected, rtol=1e-5, atol=1e-8)

    # Eigen-CAM: first principal direction of the (H*W, K) activation matrix, salient side positive.
    eig = []
    for a in acts.double().numpy():
        m = a.reshape(a.shape[0], -1).T
        m = m - m.mean(0)
        proj = m @ np.linalg.svd(m)[2][0]
        proj = -proj if abs(proj.min()) > abs(proj.max()) else proj
        eig.append(np.maximum(proj, 0).reshape(1, 8, 8))
    torch.testing.assert_close(explain("eigen_cam", model, x, y), torch.tensor(np.stack(eig)).float(),
                               rtol=1e-4, atol=1e-5)

    # Score-CAM, one masked forward pass at a time.
    expected = []
    for i in range(2):
        scores = []
        for k in range(acts.shape[1]):
            m = acts[i, k]
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)  # same size as x: upsampling is the identity
            with torch.no_grad():
                scores.append(model(x[i:i + 1] * m)[0, y[i]])
        w = torch.softmax(torch.stack(scores), 0)
        expected.append(F.relu((w[:, None, None] * acts[i]).sum(0))[None])
    torch.testing.assert_close(explain("score_cam", model, x, y), torch.stack(expected), rtol=1e-5,
                               atol=1e-7)


def _bilinear(low: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to (size, size), half-pixel centres (align_corners=False),
    edges clamped: written out from the definition, independent of torch's interpolate."""
    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    (y0, y1, fy), (x0, x1, fx) = axis(low.shape[0]), axis(low.shape[1])
    top = low[y0][:, x0] * (1 - fx) + low[y0][:, x1] * fx
    bottom = low[y1][:, x0] * (1 - fx) + low[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_cam_upsampling_is_bilinear_from_the_layer_map(build):
    model = build("resnet18")
    x, y = data(1, size=32)
    # the layer map by hand: layer4's activations A (2x2 at 32 px: small-image stem) and d logit_y / d A
    acts = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: acts.append(o))
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, y[0]], acts[0])
    a, g = acts[0][0].detach().double().numpy(), grad[0].double().numpy()  # (K, 2, 2)
    low = np.maximum((g.mean((1, 2))[:, None, None] * a).sum(0), 0)  # Grad-CAM on the layer grid
    assert low.shape == (2, 2) and np.ptp(low) > 1e-3 * np.abs(low).max()  # a map that upsampling can reveal
    want = _bilinear(low, 32)
    attr = explain("grad_cam", model, x, y)
    torch.testing.assert_close(attr[0, 0].double(), torch.tensor(want), rtol=1e-4, atol=1e-6 * np.abs(low).max())
    # nearest upsampling (one constant 16x16 block per cell) is far from it
    assert np.abs(np.kron(low, np.ones((16, 16))) - want).max() > 0.1 * np.ptp(low)


# ---------------------------------------------------------------- parity with pytorch-grad-cam


@pytest.mark.parity
@pytest.mark.parametrize("arch,size", [("tiny_cnn", 16), ("small_cnn", 32), ("vit", 32)])
def test_cams_match_pytorch_grad_cam(arch, size, build):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    from sib.explain.layers import cam_reshape, cam_target_layer

    class SignedEigenCAM(pgc.EigenCAM):
        """pytorch-grad-cam's Eigen-CAM with its own Seg-Eigen-CAM sign correction (our documented rule)."""

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads,
                          eigen_smooth):
            return get_2d_projection_with_sign_correction(activations)

    refs = {"grad_cam": pgc.GradCAM, "grad_cam_pp": pgc.GradCAMPlusPlus, "xgrad_cam": pgc.XGradCAM,
            "layer_cam": pgc.LayerCAM, "eigen_cam": SignedEigenCAM, "score_cam": pgc.ScoreCAM}
    model = build(arch)
    x, y = data(2, size=size, seed=1)
    worst = 0.0
    for name, cls in refs.items():
        ours = normalize_attr(explain(name, model, x, y), mode="minmax")[:, 0]
        with cls(model=model, target_layers=[cam_target_layer(model)],
                 reshape_transform=cam_reshape(model)) as cam:
            cam.batch_size = 64
            ref = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in y]))
        worst = max(worst, (ours - ref).abs().max().item())
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    print(f"max |ours - pytorch-grad-cam| on {arch}: {worst:.2e}")
