"""Each regulariser on a tiny model: values against closed forms, gradients, mask requirements."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sib.regularizers import REGULARIZERS, create_regularizer


def _batch(seed=0, b=4, s=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, s, s, generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[:, :, 2:6, 2:6] = True
    return x, y, mask


def _linear_model(s=8, k=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * s * s, k))


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_every_regularizer_trains_a_tiny_model(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    reg = create_regularizer(name)
    x, y, mask = _batch()
    x.requires_grad_(reg.needs_input_grad)
    out = reg(x, model(x), y, mask)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.parts.values())
    if name != "none":
        out.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ["rrr", "energy"])
def test_mask_regularizers_refuse_batches_without_masks(name):
    reg = create_regularizer(name)
    x, y, _ = _batch()
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="needs foreground masks"):
        reg(x, _linear_model()(x), y, None)


def test_sib_gt_mask_needs_masks_and_adaptive_does_not():
    x, y, _ = _batch()
    x.requires_grad_(True)
    model = _linear_model()
    assert create_regularizer("sib").needs_mask is False
    with pytest.raises(ValueError, match="needs foreground masks"):
        create_regularizer("sib", mask_source="gt")(x, model(x), y, None)
    with pytest.raises(ValueError, match="applies to --regularizer sib only"):
        create_regularizer("rrr", mask_source="gt")


def test_rrr_closed_form_on_linear_model():
    """For logits = W x + c: d sum_k log p_k / dx = W^T (1 - K p); the penalty sums its square off-mask."""
    model = _linear_model()
    x, y, mask = _batch()
    x.requires_grad_(True)
    out = create_regularizer("rrr")(x, model(x), y, mask)
    W = model[1].weight  # (K, 3*8*8)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
        grad = (1 - 3 * p) @ W  # (B, 3*8*8)
        off = (~mask).expand(-1, 3, -1, -1).flatten(1).float()
        expected = ((grad * off) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-7)


def test_energy_closed_form_on_linear_model():
    """attr = relu(sum_c W_y); loss = mean(1 - energy inside the mask / total energy)."""
    model = _linear_model()
    x, y, mask = _batch()
    x.requires_grad_(True)
    out = create_regularizer("energy")(x, model(x), y, mask)
    with torch.no_grad():
        attr = torch.relu(model[1].weight[y].view(-1, 3, 8, 8).sum(dim=1))  # (B, 8, 8)
        inside = (attr * mask[:, 0]).sum(dim=(1, 2)) / attr.sum(dim=(1, 2))
    torch.testing.assert_close(out.loss, (1 - inside).mean())


def test_unknown_regularizer_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: energy, none, rrr, sib"):
        create_regularizer("ib")
