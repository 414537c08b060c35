"""configs/: every preset loads into TrainConfig; a paper preset trains a few steps on CPU from its file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sib.config import TrainConfig, build_config
from sib.run_dir import load_checkpoint
from sib.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("study_"))  # study files: test_study
DATASETS = ["cifar100", "cub200", "imagenet", "oxford_pets", "stanford_dogs"]
MODELS = ["densenet121", "resnet18", "resnet50", "vit_b_32"]


def test_the_paper_grid_and_the_laptop_preset_are_all_there():
    names = {p.stem for p in PRESETS}
    assert names == {f"{d}_{m}" for d in DATASETS for m in MODELS} | {"laptop"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_with_the_paper_hyperparameters(path):
    cfg = build_config(TrainConfig, yaml_path=path)  # unknown keys raise
    if path.stem == "laptop":
        assert (cfg.dataset, cfg.model, cfg.device) == ("synthetic", "small_cnn", "cpu")
        return
    dataset, model = path.stem.split("_", 1) if not path.stem.startswith(("oxford", "stanford")) else \
        ("_".join(path.stem.split("_")[:2]), "_".join(path.stem.split("_")[2:]))
    assert (cfg.dataset, cfg.model) == (dataset, model)
    vit = model.startswith("vit")
    assert cfg.lr == (1e-6 if vit else 1e-5 if dataset == "imagenet" else 1e-4)
    assert cfg.sib_fg_weight == (1e-5 if vit else 0.01)
    assert (cfg.optimizer, cfg.weight_decay, cfg.epochs, cfg.image_size, cfg.seed, cfg.regularizer) == \
        ("adamw", 1e-4, 90, 224, 43, "sib")
    assert 32 <= cfg.batch_size <= 256


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text((CONFIGS / "laptop.yaml").read_text() + "learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rate'\]"):
        build_config(TrainConfig, yaml_path=tmp_path / "bad.yaml")


def _tiny_pets(root: Path) -> Path:
    """A 2-breed Oxford-IIIT Pet folder in the authors' layout: 12 trainval and 4 test images per breed."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    lines = {"trainval": [], "test": []}
    for cid, breed in [(1, "Abyssinian"), (2, "american_bulldog")]:
        for n in range(16):
            name = f"{breed}_{n}"
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
            trimap = np.full((40, 48), 2, dtype=np.uint8)
            trimap[10:30, 12:36] = 1
            Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
            lines["trainval" if n < 12 else "test"].append(f"{name} {cid} {1 + (cid == 2)} {n + 1}")
    for split, rows in lines.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_paper_preset_runs_a_few_steps_on_cpu_from_its_file(tmp_path):
    """configs/oxford_pets_resnet18.yaml at 64 px, 2 steps, on a generated folder in the dataset's layout."""
    root = _tiny_pets(tmp_path / "pets")
    cfg = build_config(TrainConfig, yaml_path=CONFIGS / "oxford_pets_resnet18.yaml", root=str(root),
                       image_size=64, epochs=1, batch_size=8, max_steps_per_epoch=2, eval_batches=1, num_workers=0,
                       device="cpu", out=str(tmp_path / "run"), profile_steps=1)
    result = train(cfg)
    row = result.history[0]
    assert (row["step"], row["reg_steps"], row["skipped"]) == (2, 2, 0)
    assert {"hsic", "bg", "coverage", "val_acc", "test_acc"} <= set(row)
    assert load_checkpoint(tmp_path / "run")["config"]["model"] == "resnet18"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # measured times (no bound on them: the machine may be loaded); the share is derived from them
    assert summary["plain_step_s"] > 0 and summary["reg_step_s"] > 0
    assert summary["reg_share"] == pytest.approx(1 - summary["plain_step_s"] / summary["reg_step_s"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())["sessions"][0]
    assert "git_revision" in run and run["world_size"] == 1
