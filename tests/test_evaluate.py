"""The evaluator on real tiny runs: summary rows, accuracy, confidence intervals, resume, bad names."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys

import pytest

from sib.claim import CLAIM, ClaimedError
from sib.config import EvalConfig
from sib.evaluate import _summarise, evaluate
from sib.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_config):
    out = tmp_path_factory.mktemp("eval") / "run"
    train(make_tiny_config(out, regularizer="sib", epochs=2))
    return out


def _cfg(run, tmp_path, **kw):
    base = dict(checkpoint=str(run), splits=["test", "test_shifted"], methods=["grad_cam", "saliency"],
                metrics=["energy_pointing_game", "pointing_game"], batch_size=16, out=str(tmp_path / "ev"),
                device="cpu")
    base.update(kw)
    return EvalConfig(**base)


def test_summary_rows_and_accuracy_match_training_log(run, tmp_path):
    result = evaluate(_cfg(run, tmp_path))
    keys = {(r["split"], r["method"], r["metric"]) for r in result.summary}
    for split in ("test", "test_shifted"):
        assert (split, "-", "accuracy") in keys
        for m in ("grad_cam", "saliency"):
            for k in ("energy_pointing_game", "pointing_game"):
                assert (split, m, k) in keys
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda r: r["val_acc"])  # the default weights: best.pt, the first epoch of best val_acc
    acc = {r["split"]: r["value"] for r in result.summary if r["metric"] == "accuracy"}
    assert acc["test"] == pytest.approx(best["test_acc"])
    assert acc["test_shifted"] == pytest.approx(best["test_shifted_acc"])
    for r in result.summary:
        assert r["n"] + r["excluded"] == 64
        assert 0.0 <= r["value"] <= 1.0 and r["ci95_low"] <= r["value"] <= r["ci95_high"]
    for ext in ("csv", "json", "md"):
        assert (result.out / f"summary.{ext}").is_file()


@pytest.mark.parametrize("weights", ["best", "last"])
def test_weights_choice_is_used_and_recorded(run, tmp_path, weights):
    result = evaluate(_cfg(run, tmp_path, weights=weights, splits=["test"], methods=["saliency"]))
    file = run / {"best": "best.pt", "last": "checkpoint.pt"}[weights]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    row = max(log, key=lambda r: r["val_acc"]) if weights == "best" else log[-1]
    recorded = json.loads((result.out / "eval_config.json").read_text())
    assert recorded["weights"] == weights
    assert recorded["evaluated_weights"] == {"file": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                                             "epoch": row["epoch"], "step": row["step"]}
    acc = next(r["value"] for r in result.summary if r["metric"] == "accuracy")
    assert acc == pytest.approx(row["test_acc"])


def test_missing_best_weights_say_how_to_use_the_last(run, tmp_path):
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("best.pt", "eval"))
    with pytest.raises(FileNotFoundError, match="no best.pt .*pass --weights last"):
        evaluate(_cfg(tmp_path / "run", tmp_path))
    with pytest.raises(ValueError, match="--weights 'final': valid values are best, last"):
        evaluate(_cfg(tmp_path / "run", tmp_path, weights="final"))
    assert evaluate(_cfg(tmp_path / "run", tmp_path, weights="last", methods=["saliency"])).summary


def test_interrupted_evaluation_resumes_without_recomputing(run, tmp_path):
    full = evaluate(_cfg(run, tmp_path, out=str(tmp_path / "full")))
    cfg = _cfg(run, tmp_path, out=str(tmp_path / "part"))
    evaluate(cfg)
    path = tmp_path / "part" / "per_image.jsonl"
    lines = path.read_text().splitlines()
    # keep the first two finished batches and a half-written line, as a killed process leaves them
    ends = [i for i, line in enumerate(lines) if "_batch_done" in line]
    path.write_text("\n".join(lines[: ends[1] + 1]) + "\n" + lines[ends[1] + 1][:20])
    marker = json.loads(lines[0])
    path.chmod(0o640)
    resumed = evaluate(EvalConfig(**{**cfg.__dict__, "resume": True}))
    # the rewrite replaced the file in place: its permissions kept, no temporary file left beside it
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept[0] == marker  # finished batches were kept, not recomputed and rewritten elsewhere
    assert sum(1 for r in kept if r.get("metric") == "_batch_done") == 8  # 2 splits x 4 batches
    strip = [{k: v for k, v in r.items() if k not in ("ci95_low", "ci95_high")} for r in full.summary]
    again = [{k: v for k, v in r.items() if k not in ("ci95_low", "ci95_high")} for r in resumed.summary]
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, strip))


def test_resume_with_other_methods_is_refused(run, tmp_path):
    evaluate(_cfg(run, tmp_path))
    with pytest.raises(ValueError, match="another configuration"):
        evaluate(_cfg(run, tmp_path, methods=["saliency"], resume=True))


def test_existing_output_is_refused(run, tmp_path):
    evaluate(_cfg(run, tmp_path))
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate(_cfg(run, tmp_path))


def test_a_symlinked_output_folder_is_refused(run, tmp_path):
    own = tmp_path / "run"
    shutil.copytree(run, own, ignore=shutil.ignore_patterns("eval"))
    elsewhere = tmp_path / "elsewhere"
    evaluate(_cfg(own, tmp_path, out=str(elsewhere), max_images=16))
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    (own / "eval").symlink_to(elsewhere, target_is_directory=True)  # the run's eval/ points out of the run
    for flags in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(FileExistsError, match=r"eval is a symbolic link \(to .*elsewhere\)"):
            evaluate(_cfg(own, tmp_path, out=None, max_images=8, **flags))
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before


def test_an_evaluation_claimed_by_another_process_is_refused_untouched(run, tmp_path):
    hold = ("import sys, time\nfrom sib.claim import claim\nheld = claim(sys.argv[1], 'evaluate')\n"
            "print('held', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "ev")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        for flags in ({}, {"overwrite": True}):
            with pytest.raises(ClaimedError, match=rf"ev is being worked on by sib evaluate on host .*pid {proc.pid}"):
                evaluate(_cfg(run, tmp_path, **flags))
        assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == [CLAIM]
    finally:
        proc.kill()
        proc.wait()
    evaluate(_cfg(run, tmp_path, max_images=16))  # its holder gone, the claim is taken over
    assert not (tmp_path / "ev" / CLAIM).exists() and (tmp_path / "ev" / "summary.json").exists()


def test_unknown_method_and_metric_list_valid_names(run, tmp_path):
    with pytest.raises(ValueError, match="valid names:.*grad_cam"):
        evaluate(_cfg(run, tmp_path, methods=["gradcam"]))
    with pytest.raises(ValueError, match="valid names:.*energy_pointing_game"):
        evaluate(_cfg(run, tmp_path, metrics=["epg"], overwrite=True))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate(EvalConfig(checkpoint=str(tmp_path / "nowhere")))


def test_summarise_means_class_means_and_exclusions():
    values = [1.0, 0.0, 1.0, math.nan, 1.0]
    labels = [0, 0, 0, 1, 1]
    s = _summarise(values, labels, "mean")
    assert s["value"] == pytest.approx(0.75) and s["n"] == 4 and s["excluded"] == 1
    c = _summarise(values, labels, "class_mean")
    assert c["value"] == pytest.approx((2 / 3 + 1.0) / 2)
    # standard error of the mean of class means: sqrt(var0/n0 + var1/n1) / 2, var1 taken as 0 (one value)
    half = 1.96 * math.sqrt((1 / 3) / 3) / 2
    assert c["ci95_high"] - c["value"] == pytest.approx(half)
    e = _summarise([math.nan], [0], "mean")
    assert math.isnan(e["value"]) and e["excluded"] == 1 and e["n"] == 0


def test_method_and_metric_options_are_passed_and_checked(run, tmp_path):
    strict = evaluate(_cfg(run, tmp_path, out=str(tmp_path / "t0"), metrics=["pointing_game"], methods=["saliency"],
                           metric_options={"pointing_game": {"tolerance": 0}}))
    loose = evaluate(_cfg(run, tmp_path, out=str(tmp_path / "t32"), metrics=["pointing_game"], methods=["saliency"],
                          metric_options={"pointing_game": {"tolerance": 64}}))
    value = {r["split"]: r["value"] for r in loose.summary if r["metric"] == "pointing_game"}
    assert value == {"test": 1.0, "test_shifted": 1.0}  # 64 px reaches every pixel of a 32 px image
    assert any(r["value"] < 1.0 for r in strict.summary if r["metric"] == "pointing_game")
    with pytest.raises(ValueError, match="metric_options names \\['auroc'\\]"):
        evaluate(_cfg(run, tmp_path, metric_options={"auroc": {}}, overwrite=True))
    with pytest.raises(ValueError, match="method_options names \\['grad_cam_pp'\\]"):
        evaluate(_cfg(run, tmp_path, method_options={"grad_cam_pp": {}}, overwrite=True))


# ------------------------------------------------- --dataset / --root: another copy, another dataset, same classes

PET_BREEDS = {"Abyssinian": 1, "american_bulldog": 2, "Bengal": 6}  # oxford-pets CLASS-IDs (run order: by id)


def _write_pets(root, breeds=PET_BREEDS, trainval=10, test=3, seed=0):
    """An Oxford-IIIT Pet folder in the authors' layout: JPEG images, trimaps, trainval/test/list.txt."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    lists = {"trainval": [], "test": []}
    for k, (breed, cid) in enumerate(breeds.items()):
        for n in range(1, trainval + test + 1):
            name = f"{breed}_{n}"
            lists["trainval" if n <= trainval else "test"].append(f"{name} {cid} 1 {n}")
            img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            img[8:22, 10:30] = (80 * k, 255 - 80 * k, 128)  # the pet: a class-coloured box
            Image.fromarray(img).save(root / "images" / f"{name}.jpg", quality=95)
            trimap = np.full((30, 40), 2, np.uint8)
            trimap[8:22, 10:30] = 1
            Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
    for split, lines in lists.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "annotations" / "list.txt").write_text("\n".join(lists["trainval"] + lists["test"]) + "\n")
    return root


