"""`sib explain` on real image files of every common format, with a tiny trained run."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sib.cli import main
from sib.runtime import load_run
from sib.train import train

METHODS = ["grad_cam", "saliency"]
IMAGE_SIZE = 32  # the tiny run's
CLASSES = ["zero", "one", "two", "three", "four", "five"]  # the synthetic benchmark's six digits


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_config):
    out = tmp_path_factory.mktemp("explain") / "run"
    train(make_tiny_config(out, tensorboard=False, profile_steps=0, eval_splits=["test"]))
    return out


def _pixels(w: int, h: int, seed: int) -> np.ndarray:
    """uint8 (h, w, 3): smooth colour ramps plus noise, so that crops and conversions change the prediction."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(w + h, 1)], -1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _write_images(folder: Path) -> dict[str, Path]:
    """One file per format and mode, of different sizes; a truncated JPEG; a text file named .png; a .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_pixels(57, 41, 0))
    grey = Image.fromarray(_pixels(40, 90, 1)).convert("L")
    files = {
        "photo.png": lambda p: rgb.save(p),
        "photo_rgba.png": lambda p: rgb.convert("RGBA").save(p),  # opaque: must match photo.png exactly
        "photo.jpg": lambda p: Image.fromarray(_pixels(300, 200, 2)).save(p, quality=90),
        "photo.webp": lambda p: Image.fromarray(_pixels(64, 64, 3)).save(p, lossless=True),
        "cmyk.jpg": lambda p: Image.fromarray(_pixels(48, 60, 4)).convert("CMYK").save(p, quality=95),
        "grey.png": lambda p: grey.save(p),
        # 16-bit grey with the grey image's values x 257: converted to 8 bits it is grey.png again
        "deep.png": lambda p: Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(p),
        "anim.gif": lambda p: Image.fromarray(_pixels(30, 30, 5)).convert("P").save(
            p, save_all=True, append_images=[Image.fromarray(_pixels(30, 30, 6)).convert("P")]),
    }
    paths = {}
    for name, write in files.items():
        write(folder / name)
        paths[name] = folder / name
    broken = folder / "broken.jpg"
    data = (folder / "photo.jpg").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("not an image\n")
    (folder / "readme.txt").write_text("ignored: not an image extension\n")
    assert Image.open(folder / "deep.png").mode.startswith("I")  # really 16-bit on disk
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK" and Image.open(folder / "anim.gif").n_frames == 2
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("images") / "mixed")


def _explain(run, inputs, out, *extra):
    return main(["explain", "--checkpoint", str(run), *map(str, inputs), "--methods", *METHODS, "--out", str(out),
                 "--device", "cpu", *extra])


def _reference_probs(run: Path, image: Image.Image) -> torch.Tensor:
    """The run's class probabilities for a PIL RGB image, preprocessed here with torchvision directly."""
    model, cfg, _ = load_run(run, torch.device("cpu"))
    pipeline = v2.Compose([v2.PILToTensor(), v2.Resize(round(IMAGE_SIZE * 256 / 224), antialias=True),
                           v2.CenterCrop(IMAGE_SIZE), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize([0.5] * 3, [0.5] * 3)])
    assert cfg.normalization == "half" and cfg.image_size == IMAGE_SIZE
    with torch.no_grad():
        return model(pipeline(image)[None]).softmax(1)[0]


