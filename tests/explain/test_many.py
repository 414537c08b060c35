"""explain_many: every method's map equals its single call; one forward serves the single-pass methods;
the explainer contract holds for the whole call (hooks, param.grad, requires_grad, training mode)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sib.explain import EXPLAINERS, explain, explain_many
from sib.registry import UnknownNameError

NAMES = EXPLAINERS.names()
SINGLE_PASS = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "eigen_cam", "saliency", "input_x_gradient"]
FAST = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4}}


def batch(n: int = 3, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3


def options_for(model: nn.Module) -> dict[str, dict]:
    opts = {k: dict(v) for k, v in FAST.items()}
    if hasattr(model, "layer1"):  # resnet18: Score-CAM on layer4 would be 512 masked passes per image
        opts["score_cam"] = {"target_layer": model.layer1, "batch_size": 64}
    return opts


@pytest.mark.parametrize("arch", ["tiny_cnn", "resnet18"])
def test_every_method_equals_its_single_call(arch, shared):
    model = shared(arch)
    x, y = batch()
    opts = options_for(model)
    many = explain_many(model, x, y, NAMES, opts)
    assert list(many) == NAMES
    for name in NAMES:
        single = explain(name, model, x, y, **opts.get(name, {}))
        assert many[name].shape == single.shape == (3, 1, 32, 32) and many[name].dtype == single.dtype
        scale = max(1.0, single.abs().max().item())
        diff = (many[name] - single).abs().max().item()
        assert diff <= 1e-6 * scale, f"{arch} {name}: max |many - single| = {diff:.2e} (scale {scale:.2e})"


class Counting(nn.Module):
    """The model, counting its forward calls (the test's own wrapper, not a hook)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_single_pass_methods_share_one_forward(build):
    inner = build("tiny_cnn")
    model = Counting(inner).eval()
    x, y = batch()
    layer = {"target_layer": inner.features}
    maps = explain_many(model, x, y, SINGLE_PASS, {m: layer for m in SINGLE_PASS[:5]})
    assert model.calls == 1 and set(maps) == set(SINGLE_PASS)
    model.calls = 0
    for name in SINGLE_PASS:
        explain(name, model, x, y, **(layer if name in SINGLE_PASS[:5] else {}))
    assert model.calls == len(SINGLE_PASS)  # what the shared pass saves


def test_two_cam_layers_in_one_pass(build):
    model = build("small_cnn")
    x, y = batch()
    layers = list(model.features.children())
    first, last = layers[2], layers[-1]
    opts = {"grad_cam": {"target_layer": first}, "layer_cam": {"target_layer": last},
            "eigen_cam": {"target_layer": first}}
    many = explain_many(model, x, y, list(opts), opts)
    for name, o in opts.items():
        torch.testing.assert_close(many[name], explain(name, model, x, y, **o), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_contract_side_effects(mode, build, count_hooks):
    model = build("tiny_cnn").train(mode == "train")
    model.features[0].weight.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    flags = [p.requires_grad for p in model.parameters()]
    x, y = batch()
    x_before = x.clone()
    maps = explain_many(model, x, y, NAMES, FAST)
    assert all(not a.requires_grad and torch.isfinite(a).all() for a in maps.values())
    assert model.training == (mode == "train") and count_hooks(model) == 0
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert torch.equal(x, x_before) and not x.requires_grad


class Exploding(nn.Module):
    """tiny_cnn whose head raises after the CAM layer's hook has fired."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.features, self.pool = inner.features, inner.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pool(self.features(x))
        raise RuntimeError("boom")


def test_exception_leaves_no_hooks_and_mode(build, count_hooks):
    model = Exploding(build("tiny_cnn")).train()
    opts = {m: {"target_layer": model.features} for m in SINGLE_PASS[:5]}
    with pytest.raises(RuntimeError, match="boom"):
        explain_many(model, *batch(2), SINGLE_PASS, opts)
    assert count_hooks(model) == 0 and model.training


def test_bad_input_is_a_clear_error_and_leaves_nothing(build, count_hooks):
    model = build("tiny_cnn")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x, y = batch(2)
    with pytest.raises(ValueError, match="target out of range"):
        explain_many(model, x, torch.tensor([0, 3]), SINGLE_PASS)
    with pytest.raises(ValueError, match="target must have shape"):
        explain_many(model, x, y[:1], SINGLE_PASS)
    with pytest.raises(UnknownNameError, match="valid names: .*grad_cam"):
        explain_many(model, x, y, ["gradcam"])
    with pytest.raises(ValueError, match=r"options name \['smoothgrad'\]"):
        explain_many(model, x, y, ["grad_cam"], {"smoothgrad": {}})
    with pytest.raises(TypeError, match="bogus"):  # an option the method does not take: its own call's error
        explain_many(model, x, y, ["grad_cam"], {"grad_cam": {"bogus": 1}})
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        explain_many(model, x, y, ["score_cam"], {"score_cam": {"batch_size": 0}})
    assert count_hooks(model) == 0 and all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_works_under_no_grad_and_keeps_batch_invariance(build):
    model = build("small_cnn")
    x, y = batch(3)
    with torch.no_grad():
        full = explain_many(model, x, y, SINGLE_PASS)
    for i in range(3):
        one = explain_many(model, x[i:i + 1], y[i:i + 1], SINGLE_PASS)
        for name in SINGLE_PASS:
            torch.testing.assert_close(full[name][i:i + 1], one[name], rtol=1e-4,
                                       atol=1e-5 * full[name].abs().max().item())
