"""BatchNorm whose backward has a cheap backward: fewer kernels in the regularised step's double backward.

In training mode the S-IB step differentiates the input gradient R = dE/dx again, so every BatchNorm layer's
backward is itself differentiated. PyTorch's derivative of `native_batch_norm_backward` is a general
composite (`batchnorm_double_backward`, dozens of small kernels). Here the first backward is a custom
`autograd.Function` (`_BNBackward`: PyTorch's fused backward kernel, saving what PyTorch's own node saves)
whose own backward is the closed form below: three per-channel sums and ~10 full-size elementwise kernels.
Used only where a graph of the backward is being built (`create_graph=True`); a plain backward is PyTorch's.
Measured (benchmarks/bench_step.py `sib+fastbn`) and used by the trainer: see `sib.step.use_cheap_double_backward`.

Closed form, per channel, over the N = B*H*W values (s = 1/sqrt(var + eps), xh = (x - mean) * s, P v = v -
mean(v) - xh * mean(xh * v), first backward g_x = w s P g, g_w = sum(g xh), g_b = sum(g)); given the
cotangents (a_x, a_w, a_b) of (g_x, g_w, g_b), with m = mean(g xh), c = sum(a_x xh), d = sum(a_x * P g):
    d/dg = w s P a_x + a_w xh + a_b
    d/dw = s d
    d/dx = -(w s^2 / N) d xh + (a_w s - w s^2 c / N) P g - w s^2 m P a_x
(derivation: differentiate <a_x, g_x> + a_w g_w through s, xh and m; tests/test_step.py checks it with a
float64 `gradcheck` of the first backward and against PyTorch's double backward on whole models).
"""

from __future__ import annotations

import torch
from torch import nn

_DIMS = (0, 2, 3)  # reduced dims of a (B, C, H, W) batch: per-channel statistics


def _c(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]  # (C,) -> (1, C, 1, 1), broadcast over (B, C, H, W)


class _BNBackward(torch.autograd.Function):
    """(g, x, w, mean, invstd, eps) -> (g_x, g_w, g_b): BatchNorm's training-mode backward (PyTorch's fused
    kernel), with a closed-form backward of its own (module docstring). mean and invstd are the forward's
    statistics of x; their dependence on x is part of the closed form, so they are not differentiated as
    inputs. Saves what PyTorch's own backward node saves (g, x, w, statistics): xh and P g are recomputed."""

    @staticmethod
    def forward(ctx, g, x, w, mean, invstd, eps):  # noqa: ANN001, ANN205 (autograd.Function signature)
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, eps,
                                                               [True, True, True])
        ctx.save_for_backward(g, x, w, mean, invstd, gw, gb)
        return gx, gw, gb

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a_x, a_w, a_b):  # noqa: ANN001, ANN205
        g, x, w, mean, s, sum_gxh, sum_g = ctx.saved_tensors
        n = g.numel() // g.shape[1]
        # float32 statistics even when x and g are half (autocast): the sums below accumulate in float32
        xh = torch.addcmul(_c(-mean * s), x, _c(s))  # (x - mean) * s
        m = sum_gxh / n
        pg = torch.addcmul(g - _c(sum_g / n), xh, _c(-m))  # P g
        ws = w * s
        if a_x is None:
            a_x = torch.zeros_like(pg)
        sum_a, c, d = a_x.sum(_DIMS), (a_x * xh).sum(_DIMS), (a_x * pg).sum(_DIMS)
        pa = torch.addcmul(a_x - _c(sum_a / n), xh, _c(-c / n))  # P a_x
        # d/dx = -(w s^2 / N) d xh + (a_w s - w s^2 c / N) P g - w s^2 m P a_x
        k_pg = -ws * s * c / n + (a_w * s if a_w is not None else 0)
        grad_x = torch.addcmul(pa * _c(-ws * s * m), xh, _c(-ws * s * d / n)).addcmul_(pg, _c(k_pg))
        # d/dg = w s P a_x + a_w xh + a_b
        grad_g = pa * _c(ws)
        if a_w is not None:
            grad_g.addcmul_(xh, _c(a_w))
        if a_b is not None:
            grad_g.add_(_c(a_b))
        return grad_g.to(g.dtype), grad_x.to(x.dtype), (s * d).to(w.dtype), None, None, None


class _BatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm2d forward (PyTorch's fused kernel, running statistics updated in place) whose
    backward is `_BNBackward` when a graph of the backward is built, else PyTorch's fused backward."""

    @staticmethod
    def forward(ctx, x, w, b, running_mean, running_var, momentum, eps):  # noqa: ANN001, ANN205
        out, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, running_mean, running_var, True, momentum,
                                                             eps)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, w, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: this backward will be differentiated
            gx, gw, gb = _BNBackward.apply(g, x, w, mean, invstd, ctx.eps)
        else:
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, ctx.eps,
                                                                   [True, True, True])
        return gx, gw, gb, None, None, None, None


class FastBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` with the same parameters, buffers and results, whose training-mode backward has a
    cheaper backward (module docstring). Eval mode, no affine parameters, or no running statistics: as
    `nn.BatchNorm2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.affine and self.track_running_stats and x.dim() == 4):
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        # momentum None: cumulative moving average, as nn.BatchNorm2d
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _BatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, factor, self.eps)


def use_fast_batchnorm(model: nn.Module) -> int:
    """Turn every `nn.BatchNorm2d` of `model` into a `FastBatchNorm2d` in place (same parameters, buffers and
    state_dict keys); returns how many. SyncBatchNorm and other subclasses are left alone."""
    count = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = FastBatchNorm2d
            count += 1
    return count


__all__ = ["FastBatchNorm2d", "use_fast_batchnorm"]
