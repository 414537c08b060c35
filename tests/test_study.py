"""`sib study`: the study file's checks, the statistics against hand-computed numbers, and real studies run
through the CLI in subprocesses (end to end, resume after a SIGKILL, --jobs 2 with a failing run)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from sib.cli import main
from sib.config import TrainConfig
from sib.report.study_summary import COLUMNS, key_table, summarise_runs
from sib.run_dir import load_checkpoint
from sib.study import load_study, run_study
from sib.tables import write_table
from sib.train import train

REPO = Path(__file__).resolve().parents[1]
T2 = 4.303  # Student t, 97.5% quantile, 2 degrees of freedom (tables)

# a study of tiny runs (a few seconds each): CE and one swept S-IB setting, 2 seeds
TINY = {
    "base": {"dataset": "synthetic", "model": "tiny_cnn", "image_size": 32, "batch_size": 16, "epochs": 2,
             "lr": 1.0e-2, "dataset_options": {"num_samples": 64}, "eval_splits": ["test"],
             "max_steps_per_epoch": 2, "profile_steps": 1, "tensorboard": False, "device": "cpu"},
    "seeds": [0, 1],
    "baseline": "ce",
    "evaluate": {"splits": ["test", "test_shifted"], "methods": ["grad_cam", "saliency"],
                 "metrics": ["energy_pointing_game"], "max_images": 16, "batch_size": 16, "device": "cpu"},
    "settings": [{"label": "ce", "regularizer": "none"},
                 {"label": "sib", "regularizer": "sib", "sweep": {"sib_bg_weight": ["1.0e5"], "sib_fg_weight": [1.0]},
                  "sweep_labels": ["x100"]}],
}


def _write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _cli(*args: str, cwd: Path, log: Path | None = None) -> subprocess.Popen:
    """`python -m sib study ARGS`; output to pipes, or to the file `log` (a pipe nobody reads could fill up)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sink = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "sib", "study", *args], cwd=cwd, env=env, text=True,
                            stdout=sink, stderr=subprocess.STDOUT if log is not None else subprocess.PIPE)


def _numbers(summary: Path) -> dict[tuple, dict]:
    """Rows keyed by (setting, split, method, metric), timing rows left out (they differ between runs)."""
    rows = json.loads(summary.read_text())
    return {(r["setting"], r["split"], r["method"], r["metric"]): r for r in rows if r["metric"] != "sec_per_step"}


def _assert_same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for col, va in a[key].items():
            vb = b[key][col]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), (key, col)
            else:
                assert va == pytest.approx(vb, abs=1e-9), (key, col, va, vb)


# ----------------------------------------------------------------------------------- the study file


def _bad(study: dict, **changes) -> dict:
    s = json.loads(json.dumps(study))
    for key, value in changes.items():
        s[key] = value
    return s