@pytest.fixture(scope="module")
def pets(tmp_path_factory, make_tiny_config):
    """A tiny run trained on one pets folder, and that folder."""
    base = tmp_path_factory.mktemp("pets")
    root = _write_pets(base / "pets_a")
    out = base / "run"
    train(make_tiny_config(out, dataset="oxford_pets", root=str(root), dataset_options={}, batch_size=6,
                           eval_splits=["test"], tensorboard=False, profile_steps=0))
    return out, root


def _rows(out):
    rows = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["metric"] != "_batch_done"]


def _pet_cfg(run, out, **kw):
    return EvalConfig(checkpoint=str(run), splits=["test"], methods=["saliency"], metrics=["pointing_game"],
                      batch_size=4, out=str(out), device="cpu", **kw)


def test_evaluate_on_another_copy_keeps_the_run_transform_and_records_the_data(pets, tmp_path):
    run, root = pets
    own = evaluate(_pet_cfg(run, tmp_path / "own"))
    copy = shutil.copytree(root, tmp_path / "copy")
    other = evaluate(_pet_cfg(run, tmp_path / "copy_ev", root=str(copy)))
    assert _rows(tmp_path / "copy_ev") == _rows(tmp_path / "own")  # same pixels, same transform: same rows
    assert [r["value"] for r in other.summary] == [r["value"] for r in own.summary]
    # a different collection of the same breeds (2 test images each): read from --root, at the run's 32 px
    smaller = _write_pets(tmp_path / "pets_b", test=2, seed=1)
    result = evaluate(_pet_cfg(run, tmp_path / "b_ev", root=str(smaller)))
    acc = next(r for r in result.summary if r["metric"] == "accuracy")
    assert acc["n"] == 6
    pg = next(r for r in result.summary if r["metric"] == "pointing_game")
    assert pg["tolerance_px"] == 2  # round(15 * 32 / 224): the run's image size, not the loader's 224 default
    recorded = json.loads((tmp_path / "b_ev" / "eval_config.json").read_text())
    assert recorded["root"] == str(smaller) and recorded["dataset"] is None
    assert recorded["evaluated_data"] == {"dataset": "oxford_pets", "root": str(smaller), "dataset_options": {},
                                          "image_size": 32, "normalization": "half",
                                          "classes": ["Abyssinian", "american_bulldog", "Bengal"], "label_map": None}


