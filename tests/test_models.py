"""Model factory, small-image stem rule, CAM layers, local weights, torchvision weights by name."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision

from sib.explain.layers import cam_reshape, cam_target_layer
from sib.models import SMALL_IMAGE_LIMIT, create_model


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid names:.*resnet18"):
        create_model("resnet19", 3)


@pytest.mark.parametrize("name", ["tiny_cnn", "small_cnn", "resnet18"])
def test_forward_shape(name):
    m = create_model(name, 5, image_size=32).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert m.sib_name == name and m.sib_num_classes == 5


def test_resnet_stem_rule():
    small = create_model("resnet18", 3, image_size=SMALL_IMAGE_LIMIT - 1)
    big = create_model("resnet18", 3, image_size=224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    feats = {}
    small.layer4.register_forward_hook(lambda m, i, o: feats.update(a=o.shape))  # returns None
    small.eval()(torch.randn(1, 3, 64, 64))
    assert feats["a"][-2:] == (4, 4)  # 64 px reaches layer4 as 4x4 (2x2 with the torchvision stem)


def test_cam_target_layers_by_family():
    r = create_model("resnet18", 3, 64)
    assert cam_target_layer(r) is r.layer4
    d = create_model("densenet121", 3, 64)
    assert cam_target_layer(d) is d.features
    v = create_model("vgg11_bn", 3, 64)
    assert cam_target_layer(v) is v.features
    t = create_model("tiny_cnn", 3)
    assert cam_target_layer(t) is t.features
    with pytest.raises(ValueError, match="target_layer"):
        cam_target_layer(torch.nn.Linear(3, 3))


def test_vit_cam_reshape_and_image_size():
    vit = create_model("vit_b_32", 3, image_size=64)
    assert isinstance(vit, torchvision.models.VisionTransformer) and vit.image_size == 64
    assert cam_target_layer(vit) is vit.encoder.layers[-1].ln_1
    tokens = torch.arange(2 * 5 * 4, dtype=torch.float32).view(2, 5, 4)  # 1 class token + 2x2 patches
    vit_small = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=1,
                                                     hidden_dim=4, mlp_dim=8, num_classes=3)
    grid = cam_reshape(vit_small)(tokens)
    assert grid.shape == (2, 4, 2, 2)
    assert torch.equal(grid[0, :, 0, 1], tokens[0, 2])  # patch 1 (row 0, col 1) is token 2
    assert cam_reshape(create_model("tiny_cnn", 3)) is None


def test_pretrained_local_file(tmp_path):
    a = create_model("tiny_cnn", 3)
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = create_model("tiny_cnn", 3, pretrained=tmp_path / "w.pt")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_model("tiny_cnn", 3, pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="do not fit"):
        create_model("tiny_cnn", 4, pretrained=tmp_path / "w.pt")


def test_mlp_shapes_sizes_and_input_check():
    m = create_model("mlp", 10, image_size=28).eval()
    assert m(torch.randn(4, 3, 28, 28)).shape == (4, 10)
    linears = [layer for layer in m.modules() if isinstance(layer, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(3 * 28 * 28, 50), (50, 30), (30, 10)]
    wide = create_model("mlp", 3, image_size=16, hidden=(20,))
    assert [lin.out_features for lin in wide.modules() if isinstance(lin, torch.nn.Linear)] == [20, 3]
    with pytest.raises(ValueError, match=r"built for \(B, 3, 28, 28\).*image_size=32"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="takes no options"):
        create_model("tiny_cnn", 3, hidden=(4,))


def test_mlp_cam_error_names_the_model_and_the_methods_that_work():
    from sib.explain import EXPLAINERS, explain

    m = create_model("mlp", 4, image_size=16).eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="'mlp' has no convolutional layer") as err:
        cam_target_layer(m)
    message = str(err.value)
    cams, working = message.split("; use a gradient method: ")
    for name in ("grad_cam", "score_cam", "eigen_cam"):
        assert name in cams and name not in working
        with pytest.raises(ValueError, match="'mlp' has no convolutional layer"):
            explain(name, m, x, y)
    working = working.split(", ")
    assert {"saliency", "input_x_gradient", "integrated_gradients"} <= set(working)
    assert set(working) < set(EXPLAINERS.names())
    for name in working:  # every method the message recommends runs on the MLP
        attr = explain(name, m, x, y)
        assert attr.shape == (2, 1, 16, 16) and bool(torch.isfinite(attr).all()) and bool(attr.abs().sum() > 0)


# ------------------------------------------------------------------ --pretrained by torchvision weight name

def _cache_file(torch_home, weights) -> Path:
    """Where torch hub keeps `weights`: TORCH_HOME/hub/checkpoints/<file name of the URL>."""
    return Path(torch_home) / "hub" / "checkpoints" / Path(urlparse(weights.url).path).name


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache under tmp_path, and every download routed to a closed local port (fails at once)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "torch_home"


def test_pretrained_weight_name_is_read_from_the_hub_cache(offline):
    weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    source = torchvision.models.squeezenet1_1(num_classes=1000).state_dict()  # stands for the published file
    cached = _cache_file(offline, weights)
    cached.parent.mkdir(parents=True)
    torch.save(source, cached)
    for name in ("IMAGENET1K_V1", "DEFAULT", "SqueezeNet1_1_Weights.IMAGENET1K_V1"):
        model = create_model("squeezenet1_1", 1000, 64, pretrained=name)
        assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items()), name
    # another class count: every weight but the classifier's is loaded, the head is the new size
    model = create_model("squeezenet1_1", 3, 64, pretrained="IMAGENET1K_V1")
    state = model.state_dict()
    head = {"classifier.1.weight", "classifier.1.bias"}
    assert state["classifier.1.weight"].shape == (3, 512, 1, 1)
    assert all(torch.equal(v, source[k]) for k, v in state.items() if k not in head)
    assert sorted(k for k, v in state.items() if v.shape != source[k].shape) == sorted(head)


def test_pretrained_weight_name_missing_offline_is_a_clear_error(offline):
    weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    cached = _cache_file(offline, weights)
    with pytest.raises(FileNotFoundError) as err:
        create_model("squeezenet1_1", 3, 64, pretrained="IMAGENET1K_V1")
    message = str(err.value)
    assert "--pretrained IMAGENET1K_V1" in message and str(cached) in message and weights.url in message
    assert "not in the torch hub cache" in message and "\n" not in message
    assert not cached.exists()  # nothing half-downloaded is left to be mistaken for the weights


def test_pretrained_weight_name_errors(offline, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"not a file, nor a torchvision weight name of squeezenet1_1; valid names: "
                                         r"DEFAULT, IMAGENET1K_V1"):
        create_model("squeezenet1_1", 3, 64, pretrained="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="model 'tiny_cnn' has no torchvision weights"):
        create_model("tiny_cnn", 3, 32, pretrained="DEFAULT")
    # a file of another model under this one's cache name: refused, naming the keys that do not fit
    cached = _cache_file(offline, torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1)
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_0().state_dict(), cached)
    with pytest.raises(ValueError, match=r"do not fit this squeezenet1_1: features\.0\.weight \(96, 3, 7, 7\) vs "
                                         r"\(64, 3, 3, 3\)"):
        create_model("squeezenet1_1", 1000, 64, pretrained="IMAGENET1K_V1")
    # a local file whose name looks like a weight name is still a file
    monkeypatch.chdir(tmp_path)
    source = create_model("tiny_cnn", 3)
    torch.save(source.state_dict(), "DEFAULT")
    model = create_model("tiny_cnn", 3, pretrained="DEFAULT")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
