"""Time and peak memory of a plain training step vs regularised steps, same model and batch, one run.

    python benchmarks/bench_step.py                       # ResNet-18, 64 px, batch 32, CPU
    python benchmarks/bench_step.py --device cuda --image-size 224 --regularizers none sib sib@4 rrr energy

A step is: forward, cross-entropy (+ regulariser), backward, AdamW step, built by `sib.step.step_loss`
exactly as the trainer builds it (math attention kernel on regularised steps). A variant `name@K` is
`--regularizer name --every K`: one regularised step then K-1 plain ones; its time is the amortised
per-step cost, (time of the K steps) / K, the median over cycles. Each variant runs in its own
subprocess so that peak memory is its own: on CPU the process's peak resident set size growth over the
state before the first step; on CUDA `torch.cuda.max_memory_allocated`. The last line is
`sib_over_plain: <ratio>` (median S-IB step time / median plain step time).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run_variant(args: argparse.Namespace, regularizer: str) -> dict:
    import torch

    from sib.models import create_model
    from sib.regularizers import create_regularizer
    from sib.step import step_loss

    name, _, every = regularizer.partition("@")
    every = int(every or 1)

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model(args.model, args.num_classes, args.image_size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reg = create_regularizer(name)
    x0 = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    mask = torch.zeros(args.batch_size, 1, args.image_size, args.image_size, dtype=torch.bool, device=device)
    mask[:, :, args.image_size // 4: 3 * args.image_size // 4, args.image_size // 4: 3 * args.image_size // 4] = True

    def one(regularise: bool) -> None:
        _, ce, r = step_loss(model, reg, x0.clone(), y, mask, regularise=regularise)
        opt.zero_grad(set_to_none=True)
        (ce if r is None else ce + r.loss).backward()
        opt.step()

    def step() -> None:  # one cycle: a regularised step, then every - 1 plain ones
        for k in range(every):
            one(k == 0)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t) / every)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # ru_maxrss is KiB
    return {"regularizer": regularizer, "median_s": statistics.median(times), "min_s": min(times),
            "peak_mib": peak_mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--regularizers", nargs="+", default=["none", "sib", "sib@4", "rrr", "energy"],
                   help="registry names; name@K = every K-th step regularised (amortised per-step time)")
    p.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._variant:  # child process: one variant, result as JSON on the last line
        print(json.dumps(run_variant(args, args._variant)))
        return
    if "none" not in args.regularizers:
        args.regularizers.insert(0, "none")
    results = {}
    base = [a for a in sys.argv[1:] if not a.startswith("--_variant")]
    for r in args.regularizers:
        out = subprocess.run([sys.executable, __file__, *base, "--_variant", r], check=True, capture_output=True,
                             text=True).stdout
        results[r] = json.loads(out.strip().splitlines()[-1])
    print(f"model={args.model} image={args.image_size}px batch={args.batch_size} device={args.device} "
          f"steps={args.steps} (median of), warmup={args.warmup}")
    plain = results["none"]["median_s"]
    print(f"{'regularizer':<12}{'median ms':>12}{'min ms':>10}{'peak MiB':>10}{'x plain':>9}")
    for r, res in results.items():
        print(f"{r:<12}{res['median_s'] * 1e3:>12.1f}{res['min_s'] * 1e3:>10.1f}{res['peak_mib']:>10.0f}"
              f"{res['median_s'] / plain:>9.2f}")
    if "sib" in results:
        print(f"sib_over_plain: {results['sib']['median_s'] / plain:.2f}")


if __name__ == "__main__":
    main()