def test_evaluate_on_another_dataset_with_the_same_classes_in_another_order(pets, tmp_path):
    """An image_folder holding the pets' test images: classes sorted by name (Abyssinian, Bengal,
    american_bulldog), mapped onto the run's order (Abyssinian, american_bulldog, Bengal)."""
    from sib.cli import main

    run, root = pets
    folder = tmp_path / "folder"
    for line in (root / "annotations" / "test.txt").read_text().split("\n"):
        if line:
            name = line.split()[0]
            breed = name.rsplit("_", 1)[0]
            (folder / "train" / breed).mkdir(parents=True, exist_ok=True)
            (folder / "test" / breed).mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "images" / f"{name}.jpg", folder / "test" / breed / f"{name}.jpg")
            shutil.copy(root / "images" / f"{name}.jpg", folder / "train" / breed / f"{name}.jpg")
    assert main(["evaluate", "--checkpoint", str(run), "--dataset", "image_folder", "--root", str(folder),
                 "--split", "test", "--methods", "saliency", "--metrics", "pointing_game", "--out",
                 str(tmp_path / "if_ev"), "--device", "cpu"]) == 0
    evaluate(_pet_cfg(run, tmp_path / "own"))
    pairs = sorted((r["label"], r["pred"]) for r in _rows(tmp_path / "if_ev") if r["metric"] == "accuracy")
    assert pairs == sorted((r["label"], r["pred"]) for r in _rows(tmp_path / "own") if r["metric"] == "accuracy")
    recorded = json.loads((tmp_path / "if_ev" / "eval_config.json").read_text())["evaluated_data"]
    assert recorded["dataset"] == "image_folder" and recorded["label_map"] == [0, 2, 1]


