"""Tiny seeded models of every family the explainers must support (milliseconds per call on a CPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from sib.models import create_model


def _vit() -> nn.Module:
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                             hidden_dim=16, mlp_dim=32, num_classes=3)
    nn.init.normal_(m.heads.head.weight)  # torchvision zero-initialises the head: logits would be constant
    return m


def _densenet() -> nn.Module:
    # Two blocks: a 32 px image reaches norm5 as a 4x4 map.
    return torchvision.models.DenseNet(growth_rate=8, block_config=(1, 1), num_init_features=8, bn_size=2,
                                       num_classes=3)


def _vgg() -> nn.Module:
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    with torch.device("meta"):  # the default 25088x4096 head would take seconds to initialise
        m = torchvision.models.VGG(nn.Sequential(), num_classes=3, init_weights=False)
    m.features, m.avgpool = features, nn.AdaptiveAvgPool2d((7, 7))
    m.classifier = nn.Linear(8 * 7 * 7, 3)
    return m


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "tiny_cnn": lambda: create_model("tiny_cnn", 3),
    "small_cnn": lambda: create_model("small_cnn", 3),
    "resnet18": lambda: create_model("resnet18", 3, 32),
    "densenet": _densenet,
    "vgg": _vgg,
    "vit": _vit,
}


@pytest.fixture
def build() -> Callable[[str], nn.Module]:
    """build(arch) -> a freshly initialised (seed 0) model in eval mode, for 32 px inputs."""

    def make(arch: str) -> nn.Module:
        torch.manual_seed(0)
        return ARCHS[arch]().eval()

    return make


_SHARED: dict[str, nn.Module] = {}


@pytest.fixture
def shared() -> Callable[[str], nn.Module]:
    """shared(arch) -> one eval-mode model per arch for the whole session; only for tests that do not
    modify it (explainers must not: the contract tests check that on fresh models)."""

    def get(arch: str) -> nn.Module:
        if arch not in _SHARED:
            torch.manual_seed(0)
            _SHARED[arch] = ARCHS[arch]().eval()
        return _SHARED[arch]

    return get


def hooks_on(model: nn.Module) -> int:
    """Number of module hooks of every kind on the model and its submodules."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    total = sum(len(getattr(m, k, {})) for m in model.modules() for k in kinds)
    # Tensor hooks on parameters (e.g. param.register_hook) live on the tensor.
    total += sum(len(p._backward_hooks or {}) for p in model.parameters())
    # Global module hooks (nn.modules.module.register_module_forward_hook and friends).
    glob = nn.modules.module
    return total + sum(len(getattr(glob, k)) for k in dir(glob) if k.startswith("_global_") and
                       k.endswith("hooks") and isinstance(getattr(glob, k), dict))


@pytest.fixture
def count_hooks() -> Callable[[nn.Module], int]:
    return hooks_on
