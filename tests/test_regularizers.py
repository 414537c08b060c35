"""Each regulariser on a tiny model: values against closed forms, gradients, mask requirements."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from sib.loss import SpatialIB, vjp_map
from sib.regularizers import REGULARIZERS, SIBLogpRegularizer, create_regularizer


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
    with pytest.raises(ValueError, match="valid names: energy, hint, l1, none, rrr, rrr_star, sib, sib_logp"):
        create_regularizer("ib")


def test_sib_logp_map_is_the_label_log_probability_gradient_on_a_linear_model():
    """logits = W x + c: d log softmax_y / dx = W_y - sum_k p_k W_k; the S-IB terms are taken on that R."""
    model = _linear_model()
    x, y, _ = _batch()
    x.requires_grad_(True)
    reg = create_regularizer("sib_logp")
    logits = model(x)
    out = reg(x, logits, y, None)
    W = model[1].weight.detach()  # (K, 3*8*8)
    with torch.no_grad():
        p = torch.softmax(logits, dim=1)  # (B, K)
        expected = (W[y] - p @ W).view_as(x)  # (B, 3, 8, 8)
    torch.testing.assert_close(out.maps["R"], expected, rtol=1e-5, atol=1e-7)
    reference = SpatialIB()(x, logits, R=expected)  # the same mask, HSIC and background terms as `sib`
    torch.testing.assert_close(out.loss, reference.loss)
    torch.testing.assert_close(out.maps["M"], reference.mask)
    assert set(out.parts) == {"hsic", "bg", "coverage"}


def test_sib_logp_map_survives_a_confident_wrong_prediction_where_the_paper_map_vanishes():
    """The reason for the variant: at a one-hot prediction the paper's R is ~0, right or wrong."""
    model = _linear_model()
    with torch.no_grad():
        model[1].weight.mul_(200.0)  # saturated softmax: p is one-hot
    x, _, _ = _batch()
    x.requires_grad_(True)
    logits = model(x)
    wrong = (logits.argmax(dim=1) + 1) % 3
    assert torch.softmax(logits, 1).max(dim=1).values.min() > 1 - 1e-6
    paper = vjp_map(logits, x).abs().max()
    ours = SIBLogpRegularizer()(x, logits, wrong, None).maps["R"].abs().max()
    assert paper < 1e-5 * ours and ours > 1.0


def test_sib_logp_trains_a_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, _ = _batch()
    x.requires_grad_(True)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y) + create_regularizer("sib_logp")(x, logits, y, None).loss
    loss.backward()
    # the regulariser alone reaches every parameter (double backprop through the input gradient)
    x2 = x.detach().clone().requires_grad_(True)
    alone = torch.autograd.grad(create_regularizer("sib_logp", sib_bg_weight=1.0, sib_fg_weight=1.0)(
        x2, model(x2), y, None).loss, list(model.parameters()))
    assert all(g.abs().sum() > 0 for g in alone)
    opt.step()
    assert torch.isfinite(loss) and all(not torch.equal(a, b) for a, b in zip(before, model.parameters(),
                                                                               strict=True))


def test_sib_logp_gradcheck_float64_wrt_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double()
    x0 = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    reg = create_regularizer("sib_logp", sib_window=3)
    names, params = zip(*model.named_parameters(), strict=True)

    def loss(*ps):
        x = x0.clone().requires_grad_(True)
        logits = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        out = reg(x, logits, y, None)
        assert out.loss.dtype == torch.float64
        return out.loss

    ps = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(loss, ps, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


def test_sib_logp_is_routed_with_the_sib_options():
    reg = create_regularizer("sib_logp", mask_source="gt", sib_bg_weight=5.0, sib_fg_weight=0.5, sib_window=7,
                             sib_form="linear")
    assert isinstance(reg, SIBLogpRegularizer) and reg.needs_mask
    assert (reg.sib.bg_weight, reg.sib.fg_weight, reg.sib.window, reg.sib.form) == (5.0, 0.5, 7, "linear")
    assert reg.weights() == {"sib_bg_weight": 5.0, "sib_fg_weight": 0.5}
    x, y, _ = _batch()
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="needs foreground masks"):
        reg(x, _linear_model()(x), y, None)


@pytest.mark.parametrize("name, keys", [("sib", {"sib_bg_weight", "sib_fg_weight"}), ("rrr", {"reg_weight"}),
                                        ("energy", {"reg_weight"}), ("none", set())])
def test_weights_by_config_field_scale_the_loss_linearly(name, keys):
    reg = create_regularizer(name)
    assert set(reg.weights()) == keys
    if not keys:
        return
    model = _linear_model()
    x, y, mask = _batch()
    x.requires_grad_(True)
    logits = model(x)
    base = reg(x, logits, y, mask).loss
    reg.set_weights({k: 3.0 * v for k, v in reg.weights().items()})
    torch.testing.assert_close(reg(x, logits, y, mask).loss, 3.0 * base)
    with pytest.raises(ValueError, match="weights must have the keys"):
        reg.set_weights({"nope": 1.0})


def test_sib_logp_from_the_cli(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset_options: {num_samples: 32}\n")
    res = subprocess.run([sys.executable, "-m", "sib", "train", "--config", str(tmp_path / "run.yaml"),
                          "--regularizer", "sib_logp", "--model", "tiny_cnn", "--image-size", "32", "--batch-size",
                          "16", "--epochs", "1", "--device", "cpu", "--eval-splits", "test", "--profile-steps", "0",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["regularizer"] == "sib_logp"
    row = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert {"hsic", "bg", "coverage", "diag_grad_ratio", "diag_coverage"} <= set(row)