BAD = {
    "unknown base field": (_bad(TINY, base={**TINY["base"], "learning_rate": 0.1}),
                           r"base: unknown TrainConfig field\(s\) \['learning_rate'\]"),
    "unknown setting field": (_bad(TINY, settings=[{"label": "ce", "regularizer": "none", "epoch": 3}]),
                              r"settings\[0\] \(ce\): unknown TrainConfig field\(s\) \['epoch'\]"),
    "unknown evaluate field": (_bad(TINY, evaluate={"splits": ["test"], "method": ["grad_cam"]}),
                               r"evaluate: unknown EvalConfig field\(s\) \['method'\]"),
    "empty sweep": (_bad(TINY, settings=[TINY["settings"][0], {"label": "sib", "sweep": {}}]),
                    r"settings\[1\] \(sib\): empty sweep"),
    "empty sweep list": (_bad(TINY, settings=[TINY["settings"][0], {"label": "sib", "sweep": {"reg_weight": []}}]),
                         r"settings\[1\] \(sib\): empty sweep of 'reg_weight'"),
    "unequal sweep lengths": (_bad(TINY, settings=[TINY["settings"][0], {"label": "sib", "sweep": {
        "sib_bg_weight": [1.0, 2.0], "sib_fg_weight": [1.0]}}]), r"unequal lengths"),
    "duplicate labels": (_bad(TINY, settings=[TINY["settings"][0], TINY["settings"][0]]),
                         r"duplicate setting label\(s\) \['ce'\]"),
    "duplicate after expansion": (_bad(TINY, settings=[TINY["settings"][0], {
        "label": "rrr", "regularizer": "rrr", "sweep": {"reg_weight": [1.0, 2.0]}, "sweep_labels": ["a", "a"]}]),
        r"duplicate setting label\(s\) \['rrr/a'\]"),
    "baseline not a setting": (_bad(TINY, baseline="cee"), r"baseline 'cee' is not among the settings"),
    "no seeds": (_bad(TINY, seeds=[]), r"no seeds"),
    "duplicate seeds": (_bad(TINY, seeds=[0, 1, 0]), r"duplicate seeds"),
    "seed set in base": (_bad(TINY, base={**TINY["base"], "seed": 3}), r"\['seed'\] are set by the study"),
    "wrong type": (_bad(TINY, base={**TINY["base"], "epochs": "two"}), r"epochs='two' is not of type int"),
    "unknown regulariser": (_bad(TINY, settings=[{"label": "ce", "regularizer": "nope"}]),
                            r"setting ce: unknown regularizer 'nope'"),
    "unknown top-level key": (_bad(TINY, sweeps=[]), r"unknown key\(s\) \['sweeps'\]"),
    # `$` of a regex also matches before a final newline: "ce\n" would make the folders ce and "ce\n"
    "label with a trailing newline": (_bad(TINY, settings=[{"label": "ce\n", "regularizer": "none"}], baseline="ce\n"),
                                      r"settings\[0\]: label 'ce\\n' must be"),
    "sweep label with a trailing newline": (_bad(TINY, settings=[TINY["settings"][0], {
        "label": "rrr", "regularizer": "rrr", "sweep": {"reg_weight": [1.0]}, "sweep_labels": ["a\n"]}]),
        r"sweep label 'a\\n' must be"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_study_file_is_one_clear_error_before_anything_runs(name, tmp_path):
    study, message = BAD[name]
    path = _write_study(tmp_path / "study.yaml", study)
    with pytest.raises(ValueError, match=message) as err:
        run_study(path, tmp_path / "out")
    assert str(err.value).startswith(f"study file {path}: ")
    assert not (tmp_path / "out").exists()  # no folder, no run


def test_the_cli_prints_one_line_and_exits_2_on_a_bad_study_file(tmp_path, capsys):
    path = _write_study(tmp_path / "study.yaml", BAD["empty sweep"][0])
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty sweep" in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_expansion_labels_doses_and_precedence(tmp_path):
    path = _write_study(tmp_path / "study.yaml", {**TINY, "settings": [
        TINY["settings"][0],
        # YAML 1.1 reads 1.0e3 as text: a float field takes it as the number it spells
        {"label": "sib", "regularizer": "sib", "epochs": 3, "sweep": {"sib_bg_weight": ["1.0e3", 1.0e7]}}]})
    study = load_study(path)
    assert [s.label for s in study.settings] == ["ce", "sib/sib_bg_weight=1000", "sib/sib_bg_weight=1e+07"]
    assert [s.folder for s in study.settings][1] == "sib__sib_bg_weight=1000"
    assert [s.dose for s in study.settings] == [None, 1000.0, 1e7]
    cfg = study.train_config(study.settings[2], 1, tmp_path / "out")
    # defaults < base < setting < {seed, out}
    assert (cfg.sib_bg_weight, cfg.epochs, cfg.seed, cfg.model, cfg.sib_fg_weight) == (1e7, 3, 1, "tiny_cnn", 0.01)
    assert Path(cfg.out) == tmp_path / "out" / "runs" / "sib__sib_bg_weight=1e+07" / "seed1"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("study_*.yaml")), ids=lambda p: p.stem)
def test_shipped_study_files_load(path):
    study = load_study(path)  # every field checked against TrainConfig / EvalConfig, names against registries
    assert len(study.seeds) >= 3 and study.baseline in [s.label for s in study.settings]


def test_the_shipped_studies_include_a_calibrated_setting():
    for name in ("study_benchmark", "study_pets_mini", "study_pets_gpu"):
        study = load_study(REPO / "configs" / f"{name}.yaml")
        assert any(s.overrides.get("reg_calibrate") for s in study.settings), name


# ----------------------------------------------------------------------------------- the statistics


