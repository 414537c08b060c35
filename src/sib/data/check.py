"""`sib data check`: validate a dataset folder before a run reads it.

Builds every split the way a run would, then opens every listed image and mask (the loaders only do
that lazily, per sample), and lists the files on disk that no list names. Prints the counts per split
and every problem with the action the loaders take (see the table in `sib.data.common`).

Exit code: 0 when a run can read every listed file (problems may still be reported: conversions,
skipped absent files, empty masks); 1 when some listed file would stop a run ("error": unreadable
image or mask, irreconcilable mask size); 2 when the folder is not the dataset at all.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sib.data import DATASETS, create_dataset
from sib.data.common import SPLITS, DataWarning, MaskedImageDataset, Problem, open_image


@dataclass
class CheckReport:
    """What `check_dataset` found.

    Attributes:
        dataset, root: what was checked.
        classes: the class names, in label order.
        counts: number of usable samples per split ("train", "val", "trainval", "test"); absent splits
            are missing from the dict.
        with_mask: per split, samples that have a mask (file present); `empty_mask`: of those, masks
            without a foreground pixel.
        problems: every irregularity, deduplicated, in the order found.
    """

    dataset: str
    root: str
    classes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    with_mask: dict[str, int] = field(default_factory=dict)
    empty_mask: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.action == "error"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """The human-readable report `sib data check` prints."""
        lines = [f"dataset {self.dataset} at {self.root}",
                 f"classes: {len(self.classes)} ({', '.join(self.classes[:10])}"
                 f"{', ...' if len(self.classes) > 10 else ''})",
                 f"{'split':<9} {'images':>8} {'with mask':>10} {'empty mask':>11}"]
        for split in SPLITS:
            if split in self.counts:
                lines.append(f"{split:<9} {self.counts[split]:>8} {self.with_mask.get(split, 0):>10} "
                             f"{self.empty_mask.get(split, 0):>11}")
        lines.append(f"problems: {len(self.problems)}")
        for p in self.problems:
            lines.append(f"  [{p.action}] {p.file}: {p.what}")
        tally: dict[str, int] = {}
        for p in self.problems:
            tally[p.action] = tally.get(p.action, 0) + 1
        lines.append("summary: " + (", ".join(f"{n} {a}" for a, n in sorted(tally.items())) or "no problems"))
        lines.append(f"{len(self.errors)} files would stop a run: fix them, or pass exclude=[...]"
                     if self.errors else "a run can read every listed file")
        return "\n".join(lines)


def _build(name: str, root: str | Path, split: str, options: dict[str, Any]) -> MaskedImageDataset | str:
    """The split's dataset, or why the split does not exist (an optional split, e.g. no test folder)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the report lists every problem itself
        try:
            return create_dataset(name, str(root), split, **options)
        except FileNotFoundError as e:
            if split == "trainval":
                raise
            return str(e)


def check_dataset(name: str, root: str | Path, workers: int | None = None, **options: Any) -> CheckReport:
    """Validate a dataset folder by reading every listed file.

    Args:
        name: registry name ("oxford_pets", "cub200", ...).
        root: the dataset's folder.
        workers: threads that open files (PIL decodes outside the GIL); None: min(8, CPU count).
        **options: the dataset's options (border=, mask_source=, val_fraction=, ...).

    Returns:
        A `CheckReport`.

    Raises:
        FileNotFoundError: the folder does not hold the dataset (the loader's message says what to get).
    """
    report = CheckReport(dataset=name, root=str(root))
    datasets = {split: _build(name, root, split, options) for split in SPLITS}
    problems: list[Problem] = []
    inspected: dict[str, list[Problem]] = {}  # image path -> its problems, each file opened once
    pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))
    with pool:
        for split, ds in datasets.items():
            if isinstance(ds, str):
                problems.append(Problem(str(root), f"no {split} split: {ds}", "ignored"))
                continue
            report.classes = report.classes or list(ds.classes)
            report.counts[split] = len(ds)
            if split in ("trainval", "test"):
                problems += ds.problems  # train and val repeat trainval's list problems
            todo = [i for i, s in enumerate(ds.samples) if str(s.path) not in inspected]
            for i, found in zip(todo, pool.map(ds.inspect, todo), strict=True):
                inspected[str(ds.samples[i].path)] = found
                problems += found
            masked = [s for s in ds.samples if s.mask is not None]
            report.with_mask[split] = len(masked)
            report.empty_mask[split] = sum(any("empty mask" in p.what for p in inspected[str(s.path)])
                                           for s in masked)
        first = next(ds for ds in datasets.values() if not isinstance(ds, str))
        problems += [_describe_unlisted(p) for p in first.unlisted()]
    report.problems = list(dict.fromkeys(problems))  # dataclass equality: drops exact repeats, keeps order
    return report


def _describe_unlisted(problem: Problem) -> Problem:
    """Add what opening an unlisted image reveals, so a folder's oddities are all in one report."""
    notes: list[str] = []
    if problem.what != "image in no list file":
        return problem
    try:
        open_image(problem.file, notes)
    except OSError as e:
        notes.append(str(e))
    return Problem(problem.file, "; ".join([problem.what, *notes]), problem.action) if notes else problem


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"an option is KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)  # numbers, booleans, lists; anything else stays a string
    except (ValueError, SyntaxError):
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `sib data check`."""
    generated = ("synthetic", "decoy_digits")  # no folder to check
    parser.add_argument("--dataset", required=True, choices=[n for n in DATASETS.names() if n not in generated],
                        help="dataset format (registry name)")
    parser.add_argument("--root", required=True, help="the dataset's folder, in its authors' layout")
    parser.add_argument("--option", action="append", default=[], type=_parse_option, metavar="KEY=VALUE",
                        help="a dataset option, e.g. border=foreground or mask_source=box (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="threads opening files (default: up to 8)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run `sib data check`; exit code: (0 readable, 1 files that would stop a run, 2 no dataset)."""
    try:
        report = check_dataset(args.dataset, args.root, workers=args.workers, **dict(args.option))
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}")
        return 2
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="sib data check", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
