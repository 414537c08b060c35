"""TensorBoard: a run writes, per epoch, the scalars its log.jsonl holds (read back with TensorBoard's own reader)."""

from __future__ import annotations

import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sib.train import train

DIAGNOSTICS = {"diag_grad_ratio", "diag_r_abs_mean", "diag_coverage", "diag_r_in_gt"}


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _same(a: float, b: float) -> bool:
    """TensorBoard stores float32: equal to float32 precision, NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


@pytest.mark.parametrize("regularizer, epochs, promised", [
    ("sib", 2, {"ce", "reg", "bg", "hsic", "coverage", "train_acc", "val_acc", "test_acc", "test_shifted_acc", "lr",
                "sec_per_step", *DIAGNOSTICS}),
    ("none", 1, {"ce", "train_acc", "val_acc", "test_acc", "test_shifted_acc", "lr", "sec_per_step"}),
])
def test_run_writes_the_scalars_it_promises(tmp_path, make_tiny_config, regularizer, epochs, promised):
    run = tmp_path / "run"
    train(make_tiny_config(run, regularizer=regularizer, epochs=epochs, profile_steps=0))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars = _scalars(run)
    log = _log(run)
    assert promised <= set(scalars), sorted(promised - set(scalars))
    if regularizer == "none":
        assert not DIAGNOSTICS & set(scalars)  # an unregularised run has no regulariser diagnostics
    # every float of every epoch row, at that row's step, and nothing else
    floats = {k for row in log for k, v in row.items() if isinstance(v, float)}
    assert set(scalars) == floats
    for tag, points in scalars.items():
        expected = [(row["step"], row[tag]) for row in log if tag in row]
        assert [s for s, _ in points] == [s for s, _ in expected], tag
        assert all(_same(v, e) for (_, v), (_, e) in zip(points, expected, strict=True)), tag
    assert [s for s, _ in scalars["ce"]] == [4 * (e + 1) for e in range(epochs)]  # 64 images / batch 16 per epoch


def test_no_tensorboard_flag_writes_nothing(tmp_path, make_tiny_config):
    run = tmp_path / "run"
    train(make_tiny_config(run, tensorboard=False, profile_steps=0))
    assert not (run / "tensorboard").exists()