@pytest.mark.parametrize("breeds, message", [
    ({"Abyssinian": 1, "american_bulldog": 2, "Persian": 7},
     r"its classes are not the run's: the run has 3 \(Abyssinian, american_bulldog, Bengal\), the dataset 3 "
     r"\(Abyssinian, american_bulldog, Persian\); missing: Bengal; not in the run: Persian"),
    ({"Abyssinian": 1, "american_bulldog": 2},
     r"the run has 3 \(Abyssinian, american_bulldog, Bengal\), the dataset 2 \(Abyssinian, american_bulldog\); "
     r"missing: Bengal; not in the run: -"),
])
def test_class_mismatch_is_a_clear_error_before_anything_is_written(pets, tmp_path, capsys, breeds, message):
    from sib.cli import main

    run, _ = pets
    other = _write_pets(tmp_path / "other", breeds=breeds)
    with pytest.raises(ValueError, match=message):
        evaluate(_pet_cfg(run, tmp_path / "ev", dataset="oxford_pets", root=str(other)))
    assert not (tmp_path / "ev").exists()
    assert main(["evaluate", "--checkpoint", str(run), "--dataset", "oxford_pets", "--root", str(other),
                 "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "its classes are not the run's" in err and len(err.strip().splitlines()) == 1


def test_resume_of_an_evaluation_saved_before_the_dataset_fields(run, tmp_path):
    """eval_config.json written before `dataset`/`root`/`dataset_options` existed still resumes."""
    cfg = _cfg(run, tmp_path, splits=["test"], methods=["saliency"], metrics=["energy_pointing_game"])
    evaluate(cfg)
    path = tmp_path / "ev" / "eval_config.json"
    saved = json.loads(path.read_text())
    for key in ("dataset", "root", "dataset_options", "evaluated_data"):
        saved.pop(key)
    path.write_text(json.dumps(saved))
    again = evaluate(EvalConfig(**{**cfg.__dict__, "resume": True}))
    assert [r["value"] for r in again.summary] == [r["value"] for r in evaluate(
        EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "fresh")})).summary]