def _fake_run(run: Path, rows: list[dict], log: list[dict] | None = None, sec_per_step: float = 1.0) -> None:
    """A finished run as the study reads it: eval/per_image.jsonl (+ summary.json), log.jsonl, summary.json."""
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "per_image.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval" / "summary.json").write_text("[]\n")
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (log or [{"epoch": 1}])))
    (run / "summary.json").write_text(json.dumps({"sec_per_step": sec_per_step}))


def _rows(metric: str, method: str, values: list[float], labels: list[int], split: str = "test", **extra) -> list:
    return [{"split": split, "index": i, "label": c, "pred": 0, "method": method, "metric": metric, "value": v,
             "status": "ok", "batch": 0, **extra} for i, (v, c) in enumerate(zip(values, labels, strict=True))]


ACC = {"ce": [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], "sib": [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]}
LABELS = [0, 0, 1, 1]


@pytest.fixture
def hand_study(tmp_path):
    """Two settings x three seeds of hand-written per-image rows; returns the runs mapping."""
    runs: dict[str, dict[int, Path]] = {"ce": {}, "sib": {}}
    for label in runs:
        for seed in range(3):
            shift = 0.1 if label == "sib" else 0.0
            epg = [0.2 + 0.1 * seed + shift, 0.4 + 0.1 * seed + shift, 0.6 + 0.1 * seed + shift, math.nan]
            rows = (_rows("accuracy", "-", ACC[label][seed], LABELS)
                    + _rows("energy_pointing_game", "grad_cam", epg, LABELS)
                    # an invalid map (finite value, flagged by the evaluator) and a batch marker: both left out
                    + [{**_rows("energy_pointing_game", "grad_cam", [100.0], [1])[0], "index": 9, "status": "invalid"},
                       {"split": "test", "batch": 0, "metric": "_batch_done"}]
                    # class_mean reduction: classes 0 (1, 0) and 1 (1): mean of class means 0.75, not 2/3
                    + _rows("pointing_game", "grad_cam", [1.0, 0.0, 1.0], [0, 0, 1]))
            log = [{"epoch": 1, "diag_grad_ratio": 9.0},
                   {"epoch": 2, "diag_grad_ratio": 0.01 * (seed + 1), "diag_coverage": math.nan}]
            run = tmp_path / label / f"seed{seed}"
            _fake_run(run, rows, log if label == "sib" else None, sec_per_step=(2.0 + 0.5 * seed) if label == "sib"
                      else 1.0)
            runs[label][seed] = run
    return runs