def test_mixed_folder_explains_the_good_files_and_names_the_broken_ones(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = _explain(run, [images["photo.png"].parent], out)
    err = capsys.readouterr().err
    assert code == 1  # some files failed
    assert "broken.jpg" in err and "notes.png" in err and "photo" not in err

    doc = json.loads((out / "predictions.json").read_text())
    good = sorted(images)  # a folder's image files, sorted by name
    assert [Path(r["file"]).name for r in doc["images"]] == good
    assert sorted(Path(f["file"]).name for f in doc["failed"]) == ["broken.jpg", "notes.png"]
    assert doc["methods"] == METHODS and doc["target_mode"] == "predicted"
    by_name = {Path(r["file"]).name: r for r in doc["images"]}
    for name, r in by_name.items():
        probs = [t["probability"] for t in r["top5"]]
        assert len(r["top5"]) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert {t["class"] for t in r["top5"]} <= set(CLASSES)
        assert r["predicted"] == r["top5"][0]["class"] == r["target"] and r["probability"] == probs[0]
        for method in METHODS:
            png = out / r["overlays"][method]
            assert png.is_file(), (name, method)
            # 32 px crop enlarged by the smallest whole factor reaching 224 px: 7 x 32
            assert Image.open(png).size == (224, 224) and Image.open(png).mode == "RGB"
    assert len(list((out / "overlays").iterdir())) == len(good) * len(METHODS)

    # the prediction is the run's on the eval transform, checked against torchvision applied here
    expected = _reference_probs(run, Image.open(images["photo.png"]).convert("RGB"))
    top = expected.topk(5)
    assert [t["class"] for t in by_name["photo.png"]["top5"]] == [CLASSES[i] for i in top.indices.tolist()]
    assert np.allclose([t["probability"] for t in by_name["photo.png"]["top5"]], top.values.tolist(), atol=1e-5)
    expected = _reference_probs(run, Image.open(images["photo.jpg"]).convert("RGB"))  # 300 x 200: a real crop
    assert math.isclose(by_name["photo.jpg"]["probability"], expected.max().item(), abs_tol=1e-5)
    # conversions: an opaque RGBA file is its RGB pixels; a 16-bit file is its 8-bit grey image
    assert by_name["photo_rgba.png"]["top5"] == by_name["photo.png"]["top5"]
    assert by_name["deep.png"]["top5"] == by_name["grey.png"]["top5"]

    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == sorted([*good, "broken.jpg", "notes.png"])
    for r in rows:
        name = Path(r["file"]).name
        if name in ("broken.jpg", "notes.png"):
            assert r["status"] == "failed" and name in r["error"] and r["predicted"] == ""
        else:
            j = by_name[name]
            assert r["status"] == "ok" and r["error"] == "" and r["methods"] == " ".join(METHODS)
            assert r["predicted"] == j["predicted"] == r["target"]
            assert [r[f"top{k}_class"] for k in range(1, 6)] == [t["class"] for t in j["top5"]]
            assert math.isclose(float(r["top1_probability"]), j["probability"], rel_tol=1e-9)
            assert all((out / r[f"overlay_{m}"]).is_file() for m in METHODS)


def test_all_good_files_exit_zero_and_repeated_stems_get_distinct_overlays(run, images, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(_pixels(20, 20, 9)).save(other / "photo.png")  # same stem as images/photo.png
    out = tmp_path / "out"
    assert _explain(run, [images["photo.png"], other / "photo.png", images["cmyk.jpg"]], out) == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["failed"] == [] and len(doc["images"]) == 3
    overlays = [r["overlays"]["grad_cam"] for r in doc["images"]]
    assert overlays == ["overlays/photo__grad_cam.png", "overlays/photo-2__grad_cam.png", "overlays/cmyk__grad_cam.png"]


@pytest.mark.parametrize("target, index", [("three", 3), ("2", 2), ("five", 5)])
def test_target_by_name_or_index(run, images, tmp_path, target, index):
    out = tmp_path / "out"
    assert _explain(run, [images["photo.png"], images["grey.png"]], out, "--target", target) == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert [(r["target"], r["target_index"]) for r in doc["images"]] == [(CLASSES[index], index)] * 2
    assert doc["target_mode"] == target


def test_target_changes_the_explanation(run, images, tmp_path):
    """The overlay of a class other than the predicted one is another map (the target reaches the explainer)."""
    first = tmp_path / "pred"
    assert _explain(run, [images["photo.png"]], first) == 0
    predicted = json.loads((first / "predictions.json").read_text())["images"][0]["predicted_index"]
    other = str((predicted + 1) % len(CLASSES))
    second = tmp_path / "other"
    assert _explain(run, [images["photo.png"]], second, "--target", other) == 0
    a = np.asarray(Image.open(first / "overlays/photo__saliency.png"))
    b = np.asarray(Image.open(second / "overlays/photo__saliency.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.parametrize("target, message", [
    ("dog", "--target 'dog': not a class of this run; pass 'predicted', a class name (zero, one, two, three, four, "
            "five) or an index 0..5"),
    ("6", "--target '6': not a class of this run"),
    ("-1", "--target '-1': not a class of this run"),
])
def test_bad_target_is_a_clear_error_listing_the_classes(run, images, tmp_path, capsys, target, message):
    assert _explain(run, [images["photo.png"]], tmp_path / "out", "--target", target) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "RUN", "nowhere.png", "--out", "OUT"], "nowhere.png: no such file or folder"),
    (["--checkpoint", "RUN", "EMPTY", "--out", "OUT"], "no image file in"),
    (["--checkpoint", "RUN", "IMG"], "--out is required"),
    (["IMG", "--out", "OUT"], "--checkpoint is required"),
    (["--checkpoint", "RUN", "IMG", "--out", "OUT", "--methods", "gradcam"], "unknown explainer 'gradcam'"),
    (["--checkpoint", "RUN", "IMG", "--out", "OUT", "--weights", "first"], "--weights 'first': valid values"),
])
def test_bad_arguments_exit_2(run, images, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    subst = {"RUN": str(run), "OUT": str(tmp_path / "out"), "IMG": str(images["photo.png"]),
             "EMPTY": str(tmp_path / "empty")}
    assert main(["explain", *[subst.get(a, a) for a in argv], "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_overwrite_removes_only_what_explain_wrote(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _explain(run, [images["photo.png"], images["grey.png"]], out) == 0
    (out / "mine.txt").write_text("keep me")
    assert _explain(run, [images["grey.png"]], out) == 2  # not without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert _explain(run, [images["grey.png"]], out, "--overwrite") == 0
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["grey__grad_cam.png", "grey__saliency.png"]
    assert [Path(r["file"]).name for r in json.loads((out / "predictions.json").read_text())["images"]] == ["grey.png"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    assert _explain(run, [images["grey.png"]], foreign, "--overwrite") == 2  # never into a folder sib did not make
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_cli_subprocess_exit_code_and_stderr(run, images, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "sib", "explain", "--checkpoint", str(run), str(images["grey.png"]),
                           str(images["photo.png"].parent / "broken.jpg"), "--methods", "saliency", "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--weights", "last"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg" in proc.stderr and "explained 1 image(s)" in proc.stdout
    doc = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert Path(doc["weights"]["file"]).name == "checkpoint.pt"


def test_a_file_name_that_is_not_utf8_is_explained_and_written(run, images, tmp_path, capsys):
    folder = tmp_path / "latin1"
    folder.mkdir()
    odd = folder / os.fsdecode(b"caf\xe9.png")  # a Latin-1 name on a UTF-8 system: no valid text
    odd.write_bytes(images["photo.png"].read_bytes())
    out = tmp_path / "out"
    assert _explain(run, [odd], out) == 0, capsys.readouterr().err
    shown = str(folder / "caf\\xe9.png")  # the undecodable byte as an escape, in every output
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    assert [r["file"] for r in rows] == [shown] and rows[0]["status"] == "ok"
    record = json.loads((out / "predictions.json").read_text(encoding="utf-8"))["images"][0]
    assert record["file"] == shown
    assert all((out / rel).is_file() and rel.encode("utf-8") for rel in record["overlays"].values())


def test_a_fifo_or_other_non_regular_file_is_skipped_by_name(run, images, tmp_path):
    folder = tmp_path / "special"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")  # opening it would wait for a writer for ever
    os.mkfifo(tmp_path / "named.png")
    (folder / "photo.png").write_bytes(images["photo.png"].read_bytes())
    proc = subprocess.run([sys.executable, "-m", "sib", "explain", "--checkpoint", str(run), str(folder),
                           str(tmp_path / "named.png"), "--methods", "saliency", "--out", str(tmp_path / "out"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr
    for fifo in (folder / "pipe.png", tmp_path / "named.png"):
        assert f"{fifo}: not a regular file" in proc.stderr
    doc = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in doc["images"]] == ["photo.png"]
    assert sorted(Path(f["file"]).name for f in doc["failed"]) == ["named.png", "pipe.png"]


def test_inputs_inside_the_folder_being_replaced_are_refused(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _explain(run, [images["grey.png"]], out) == 0
    before = sorted(p.name for p in (out / "overlays").iterdir())
    assert _explain(run, [out / "overlays"], out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"{out / 'overlays'}" in err and "inside --out" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (out / "overlays").iterdir()) == before  # its own inputs not deleted


def test_overwrite_of_a_folder_without_manifest_is_refused_naming_the_files(run, images, tmp_path, capsys):
    mine = tmp_path / "holiday"
    (mine / "overlays").mkdir(parents=True)
    (mine / "overlays" / "holiday.png").write_bytes(images["photo.png"].read_bytes())
    (mine / "predictions.json").write_text('{"mine": true}')
    assert _explain(run, [images["grey.png"]], mine, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "--overwrite would have deleted: overlays, predictions.json" in err
    assert (mine / "overlays" / "holiday.png").read_bytes() == images["photo.png"].read_bytes()
    assert (mine / "predictions.json").read_text() == '{"mine": true}'


def test_an_extreme_aspect_ratio_is_skipped_by_name_the_others_explained(run, images, tmp_path, capsys):
    folder = tmp_path / "shapes"
    folder.mkdir()
    Image.new("RGB", (200000, 1), (200, 10, 10)).save(folder / "line.png")  # 2 GB once resized, before
    (folder / "photo.png").write_bytes(images["photo.png"].read_bytes())
    assert _explain(run, [folder], tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{folder / 'line.png'}: image of 200000x1 px (W x H)" in err
    doc = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in doc["images"]] == ["photo.png"]
