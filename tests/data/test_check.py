"""`sib data check`: every irregularity of a folder is found ahead of a run, with counts per split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sib.data.check import add_arguments, check_dataset, run


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _found(report) -> dict[tuple[str, str], str]:
    """(file name, action) -> what (joined with "; " where a file has several problems)."""
    found: dict[tuple[str, str], str] = {}
    for p in report.problems:
        key = (Path(p.file).name, p.action)
        found[key] = f"{found[key]}; {p.what}" if key in found else p.what
    return found


def test_check_finds_every_irregularity_of_the_pets_fixture(pets_root):
    report = check_dataset("oxford_pets", pets_root, val_fraction=0.2)
    assert report.counts["trainval"] == 14 and report.counts["test"] == 6
    assert report.counts["train"] + report.counts["val"] == 14
    assert report.with_mask["trainval"] == 13 and report.empty_mask["trainval"] == 1
    found = _found(report)
    assert "listed but absent" in found[("Abyssinian_5.jpg", "skipped")]
    assert "trimap absent" in found[("american_bulldog_1.png", "no mask")]
    assert "PNG data under extension '.jpg'" in found[("Abyssinian_1.jpg", "converted")]
    assert "mode CMYK converted" in found[("Abyssinian_2.jpg", "converted")]
    assert "mode L converted" in found[("Abyssinian_3.jpg", "converted")]
    assert "GIF data" in found[("Abyssinian_4.jpg", "converted")]
    assert "mode RGBA converted" in found[("Bengal_1.jpg", "converted")]
    assert "resized" in found[("american_bulldog_2.png", "resized")]
    assert "different aspect ratio" in found[("american_bulldog_3.png", "error")]
    assert "truncated" in found[("american_bulldog_4.jpg", "error")].lower()
    assert "empty mask" in found[("american_bulldog_5.png", "kept")]
    assert "in no list file" in found[("Bengal_9.jpg", "ignored")]
    assert {Path(p.file).name for p in report.errors} == {"american_bulldog_3.png", "american_bulldog_4.jpg"}
    assert len(report.problems) == len(set(report.problems))  # each reported once, though in 3 splits


def test_cli_exit_codes_output_and_json(pets_root, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert run(_cli("--dataset", "oxford_pets", "--root", str(pets_root), "--json", str(out))) == 1
    text = capsys.readouterr().out
    assert "trainval" in text and "american_bulldog_4.jpg" in text and "2 files would stop a run" in text
    assert json.loads(out.read_text())["counts"]["test"] == 6
    excluded = ["--option", "exclude=['american_bulldog_3.jpg', 'american_bulldog_4.jpg']"]
    assert run(_cli("--dataset", "oxford_pets", "--root", str(pets_root), *excluded)) == 0
    assert "a run can read every listed file" in capsys.readouterr().out
    assert run(_cli("--dataset", "oxford_pets", "--root", str(tmp_path / "nothing"))) == 2
    assert "does not hold the expected files" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _cli("--dataset", "oxford_pets", "--root", "x", "--option", "no_equals_sign")


def test_check_on_oxford_pets_mini(shared_path):
    report = check_dataset("oxford_pets", shared_path("data/oxford-pets-mini"))
    assert report.counts == {"train": 270, "val": 30, "trainval": 300, "test": 199}
    assert report.with_mask == report.counts and not any(report.empty_mask.values())
    assert not report.errors
    found = _found(report)
    assert set(found) == {(n, "ignored") for n in ("Abyssinian_34.jpg", "Abyssinian_82.jpg",
                                                   "Abyssinian_34.png", "Abyssinian_82.png")}
    assert "GIF data under extension '.jpg'" in found[("Abyssinian_34.jpg", "ignored")]
    assert "empty: no pet pixel" in found[("Abyssinian_34.png", "ignored")]
    assert "empty" not in found[("Abyssinian_82.png", "ignored")]