def test_aggregation_matches_hand_computed_numbers(hand_study):
    rows, notes = summarise_runs(hand_study, "ce", {"ce": None, "sib": 1000.0})
    # each run's one invalid Grad-CAM map is named, not dropped in silence
    assert notes == [f"{label} seed {seed}: grad_cam maps invalid (not finite) on 1 of 5 test images; left out"
                     for seed in range(3) for label in ("ce", "sib")]
    t = {(r["setting"], r["split"], r["method"], r["metric"]): r for r in rows}
    approx = lambda v: pytest.approx(v, abs=2e-4)  # noqa: E731 (4.303 is the table's rounding of t)

    ce = t[("ce", "test", "-", "accuracy")]  # per seed 0.5, 0.75, 0.25: mean 0.5, sd 0.25
    assert ce["n_seeds"] == 3 and ce["n_images"] == 4 and ce["mean"] == pytest.approx(0.5)
    assert (ce["ci95_low"], ce["ci95_high"]) == (approx(0.5 - T2 * 0.25 / math.sqrt(3)),
                                                 approx(0.5 + T2 * 0.25 / math.sqrt(3)))
    assert math.isnan(ce["diff"]) and math.isnan(ce["boot_ci95_low"])  # the baseline has no difference to itself

    sib = t[("sib", "test", "-", "accuracy")]  # per seed 0.75, 1.0, 0.75; paired differences 0.25, 0.25, 0.5
    assert sib["mean"] == pytest.approx(2.5 / 3) and sib["dose"] == 1000.0
    sd = math.sqrt(((0.25 - 1 / 3) ** 2 * 2 + (0.5 - 1 / 3) ** 2) / 2)
    assert sib["diff"] == pytest.approx(1 / 3)
    assert (sib["diff_ci95_low"], sib["diff_ci95_high"]) == (approx(1 / 3 - T2 * sd / math.sqrt(3)),
                                                             approx(1 / 3 + T2 * sd / math.sqrt(3)))
    assert sib["boot_ci95_low"] <= 1 / 3 <= sib["boot_ci95_high"] and sib["boot_ci95_low"] >= 0.0

    # EPG: NaN image and the invalid row left out; per seed (0.2+0.4+0.6)/3 + 0.1 seed = 0.4, 0.5, 0.6
    epg = t[("ce", "test", "grad_cam", "energy_pointing_game")]
    assert epg["n_images"] == 3 and epg["mean"] == pytest.approx(0.5)
    assert epg["ci95_high"] - epg["mean"] == approx(T2 * 0.1 / math.sqrt(3))
    sib_epg = t[("sib", "test", "grad_cam", "energy_pointing_game")]  # +0.1 on every image of every seed
    for col in ("diff", "diff_ci95_low", "diff_ci95_high", "boot_ci95_low", "boot_ci95_high"):
        assert sib_epg[col] == pytest.approx(0.1), col
    assert t[("ce", "test", "grad_cam", "pointing_game")]["mean"] == pytest.approx(0.75)

    # run-level rows: the LAST log row's diagnostics (NaN ones absent), summary.json's sec_per_step
    ratio = t[("sib", "-", "-", "diag_grad_ratio")]
    assert ratio["mean"] == pytest.approx(0.02) and ratio["n_seeds"] == 3
    assert ("sib", "-", "-", "diag_coverage") not in t and ("ce", "-", "-", "diag_grad_ratio") not in t
    cost = t[("sib", "-", "-", "sec_per_step")]  # 2.0, 2.5, 3.0 against 1.0
    assert cost["diff"] == pytest.approx(1.5) and cost["diff_ci95_high"] == approx(1.5 + T2 * 0.5 / math.sqrt(3))


def test_an_incomplete_run_is_left_out_and_named(hand_study):
    (hand_study["sib"][1] / "eval" / "summary.json").unlink()  # an evaluation that did not finish
    rows, notes = summarise_runs(hand_study, "ce")
    notes = [n for n in notes if "invalid" not in n]
    assert len(notes) == 1 and "sib seed 1" in notes[0]
    sib = next(r for r in rows if r["setting"] == "sib" and r["metric"] == "accuracy")
    assert sib["n_seeds"] == 2 and sib["diff"] == pytest.approx((0.25 + 0.5) / 2)  # seeds 0 and 2


def test_a_failed_baseline_seed_shows_the_paired_count(hand_study):
    (hand_study["ce"][1] / "eval" / "summary.json").unlink()  # the baseline's seed 1 did not finish
    rows, _ = summarise_runs(hand_study, "ce")
    sib = next(r for r in rows if r["setting"] == "sib" and r["metric"] == "accuracy")
    assert (sib["n_seeds"], sib["n_pairs"]) == (3, 2)  # the difference rests on seeds 0 and 2 only
    assert sib["diff"] == pytest.approx((0.25 + 0.5) / 2)
    line = next(r for r in key_table(rows, "ce") if r["setting"] == "sib")
    assert line["seeds"] == "3 (2 paired)"
    assert next(r for r in key_table(rows, "ce") if r["setting"] == "ce")["seeds"] == "2"


