"""Contract tests generated from the registry: every explainer in EXPLAINERS is checked here.

A method added to the registry is picked up automatically; it must also get a correctness test
(`REFERENCE_TESTS` in test_reference.py), or `test_every_explainer_has_a_reference_test` fails there.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sib.explain import EXPLAINERS, explain
from sib.registry import UnknownNameError

NAMES = EXPLAINERS.names()
CAMS = {"grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "score_cam", "eigen_cam"}
# Cheap settings so the suite stays fast; the defaults are exercised in test_reference.py.
FAST = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4}}


def run(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, **options) -> torch.Tensor:
    return explain(name, model, x, target, **{**FAST.get(name, {}), **options})


def batch(n: int = 3, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3


def test_registry_lists_the_ten_required_methods():
    required = {"grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "score_cam", "eigen_cam", "saliency",
                "input_x_gradient", "integrated_gradients", "smoothgrad"}
    assert required <= set(NAMES)


def test_unknown_explainer_lists_valid_names(build):
    with pytest.raises(UnknownNameError, match="valid names: .*grad_cam.*saliency"):
        explain("gradcam", build("tiny_cnn"), *batch())


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_shape_device_dtype_and_side_effects(name, mode, build, count_hooks):
    model = build("tiny_cnn").train(mode == "train")
    model.features[0].weight.requires_grad_(False)  # a frozen parameter must stay frozen
    sentinels = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinels[n].clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = batch()
    x_before = x.clone()

    attr = run(name, model, x, y)

    assert attr.shape == (3, 1, 32, 32) and attr.dtype == torch.float32 and attr.device == x.device
    assert not attr.requires_grad and torch.isfinite(attr).all() and attr.abs().sum() > 0
    assert model.training == (mode == "train")
    assert count_hooks(model) == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, sentinels[n]), f"{name} changed {n}.grad"
    assert torch.equal(x, x_before) and not x.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_batch_invariance(name, build):
    model = build("small_cnn")  # BatchNorm in eval mode: samples must not interact
    x, y = batch(3)
    full = run(name, model, x, y)
    for i in range(3):
        single = run(name, model, x[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(full[i:i + 1], single, rtol=1e-4, atol=1e-5 * full.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["shape", "float", "negative", "out_of_range", "length"])
def test_bad_target_is_a_clear_value_error_and_leaves_nothing_behind(name, bad, build, count_hooks):
    model = build("tiny_cnn")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x, y = batch(2)
    target = {"shape": y[:, None], "float": y.float(), "negative": torch.tensor([0, -1]),
              "out_of_range": torch.tensor([0, 3]), "length": y[:1]}[bad]
    with pytest.raises(ValueError, match="target"):
        run(name, model, x, target)
    assert count_hooks(model) == 0
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert not model.training


class Exploding(nn.Module):
    """tiny_cnn whose head raises: the exception happens after the CAM layer's hook has fired."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.features, self.pool = inner.features, inner.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pool(self.features(x))
        raise RuntimeError("boom")


@pytest.mark.parametrize("name", NAMES)
def test_model_that_raises_leaves_no_hooks(name, build, count_hooks):
    model = Exploding(build("tiny_cnn")).eval()
    layer = {"target_layer": model.features} if name in CAMS else {}
    with pytest.raises(RuntimeError, match="boom"):
        run(name, model, *batch(2), **layer)
    assert count_hooks(model) == 0 and not model.training


@pytest.mark.parametrize("arch", ["resnet18", "densenet", "vgg", "vit"])
@pytest.mark.parametrize("name", NAMES)
def test_every_family(name, arch, shared, count_hooks):
    model = shared(arch)
    x, y = batch(2)
    options = {}
    if name == "score_cam" and arch == "resnet18":
        options["target_layer"] = model.layer1  # one forward pass per channel: 64, not layer4's 512
    attr = run(name, model, x, y, **options)
    assert attr.shape == (2, 1, 32, 32) and torch.isfinite(attr).all()
    # A random net may give one sample an all-zero CAM (negative weights, ReLU); not both.
    assert attr.flatten(1).std(1).max() > 0, "maps are constant"
    if name in CAMS or name == "saliency":
        assert attr.min() >= 0
    assert count_hooks(model) == 0


@pytest.mark.parametrize("name", sorted(CAMS))
def test_cam_without_default_layer_says_which_option_to_pass(name, count_hooks):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x, y = batch(2)
    with pytest.raises(ValueError, match="target_layer="):
        run(name, model, x, y)
    attr = run(name, model, x, y, target_layer=model[1])
    assert attr.shape == (2, 1, 32, 32)
    assert count_hooks(model) == 0


@pytest.mark.parametrize("name", sorted(CAMS))
def test_cam_layer_that_is_never_called_is_a_value_error(name, build, count_hooks):
    model = build("tiny_cnn")
    with pytest.raises(ValueError, match="not called"):
        run(name, model, *batch(2), target_layer=nn.Conv2d(3, 3, 1))
    assert count_hooks(model) == 0


def test_explainers_work_under_no_grad(build):
    model = build("tiny_cnn")
    x, y = batch(2)
    with torch.no_grad():
        for name in NAMES:
            assert run(name, model, x, y).abs().sum() > 0, name
