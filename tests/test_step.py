"""The step builder: a ViT S-IB step runs (math attention kernel), with the R of the default kernel."""

from __future__ import annotations

import pytest
import torch
import torchvision

from sib.loss import vjp_map
from sib.regularizers import create_regularizer
from sib.step import double_backward_attention, step_loss


def _tiny_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=3).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])


def test_vit_sib_step_runs_and_its_r_equals_the_default_kernels():
    model, (x, y) = _tiny_vit(), _batch()
    reg = create_regularizer("sib")
    _, ce, r = step_loss(model, reg, x.clone(), y, None, regularise=True)
    (ce + r.loss).backward()  # the double backward through attention
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # R itself (a first-order gradient) is available on the default fused kernel: the math kernel gives it too
    xd = x.clone().requires_grad_(True)
    r_default = vjp_map(model(xd), xd, create_graph=False)
    xm = x.clone().requires_grad_(True)
    with double_backward_attention(True):
        r_math = vjp_map(model(xm), xm, create_graph=True)
    torch.testing.assert_close(r_math, r_default, rtol=1e-4, atol=1e-7)


def test_default_kernel_has_no_double_backward_which_is_why_the_math_kernel_is_used():
    """If this starts passing without error, torch gained the derivative and the context could go."""
    model, (x, y) = _tiny_vit(), _batch()
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="not implemented"):
        loss = create_regularizer("sib")(x, model(x), y, None).loss
        loss.backward()


def test_plain_step_needs_no_input_gradient():
    model, (x, y) = _tiny_vit(), _batch()
    xs = x.clone()
    _, ce, r = step_loss(model, create_regularizer("sib"), xs, y, None, regularise=False)
    assert r is None and not xs.requires_grad and ce.dim() == 0
