"""Explanations at a layer as the regularised quantity (sib.guidance and the layer path of sib.regularizers).

Checked against independent references: Captum's LayerGradCam (forward values), a closed form of Grad-CAM on a
GAP + linear head, float64 finite differences of every layer-level loss, and the published input-level formulas
written out here (bitwise equality: the default settings did not change).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sib.guidance import capture, grad_cam_map, resolve_layer, to_image
from sib.loss import SpatialIB
from sib.models import create_model
from sib.regularizers import create_regularizer, resolve_explanation
from sib.step import step_loss


class Smooth(nn.Module):
    """A small CNN with smooth activations (finite differences need no ReLU kinks before the map)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                                      nn.Conv2d(4, 5, 3, padding=1), nn.Softplus())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, k)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _batch(b=4, s=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, s, s, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (b,), generator=g)
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[:, :, 1:5, 2:7] = True
    mask[0, :, 5:, :] = True  # images differ
    return x, y, mask


# ---- the map ----------------------------------------------------------------------------------------------

def test_layer_grad_cam_forward_equals_captum_layer_gradcam():
    from captum.attr import LayerGradCam

    torch.manual_seed(0)
    model = create_model("small_cnn", 3, 32).eval()
    x, y, _ = _batch(s=32)
    ref = LayerGradCam(model, model.features).attribute(x, target=y, relu_attributions=True)  # (B, 1, 4, 4)
    with capture(model, resolve_layer(model, "cam")) as cap:
        logits = model(x)
        ours = grad_cam_map(logits.gather(1, y[:, None]).sum(), cap.output, cap)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-8)
    assert ours.requires_grad  # ours keeps the graph: the channel weights are trainable, Captum's are constants


def test_grad_cam_on_a_gap_linear_head_is_the_class_weighted_activation_sum():
    torch.manual_seed(1)
    model = create_model("small_cnn", 3, 32)
    x, y, _ = _batch(s=32)
    with capture(model, resolve_layer(model, "cam")) as cap:
        logits = model(x)
        ours = grad_cam_map(logits.gather(1, y[:, None]).sum(), cap.output, cap)
        A = cap.output.detach()
    h, w = A.shape[-2:]
    closed = F.relu(torch.einsum("bk,bkhw->bhw", model.fc.weight[y].detach() / (h * w), A))[:, None]
    torch.testing.assert_close(ours.detach(), closed, rtol=1e-5, atol=1e-7)


def test_one_forward_per_regularised_step_and_no_hook_left():
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, 32)
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    x, y, mask = _batch(s=32)
    reg = create_regularizer("energy", layer="cam")
    _, ce, r = step_loss(model, reg, x, y, mask, regularise=True)
    (ce + r.loss).backward()
    assert len(calls) == 1
    assert not model.features._forward_hooks and reg._cap is None
    assert not x.requires_grad  # at a layer the input needs no gradient


# ---- gradients against float64 finite differences ----------------------------------------------------------

LAYER_CASES = [("energy", "grad_cam", "adaptive"), ("l1", "grad_cam", "adaptive"), ("rrr_star", "grad_cam", "adaptive"),
               ("hint", "grad_cam", "adaptive"), ("rrr", "grad_cam", "adaptive"), ("rrr", "gradient", "adaptive"),
               ("energy", "gradient", "adaptive"), ("sib", "vjp", "gt"), ("sib_logp", "vjp", "gt"),
               ("sib_logp", "vjp", "adaptive")]


@pytest.mark.parametrize("name,explanation,mask_source", LAYER_CASES)
def test_layer_loss_gradient_matches_float64_finite_differences(name, explanation, mask_source):
    torch.manual_seed(3)
    model = Smooth().double()
    x, y, mask = _batch(dtype=torch.float64, seed=4)
    kwargs = {"mask_source": mask_source, "sib_window": 3} if name.startswith("sib") else {}
    reg = create_regularizer(name, layer="features", explanation=explanation, **kwargs)
    conv, fc = model.features[3].weight, model.fc.weight

    def loss(w_conv, w_fc):
        params = {"features.3.weight": w_conv, "fc.weight": w_fc}
        with reg.capturing(model):
            logits = torch.func.functional_call(model, params, (x,))
            return reg(x, logits, y, mask).loss

    assert torch.autograd.gradcheck(loss, (conv.detach().clone().requires_grad_(),
                                           fc.detach().clone().requires_grad_()), eps=1e-6, atol=1e-5, rtol=1e-3)


# ---- the defaults are the published methods, bitwise ---------------------------------------------------------

def _published(name, x, logits, y, mask):
    """RRR, Energy and S-IB as published (the formulas written out here, independently of sib.regularizers)."""
    if name == "rrr":
        (g,) = torch.autograd.grad(torch.log_softmax(logits.float(), dim=1).sum(), x, create_graph=True)
        return ((g.float() * (~mask).float()) ** 2).flatten(1).sum(dim=1).mean()
    if name == "energy":
        (g,) = torch.autograd.grad(logits.float().gather(1, y[:, None]).sum(), x, create_graph=True)
        attr = torch.relu(g.float().sum(dim=1, keepdim=True))
        total, inside = attr.flatten(1).sum(dim=1), (attr * mask.float()).flatten(1).sum(dim=1)
        return (1 - torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))).mean()
    return SpatialIB()(x, logits).loss


