"""One epoch of training batches: micro-steps, gradient accumulation, DDP sync, clipping, non-finite losses.

`sib.train` builds the objects and owns the epoch boundary (evaluation, checkpoints, logs); this module
runs the batches in between and returns the epoch's log row, reduced over processes.
"""

from __future__ import annotations

import re
import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from sib import progress
from sib.config import TrainConfig
from sib.distributed import DistInfo, all_reduce_
from sib.step import step_loss


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the run stops and the last good checkpoint is kept."""


def _nonfinite_terms(terms: dict[str, torch.Tensor], info: DistInfo) -> list[str]:
    """Names of the loss terms that are NaN/inf on any process (every process gets the same answer).

    One host sync per step, on purpose: it is what lets the run stop (or skip) before a bad update.
    """
    flags = torch.stack([~torch.isfinite(v.detach()).all() for v in terms.values()]).to(torch.int32)
    all_reduce_(flags, info, op="max")
    return [k for k, bad in zip(terms, flags.tolist(), strict=True) if bad]


class EpochLoop:
    """The batches of one epoch: micro-steps, accumulation, clipping, non-finite handling, reduced metrics."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, module: nn.Module, reg: Any, opt: torch.optim.Optimizer,
                 sched: Any, scaler: torch.amp.GradScaler, device: torch.device, info: DistInfo,
                 loss_options: dict) -> None:
        self.cfg, self.model, self.module, self.reg, self.opt = cfg, model, module, reg, opt
        self.sched, self.scaler, self.device, self.info, self.loss_options = sched, scaler, device, info, loss_options

    def run(self, loader: DataLoader, epoch: int, step: int) -> tuple[dict[str, Any], int]:
        """Train one epoch from global step `step`; returns the epoch's log row and the next step."""
        cfg, device, info = self.cfg, self.device, self.info
        self.model.train()
        zero = torch.zeros((), device=device, dtype=torch.float64)
        sums: dict[str, torch.Tensor] = {}
        counts = {"batches": zero.clone(), "reg_steps": zero.clone(), "skipped": zero.clone(), "seen": zero.clone(),
                  "correct": zero.clone()}
        n = len(loader)
        window_has_grad = False
        t0 = time.perf_counter()
        bar = progress.bar(loader, f"{cfg.regularizer} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                           dynamic_ncols=True, disable=not info.is_main)  # the trainer logs a line per epoch
        for i, (x, y, mask) in enumerate(bar):
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last if cfg.channels_last
                     else torch.contiguous_format)
            y = y.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True) if mask is not None else None
            if i % cfg.accumulate == 0:
                self.opt.zero_grad(set_to_none=True)
                window_has_grad = False
            last = (i + 1) % cfg.accumulate == 0 or i + 1 == n
            regularise = self.reg.regularises and step % cfg.every == 0  # False for "none"
            # DDP all-reduces on the backward of the window's last micro-batch only
            sync = self.model.no_sync() if info.enabled and not last else nullcontext()
            with sync:
                logits, ce, r = step_loss(self.model, self.reg, x, y, mask, regularise=regularise,
                                          **self.loss_options)
                terms = {"ce": ce, **({cfg.regularizer: r.loss} if r is not None else {})}
                bad = _nonfinite_terms(terms, info)
                if bad and cfg.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step}: term(s) {', '.join(bad)} = "
                        f"{', '.join(str(terms[k].item()) for k in bad)}; the last good checkpoint is kept")
                if not bad:
                    loss = ce if r is None else ce + r.loss
                    self.scaler.scale(loss / cfg.accumulate).backward()
                    window_has_grad = True
            if bad:
                counts["skipped"] += 1
            else:
                self._accumulate(sums, counts, ce, r, logits, y)
            if last:
                self._optimizer_step(window_has_grad, synced=not bad)
            step += 1
            if info.is_main and step % cfg.log_every == 0:
                bar.set_postfix(ce=f"{(sums['ce'] / counts['batches'].clamp_min(1)).item():.3f}")
        return self._row(epoch, step, sums, counts, time.perf_counter() - t0, n), step

    def _accumulate(self, sums: dict, counts: dict, ce: torch.Tensor, r: Any, logits: torch.Tensor,
                    y: torch.Tensor) -> None:
        parts = {"ce": ce.detach()}
        if r is not None:
            parts.update({"reg": r.loss.detach(), **r.parts})
            counts["reg_steps"] += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, torch.zeros((), device=self.device, dtype=torch.float64)) + \
                torch.nan_to_num(v.double(), nan=0.0)
        counts["batches"] += 1
        counts["correct"] += (logits.detach().argmax(dim=1) == y).sum()
        counts["seen"] += y.numel()

    def _optimizer_step(self, has_grad: bool, synced: bool) -> None:
        if has_grad:
            if self.info.enabled and not synced:
                # the window's last (syncing) micro-batch was skipped: average the earlier ones by hand
                for p in self.module.parameters():
                    if p.grad is not None:
                        all_reduce_(p.grad, self.info).div_(self.info.world_size)
            if self.cfg.grad_clip is not None:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        with warnings.catch_warnings():  # torch warns when a skipped batch means no optimizer.step() yet
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.sched.step()  # the schedule follows the position in the run, skipped batches included

    def _row(self, epoch: int, step: int, sums: dict, counts: dict, seconds: float, n: int) -> dict[str, Any]:
        """The epoch's log row, every number reduced over processes (sums in float64, one all-reduce)."""
        # skips and regularised steps are decided identically on every process, so the keys agree
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys] + [counts[k] for k in sorted(counts)])
        all_reduce_(packed, self.info)
        values = dict(zip(keys + sorted(counts), packed.tolist(), strict=True))
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step}
        for k in keys:
            row[k] = values[k] / max(values["batches" if k == "ce" else "reg_steps"], 1)
        row.setdefault("reg", 0.0)
        row.update({"train_acc": values["correct"] / max(values["seen"], 1), "lr": self.opt.param_groups[0]["lr"],
                    "reg_steps": int(values["reg_steps"] / self.info.world_size),
                    "skipped": int(values["skipped"] / self.info.world_size),
                    "sec_per_step": seconds / max(n, 1)})
        return row
