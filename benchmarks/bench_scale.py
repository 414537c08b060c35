"""How the plain and the S-IB training step grow with image size: time, peak memory and the mask's share.

    python benchmarks/bench_scale.py                                   # ResNet-18, 64..448 px, batch 2 and 4
    python benchmarks/bench_scale.py --sizes 64 128 --batch-sizes 8 --mask fast
    python benchmarks/bench_scale.py --device cuda --batch-sizes 16 32

Three parts, one run:
1. The adaptive mask alone (forward + backward of `adaptive_mask` on a (B, 3, S, S) map, issue 12's
   shapes: batch 32 up to 224 px, 8 at 448 px), for each `--mask`: `fast` is `sib.loss.adaptive_mask`;
   `direct` is the former form kept here verbatim (a window x window `avg_pool2d`, one `kthvalue` pass per
   order statistic), so before and after come from the same run on the same machine.
2. Per (image size, batch size): the plain step and the S-IB step with each `--mask`, built by
   `sib.step.step_loss` as the trainer builds it (forward, cross-entropy + regulariser, backward, AdamW
   step); the mask alone timed on that step's R shape, and its share of the S-IB step. Each (size, batch,
   kind) runs in its own subprocess. Peak memory is what one step allocates above the state before it: on
   CPU from the profiler's allocation events (`profile_memory=True`: every CPU tensor allocation and free,
   timestamped; the peak of their running sum over one extra, untimed step. The process's peak RSS is no
   use: a high-water mark that model creation and the optimizer's first step have already set); on CUDA
   `torch.cuda.max_memory_allocated` minus what was allocated before that step. Both include the
   parameter gradients (`zero_grad(set_to_none=True)` frees them between steps).
3. A fitted growth exponent per quantity: k in quantity ~ pixels^k, least squares of log quantity against
   log pixels over the sizes (k = 1: linear in pixels).

The model is built with the standard ImageNet stem at every size (`create_model(..., image_size=224)`):
`create_model` swaps in a stride-1 stem below 128 px, which would change the network between sizes.
The last line is `sib_over_plain: <ratio at each size>` (S-IB step / plain step, first batch
size, first mask). Times are the minimum over `--steps` timed steps after `--warmup` untimed ones (min, not
median: the CPU may be shared, and contention only ever adds time).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

MASK_TABLE = [(64, 32), (128, 32), (224, 32), (448, 8)]  # issue 12's mask-alone shapes: (side, batch)


def direct_adaptive_mask(R, window=None, temperature=0.1, slope=10.0):
    """The former `sib.loss.adaptive_mask` (before issue 12), kept verbatim as the 'before' of this benchmark."""
    import torch
    import torch.nn.functional as F

    from sib.loss import default_window

    def soft_quantile(values, q):  # one kthvalue pass per order statistic, 2 on each side of q(n-1)
        n = values.shape[1]
        centre = q * (n - 1)
        ranks = range(max(0, math.floor(centre) - 1), min(n - 1, math.floor(centre) + 2) + 1)
        logits = torch.tensor([-abs(i - centre) / temperature for i in ranks], dtype=torch.float64)
        out = values.new_zeros(values.shape[0])
        for rank, weight in zip(ranks, torch.softmax(logits, dim=0).tolist(), strict=True):
            out = out + weight * values.kthvalue(rank + 1, dim=1).values
        return out

    B, _, H, W = R.shape
    window = default_window(H, W) if window is None else window

    def q(t, level):
        return soft_quantile(t.flatten(1), level).view(B, 1, 1, 1)

    g = R.mean(dim=1, keepdim=True).abs()
    lo, hi = q(g, 0.05), q(g, 0.95)
    gn = (g - lo) / (hi - lo + 1e-8)
    h = torch.sigmoid(slope * (gn - q(gn, 0.8)))
    d = F.avg_pool2d(h, kernel_size=window, stride=1, padding=window // 2)
    return torch.sigmoid(slope * (d - q(d, 0.8)))


def _mask_fn(kind: str):
    from sib import loss

    return loss.adaptive_mask if kind == "fast" else direct_adaptive_mask


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mask(kind: str, batch: int, side: int, device, reps: int) -> float:
    """Minimum seconds of forward + backward of the mask alone on a (batch, 3, side, side) map."""
    import torch

    gen = torch.Generator().manual_seed(0)
    R = torch.randn(batch, 3, side, side, generator=gen).to(device).requires_grad_(True)
    cot = torch.rand(batch, 1, side, side, generator=gen).to(device)
    fn = _mask_fn(kind)
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        _sync(device)
        t = time.perf_counter()
        (gR,) = torch.autograd.grad(fn(R), R, cot)
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times[1:])


def cpu_peak_bytes(fn) -> int:
    """Peak of the bytes allocated (minus freed) on CPU while `fn()` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # nbytes < 0 for a free
        live += nbytes
        peak = max(peak, live)
    return peak


def run_child(args: argparse.Namespace, side: int, batch: int, kind: str) -> dict:
    """One (size, batch, kind) in this process: kind is 'plain' or 'sib:<mask>'."""
    import torch

    from sib import loss
    from sib.models import create_model
    from sib.regularizers import create_regularizer
    from sib.step import step_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    regularise = kind != "plain"
    mask_kind = kind.partition(":")[2] or None
    if mask_kind == "direct":  # the S-IB module calls sib.loss.adaptive_mask: run the former form instead
        loss.adaptive_mask = direct_adaptive_mask
    model = create_model(args.model, args.num_classes, image_size=224).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reg = create_regularizer("sib")
    x0 = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, args.num_classes, (batch,), device=device)

    def step() -> None:
        _, ce, r = step_loss(model, reg, x0.clone(), y, None, regularise=regularise)
        opt.zero_grad(set_to_none=True)
        (ce if r is None else ce + r.loss).backward()
        opt.step()

    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    if device.type == "cuda":  # one more step: its peak over what was allocated before it
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mib = cpu_peak_bytes(step) / 2**20
    out = {"step_s": min(times), "peak_mib": peak_mib}
    if mask_kind:
        out["mask_s"] = time_mask(mask_kind, batch, side, device, args.mask_reps)
    return out


