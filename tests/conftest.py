"""Shared fixtures: tiny, seeded, real runs on disk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sib.config import TrainConfig

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_config(out, **overrides) -> TrainConfig:
    """A training run that takes about a second: tiny CNN, 32 px synthetic images, 64 per split."""
    base = TrainConfig(dataset="synthetic", model="tiny_cnn", image_size=32, batch_size=16, epochs=1, lr=1e-2,
                       dataset_options={"num_samples": 64}, out=str(out), eval_splits=["test", "test_shifted"],
                       device="cpu")
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda out=None, **kw: tiny_config(out or tmp_path / "run", **kw)


@pytest.fixture(scope="session")
def make_tiny_config():
    """`tiny_config` itself, for module-scoped fixtures (conftest is not importable in importlib mode)."""
    return tiny_config
