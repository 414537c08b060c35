"""`sib evaluate` end to end: wall time of every method x every metric, and peak memory vs number of images.

Two measurements, each a real `python -m sib evaluate` subprocess (its peak resident set size from
`os.wait4`, i.e. getrusage of that child):

- time:   `--methods all --metrics all` on the first 300 images of the demo's `test` split (small_cnn,
          64 px, one epoch of training: the weights do not change the amount of work).
- memory: peak RSS at 1k and 10k synthetic images (tiny_cnn, 32 px, saliency x energy_pointing_game,
          dataset_options num_samples, the synthetic sample cache off so that only the evaluator's own
          memory can grow with the number of images).

`--before SRC` runs the same commands on another source tree too (PYTHONPATH=SRC; e.g. a
`git worktree add /tmp/before <rev>`), alternating with this tree, so that both see the same machine load.
The runs it trains live in `--work` (a temporary folder by default). Prints one line per measurement and
`time_ratio` / `memory_growth` lines (before / after).

Usage:
    python benchmarks/bench_eval_cli.py [--before /tmp/before/src] [--only time|memory] [--wide] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
WIDE_METRICS = ["energy_pointing_game", "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
                "topk_iou", "auroc"]


def train_runs(work: Path) -> dict[str, Path]:
    """The runs to evaluate, trained once with this tree's `sib` (the checkpoint format is shared)."""
    from sib.config import TrainConfig
    from sib.train import train

    runs = {"demo": work / "demo"}
    if not (runs["demo"] / "best.pt").exists():
        train(TrainConfig(dataset="synthetic", model="small_cnn", image_size=64, optimizer="adamw", lr=1e-3,
                          batch_size=32, epochs=1, seed=0, device="cpu", eval_splits=["test"],
                          out=str(runs["demo"]), overwrite=True))
    runs["tiny"] = work / "tiny"
    if not (runs["tiny"] / "best.pt").exists():
        train(TrainConfig(dataset="synthetic", model="tiny_cnn", image_size=32, batch_size=64, epochs=1, lr=1e-2,
                          dataset_options={"num_samples": 256, "cache": False}, device="cpu", eval_splits=[],
                          out=str(runs["tiny"]), overwrite=True))
    return runs


def run_evaluate(src: Path, args: list[str], threads: int | None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of `python -m sib evaluate ARGS` run on
    source tree `src`."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sib", "evaluate", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise RuntimeError(f"sib evaluate {' '.join(args)} failed on {src}: {proc.stderr.read()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, default=None, help="another source tree (its src/) to compare with")
    p.add_argument("--work", type=Path, default=None, help="folder for the trained runs and outputs (reused)")
    p.add_argument("--only", choices=["time", "memory"], default=None)
    p.add_argument("--images", type=int, default=300, help="images of the timed evaluation")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="images of the memory runs")
    p.add_argument("--wide", action="store_true",
                   help="memory also with 3 methods x 6 localisation metrics (19 rows per image)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the evaluate processes (1: CPU time is then a load-independent measure)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="sib_bench_eval_cli_"))
    work.mkdir(parents=True, exist_ok=True)
    # The memory runs' test split holds `n` images: the checkpoint's dataset_options say so. Training uses
    # 256 images; the evaluation's num_samples is patched into the saved config below.
    runs = train_runs(work)
    trees = {"after": HERE, **({"before": args.before.resolve()} if args.before else {})}
    print(f"trees: {', '.join(f'{k}={v}' for k, v in trees.items())}; threads: {args.threads or 'default'}; "
          f"load average: {os.getloadavg()[0]:.1f}")
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    jobs = []
    if args.only in (None, "time"):
        jobs.append(("time", ["--checkpoint", str(runs["demo"]), "--splits", "test", "--methods", "all",
                              "--metrics", "all", "--max-images", str(args.images), "--batch-size", "50",
                              "--device", "cpu"]))
    if args.only in (None, "memory"):
        for n in args.sizes:
            ckpt = set_num_samples(runs["tiny"], n)
            jobs.append((f"memory_{n}", ["--checkpoint", str(ckpt), "--splits", "test", "--methods", "saliency",
                                         "--metrics", "energy_pointing_game", "--batch-size", "100",
                                         "--device", "cpu"]))
            if args.wide:  # 19 rows per image instead of 2: what a list of all rows costs shows above the noise
                jobs.append((f"wide_{n}", ["--checkpoint", str(ckpt), "--splits", "test", "--methods", "saliency",
                                           "input_x_gradient", "grad_cam", "--metrics", *WIDE_METRICS,
                                           "--batch-size", "100", "--device", "cpu"]))
    for name, cmd in jobs:
        for tree, src in trees.items():
            out = work / f"eval_{name}_{tree}"
            wall, cpu, rss = run_evaluate(src, [*cmd, "--out", str(out), "--overwrite"], args.threads)
            results[(name, tree)] = (wall, cpu, rss)
            print(f"{name:<14}{tree:<8}wall {wall:8.1f} s   cpu {cpu:8.1f} s   peak RSS {rss:8.1f} MiB", flush=True)
    if ("time", "before") in results:
        before, after = results[("time", "before")], results[("time", "after")]
        print(f"time_ratio (before / after): wall {before[0] / after[0]:.2f}, cpu {before[1] / after[1]:.2f}")
    if len(args.sizes) >= 2:
        lo, hi = min(args.sizes), max(args.sizes)
        for kind in ("memory", "wide"):
            for tree in trees:
                if (f"{kind}_{lo}", tree) in results:
                    growth = results[(f"{kind}_{hi}", tree)][2] - results[(f"{kind}_{lo}", tree)][2]
                    print(f"{kind}_growth {tree} ({lo} -> {hi} images): {growth:+.1f} MiB")


def set_num_samples(run: Path, n: int) -> Path:
    """A copy of the run's best.pt whose saved config evaluates `n` images per split (cache off)."""
    import torch

    target = run / f"best_n{n}.pt"
    if not target.exists():
        ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
        ckpt["config"]["dataset_options"] = {"num_samples": n, "cache": False}
        torch.save(ckpt, target)
    return target


if __name__ == "__main__":
    main()