# ------------------------------------------------- summaries from streamed sums (memory flat in the images)


def _random_rows(seed=0, n=600):
    """Rows as the evaluator writes them (and some as an older per_image.jsonl did, without a status)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        split = rng.choice(["test", "test_shifted"])
        label = rng.randrange(4)
        rows.append({"split": split, "index": i, "label": label, "method": "-", "metric": "accuracy",
                     "value": float(rng.random() < 0.7), "status": "ok"})
        for method in ("grad_cam", "saliency"):
            status = rng.choices(["ok", "excluded", "invalid"], [8, 1, 1])[0]
            for metric in ("energy_pointing_game", "pointing_game", "deletion_auc"):
                value = math.nan if status != "ok" else (
                    float(rng.random() < 0.5) if metric == "pointing_game" else rng.random() * 10 ** rng.randint(-3, 2))
                row = {"split": split, "index": i, "label": label, "method": method, "metric": metric,
                       "value": value, "status": status}
                if metric == "pointing_game":
                    row["tolerance_px"] = 2 if i < n // 2 else 3  # two radii in one group: listed
                if method == "saliency" and metric == "deletion_auc" and i % 7 == 0:
                    del row["status"]  # a group mixing rows with and without status: every NaN is excluded
                rows.append(row)
    return rows


def _assert_same_summary(got, want):
    assert [(r["split"], r["method"], r["metric"]) for r in got] == [(r["split"], r["method"], r["metric"])
                                                                      for r in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for k, v in w.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(g[k]), k
            elif isinstance(v, float):
                assert abs(g[k] - v) <= 1e-12 * max(1.0, abs(v)), (k, g[k], v)
            else:
                assert g[k] == v, (k, g[k], v)


def test_streamed_summary_equals_the_two_pass_summary_on_the_same_rows():
    from sib.eval_summary import SummaryStream
    from sib.evaluate import summarise

    rows = _random_rows()
    rows += [{"split": "val", "index": 0, "label": 1, "method": "saliency", "metric": "auroc", "value": math.nan,
              "status": "excluded"}]  # a group with no value: NaN, n 0
    stream = SummaryStream()
    for r in rows:
        stream.add(r)
    want = summarise(rows, "run")
    _assert_same_summary(stream.summary("run"), want)
    mixed = next(r for r in want if (r["split"], r["method"], r["metric"]) == ("test", "saliency", "deletion_auc"))
    assert mixed["invalid"] == 0 and mixed["excluded"] > 0  # the older-file rule applied to the whole group
    assert any(r["tolerance_px"] == "2, 3" for r in want)


def test_evaluation_summary_equals_the_two_pass_summary_of_its_per_image_file(run, tmp_path):
    from sib.evaluate import summarise

    result = evaluate(_cfg(run, tmp_path, metrics=["energy_pointing_game", "pointing_game", "average_drop"]))
    rows = [json.loads(line) for line in (result.out / "per_image.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["metric"] != "_batch_done"]
    _assert_same_summary(result.summary, summarise(rows, run.name))
