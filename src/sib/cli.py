"""`sib train | evaluate | explain | study | report | demo | data check`: parse -> config -> library call.

No logic lives here.

Every flag has a one-line help with its default and allowed values: the config flags take theirs from the
fields' metadata in sib.config (the README's option table comes from the same place).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

from sib.config import (
    EvalConfig,
    ExplainConfig,
    LauncherConfig,
    TrainConfig,
    add_dataclass_arguments,
    build_config,
    field_help,
)


def _train(args: argparse.Namespace) -> int:
    from sib.train import train

    cfg = build_config(TrainConfig, args, args.config)
    result = train(cfg)
    last = result.history[-1] if result.history else {}
    print(f"run: {result.out}  " + "  ".join(f"{k}={v:.4f}" for k, v in last.items() if k.endswith("_acc")))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from sib.evaluate import evaluate
    from sib.tables import to_markdown

    cfg = build_config(EvalConfig, args, args.config)
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required: a run folder (holding checkpoint.pt) or a checkpoint file")
    result = evaluate(cfg)
    print(to_markdown(result.summary, ["split", "method", "metric", "value", "ci95_low", "ci95_high", "n",
                                       "excluded", "invalid", "tolerance_px"]))
    print(f"written: {result.out}/summary.{{csv,json,md}}, {result.out}/per_image.jsonl")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from sib.explain_files import explain_images

    cfg = build_config(ExplainConfig, args, args.config)
    result = explain_images(cfg)
    print(f"explained {len(result.explained)} image(s) with {', '.join(result.methods)}; written: {result.out}/"
          f"predictions.{{json,csv}}, {result.out}/overlays/")
    for file, reason in result.failed:
        print(f"sib explain: skipped: {reason}" if file in reason else f"sib explain: skipped {file}: {reason}",
              file=sys.stderr)
    return 1 if result.failed else 0


def _demo(args: argparse.Namespace) -> int:
    from sib.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed, device=args.device, overwrite=args.overwrite,
             epochs=args.epochs)
    return 0


def _study(args: argparse.Namespace) -> int:
    from sib.report.study_summary import key_table
    from sib.study import run_study, study_status
    from sib.study_pool import StudyInterrupted
    from sib.tables import to_markdown

    if args.status is not None:
        rows, command = study_status(args.status)
        print(to_markdown(rows, ["setting", "seed", "state", "job", "node", "detail"]))
        counts = Counter(row["state"] for row in rows)
        print(", ".join(f"{n} {state}" for state, n in counts.items()))
        print(f"aggregate: {command}" + ("" if counts.get("done") == len(rows) else " (add --partial while runs are "
                                                                                   "missing)"))
        return 0
    for flag in ("config", "out"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag} is required (or --status DIR alone)")
    options = {f: v for f, v in vars(args).items() if f in LauncherConfig.__dataclass_fields__ and v is not None}
    try:
        result = run_study(args.config, args.out, jobs=args.jobs, device=args.device,
                           summary_only=args.summary_only, overwrite=args.overwrite, launcher=args.launcher,
                           launcher_options=options, wait=args.wait, partial=args.partial)
    except StudyInterrupted as stop:  # every worker stopped first; the message names the runs cut
        print(f"sib study: {stop}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except RuntimeError as err:  # the cluster refused (sbatch missing or failing): its message, no traceback
        print(f"sib study: error: {err}", file=sys.stderr)
        return 1
    if result.submitted is not None:
        for note in result.notes:
            print(note)
        return 0
    key = key_table(result.rows, result.baseline)
    print(to_markdown(key, list(dict.fromkeys(c for row in key for c in row))) if key else "(no finished run)")
    for note in result.notes:
        print(note)
    figure = f", {result.figure}" if result.figure else ""
    print(f"written: {result.out}/summary.{{csv,json,md}} (all rows){figure}; runs in {result.out}/runs/")
    for failure in result.failed:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if result.failed else 0


def _report(args: argparse.Namespace) -> int:
    from sib.report.html import write_report

    path = write_report(args.inputs, args.out, overwrite=args.overwrite, methods=args.methods, n_images=args.images,
                        device=args.device)
    print(f"report: {path} (open it in a browser; one self-contained file)")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from sib.data.check import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier with or without an explanation regulariser")
    p.add_argument("--config", default=None, help="YAML file of options (flags override it) (default: none)")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="explanation methods x metrics over dataset splits for a run")
    p.add_argument("--config", default=None, help="YAML file of options (flags override it) (default: none)")
    add_dataclass_arguments(p, EvalConfig)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("explain", help="a trained run's prediction and explanations of your own image files")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help=field_help(ExplainConfig, "inputs"))
    p.add_argument("--config", default=None, help="YAML file of options (flags override it) (default: none)")
    add_dataclass_arguments(p, ExplainConfig, skip=("inputs",))
    p.set_defaults(func=_explain)

    p = sub.add_parser("demo", help="CE vs S-IB on the built-in benchmark: train, evaluate, table, figure")
    p.add_argument("--out", default="runs/demo", help="the demo folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a tiny budget (under a minute), for tests (default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the demo's epoch budget (default: the demo's own, fewer with --quick)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N "
                                                    "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous demo in --out (only the files sib wrote) (default: off)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("study", help="settings x seeds as run folders (resumable), then paired statistics")
    p.add_argument("--config", default=None,
                   help="required: the study file (YAML: base, seeds, baseline, evaluate, settings, launcher)")
    p.add_argument("--out", default=None, help="required: the study folder (rerun the same command to resume)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, in separate processes, with the local launcher (default: 1)")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="where the runs execute: local (this machine) or slurm (one job array through submitit; the "
                        "options below and the file's launcher: section) (default: %(default)s)")
    p.add_argument("--wait", action="store_true",
                   help="with --launcher slurm: wait for the runs (a line per change), then aggregate (default: off: "
                        "exit after submitting, printing the job id)")
    p.add_argument("--status", default=None, metavar="DIR",
                   help="print each run of study folder DIR: pending / running (job, node) / done / failed (its "
                        "error), and the command that aggregates; nothing else is done (default: off)")
    p.add_argument("--partial", action="store_true",
                   help="aggregate although runs are missing (--summary-only refuses otherwise); the summary says "
                        "which (default: off)")
    p.add_argument("--device", default=None, help="device of every run and evaluation: auto, cpu, cuda or cuda:N "
                                                  "(default: the file's)")
    p.add_argument("--summary-only", action="store_true", help="only re-aggregate the runs on disk (default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="accept a changed study file for --out: runs whose configuration changed are redone "
                        "(default: off)")
    add_dataclass_arguments(p.add_argument_group("SLURM launcher (--launcher slurm; also the study file's "
                                                 "launcher: section)"), LauncherConfig)
    p.set_defaults(func=_study)

    p = sub.add_parser("report", help="a static HTML report (one file, opens from disk) of runs, a demo or a study")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_STUDY",
                   help="run folders (the first is the baseline), a demo folder, or one study folder")
    p.add_argument("--out", required=True, help="required: the report folder; index.html is written there")
    p.add_argument("--methods", nargs="+", default=None,
                   help="explanation methods of the heatmap gallery (default: up to 4 that every run's evaluation "
                        "ran)")
    p.add_argument("--images", type=int, default=6, help="images per split in the gallery (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where the gallery's models run: auto, cpu, cuda or cuda:N "
                                                   "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous report in --out (only its index.html) (default: off)")
    p.set_defaults(func=_report)

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
