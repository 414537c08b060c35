"""The evaluator on real tiny runs: summary rows, accuracy, confidence intervals, resume, bad names."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

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
    resumed = evaluate(EvalConfig(**{**cfg.__dict__, "resume": True}))
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