def test_one_seed_says_no_interval_and_the_seeds_column_is_the_settings(hand_study):
    one = {label: {0: by_seed[0]} for label, by_seed in hand_study.items()}
    rows, _ = summarise_runs(one, "ce")
    table = {r["setting"]: r for r in key_table(rows, "ce")}
    assert "nan" not in json.dumps(table)
    assert table["sib"]["acc test"] == "0.750 (+0.250, 1 seed: no interval)"
    assert table["ce"]["acc test"] == "0.500 (1 seed: no interval)"
    # the seeds column counts every column of the line, not whichever came last
    (hand_study["sib"][2] / "eval" / "per_image.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in _rows("accuracy", "-", ACC["sib"][2], LABELS)))  # seed 2: no EPG
    rows, _ = summarise_runs(hand_study, "ce")
    assert next(r for r in key_table(rows, "ce") if r["setting"] == "sib")["seeds"] == "2-3"


def _invalid_rows(method: str, n: int) -> list[dict]:
    """What sib evaluate writes for a method whose maps are all NaN: NaN values flagged "invalid"."""
    return [{**r, "status": "invalid"} for r in _rows("energy_pointing_game", method, [math.nan] * n, [0] * n)]


def test_invalid_maps_are_counted_per_setting_seed_and_method(tmp_path):
    runs: dict[str, dict[int, Path]] = {"ce": {}, "sib": {}}
    for label in runs:
        for seed in range(3):
            rows = _rows("accuracy", "-", [1, 0, 1, 1], LABELS)
            if label == "ce":
                rows += _rows("energy_pointing_game", "saliency", [0.3, 0.4, 0.5, 0.6], LABELS)
            else:
                rows += _invalid_rows("saliency", 4)  # every saliency map of the setting is NaN
            if label == "sib" and seed == 2:
                rows += _invalid_rows("grad_cam", 4)  # one seed's Grad-CAM maps are all invalid
            else:
                rows += _rows("energy_pointing_game", "grad_cam", [0.2 + 0.1 * seed, 0.3, 0.4, 0.5], LABELS)
            run = tmp_path / label / f"seed{seed}"
            _fake_run(run, rows)
            runs[label][seed] = run
    rows, notes = summarise_runs(runs, "ce")
    t = {(r["setting"], r["method"]): r for r in rows if r["metric"] == "energy_pointing_game"}
    saliency = t[("sib", "saliency")]  # a row, although no seed has a valid map
    assert saliency["n_seeds"] == 0 and math.isnan(saliency["mean"]) and saliency["invalid"] == 12
    assert saliency["invalid_seeds"] == "seed0 4/4, seed1 4/4, seed2 4/4"
    grad_cam = t[("sib", "grad_cam")]  # the mean rests on seeds 0 and 1: said, not silent
    assert (grad_cam["n_seeds"], grad_cam["n_pairs"], grad_cam["invalid"]) == (2, 2, 4)
    assert grad_cam["invalid_seeds"] == "seed2 4/4"
    assert t[("ce", "grad_cam")]["invalid"] == 0 and t[("ce", "grad_cam")]["invalid_seeds"] == ""
    assert "sib seed 2: grad_cam maps invalid (not finite) on 4 of 4 test images; left out" in notes
    assert sum("saliency maps invalid" in n for n in notes) == 3
    line = next(r for r in key_table(rows, "ce") if r["setting"] == "sib")
    assert line["EPG saliency (test)"] == "invalid (12 maps)"
    assert line["EPG grad_cam (test)"].endswith(", 4 invalid")
    write_table(rows, tmp_path / "summary", COLUMNS)  # what sib study writes: the counts are columns
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"n_seeds", "n_pairs", "invalid", "invalid_seeds"} <= set(header)
    assert "invalid_seeds" in (tmp_path / "summary.md").read_text()


def test_duplicate_rows_are_refused_naming_the_file(hand_study):
    per_image = hand_study["sib"][1] / "eval" / "per_image.jsonl"
    rows = per_image.read_text().splitlines(keepends=True)
    per_image.write_text("".join(rows + rows[:6]))  # a second evaluation appended into the same file
    with pytest.raises(ValueError, match=rf"{per_image}: image index 0 appears more than once for split test, "
                                         r"method -, metric accuracy \(4 repeated rows\).*remove the folder"):
        summarise_runs(hand_study, "ce")


def test_the_paired_bootstrap_is_deterministic_paired_and_of_the_right_width(tmp_path):
    rng = np.random.default_rng(0)
    n, runs = 400, {"ce": {}, "reg": {}}
    for seed in range(3):
        base = rng.uniform(0, 1, n)  # images differ a lot; the paired difference varies little
        d = 0.05 + rng.normal(0, 0.02, n)
        for label, values in (("ce", base), ("reg", base + d)):
            run = tmp_path / label / f"seed{seed}"
            _fake_run(run, _rows("energy_pointing_game", "saliency", list(values), [0] * n))
            runs[label][seed] = run
    rows, _ = summarise_runs(runs, "ce")
    again, _ = summarise_runs(runs, "ce")
    other, _ = summarise_runs(runs, "ce", boot_seed=1)
    reg = next(r for r in rows if r["setting"] == "reg")
    assert reg == next(r for r in again if r["setting"] == "reg")  # same Generator seed: same interval
    assert reg["boot_ci95_low"] != next(r for r in other if r["setting"] == "reg")["boot_ci95_low"]
    assert reg["boot_ci95_low"] < reg["diff"] < reg["boot_ci95_high"]
    # pooled over 3 seeds, paired: sd of the mean difference = 0.02 / sqrt(n * 3); an unpaired resampling
    # would be ~15x wider (the images' own spread, 0.29)
    expected = 2 * 1.96 * 0.02 / math.sqrt(n * 3)
    assert reg["boot_ci95_high"] - reg["boot_ci95_low"] == pytest.approx(expected, rel=0.25)


