"""Run-folder rules on real folders: what --overwrite removes, which folders are refused, checkpoint helpers."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from sib.cli import main
from sib.config import TrainConfig, to_dict
from sib.run_dir import (
    DEMO,
    EVAL,
    EXPLAIN,
    MANIFEST,
    RESUME_MAY_CHANGE,
    STUDY,
    TRAIN,
    check_resume,
    folder_kind,
    load_checkpoint,
    prepare,
    resolve_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _old_run(folder):
    """A training run as sib leaves it, with an evaluation, TensorBoard events and a killed write's temporary."""
    prepare(folder, TRAIN, overwrite=False, resume=False)
    for name in ("config.json", "run.json", "log.jsonl", "checkpoint.pt", "best.pt", "summary.json",
                 ".checkpoint.pt.k3j_x9a1.tmp", "tensorboard/events.out.tfevents.1.host"):
        _touch(folder / name)
    prepare(folder / "eval", EVAL, overwrite=False, resume=False)
    for name in ("eval_config.json", "per_image.jsonl", "summary.csv", "summary.json", "summary.md"):
        _touch(folder / "eval" / name)


def test_new_folder_gets_a_manifest_of_its_kind(tmp_path):
    prepare(tmp_path / "a" / "run", TRAIN, overwrite=False, resume=False)
    manifest = json.loads((tmp_path / "a" / "run" / MANIFEST).read_text())
    assert manifest["kind"] == "train" and "checkpoint.pt" in manifest["files"]
    assert folder_kind(tmp_path / "a" / "run") == "train"
    prepare(tmp_path / "empty", DEMO, overwrite=False, resume=False)  # an empty folder is fine too
    assert folder_kind(tmp_path / "empty") == "demo"


@pytest.mark.parametrize("kind", [TRAIN, EVAL, DEMO, EXPLAIN])
def test_overwrite_of_a_folder_that_does_not_exist_yet_creates_it(tmp_path, kind):
    """`make demo` passes --overwrite; on a fresh clone neither runs/ nor runs/demo exists (it crashed there)."""
    folder = tmp_path / "runs" / "new"
    prepare(folder, kind, overwrite=True, resume=False)
    assert _tree(folder) == [MANIFEST] and folder_kind(folder) == kind.name


def test_overwrite_removes_the_kinds_artefacts_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    kept = [_touch(run / "thesis.tex", "\\documentclass{article}"), _touch(run / "figures" / "plot.pdf"),
            _touch(run / "eval" / "my_notes.txt"), _touch(run / "tensorboard" / "mine.txt"),
            _touch(run / "checkpoint.pt.bak")]
    with pytest.raises(FileExistsError, match="--resume to continue it or --overwrite"):
        prepare(run, TRAIN, overwrite=False, resume=False)
    prepare(run, TRAIN, overwrite=True, resume=False)
    assert _tree(run) == sorted([MANIFEST, "checkpoint.pt.bak", "eval", f"eval/{MANIFEST}", "eval/my_notes.txt",
                                 "figures",
                                 "figures/plot.pdf", "tensorboard", "tensorboard/mine.txt", "thesis.tex"])
    assert (run / "thesis.tex").read_text() == "\\documentclass{article}"
    assert all(p.exists() for p in kept)


def test_overwrite_of_a_sub_folder_of_another_kind_leaves_it(tmp_path):
    run = tmp_path / "run"
    prepare(run, TRAIN, overwrite=False, resume=False)
    _touch(run / "checkpoint.pt")
    prepare(run / "eval", DEMO, overwrite=False, resume=False)  # "eval" here is a demo folder, not ours
    _touch(run / "eval" / "comparison.json")
    prepare(run, TRAIN, overwrite=True, resume=False)
    assert (run / "eval" / "comparison.json").exists() and not (run / "checkpoint.pt").exists()


def test_folder_from_before_manifests_is_recognised_by_its_marker_and_only_resumed(tmp_path):
    run = tmp_path / "legacy"
    for name in ("checkpoint.pt", "config.json", "thesis.tex"):
        _touch(run / name)
    assert folder_kind(run) == "train"
    with pytest.raises(FileExistsError, match="already holds a sib train run"):
        prepare(run, TRAIN, overwrite=False, resume=False)
    # a marker is a guess (a user's own checkpoint.pt); deleting needs the manifest's word
    with pytest.raises(FileExistsError, match=rf"no {MANIFEST}.*would have deleted: checkpoint.pt, config.json;"):
        prepare(run, TRAIN, overwrite=True, resume=False)
    assert _tree(run) == ["checkpoint.pt", "config.json", "thesis.tex"]
    prepare(run, TRAIN, overwrite=False, resume=True)  # continuing it deletes nothing
    assert _tree(run) == [MANIFEST, "checkpoint.pt", "config.json", "thesis.tex"]


