"""One training step's loss (plain or regularised), and the timing of both kinds for the run summary.

A regularised step differs from a plain one in three ways, all decided here so the trainer, the timing
probe and `benchmarks/bench_step.py` agree:
- the regulariser differentiates the logits with respect to the input (which then gets `requires_grad`) or
  to a layer's output captured in the same forward (`Regularizer.capturing`, sib.guidance), with
  `create_graph=True` (double backprop: at a layer it runs through the part of the model after the layer);
- attention runs on the plain "math" SDPA kernel: the fused kernels (flash / memory-efficient, chosen by
  default for torchvision's ViT) have no double backward ("derivative for
  aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). Plain steps and
  evaluation keep the default kernels. The context is a no-op for models without attention.
- under `--amp`, the regularised forward runs in float32 unless `reg_precision="amp"` (see TrainConfig).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sib.regularizers import RegOutput, Regularizer


def double_backward_attention(active: bool) -> AbstractContextManager:
    """The SDPA kernel context for a step: the math kernel when `active` (a regularised step)."""
    return sdpa_kernel(SDPBackend.MATH) if active else nullcontext()


def use_cheap_double_backward(module: nn.Module, reg: Regularizer, device: torch.device) -> int:
    """Give `module` BatchNorm layers whose backward is cheap to differentiate (`sib.fast_bn`), where that was
    measured to win: a regulariser that differentiates the input gradient (`reg.needs_input_grad`), on a CPU.

    Same parameters, buffers, state_dict and results (parameter gradient equal to PyTorch's double backward:
    tests/test_step.py). benchmarks/bench_step.py (ResNet-18, 64 px, batch 32, 2-core CPU): S-IB step 2.92x ->
    2.67x plain at 1 thread and 2.83x -> 2.86x (a tie) at 2 threads on a quiet machine, 13.7x -> 2.6x at 2
    threads under load; peak memory 1.87x -> 1.70x plain. On a GPU it is not measured yet
    (benchmarks/gpu_check.sh measures `sib+fastbn`), so CUDA models keep PyTorch's.

    Returns:
        the number of BatchNorm2d layers changed (0: nothing done).
    """
    if not reg.needs_input_grad or device.type != "cpu":
        return 0
    from sib.fast_bn import use_fast_batchnorm

    return use_fast_batchnorm(module)


def step_loss(model: nn.Module, reg: Regularizer, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
              *, regularise: bool, amp_dtype: torch.dtype | None = None, reg_precision: str = "fp32",
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, RegOutput | None]:
    """Forward, cross-entropy and (on a regularised step) the regulariser.

    Args:
        model: maps (B, 3, H, W) float images to (B, K) logits (may be DDP-wrapped).
        reg: the run's regulariser.
        x: (B, 3, H, W) normalised images (a leaf; `requires_grad` is set here).
        y: (B,) int64 labels.
        mask: (B, 1, H, W) bool foreground masks, or None.
        regularise: run the regulariser on this step.
        amp_dtype: autocast dtype (None: float32).
        reg_precision: "fp32" or "amp": autocast on regularised steps too.
        label_smoothing: of the cross-entropy, in [0, 1).

    Returns:
        logits (B, K), ce (0-dim float32), the regulariser's output or None on a plain step.
    """
    regularise = regularise and reg.regularises
    x.requires_grad_(regularise and reg.needs_input_grad)
    use_amp = amp_dtype is not None and (not regularise or reg_precision == "amp")
    # at a layer (sib.guidance), the forward keeps that layer's output for the regulariser: one model call
    with double_backward_attention(regularise), reg.capturing(model) if regularise else nullcontext():
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
            logits = model(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        r = reg(x, logits, y, mask) if regularise else None
    return logits, ce, r


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: nn.Module, reg: Regularizer, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
               batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], steps: int, **loss_options
               ) -> dict[str, float]:
    """Median seconds of a plain and of a regularised step (forward, backward, optimizer step) on one batch.

    Runs on a deep copy of `model` with a fresh optimizer and a forked RNG, so the caller's model,
    optimizer and random streams are untouched. One warm-up step per kind is not timed.

    Returns:
        {"plain_step_s", "reg_step_s" (absent when the regulariser needs no input gradient)}.
    """
    x0, y, mask = batch
    device = x0.device
    probe = copy.deepcopy(model).train()
    opt = make_optimizer(probe)
    kinds = [("plain_step_s", False)] + ([("reg_step_s", True)] if reg.regularises else [])
    result: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for key, regularise in kinds:
            times = []
            for _ in range(steps + 1):
                _sync(device)
                t = time.perf_counter()
                _, ce, r = step_loss(probe, reg, x0.detach().clone(), y, mask, regularise=regularise,
                                     **loss_options)
                opt.zero_grad(set_to_none=True)
                (ce if r is None else ce + r.loss).backward()
                opt.step()
                _sync(device)
                times.append(time.perf_counter() - t)
            result[key] = statistics.median(times[1:])
    return result