# ----------------------------------------------------------------------------------- real studies


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny study run uninterrupted through the CLI: (study file, study folder, stdout)."""
    root = tmp_path_factory.mktemp("study")
    path = _write_study(root / "tiny.yaml", TINY)
    proc = _cli("--config", str(path), "--out", str(root / "out"), cwd=root)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return path, root / "out", out


@pytest.mark.slow
def test_end_to_end_through_the_cli(finished):
    path, out, stdout = finished
    for name in ("study.json", "summary.csv", "summary.json", "summary.md", "dose_response.png", "trade_off.png",
                 "trade_off.csv"):
        assert (out / name).is_file(), name
    assert (out / "dose_response.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "trade_off.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trade = json.loads((out / "trade_off.json").read_text())
    assert {(r["setting"], r["split"]) for r in trade} >= {("ce", "test"), ("sib/x100", "test_shifted")}
    assert all(r["n_seeds"] == 2 for r in trade) and any(r["pareto"] for r in trade)
    for folder in ("ce", "sib__x100"):
        for seed in (0, 1):
            run = out / "runs" / folder / f"seed{seed}"
            assert json.loads((run / "config.json").read_text())["seed"] == seed
            assert (run / "eval" / "per_image.jsonl").is_file()
    rows = _numbers(out / "summary.json")
    acc = rows[("sib/x100", "test_shifted", "-", "accuracy")]
    assert acc["n_seeds"] == 2 and acc["n_images"] == 16 and acc["dose"] == 1e5
    assert math.isfinite(acc["diff"]) and math.isfinite(acc["boot_ci95_low"])
    # each run's per-run value is its own evaluation's: the mean over seeds equals that of eval/summary.json
    per_run = [next(r["value"] for r in json.loads((out / "runs" / "sib__x100" / f"seed{s}" / "eval" /
                                                    "summary.json").read_text())
                    if (r["split"], r["method"], r["metric"]) == ("test", "grad_cam", "energy_pointing_game"))
               for s in (0, 1)]
    assert rows[("sib/x100", "test", "grad_cam", "energy_pointing_game")]["mean"] == pytest.approx(sum(per_run) / 2)
    assert ("sib/x100", "-", "-", "diag_grad_ratio") in rows
    # the terminal's key table: one line per setting, EPG per method, paired difference to CE
    assert "| setting | seeds | acc test | acc test_shifted | EPG grad_cam (test) | EPG saliency (test) |" in stdout
    assert "| sib/x100 | 2 | " in stdout and "dose_response.png" in stdout


@pytest.mark.slow
def test_resume_after_a_real_kill_reuses_finished_runs_and_gives_the_same_summary(finished, tmp_path):
    path, reference, _ = finished
    out = tmp_path / "out"
    second = out / "runs" / "sib__x100" / "seed0" / "checkpoint.pt"  # seed-major order: the second run
    proc = _cli("--config", str(path), "--out", str(out), cwd=tmp_path, log=tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the study ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out / "runs" / "ce" / "seed0"
    kept = {p: p.stat().st_mtime_ns for p in [*first.glob("*"), *(first / "eval").glob("*")] if p.is_file()}
    assert first / "eval" / "summary.json" in kept  # the first run had finished before the kill
    assert not (out / "summary.json").exists()

    proc = _cli("--config", str(path), "--out", str(out), cwd=tmp_path)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "ce seed 0: training kept, evaluation kept" in stdout
    assert "sib/x100 seed 0: training trained" not in stdout  # the interrupted run continued
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    _assert_same_numbers(_numbers(out / "summary.json"), _numbers(reference / "summary.json"))


@pytest.mark.slow
def test_summary_only_and_a_changed_study(finished, tmp_path):
    path, reference, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    result = run_study(path, out, summary_only=True)
    _assert_same_numbers(_numbers(out / "summary.json"), _numbers(reference / "summary.json"))
    assert result.failed == [] and result.figure == out / "dose_response.png"

    changed = _write_study(tmp_path / "changed.yaml", {**TINY, "evaluate": {**TINY["evaluate"], "max_images": 8}})
    before = (out / "study.json").read_text()
    with pytest.raises(FileExistsError, match=r"holds another study \(differs in \['evaluate'\]\)"):
        run_study(changed, out)
    assert (out / "study.json").read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no study.json"):
        run_study(changed, tmp_path / "other")

    # --overwrite: the evaluation changed, the training did not: runs kept, evaluations redone
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/checkpoint.pt")}
    result = run_study(changed, out, overwrite=True)
    assert result.failed == [] and {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    assert {r["n_images"] for r in result.rows if r["split"] != "-"} == {8}


@pytest.mark.slow
def test_jobs_2_runs_in_parallel_and_a_failed_run_does_not_stop_the_others(tmp_path):
    study = {**TINY, "seeds": [0], "settings": [
        {"label": "ce", "regularizer": "none"},
        {"label": "broken", "regularizer": "none", "on_nonfinite": "explode"},  # refused when its run starts
        {"label": "ce2", "regularizer": "none", "lr": 0.05}]}
    path = _write_study(tmp_path / "study.yaml", study)
    proc = _cli("--config", str(path), "--out", str(tmp_path / "out"), "--jobs", "2", cwd=tmp_path)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    assert "FAILED broken seed 0: ValueError: --on-nonfinite 'explode'" in err
    rows = _numbers(tmp_path / "out" / "summary.json")
    assert rows[("ce", "test", "-", "accuracy")]["n_seeds"] == 1
    assert math.isfinite(rows[("ce2", "test", "-", "accuracy")]["diff"])
    assert not any(key[0] == "broken" for key in rows)
    assert "broken seed 0: no complete evaluation" in stdout


@pytest.mark.slow
def test_two_studies_on_one_folder_never_work_on_the_same_run(tmp_path):
    """The first study is paused (SIGSTOP) mid-training; a second runs to its end on the same folder; the first
    resumes. The second skips the claimed run saying by whom; the run is trained and evaluated once."""
    study = {**TINY, "seeds": [0], "settings": [{"label": "ce", "regularizer": "none"}],
             "base": {**TINY["base"], "epochs": 20}}
    path = _write_study(tmp_path / "study.yaml", study)
    out, run = tmp_path / "out", tmp_path / "out" / "runs" / "ce" / "seed0"
    first = _cli("--config", str(path), "--out", str(out), cwd=tmp_path, log=tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.pt").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None and _finished(run) < 20, "the first study ended before it could be paused"
        second = _cli("--config", str(path), "--out", str(out), cwd=tmp_path)
        stdout, err = second.communicate(timeout=600)
        assert second.returncode == 0, err[-3000:]
        assert f"ce seed 0: skipped, {run} is claimed by sib train on host" in stdout and f"pid {first.pid}" in stdout
        assert "ce seed 0: no complete evaluation" in stdout
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    log = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 21))  # one trainer: every epoch once, in order
    rows = [json.loads(line) for line in (run / "eval" / "per_image.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["method"], r["metric"], r["index"]) for r in rows if r["metric"] != "_batch_done"]
    assert len(keys) == len(set(keys)) == 16 * 2 * 3  # 16 images x 2 splits x (accuracy + 2 methods' EPG)
    assert not any("ce seed 0" in note for note in run_study(path, out, summary_only=True).notes)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("jobs, sig", [(2, signal.SIGTERM), (2, signal.SIGINT), (1, signal.SIGTERM)])
def test_a_stopped_study_stops_every_worker_and_names_the_cut_runs(tmp_path, jobs, sig):
    study = {**TINY, "seeds": [0], "base": {**TINY["base"], "epochs": 400}}  # long runs: cut mid-training
    path = _write_study(tmp_path / "study.yaml", study)
    out = tmp_path / "out"
    runs = [out / "runs" / "ce" / "seed0", out / "runs" / "sib__x100" / "seed0"][:jobs]  # those started at once
    proc = _cli("--config", str(path), "--out", str(out), "--jobs", str(jobs), cwd=tmp_path,
                log=tmp_path / "study.log")
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not all((r / "checkpoint.pt").exists() for r in runs) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "study.log").read_text()[-3000:]
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) >= (2 if jobs == 2 else 0)
        proc.send_signal(sig)
        assert proc.wait(timeout=240) == 128 + sig
        log = (tmp_path / "study.log").read_text()
        cut = "ce seed 0, sib/x100 seed 0" if jobs == 2 else "ce seed 0"
        assert f"sib study: stopped by {sig.name}; runs cut: {cut} (each keeps its last completed checkpoint" in log
        assert jobs == 2 or "; not started: sib/x100 seed 0" in log
        deadline = time.monotonic() + 30
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _running(w)], "workers left running after the study was stopped"
    finally:
        for pid in [proc.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    for run in runs:  # each run continues from the checkpoint it kept
        saved = load_checkpoint(run)
        assert 1 <= saved["epoch"] < 400 and not list(run.glob(".*.tmp"))
        resumed = train(dataclasses.replace(TrainConfig(**json.loads((run / "config.json").read_text())),
                                            resume=True, epochs=saved["epoch"] + 1))
        assert [r["epoch"] for r in resumed.history] == list(range(1, saved["epoch"] + 2))


def _finished(run: Path) -> int:
    log = run / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


# ----------------------------------------------------------------------------------- the trade-off figure


def _evaluated(run: Path, acc: float, epgs: list[float], split: str = "test") -> None:
    (run / "eval").mkdir(parents=True)
    rows = [{"split": split, "method": "-", "metric": "accuracy", "value": acc}]
    rows += [{"split": split, "method": f"m{i}", "metric": "energy_pointing_game", "value": v}
             for i, v in enumerate(epgs)]
    rows += [{"split": split, "method": "m0", "metric": "auroc", "value": 0.99}]  # other metrics do not enter
    (run / "eval" / "summary.json").write_text(json.dumps(rows))


def test_trade_off_points_are_seed_means_of_method_averages_with_the_pareto_front(tmp_path):
    from sib.report.trade_off import pareto, trade_off_figure, trade_off_rows

    values = {"ce": [(0.90, [0.2, 0.4]), (0.80, [0.4, 0.6])],      # mean EPG per seed 0.3, 0.5 -> 0.4
              "good": [(0.95, [0.6, 0.8]), (0.85, [0.8, 1.0])],    # 0.7, 0.9 -> 0.8; acc 0.90: dominates ce
              "sharp": [(0.50, [0.9, 0.9]), (0.50, [0.9, 0.9])],   # EPG 0.9, accuracy 0.5: on the front
              "half": [(0.99, [0.1, 0.1])]}                         # one seed (the other not evaluated)
    runs = {}
    for label, seeds in values.items():
        runs[label] = {}
        for seed in range(2):
            run = tmp_path / label / f"seed{seed}"
            run.mkdir(parents=True)
            if seed < len(seeds):
                _evaluated(run, seeds[seed][0], seeds[seed][1])
            runs[label][seed] = run
    rows = {r["setting"]: r for r in trade_off_rows(runs)}
    assert rows["ce"]["accuracy"] == pytest.approx(0.85) and rows["ce"]["mean_epg"] == pytest.approx(0.4)
    # t-interval over the two seeds' method averages (0.3, 0.5): half-width t(0.975, 1) * 0.1414 / sqrt(2)
    half = 12.706204736 * math.sqrt(0.02) / math.sqrt(2)
    assert rows["ce"]["mean_epg_ci95_high"] - 0.4 == pytest.approx(half, rel=1e-6)
    assert rows["half"]["n_seeds"] == 1 and math.isnan(rows["half"]["accuracy_ci95_low"])
    assert {k for k, r in rows.items() if r["pareto"]} == {"good", "sharp", "half"}
    assert pareto({"a": (1, 1), "b": (1, 1), "c": (0, 2)}) == {"a", "b", "c"}  # ties dominate nobody
    assert trade_off_figure(list(rows.values()), "ce", tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert trade_off_figure([], "ce", tmp_path / "none.png") is None
