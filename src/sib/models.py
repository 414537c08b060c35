"""Models by name (the layer each family's CAM methods read is chosen in `sib.explain.layers`).

`create_model(name, num_classes, image_size)` returns an `nn.Module` mapping normalised images
(B, 3, H, W) to logits (B, num_classes). Names:

- "tiny_cnn":  two 3x3 conv layers, 8 channels; for tests (milliseconds per step).
- "small_cnn": four conv-BN-ReLU blocks (32-64-128-128); the built-in demo's model (CPU minutes).
- "mlp":       flatten, then Linear-ReLU layers (hidden sizes 50, 30 by default), a linear head: the model
               family of Ross et al. 2017's Decoy MNIST. No convolutional layer, so CAM methods do not
               apply to it (`sib.explain.layers.cam_target_layer` says so); gradient methods do.
- "resnet18", "resnet50", "densenet121", "vgg16_bn", "vit_b_32", "vit_b_16", and any other
  torchvision classification model by its builder name ("efficientnet_b0", ...), trained from scratch
  unless `pretrained` is given.

Pretrained weights (`pretrained=`): a local state-dict file (or a sib checkpoint), or the name of one of the
model's torchvision weights (`IMAGENET1K_V1`, `DEFAULT`, or the full `ResNet18_Weights.IMAGENET1K_V1`). A name is
read from the torch hub cache, `torch.hub.get_dir()/checkpoints/<the file name of the weights' URL>` (set
TORCH_HOME to move it), where torchvision keeps it too; only when the file is absent is it downloaded (with
torchvision's hash check), and a failed download is a FileNotFoundError naming the weights, the cache path and
the URL, so an offline machine can be given the file by hand. Files are loaded with `weights_only=True` (never
unpickling code; torchvision's own loader does not). Keys, shapes and dtypes must match the model built here,
except the classifier head when `num_classes` differs from the weights' categories: it is left as initialised
(fine-tuning). So ResNets below 128 px (3x3 stem, below) and ViTs at another image size refuse ImageNet weights.

Small images (ResNet stem rule): for `image_size < 128` a ResNet's 7x7 stride-2 stem convolution is
replaced by a 3x3 stride-1 one (the max-pool is kept), so a 64 px image reaches layer4 as a 4x4 map
instead of 2x2, which is what CAM methods need to localise anything; at 224 px the torchvision stem is
unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

SMALL_IMAGE_LIMIT = 128  # below this input size, ResNet stems are adapted (see module docstring)


class TinyCNN(nn.Module):
    """Two 3x3 convolutions (8 channels), global average pooling, a linear head. For tests."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))  # (B, C, 1, 1) -> (B, C) -> (B, K)


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                               nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (32, 64, 128, 128 channels), three 2x max-pools, GAP, linear head.

    At 64 px the last block's map is 8x8, fine enough for CAMs; ~0.1 GFLOP per 64 px image.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(3, 32, True), _block(32, 64, True), _block(64, 128, True),
                                      _block(128, 128, False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))  # (B, C, 1, 1) -> (B, C) -> (B, K)


class MLP(nn.Module):
    """Flatten, then Linear-ReLU layers, then a linear head: 3*S*S -> hidden[0] -> ... -> num_classes.

    Args:
        num_classes: output size K.
        image_size: input side S (the first layer takes 3*S*S inputs).
        hidden: sizes of the hidden layers; (50, 30) as Ross et al. 2017's Decoy MNIST MLP.
    """

    def __init__(self, num_classes: int, image_size: int, hidden: tuple[int, ...] | list[int] = (50, 30)) -> None:
        super().__init__()
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"mlp: hidden sizes must be a non-empty list of positive integers, got {hidden!r}")
        self.image_size = image_size
        sizes = [3 * image_size * image_size, *(int(h) for h in hidden)]
        layers: list[nn.Module] = [nn.Flatten()]
        for cin, cout in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(cin, cout), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> logits (B, K)."""
        if tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"mlp was built for (B, 3, {self.image_size}, {self.image_size}) inputs, "
                             f"got {tuple(x.shape)}; create it with image_size={x.shape[-1]}")
        return self.fc(self.layers(x))


_CUSTOM: dict[str, Callable[..., nn.Module]] = {"tiny_cnn": TinyCNN, "small_cnn": SmallCNN, "mlp": MLP}
_TAKES_SIZE = {"mlp"}  # our models built for one input size (and taking options)


def available_models() -> list[str]:
    """Every name `create_model` accepts: our own models and torchvision's classification models."""
    return sorted(_CUSTOM) + sorted(torchvision.models.list_models(module=torchvision.models))


