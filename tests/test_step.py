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


# ------------------------------------------------- sib.fast_bn: a BatchNorm whose backward has a cheap backward


def test_fast_batchnorm_backward_has_the_right_second_derivative():
    from sib.fast_bn import _BNBackward

    torch.manual_seed(0)
    g = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def first_backward(g, x, w):
        # the statistics enter the closed form as functions of x, so they are passed detached
        var, mean = torch.var_mean(x, (0, 2, 3), unbiased=False)
        return _BNBackward.apply(g, x, w, mean.detach(), (var.detach() + 1e-5).rsqrt(), 1e-5)

    # first order: PyTorch's BatchNorm backward; second order: numerical differentiation of the first
    y = torch.nn.functional.batch_norm(x, None, None, w, torch.zeros(2, dtype=torch.float64), training=True)
    want = torch.autograd.grad(y, (x, w), g)
    got = first_backward(g, x, w)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], g.sum((0, 2, 3)))
    assert torch.autograd.gradcheck(first_backward, (g, x, w))


def _sib_param_grad(model, x, y):
    reg = create_regularizer("sib")
    _, ce, r = step_loss(model, reg, x.clone(), y, None, regularise=True)
    grads = torch.autograd.grad(ce + r.loss, list(model.parameters()))
    return torch.cat([t.flatten().double() for t in grads])


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_fast_batchnorm_gives_the_plain_double_backward_gradient(arch):
    import copy

    from sib.fast_bn import FastBatchNorm2d, use_fast_batchnorm
    from sib.models import create_model

    torch.manual_seed(0)
    plain = create_model(arch, 3, 32).train()
    fast = copy.deepcopy(plain)
    assert use_fast_batchnorm(fast) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) > 0
    assert all(type(m) is FastBatchNorm2d for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])
    a, b = _sib_param_grad(plain, x, y), _sib_param_grad(fast, x, y)
    cosine = torch.nn.functional.cosine_similarity(a, b, 0).item()
    rel = ((a - b).norm() / a.norm()).item()
    assert cosine >= 0.99999 and rel <= 1e-5, (cosine, rel)
    # same buffers after the step (running statistics, batch count) and the same state_dict keys
    assert plain.state_dict().keys() == fast.state_dict().keys()
    for (name, p), q in zip(plain.state_dict().items(), fast.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, msg=name)
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x))


def test_regularised_cpu_runs_get_the_cheap_double_backward_and_others_keep_pytorchs():
    from sib.fast_bn import FastBatchNorm2d
    from sib.models import create_model
    from sib.step import use_cheap_double_backward

    def bns(model):
        return [type(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    model = create_model("small_cnn", 3)
    assert use_cheap_double_backward(model, create_regularizer("none"), cpu) == 0
    assert use_cheap_double_backward(model, create_regularizer("sib"), cuda) == 0  # not measured on a GPU yet
    assert set(bns(model)) == {torch.nn.BatchNorm2d}
    assert use_cheap_double_backward(model, create_regularizer("sib"), cpu) == len(bns(model)) == 4
    assert set(bns(model)) == {FastBatchNorm2d}


def test_bn_double_backward_option_is_recorded_and_pytorch_keeps_pytorchs(tmp_path, tiny_cfg):
    """--bn-double-backward auto (default) gives a regularised CPU run sib.fast_bn, pytorch keeps PyTorch's
    BatchNorm; run.json says which. Same maths: the two runs' losses agree to float rounding."""
    import json

    from sib.train import train

    logs = {}
    for choice in ("auto", "pytorch"):
        out = tmp_path / choice
        train(tiny_cfg(out, model="small_cnn", regularizer="sib", bn_double_backward=choice, profile_steps=0,
                       tensorboard=False, max_steps_per_epoch=2))
        session = json.loads((out / "run.json").read_text())["sessions"][-1]
        assert session["fast_bn_layers"] == {"auto": 4, "pytorch": 0}[choice]
        logs[choice] = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    for key in ("ce", "bg", "hsic"):
        assert logs["auto"][key] == pytest.approx(logs["pytorch"][key], rel=1e-3)
    with pytest.raises(ValueError, match="--bn-double-backward 'fast': valid values are auto, pytorch"):
        train(tiny_cfg(tmp_path / "bad", bn_double_backward="fast"))
