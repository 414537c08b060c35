"""Learning-rate schedules, stepped once per optimizer step: linear warmup, then constant, step or cosine."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("none", "step", "cosine")


def lr_factor(step: int, *, schedule: str, steps_per_epoch: int, total_steps: int, warmup_steps: int,
              step_epochs: int, gamma: float) -> float:
    """Multiplier of the base learning rate before optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps for the first `warmup_steps` steps (never 0, so the first step
    trains). Then "none": 1; "step": gamma ** (epoch // step_epochs); "cosine": from 1 down to 0 at the
    last step, 0.5 * (1 + cos(pi * t)) with t the fraction of the post-warmup steps done.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    if schedule == "step":
        return gamma ** ((step // max(steps_per_epoch, 1)) // step_epochs)
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def create_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, epochs: int, steps_per_epoch: int,
                     warmup_epochs: float = 0.0, step_epochs: int = 30, gamma: float = 0.1
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over optimizer steps; its state (the step count) goes into the checkpoint.

    Args:
        optimizer: the optimizer whose groups' `lr` are the base learning rates.
        schedule: one of SCHEDULES.
        epochs: length of the run, for the cosine's end.
        steps_per_epoch: optimizer steps per epoch (batches / accumulation).
        warmup_epochs: warmup length in epochs (fractions allowed), rounded to optimizer steps.
        step_epochs, gamma: the "step" schedule's period (epochs) and factor.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid names: {', '.join(SCHEDULES)}")
    if warmup_epochs < 0 or step_epochs < 1 or not 0 < gamma <= 1:
        raise ValueError(f"schedule options out of range: warmup_epochs={warmup_epochs} (>= 0), "
                         f"lr_step_epochs={step_epochs} (>= 1), lr_gamma={gamma} (in (0, 1])")
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    total = epochs * steps_per_epoch

    def factor(step: int) -> float:
        return lr_factor(step, schedule=schedule, steps_per_epoch=steps_per_epoch, total_steps=total,
                         warmup_steps=warmup_steps, step_epochs=step_epochs, gamma=gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