@pytest.mark.parametrize("name", ["rrr", "energy", "sib"])
def test_input_level_defaults_are_bitwise_the_published_formulas(name):
    x, y, mask = _batch(s=16)
    grads = []
    for which in ("sib", "published"):
        torch.manual_seed(0)
        model = create_model("tiny_cnn", 3, 16)
        reg = create_regularizer(name)  # reg_layer input, reg_explanation auto: the defaults
        xi = x.clone()
        logits, ce, r = step_loss(model, reg, xi, y, mask, regularise=True)
        loss = r.loss if which == "sib" else _published(name, xi, logits, y, mask)
        grads.append([loss.detach()] + list(torch.autograd.grad(ce + loss, list(model.parameters()))))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


# ---- models and layers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size", [("resnet18", 32), ("densenet121", 64), ("vgg11_bn", 64), ("vit_b_32", 64)])
def test_cam_layer_guidance_trains_torchvision_families(name, size):
    torch.manual_seed(0)
    model = create_model(name, 3, size)
    if name.startswith("vit"):  # torchvision zero-initialises ViT's head: every explanation would be zero
        nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, 2])
    mask = torch.zeros(2, 1, size, size, dtype=torch.bool)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    layer = resolve_layer(model, "cam")
    stem = next(p for p in model.parameters() if p.dim() == 4)  # the first convolution: before the layer
    for reg in (create_regularizer("hint", layer="cam"), create_regularizer("sib", layer="cam", mask_source="gt")):
        _, ce, r = step_loss(model, reg, x.clone(), y, mask, regularise=True)
        assert torch.isfinite(r.loss) and r.maps["R"].shape == (2, 1, size, size)
        (grad,) = torch.autograd.grad(r.loss, [stem], allow_unused=True)
        # S-IB's VJP map is never zero, so its loss reaches the stem through the activations; HINT's Grad-CAM
        # may be all zero at initialisation (a constant loss), so it is only required to be finite there
        if reg.layer == "cam" and type(reg).__name__ == "SIBRegularizer":
            assert grad is not None and grad.abs().sum() > 0, name
        assert not layer._forward_hooks


def test_a_named_module_is_a_layer_and_an_unknown_one_is_named():
    model = create_model("small_cnn", 3, 32)
    assert resolve_layer(model, "features.2") is model.features[2]
    assert resolve_layer(model, "input") is None
    with pytest.raises(ValueError, match=r"--reg-layer 'layer9'.*SmallCNN has no module.*features\.0"):
        resolve_layer(model, "layer9")
    with pytest.raises(ValueError, match="no convolutional layer"):
        resolve_layer(create_model("mlp", 3, 8), "cam")


@pytest.mark.parametrize("name,layer,explanation,message", [
    ("energy", "input", "grad_cam", "grad_cam needs a layer"),
    ("energy", "cam", "vjp", "vjp is S-IB's"),
    ("sib", "cam", "grad_cam", "shapes its own map"),
    ("none", "cam", "auto", "apply to a regulariser"),
])
def test_combinations_without_an_explanation_are_refused(name, layer, explanation, message):
    with pytest.raises(ValueError, match=message):
        resolve_explanation(name, layer, explanation)


def test_auto_is_the_published_map_at_the_input_and_grad_cam_at_a_layer():
    assert resolve_explanation("energy", "input", "auto") == "gradient"
    assert resolve_explanation("energy", "cam", "auto") == "grad_cam"
    assert resolve_explanation("rrr", "layer3", "auto") == "grad_cam"
    assert resolve_explanation("sib", "cam", "auto") == resolve_explanation("sib", "input", "auto") == "vjp"


# ---- annotation budgets in the loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["input", "cam"])
def test_partial_annotation_averages_over_annotated_images_only(layer):
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, 32).eval()  # eval: BatchNorm's batch statistics would couple images
    x, y, mask = _batch(s=32)
    withheld = mask.clone()
    withheld[1:3] = False  # images 1 and 2 unannotated
    full = create_regularizer("energy", layer=layer)
    part = create_regularizer("energy", layer=layer, partial=True)
    keep = torch.tensor([0, 3])
    _, _, r_part = step_loss(model, part, x.clone(), y, withheld, regularise=True)
    _, _, r_sub = step_loss(model, full, x[keep].clone(), y[keep], mask[keep], regularise=True)
    torch.testing.assert_close(r_part.loss, r_sub.loss, rtol=1e-5, atol=1e-7)
    _, _, none = step_loss(model, part, x.clone(), y, torch.zeros_like(mask), regularise=True)
    assert none.loss.item() == 0.0


def test_layer_map_is_upsampled_bilinearly_to_the_image():
    m = torch.arange(4.0).view(1, 1, 2, 2)
    up = to_image(m, (4, 4))
    torch.testing.assert_close(up, F.interpolate(m, size=(4, 4), mode="bilinear", align_corners=False))
    assert to_image(m, (2, 2)) is m