NAMES_ONLY = [(TRAIN, ["config.json", "summary.json"]), (EXPLAIN, ["overlays/holiday.png", "predictions.json"]),
              (EVAL, ["summary.csv"])]


@pytest.mark.parametrize("kind, names, flags", [(k, n, f) for k, n in NAMES_ONLY
                                                for f in ({}, {"overwrite": True}, {"resume": True})
                                                if k.resumable or not f.get("resume")])
def test_a_folder_without_manifest_holding_only_sib_names_is_refused(tmp_path, kind, names, flags):
    """A user's config.json and summary.json look like sib's by name; without a manifest they are the user's."""
    folder = tmp_path / "mine"
    for name in names:
        _touch(folder / name, f"my {name}")
    with pytest.raises(FileExistsError, match=rf"not a sib {kind.name} folder \(no {MANIFEST}\)") as err:
        prepare(folder, kind, overwrite=flags.get("overwrite", False), resume=flags.get("resume", False))
    top = sorted({name.split("/")[0] for name in names})
    if flags.get("overwrite"):
        assert f"--overwrite would have deleted: {', '.join(top)}" in str(err.value)
    assert all((folder / name).read_text() == f"my {name}" for name in names)
    assert MANIFEST not in _tree(folder)


@pytest.mark.parametrize("kind", [TRAIN, EVAL, EXPLAIN])
def test_an_empty_folder_is_used_with_or_without_overwrite(tmp_path, kind):
    for overwrite in (False, True):
        folder = tmp_path / f"empty{overwrite}"
        folder.mkdir()
        prepare(folder, kind, overwrite=overwrite, resume=False)
        assert _tree(folder) == [MANIFEST]


