"""End to end on image files: S-IB training on an Oxford-IIIT Pet folder, then the evaluator.

The first test writes its own folder in the dataset's layout (JPEG photos, PNG trimaps, the three lists), so
it runs in any clone; the second reads the real oxford-pets-mini from ../shared/data where it is present (and
fails rather than skips under CI, see `shared_path` in conftest.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sib.config import EvalConfig, TrainConfig
from sib.data import create_dataset
from sib.evaluate import evaluate
from sib.train import train

BREEDS = {"Abyssinian": (1, 1, 1), "american_bulldog": (2, 2, 1), "Bengal": (6, 1, 2)}  # class, species, breed id


def write_pets_folder(root: Path, trainval: int, test: int, seed: int = 0) -> Path:
    """An Oxford-IIIT Pet folder: per breed `trainval` + `test` photos of different sizes (JPEG), each a
    breed-coloured ellipse (the pet) on a noisy background, and its trimap (1 pet, 3 a border ring, 2 else)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for b, (breed, (cid, species, bid)) in enumerate(BREEDS.items()):
        for n in range(1, trainval + test + 1):
            w, h = int(rng.integers(70, 110)), int(rng.integers(60, 100))
            yy, xx = np.mgrid[0:h, 0:w]
            cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
            ry, rx = rng.uniform(0.2, 0.3) * h, rng.uniform(0.2, 0.3) * w
            r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            colour = np.roll(np.array([200, 60, 60]), b) + rng.integers(-20, 20, 3)
            photo = rng.integers(40, 140, (h, w, 3))
            photo[r2 <= 1] = colour
            trimap = np.where(r2 <= 1, 1, np.where(r2 <= 1.3, 3, 2)).astype(np.uint8)
            name = f"{breed}_{n}"
            Image.fromarray(photo.astype(np.uint8)).save(root / "images" / f"{name}.jpg", quality=90)
            Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
            lines["trainval" if n <= trainval else "test"].append(f"{name} {cid} {species} {bid}")
    for split, rows in lines.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    (root / "annotations" / "list.txt").write_text(header + "\n".join(lines["trainval"] + lines["test"]) + "\n")
    return root


def _train_then_evaluate(root: Path, out: Path, n_test: int, max_images: int, image_size: int) -> None:
    cfg = TrainConfig(dataset="oxford_pets", root=str(root), image_size=image_size, model="small_cnn",
                      regularizer="sib", epochs=1, batch_size=16, lr=1e-3, out=str(out / "run"), eval_splits=["test"],
                      device="cpu")
    result = train(cfg)
    row = result.history[-1]
    assert math.isfinite(row["ce"]) and math.isfinite(row["hsic"]) and math.isfinite(row["bg"])
    n_train = len(create_dataset("oxford_pets", root, "train"))
    assert n_train + len(create_dataset("oxford_pets", root, "val")) == len(create_dataset("oxford_pets", root,
                                                                                             "trainval"))
    assert row["step"] == n_train // 16  # every full batch of the train part once, the last partial one dropped
    assert 0.0 <= row["test_acc"] <= 1.0
    ev = evaluate(EvalConfig(checkpoint=str(result.out), splits=["test"], methods=["grad_cam", "saliency"],
                             metrics=["energy_pointing_game"], max_images=max_images, batch_size=16, device="cpu",
                             out=str(out / "eval")))
    epg = {r["method"]: r for r in ev.summary if r["metric"] == "energy_pointing_game"}
    for method in ("grad_cam", "saliency"):
        # every listed test image has a pet and a finite map
        assert (epg[method]["n"], epg[method]["excluded"], epg[method]["invalid"]) == (min(n_test, max_images), 0, 0)
        assert 0.0 < epg[method]["value"] < 1.0


@pytest.mark.slow
def test_sib_on_a_written_pets_folder_then_energy_pointing_game(tmp_path):
    root = write_pets_folder(tmp_path / "pets", trainval=20, test=6)
    _train_then_evaluate(root, tmp_path, n_test=18, max_images=48, image_size=32)


@pytest.mark.slow
def test_sib_on_oxford_pets_mini_then_energy_pointing_game(tmp_path, shared_path):
    pets = shared_path("data/oxford-pets-mini")
    _train_then_evaluate(pets, tmp_path, n_test=199, max_images=48, image_size=64)
