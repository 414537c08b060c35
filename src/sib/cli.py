"""`sib train | evaluate | study | demo | data check`: parse -> config -> library call. No logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sib.config import EvalConfig, TrainConfig, add_dataclass_arguments, build_config


def _train(args: argparse.Namespace) -> int:
    from sib.train import train

    cfg = build_config(TrainConfig, args, args.config)
    result = train(cfg)
    last = result.history[-1] if result.history else {}
    print(f"run: {result.out}  " + "  ".join(f"{k}={v:.4f}" for k, v in last.items() if k.endswith("_acc")))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from sib.evaluate import evaluate
    from sib.report.tables import to_markdown

    cfg = build_config(EvalConfig, args, args.config)
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required: a run folder (holding checkpoint.pt) or a checkpoint file")
    result = evaluate(cfg)
    print(to_markdown(result.summary, ["split", "method", "metric", "value", "ci95_low", "ci95_high", "n",
                                       "excluded", "invalid", "tolerance_px"]))
    print(f"written: {result.out}/summary.{{csv,json,md}}, {result.out}/per_image.jsonl")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sib.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed, device=args.device, overwrite=args.overwrite,
             epochs=args.epochs)
    return 0


def _study(args: argparse.Namespace) -> int:
    from sib.report.study_summary import key_table
    from sib.report.tables import to_markdown
    from sib.study import run_study

    result = run_study(args.config, args.out, jobs=args.jobs, device=args.device, summary_only=args.summary_only,
                       overwrite=args.overwrite)
    key = key_table(result.rows)
    print(to_markdown(key, list(dict.fromkeys(c for row in key for c in row))) if key else "(no finished run)")
    for note in result.notes:
        print(note)
    figure = f", {result.figure}" if result.figure else ""
    print(f"written: {result.out}/summary.{{csv,json,md}} (all rows){figure}; runs in {result.out}/runs/")
    for failure in result.failed:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if result.failed else 0


def _data_check(args: argparse.Namespace) -> int:
    from sib.data.check import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier with or without an explanation regulariser")
    p.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="explanation methods x metrics over dataset splits for a run")
    p.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    add_dataclass_arguments(p, EvalConfig)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="CE vs S-IB on the built-in benchmark: train, evaluate, table, figure")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a tiny budget (under a minute), for tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch budget")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_demo)

    p = sub.add_parser("study", help="settings x seeds as run folders (resumable), then paired statistics")
    p.add_argument("--config", required=True, help="the study file (YAML: base, seeds, baseline, evaluate, settings)")
    p.add_argument("--out", required=True, help="the study folder (rerun the same command to resume)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes (default 1)")
    p.add_argument("--device", default=None, help="device of every run and evaluation (default: the file's)")
    p.add_argument("--summary-only", action="store_true", help="only re-aggregate the runs on disk")
    p.add_argument("--overwrite", action="store_true",
                   help="accept a changed study file for --out: runs whose configuration changed are redone")
    p.set_defaults(func=_study)

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate a dataset folder: counts per split, every problem found")
    from sib.data.check import add_arguments

    add_arguments(c)
    c.set_defaults(func=_data_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        # bad input: one clear line, no traceback (the message names the file or argument)
        print(f"sib {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # the machine, not the input: a full disk, a file too large, no permission (sib.io names the file and
        # says the previous file is intact); one line, exit 1
        print(f"sib {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sib {args.command}: interrupted; the last completed checkpoint/batch is kept "
              "(rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
