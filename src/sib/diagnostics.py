"""Why a regulariser's weight did nothing or broke the model: per-epoch diagnostics, and weight calibration.

Per epoch (`EpochDiagnostics`, called by sib.train after the epoch's accuracy evaluation), for every
regularised run, on one fixed batch: the first validation batch (an in-order loader: the same images every
epoch). The log row (log.jsonl, TensorBoard) gets:

    diag_grad_ratio  ||d reg / d theta|| / ||d ce / d theta||: L2 norms over all trainable parameters, `reg`
                     with its configured weights, `ce` the trainer's cross-entropy (label smoothing included)
    diag_r_abs_mean  mean |R| of the regulariser's own attribution map (RegOutput.maps["R"]: S-IB's VJP map,
                     sib_logp's d log p_y/dx, RRR's and Energy's input gradients)
    diag_coverage    mean of S-IB's adaptive mask M; NaN for the other regularisers and for mask_source gt
    diag_r_in_gt     share of R's energy sum_c R^2 inside the ground-truth mask, averaged over the batch's
                     images (the energy pointing game of sum_c R^2); images with an empty mask are left
                     out; NaN when the dataset has no masks
A run without a regulariser ("none": no input gradient) gets none of these keys.

Mode and state. The diagnostics run the model in TRAIN mode, as the training step does: the ratio is then
the one the optimiser sees (with BatchNorm's batch statistics, which couple the images and enter the
double backward), and the same quantity `--reg-calibrate` sets, so epoch 1's ratio can be read against
the calibration target. Train mode would update BatchNorm's running statistics, so every buffer is saved
before and copied back after; the RNG states (Python, NumPy, torch, CUDA) are restored too (dropout), and
`model.training` is restored. Gradients come from `torch.autograd.grad`: `param.grad` is never touched.
Cost: one forward and one double backward on one batch per epoch (measured in docs/ARCHITECTURE.md).
Under torchrun each process measures its own shard's first batch; rank 0's row is the one written.

Calibration (`--reg-calibrate RATIO`, `calibrate_run`). Before the first epoch, with the initial model (train
mode, state restored as above), on the first `CALIBRATION_BATCHES` training batches of epoch 1: ratio_i =
||d reg/d theta|| / ||d ce/d theta|| per batch, factor = RATIO / median_i(ratio_i), and every weight of the
regulariser is multiplied by the factor (`Regularizer.weights()`: for sib/sib_logp sib_bg_weight and
sib_fg_weight, for rrr/energy reg_weight). Each loss is linear in its weights (S-IB's w * exp(bg) too: the
exp is of bg, not of w), so the scaled regulariser's median ratio on those batches is exactly RATIO. It
runs inside a forked RNG reseeded from the run's seed: the training RNG is not consumed, and a calibrated
run is reproducible. The result is written to `calibration.json` in the run folder with the options it was
measured under (`config`: every TrainConfig field a resume may not change); `--resume` reuses it when they are
this run's (never recalibrates a trained model: other options with trained epochs are refused; a run killed
before its first checkpoint is recalibrated, logged), logged as `reg_scale` in log.jsonl and summary.json (with
the weights, `reg_weights`).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sib.config import TrainConfig, save_json, to_dict
from sib.data import collate
from sib.distributed import DistInfo, EpochBatchSampler, broadcast_object
from sib.metrics.localisation import energy_pointing_game
from sib.regularizers import RegOutput, Regularizer
from sib.run_dir import RESUME_MAY_CHANGE
from sib.step import step_loss

CALIBRATION_BATCHES = 4
CALIBRATION_FILE = "calibration.json"
DIAGNOSTIC_KEYS = ("diag_grad_ratio", "diag_r_abs_mean", "diag_coverage", "diag_r_in_gt")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore `module`'s buffers (BatchNorm statistics), its train/eval mode and every RNG state on exit."""
    training = module.training
    buffers = [b.detach().clone() for b in module.buffers()]
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = sorted({b.device.index or 0 for b in module.parameters() if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        with torch.no_grad():
            for b, saved in zip(module.buffers(), buffers, strict=True):
                b.copy_(saved)
        module.train(training)


def _grad_norm(loss: torch.Tensor, params: list[nn.Parameter], retain_graph: bool) -> torch.Tensor:
    """L2 norm of d loss / d params over all of them (0 when `loss` does not depend on them), float32."""
    if not loss.requires_grad:
        return loss.new_zeros((), dtype=torch.float32)
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else loss.new_zeros((), dtype=torch.float32)


def _measure(module: nn.Module, reg: Regularizer, batch: Batch, loss_options: dict
             ) -> tuple[torch.Tensor, torch.Tensor, RegOutput]:
    """(||d ce/d theta||, ||d reg/d theta||, the regulariser's output) for one batch, as the trainer's step."""
    x, y, mask = batch
    _, ce, out = step_loss(module, reg, x.detach().clone(), y, mask, regularise=True, **loss_options)
    if out is None:
        raise ValueError(f"{type(reg).__name__} is not a regulariser with an input gradient")
    params = [p for p in module.parameters() if p.requires_grad]
    ce_norm = _grad_norm(ce, params, retain_graph=True)  # the regulariser's graph shares the forward
    return ce_norm, _grad_norm(out.loss, params, retain_graph=False), out


def r_in_gt(R: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean over images of the share of sum_c R^2 inside the ground-truth mask.

    Args:
        R: (B, C, H, W) attribution map.
        mask: (B, 1, H, W) bool foreground, or None.

    Returns:
        The mean over images with a non-empty mask (an all-zero R counts as |fg| / (H*W), chance, as in the
        energy pointing game); NaN when `mask` is None or every mask is empty.
    """
    if mask is None:
        return math.nan
    energy = R.detach().double().pow(2).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    return torch.nanmean(energy_pointing_game(energy, mask.bool())).item()


def diagnostics(module: nn.Module, reg: Regularizer, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                **loss_options: Any) -> dict[str, float]:
    """The diagnostic keys (module docstring) for one batch; {} for a regulariser without an input gradient.

    Args:
        module: the (unwrapped) model; run in train mode, its state restored (module docstring).
        reg: the run's regulariser, with its current weights.
        x: (B, 3, H, W) normalised images; y: (B,) labels; mask: (B, 1, H, W) bool or None.
        **loss_options: the trainer's `step_loss` options (amp_dtype, reg_precision, label_smoothing).
    """
    if not reg.regularises:
        return {}
    with preserved_state(module):
        module.train()
        ce_norm, reg_norm, out = _measure(module, reg, (x, y, mask), loss_options)
    maps = out.maps or {}
    R, M = maps.get("R"), maps.get("M")
    ratio = (reg_norm / ce_norm).item()
    return {"diag_grad_ratio": ratio,
            "diag_r_abs_mean": R.abs().mean().item() if R is not None else math.nan,
            "diag_coverage": M.mean().item() if M is not None else math.nan,
            "diag_r_in_gt": r_in_gt(R, mask) if R is not None else math.nan}


class EpochDiagnostics:
    """What the trainer adds to each epoch's row: the diagnostics on a fixed batch, and `reg_scale`.

    Args:
        module: the unwrapped model (never the DDP wrapper: its reducer expects a .backward()).
        reg: the run's regulariser.
        loader: the validation loader (in order); its first batch is the fixed batch, read once.
        device: where the batch goes.
        loss_options: the trainer's `step_loss` options.
        reg_scale: the calibration factor (`calibrate_run`), or None.
    """

    def __init__(self, module: nn.Module, reg: Regularizer, loader: DataLoader, device: torch.device,
                 loss_options: dict, reg_scale: float | None = None) -> None:
        self.module, self.reg, self.loader, self.device = module, reg, loader, device
        self.loss_options, self.reg_scale = loss_options, reg_scale
        self._batch: Batch | None = None

    def __call__(self) -> dict[str, float]:
        row = {} if self.reg_scale is None else {"reg_scale": self.reg_scale}
        if not self.reg.regularises:
            return row
        if self._batch is None:
            first = next(iter(self.loader), None)
            if first is None:  # an empty validation split: nothing to measure
                return row
            x, y, mask = first
            self._batch = (x.to(self.device), y.to(self.device), mask.to(self.device) if mask is not None else None)
        row.update(diagnostics(self.module, self.reg, *self._batch, **self.loss_options))
        return row


def calibrate(module: nn.Module, reg: Regularizer, batches: Iterable[Batch], target: float, name: str | None = None,
              **loss_options: Any) -> dict[str, Any]:
    """Scale `reg`'s weights so that the median gradient-norm ratio (reg / ce) over `batches` is `target`.

    The model runs in train mode with its state restored (`preserved_state`); `batches` are read inside
    the forked RNG, so random augmentation does not consume the caller's RNG either.

    Args:
        module: the unwrapped model.
        reg: the regulariser; its weights are changed in place.
        batches: (x, y, mask) batches on the model's device.
        target: the wanted ratio, > 0.
        name: the regulariser's name in error messages (default: its class name).
        **loss_options: the trainer's `step_loss` options.

    Returns:
        {"target_ratio", "median_ratio", "ratios" (per batch, before scaling), "batches", "factor",
        "weights_before", "weights"} (weights by TrainConfig field name).
    """
    name = name or type(reg).__name__
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"--reg-calibrate {target}: must be a positive finite ratio (e.g. 0.1)")
    before = reg.weights()
    if not before or not reg.regularises:
        raise ValueError(f"--reg-calibrate: regulariser {name!r} has no weight to calibrate")
    ratios = []
    with preserved_state(module):
        module.train()
        for batch in batches:
            ce_norm, reg_norm, _ = _measure(module, reg, batch, loss_options)
            ratios.append((reg_norm / ce_norm).item())
    if not ratios:
        raise ValueError("--reg-calibrate: no training batch to calibrate on")
    median = statistics.median(ratios)
    if median == 0:
        raise ValueError(f"--reg-calibrate: regulariser {name!r} cannot be calibrated: its parameter gradient "
                         f"is zero on the first {len(ratios)} training batches (gradient-norm ratio 0)")
    if not math.isfinite(median):
        raise ValueError(f"--reg-calibrate: regulariser {name!r} cannot be calibrated: the gradient-norm ratio "
                         f"is {median} on the first {len(ratios)} training batches")
    factor = target / median
    weights = {k: v * factor for k, v in before.items()}
    reg.set_weights(weights)
    return {"target_ratio": target, "median_ratio": median, "ratios": ratios, "batches": len(ratios),
            "factor": factor, "weights_before": before, "weights": weights}


def _first_batches(cfg: TrainConfig, train_ds: Dataset, device: torch.device) -> Iterator[Batch]:
    """The first CALIBRATION_BATCHES batches of epoch 1, as one process sees them (the trainer's sampler seed)."""
    sampler = EpochBatchSampler(len(train_ds), cfg.batch_size, cfg.seed * 1_000_003, max_batches=CALIBRATION_BATCHES)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for x, y, mask in DataLoader(train_ds, batch_sampler=sampler, num_workers=0, collate_fn=collate):
        yield x.to(device, memory_format=fmt), y.to(device), mask.to(device) if mask is not None else None


def _measured_under(cfg: TrainConfig) -> dict[str, Any]:
    """The options a calibration depends on: every TrainConfig field a resume may not change (sib.run_dir)."""
    return {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k not in RESUME_MAY_CHANGE}


def _reusable(cfg: TrainConfig, path: Path, saved: dict[str, Any], reg: Regularizer, resumed: bool) -> bool:
    """Whether a resume may reuse calibration.json: measured under this run's options (those a resume may not
    change). Otherwise a run with trained epochs is refused (a trained model cannot be recalibrated); one
    without (killed before its first checkpoint) is recalibrated, and that is logged."""
    wanted = {"regularizer": cfg.regularizer, "target_ratio": cfg.reg_calibrate, "weights_before": reg.weights()}
    diffs = [f"{k}={saved.get(k)!r} -> {k}={v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if "config" in saved:
        defaults = to_dict(TrainConfig())
        diffs += [f"{k}={saved['config'].get(k, defaults.get(k))!r} -> {k}={v!r}"
                  for k, v in _measured_under(cfg).items() if saved["config"].get(k, defaults.get(k)) != v]
    elif not resumed:
        diffs.append("options not recorded (a calibration.json of an earlier sib)")
    if not diffs:
        return True
    if resumed:
        raise ValueError(f"{path} was measured under other options ({'; '.join(diffs)}) than this run's, whose "
                         f"epochs were trained with it; use another --out or --overwrite")
    print(f"reg-calibrate: {path} was measured under other options ({'; '.join(diffs)}) and no epoch was "
          f"trained: recalibrating", flush=True)
    return False


def _calibration(cfg: TrainConfig, out: Path, module: nn.Module, reg: Regularizer, train_ds: Dataset,
                 device: torch.device, loss_options: dict, resumed: bool) -> dict[str, Any] | None:
    path = out / CALIBRATION_FILE
    saved = json.loads(path.read_text()) if cfg.resume and path.is_file() else None
    if cfg.reg_calibrate is None:
        if saved is not None:
            raise ValueError(f"{path}: this run was calibrated (--reg-calibrate {saved['target_ratio']:g}); pass "
                             f"the same --reg-calibrate to resume it, or use another --out or --overwrite")
        return None
    if saved is not None and _reusable(cfg, path, saved, reg, resumed):
        print(f"reg-calibrate: reusing {path}: factor {saved['factor']:.4g}, "
              + " ".join(f"{k}={v:.4g}" for k, v in saved["weights"].items()), flush=True)
        return saved
    if resumed:
        raise ValueError(f"--reg-calibrate {cfg.reg_calibrate:g}: the run in {out} was trained without it ({path} is "
                         f"missing), and a trained model cannot be calibrated; drop the flag or use another --out")
    with preserved_state(module):  # reseeded inside a fork: a pure function of (config, initial model)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        result = calibrate(module, reg, _first_batches(cfg, train_ds, device), cfg.reg_calibrate, cfg.regularizer,
                           **loss_options)
    result["regularizer"] = cfg.regularizer
    result["config"] = _measured_under(cfg)
    save_json(result, path)
    print(f"reg-calibrate: ||grad {cfg.regularizer}|| / ||grad ce|| = {result['median_ratio']:.4g} (median of "
          f"{result['batches']} batches) -> factor {result['factor']:.4g} for ratio {cfg.reg_calibrate:g}: "
          + " ".join(f"{k}={v:.4g}" for k, v in result["weights"].items()) + f" (saved to {path})", flush=True)
    return result


def calibrate_run(cfg: TrainConfig, out: Path, module: nn.Module, reg: Regularizer, train_ds: Dataset,
                  device: torch.device, info: DistInfo, loss_options: dict, resumed: bool) -> float | None:
    """`--reg-calibrate` for a training run: calibrate a fresh run, reuse `calibration.json` on a resume.

    Rank 0 calibrates (or reads the file) and every process applies its weights. Refuses (ValueError) a
    resume of a calibrated run without the flag or with another ratio, and a calibration of a run that
    was trained without it.

    Args:
        cfg: the run's configuration (`reg_calibrate`, `resume`, `seed`, `batch_size`, ...).
        out: the run folder.
        module: the unwrapped, freshly initialised (or resumed) model.
        reg: the regulariser; its weights are set in place.
        train_ds: the training split.
        device: the model's device.
        info: the process group.
        loss_options: the trainer's `step_loss` options.
        resumed: a checkpoint was loaded.

    Returns:
        The factor applied to the weights, or None without `--reg-calibrate`.
    """
    result, error = None, None
    if info.is_main:
        try:
            result = _calibration(cfg, Path(out), module, reg, train_ds, device, loss_options, resumed)
        except ValueError as err:
            error = err
    result, error = broadcast_object((result, error), info)  # every process stops with rank 0's refusal
    if error is not None:
        raise error
    if result is None:
        return None
    reg.set_weights(result["weights"])
    return float(result["factor"])
