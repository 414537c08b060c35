"""Learning-rate schedules: warmup, step, cosine, by optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from sib.schedule import create_scheduler, lr_factor


def _f(step, schedule, **kw):
    opts = dict(steps_per_epoch=10, total_steps=100, warmup_steps=0, step_epochs=3, gamma=0.1) | kw
    return lr_factor(step, schedule=schedule, **opts)


def test_warmup_then_constant():
    assert [_f(s, "none", warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_step_schedule_multiplies_by_gamma_every_period():
    assert _f(29, "step") == 1.0 and _f(30, "step") == pytest.approx(0.1) and _f(65, "step") == pytest.approx(0.01)


def test_cosine_goes_from_one_to_zero_after_warmup():
    assert _f(10, "cosine", warmup_steps=10) == 1.0
    assert _f(55, "cosine", warmup_steps=10) == pytest.approx(0.5)
    assert _f(100, "cosine", warmup_steps=10) == pytest.approx(0.0, abs=1e-12)
    assert _f(40, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))


def test_scheduler_steps_and_refuses_unknown_names():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = create_scheduler(opt, schedule="cosine", epochs=2, steps_per_epoch=5, warmup_epochs=0.4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 0.4 epochs = 2 warmup steps, then the cosine over the 8 remaining ones
    assert lrs == [0.5, 1.0, 1.0, pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))]
    with pytest.raises(ValueError, match="valid names: none, step, cosine"):
        create_scheduler(opt, schedule="linear", epochs=1, steps_per_epoch=1)