def create_model(name: str, num_classes: int, image_size: int = 224, pretrained: str | Path | None = None,
                 **options: Any) -> nn.Module:
    """Build a classifier by name.

    Args:
        name: see `available_models()`.
        num_classes: size of the output layer.
        image_size: input side in pixels; sets the ResNet stem rule and the ViT image size.
        pretrained: optional path of a local state dict (or a sib checkpoint holding "model") to load, or a
            torchvision weight name of this model ("IMAGENET1K_V1", "DEFAULT"; see the module docstring).
        **options: options of our own models (Python API only): "mlp" takes `hidden` (e.g. (50, 30)).

    Returns:
        nn.Module with attributes `sib_name` (the registry name) and `sib_num_classes`.
    """
    if options and name not in _TAKES_SIZE:
        raise ValueError(f"model {name!r} takes no options; got {sorted(options)}")
    if name in _CUSTOM:
        sized = (image_size,) if name in _TAKES_SIZE else ()
        model = _CUSTOM[name](num_classes, *sized, **options)
    else:
        valid = available_models()
        if name not in valid:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(valid)}")
        kwargs: dict = {"weights": None, "num_classes": num_classes}
        if name.startswith("vit_"):
            kwargs["image_size"] = image_size
        model = torchvision.models.get_model(name, **kwargs)
        if isinstance(model, torchvision.models.ResNet) and image_size < SMALL_IMAGE_LIMIT:
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    if pretrained is not None:
        if is_weight_name(pretrained) and not Path(pretrained).exists():
            _load_torchvision_weights(model, name, num_classes, str(pretrained))
        else:
            _load_weights(model, Path(pretrained))
    model.sib_name = name
    model.sib_num_classes = num_classes
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained {path}: no such file (expected a local state dict)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"--pretrained {path}: weights do not fit this model: {err}") from err


_WEIGHT_NAME = re.compile(r"([A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*")


def is_weight_name(pretrained: str | Path) -> bool:
    """Whether `pretrained` reads as a torchvision weight name (IMAGENET1K_V1, DEFAULT, X_Weights.NAME)."""
    return not isinstance(pretrained, Path) and _WEIGHT_NAME.fullmatch(pretrained) is not None


def torchvision_weights(model_name: str, weight_name: str) -> Any:
    """The torchvision weights enum member `weight_name` of model `model_name`.

    Raises:
        ValueError: the model has no torchvision weights, or none of that name (the valid names are listed).
    """
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise ValueError(f"--pretrained {weight_name}: model {model_name!r} has no torchvision weights; pass a "
                         f"local state-dict file") from None
    prefix, _, value = weight_name.rpartition(".")
    valid = ["DEFAULT", *(w.name for w in enum)]
    if (prefix and prefix != enum.__name__) or value not in valid:
        raise ValueError(f"--pretrained {weight_name}: not a file, nor a torchvision weight name of {model_name}; "
                         f"valid names: {', '.join(valid)} (or {enum.__name__}.<name>)")
    return enum.DEFAULT if value == "DEFAULT" else enum[value]


def weights_cache_file(weights: Any) -> Path:
    """Where torch hub keeps (and torchvision looks for) a weights file: <hub dir>/checkpoints/<URL file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _load_torchvision_weights(model: nn.Module, model_name: str, num_classes: int, weight_name: str) -> None:
    """Load torchvision weights by name from the hub cache (downloading them only when absent); see the module
    docstring for what must match."""
    weights = torchvision_weights(model_name, weight_name)
    cached = weights_cache_file(weights)
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            found = torch.hub.HASH_REGEX.search(cached.name)  # torchvision checks the hash its file names carry
            torch.hub.download_url_to_file(weights.url, str(cached), found.group(1) if found else None,
                                           progress=False)
        except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), a bad hash, a full disk
            raise FileNotFoundError(
                f"--pretrained {weight_name}: the weights {weights} of {model_name} are not in the torch hub cache "
                f"({cached}) and downloading them from {weights.url} failed ({err}); on a machine without network, "
                f"copy that file to {cached} (or set TORCH_HOME), or pass a local state-dict file") from err
    try:
        state = torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"--pretrained {weight_name}: {cached} is unreadable or not plain weights "
                         f"({type(err).__name__}); delete it to download it again") from err
    if isinstance(model, torchvision.models.DenseNet):  # old key names, renamed as torchvision's loader does
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.)", r"\1\2", k): v for k, v in state.items()}
    own = model.state_dict()
    categories = len(weights.meta.get("categories") or [])
    head, misfit = [], []
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if (value.shape[:1] == (categories,) and own[key].shape[:1] == (num_classes,)
                    and value.shape[1:] == own[key].shape[1:]):
                head.append(key)  # the classifier of another class count: left as initialised
            else:
                misfit.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
    misfit += [f"{k} missing" for k in own if k not in state] + [f"{k} unexpected" for k in state if k not in own]
    if misfit:
        hint = (f"; a ResNet below {SMALL_IMAGE_LIMIT} px gets a 3x3 stem (sib.models): use --image-size "
                f"{SMALL_IMAGE_LIMIT} or more with these weights"
                if isinstance(model, torchvision.models.ResNet) and any(m.startswith("conv1.") for m in misfit) else "")
        raise ValueError(f"--pretrained {weight_name}: the weights {weights} ({cached}) do not fit this "
                         f"{model_name}: {', '.join(misfit[:5])}{', ...' if len(misfit) > 5 else ''}{hint}")
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=not head)