def growth_exponent(sides: list[int], values: list[float]) -> float:
    """k of value ~ pixels^k: least-squares slope of log(value) against log(side^2)."""
    xs = [math.log(s * s) for s in sides]
    ys = [math.log(max(v, 1e-12)) for v in values]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224, 448])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--mask", nargs="+", choices=["fast", "direct"], default=["fast", "direct"],
                   help="adaptive masks to time: fast (sib.loss today) and/or direct (the former w x w pool)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mask-reps", type=int, default=3, help="timed repetitions of the mask alone")
    p.add_argument("--no-mask-table", action="store_true", help="skip part 1 (issue 12's mask-alone shapes)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if len(args.sizes) < 2:
        p.error("--sizes: give at least two sizes to fit a growth exponent")
    if args._child:  # child process: one (size, batch, kind), result as JSON on the last line
        side, batch, kind = args._child.split(",")
        print(json.dumps(run_child(args, int(side), int(batch), kind)))
        return

    import torch

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model={args.model} (standard stem at every size) device={args.device} threads={torch.get_num_threads()} "
          f"steps={args.steps} (min of), warmup={args.warmup}; peak memory = allocated by one step (profiler events)")

    if not args.no_mask_table:
        from sib.loss import default_window

        print("\n1. adaptive mask alone, forward + backward (min of", args.mask_reps, "reps)")
        print(f"{'side':>6}{'window':>8}{'batch':>7}" + "".join(f"{m + ' ms':>13}{'per image':>11}" for m in args.mask)
              + (f"{'direct/fast':>13}" if len(args.mask) == 2 else ""))
        for side, batch in MASK_TABLE:
            ts = {m: time_mask(m, batch, side, torch.device(args.device), args.mask_reps) for m in args.mask}
            row = f"{side:>6}{default_window(side, side):>8}{batch:>7}"
            row += "".join(f"{ts[m] * 1e3:>13.1f}{ts[m] / batch * 1e3:>11.2f}" for m in args.mask)
            if len(args.mask) == 2:
                row += f"{ts['direct'] / ts['fast']:>13.1f}"
            print(row, flush=True)

    kinds = ["plain"] + [f"sib:{m}" for m in args.mask]
    base = [a for a in sys.argv[1:] if not a.startswith("--_child")]
    res: dict[tuple[int, int, str], dict] = {}
    print("\n2. training step (ms, peak MiB); mask = the mask alone on the step's R shape, share = mask / S-IB step")
    head = f"{'side':>6}{'batch':>7}{'plain ms':>11}{'MiB':>7}"
    for m in args.mask:
        head += f"{'sib:' + m + ' ms':>16}{'MiB':>7}{'x plain':>9}{'mask ms':>10}{'share':>8}"
    print(head)
    for batch in args.batch_sizes:
        for side in args.sizes:
            for kind in kinds:
                out = subprocess.run([sys.executable, __file__, *base, "--_child", f"{side},{batch},{kind}"],
                                     check=True, capture_output=True, text=True).stdout
                res[side, batch, kind] = json.loads(out.strip().splitlines()[-1])
            plain = res[side, batch, "plain"]
            row = f"{side:>6}{batch:>7}{plain['step_s'] * 1e3:>11.0f}{plain['peak_mib']:>7.0f}"
            for m in args.mask:
                r = res[side, batch, f"sib:{m}"]
                row += (f"{r['step_s'] * 1e3:>16.0f}{r['peak_mib']:>7.0f}{r['step_s'] / plain['step_s']:>9.2f}"
                        f"{r['mask_s'] * 1e3:>10.1f}{r['mask_s'] / r['step_s']:>8.1%}")
            print(row, flush=True)

    print("\n3. growth exponent k (quantity ~ pixels^k), least squares over sizes", args.sizes)
    quantities = [("plain step time", "plain", "step_s"), ("plain peak memory", "plain", "peak_mib")]
    for m in args.mask:
        quantities += [(f"S-IB step time ({m} mask)", f"sib:{m}", "step_s"),
                       (f"S-IB peak memory ({m} mask)", f"sib:{m}", "peak_mib"),
                       (f"mask alone time ({m})", f"sib:{m}", "mask_s"),
                       (f"S-IB / plain time ({m} mask)", f"sib:{m}", "ratio")]
    print(f"{'quantity':<34}" + "".join(f"{'batch ' + str(b):>10}" for b in args.batch_sizes))
    for label, kind, key in quantities:
        row = f"{label:<34}"
        for b in args.batch_sizes:
            vals = [res[s, b, kind]["step_s"] / res[s, b, "plain"]["step_s"] if key == "ratio" else res[s, b, kind][key]
                    for s in args.sizes]
            row += f"{growth_exponent(args.sizes, vals):>10.2f}"
        print(row)
    b0, m0 = args.batch_sizes[0], args.mask[0]
    ratios = " ".join(f"{s}px={res[s, b0, 'sib:' + m0]['step_s'] / res[s, b0, 'plain']['step_s']:.2f}"
                      for s in args.sizes)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    print(f"sib_over_plain: {ratios} (batch {b0}, {m0} mask)")


if __name__ == "__main__":
    main()