def test_overwrite_through_the_cli_never_touches_a_folder_without_manifest(tmp_path, capsys):
    folder = tmp_path / "mine"
    _touch(folder / "config.json", "my config")
    _touch(folder / "summary.json", "my summary")
    assert main(["train", "--out", str(folder), "--overwrite", "--model", "tiny_cnn"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite would have deleted: config.json, summary.json" in err and len(err.splitlines()) == 1
    assert (folder / "config.json").read_text() == "my config" and _tree(folder) == ["config.json", "summary.json"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_non_empty_folder_is_refused_untouched(tmp_path, overwrite):
    folder = tmp_path / "thesis"
    _touch(folder / "thesis.tex", "chapter 1")
    _touch(folder / "config.json", "{}")  # one of our names does not make the folder ours
    with pytest.raises(FileExistsError, match=r"not empty \(config.json, thesis.tex\) and is not a sib train"):
        prepare(folder, TRAIN, overwrite=overwrite, resume=False)
    assert _tree(folder) == ["config.json", "thesis.tex"]
    assert (folder / "config.json").read_text() == "{}"


def test_folder_of_another_kind_is_refused(tmp_path):
    prepare(tmp_path / "ev", EVAL, overwrite=False, resume=False)
    _touch(tmp_path / "ev" / "per_image.jsonl")
    with pytest.raises(FileExistsError, match="holds a sib eval folder, not a train one"):
        prepare(tmp_path / "ev", TRAIN, overwrite=True, resume=False)
    assert (tmp_path / "ev" / "per_image.jsonl").exists()


def test_demo_refusal_names_only_overwrite_and_counts_its_runs(tmp_path):
    demo = tmp_path / "demo"
    prepare(demo, DEMO, overwrite=False, resume=False)
    prepare(demo / "ce", TRAIN, overwrite=False, resume=False)
    _touch(demo / "ce" / "checkpoint.pt")  # an interrupted demo: a run, no comparison yet
    with pytest.raises(FileExistsError, match="sib demo run .*; pass --overwrite to replace") as err:
        prepare(demo, DEMO, overwrite=False, resume=False)
    assert "--resume" not in str(err.value)
    prepare(demo, DEMO, overwrite=True, resume=False)
    assert _tree(demo) == [MANIFEST]
    # a sub-run holding a user's file keeps its manifest, so the demo's own run may still write there
    prepare(demo / "sib", TRAIN, overwrite=False, resume=False)
    _touch(demo / "sib" / "checkpoint.pt")
    _touch(demo / "sib" / "notes.txt")
    prepare(demo, DEMO, overwrite=True, resume=False)
    assert _tree(demo) == sorted([MANIFEST, "sib", f"sib/{MANIFEST}", "sib/notes.txt"])
    prepare(demo / "sib", TRAIN, overwrite=True, resume=False)


def test_study_folders_nest_training_runs_by_pattern(tmp_path):
    study = tmp_path / "study"
    prepare(study, STUDY, overwrite=False, resume=False)
    for name in ("study.json", "summary.csv", "dose_response.png", "my_analysis.ipynb"):
        _touch(study / name)
    seed = study / "runs" / "sib__x100" / "seed0"
    prepare(seed, TRAIN, overwrite=False, resume=False)
    for name in ("checkpoint.pt", "log.jsonl", ".log.jsonl.zz9x_k2a.tmp", "notes.txt"):
        _touch(seed / name)
    _touch(study / "runs" / "sib__x1" / "seed1" / "checkpoint.pt")  # a run from before manifests
    with pytest.raises(FileExistsError, match="holds a sib study folder, not a train one"):
        prepare(study, TRAIN, overwrite=True, resume=False)
    prepare(study, STUDY, overwrite=True, resume=False)
    assert _tree(study) == sorted([MANIFEST, "my_analysis.ipynb", "runs", "runs/sib__x100", "runs/sib__x100/seed0",
                                   f"runs/sib__x100/seed0/{MANIFEST}", "runs/sib__x100/seed0/notes.txt"])


def test_resume_removes_temporaries_of_a_killed_write_only(tmp_path):
    run = tmp_path / "run"
    prepare(run, TRAIN, overwrite=False, resume=False)
    _touch(run / "checkpoint.pt", "intact")
    _touch(run / ".checkpoint.pt.abcd1234.tmp", "half")
    _touch(run / ".thesis.tex.abcd1234.tmp", "an editor's file")
    prepare(run, TRAIN, overwrite=False, resume=True)
    assert _tree(run) == sorted([MANIFEST, ".thesis.tex.abcd1234.tmp", "checkpoint.pt"])
    assert (run / "checkpoint.pt").read_text() == "intact"


def test_contradictory_or_impossible_requests(tmp_path):
    with pytest.raises(ValueError, match="--resume and --overwrite contradict"):
        prepare(tmp_path / "run", TRAIN, overwrite=True, resume=True)
    _touch(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        prepare(tmp_path / "file", TRAIN, overwrite=False, resume=False)
    _touch(tmp_path / "bad" / MANIFEST, "{not json")
    with pytest.raises(ValueError, match="unreadable sib manifest"):
        prepare(tmp_path / "bad", TRAIN, overwrite=False, resume=False)


def test_resolve_weights_picks_the_file_and_says_what_is_missing(tmp_path):
    run = tmp_path / "run"
    _touch(run / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="no best.pt .*pass --weights last"):
        resolve_weights(run, "best")
    assert resolve_weights(run, "last") == run / "checkpoint.pt"
    _touch(run / "best.pt")
    assert resolve_weights(run, "best") == run / "best.pt"
    assert resolve_weights(run / "checkpoint.pt", "best") == run / "checkpoint.pt"  # a file is used as given
    with pytest.raises(ValueError, match="--weights 'median': valid values are best, last"):
        resolve_weights(run, "median")
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        resolve_weights(tmp_path / "nowhere", "best")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        resolve_weights(tmp_path, "last")


def test_check_resume_names_every_changed_field_and_allows_the_listed_ones():
    saved = to_dict(TrainConfig(batch_size=16, seed=0, lr=0.05))
    allowed = to_dict(TrainConfig(batch_size=16, seed=0, lr=0.05, epochs=50, device="cpu", num_workers=4,
                                  log_every=1, profile_steps=0, tensorboard=False, eval_splits=["val"],
                                  eval_batches=2, out="elsewhere", resume=True))
    defaults = to_dict(TrainConfig())
    check_resume(saved, allowed, defaults, "ck.pt")
    changed = {**allowed, "batch_size": 8, "seed": 123, "lr": 1.0}
    with pytest.raises(ValueError) as err:
        check_resume(saved, changed, defaults, "ck.pt")
    message = str(err.value)
    for part in ("batch_size=16 -> batch_size=8", "seed=0 -> seed=123", "lr=0.05 -> lr=1.0", "ck.pt"):
        assert part in message
    assert "epochs=" not in message and "\n" not in message
    # NaN equals NaN; a field the checkpoint predates counts as its default
    check_resume({**saved, "sib_bg_weight": math.nan}, {**allowed, "sib_bg_weight": math.nan}, defaults, "ck.pt")
    old = {k: v for k, v in saved.items() if k != "sib_form"}
    check_resume(old, allowed, defaults, "ck.pt")
    with pytest.raises(ValueError, match="sib_form='exp' -> sib_form='linear'"):
        check_resume(old, {**allowed, "sib_form": "linear"}, defaults, "ck.pt")
    assert RESUME_MAY_CHANGE <= set(defaults)  # the allow-list names real fields


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint({"model": {}, "config": {}, "rng": rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])  # torch.load(weights_only=True) inside
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_checkpoint_of_an_earlier_version_still_loads_and_restores_its_rng(tmp_path):
    """Earlier checkpoints pickled NumPy's RNG state as an array and Python's as tuples."""
    np.random.seed(5)
    random.seed(5)
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"model": {}, "config": {}, "rng": legacy}, tmp_path / "old.pt")
    expected = (random.random(), np.random.rand())
    np.random.seed(0)
    random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"])
    assert (random.random(), np.random.rand()) == expected
