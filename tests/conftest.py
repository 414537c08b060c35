"""Shared fixtures: tiny, seeded, real runs on disk."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

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


SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # the team's read-only data beside the clone


@pytest.fixture(scope="session")
def shared_path():
    """shared_path(rel) -> ../shared/<rel>. Where it is absent: a skip on a developer's machine, a failure
    under CI (environment variable CI set and not "0"/"false"): a skip there would hide an untested path."""

    def get(rel: str) -> Path:
        path = SHARED / rel
        if not path.exists():
            why = f"{path} absent (the team's read-only ../shared/ is not beside this clone)"
            if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
                pytest.fail(f"{why}; CI is set, where a skip counts as a failure", pytrace=False)
            pytest.skip(why)
        return path

    return get
