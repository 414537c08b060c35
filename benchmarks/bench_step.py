"""Time and peak memory of a plain training step vs regularised steps, same model and batch, one run.

    python benchmarks/bench_step.py                       # ResNet-18, 64 px, batch 32, CPU
    python benchmarks/bench_step.py --device cuda --image-size 224 --regularizers none sib sib@4 rrr energy
    python benchmarks/bench_step.py --threads 2 --rounds 3 --regularizers none sib sib+fastbn sib+cl
    python benchmarks/bench_step.py --models small_cnn resnet18 --regularizers none energy energy:cam sib sib:cam

A step is: forward, cross-entropy (+ regulariser), backward, AdamW step, built by `sib.step.step_loss`
exactly as the trainer builds it (math attention kernel on regularised steps). A variant `name:LAYER` is
`--regularizer name --reg-layer LAYER` (cam or a module path; its default explanation: the label's Grad-CAM,
S-IB's VJP for sib): guidance at a layer, whose double backward runs through the model after the layer
only. Several `--models` are measured one after the other in one run, each against its own plain step
(lines `<model> <variant>_over_plain: <ratio>` and `..._peak_memory_over_plain`). A variant `name@K` is
`--regularizer name --every K`: one regularised step then K-1 plain ones; its time is the amortised
per-step cost, (time of the K steps) / K, the median over cycles. Each variant runs in its own
subprocess so that peak memory is its own: on CPU the process's peak resident set size growth over the
state before the first step; on CUDA `torch.cuda.max_memory_allocated`. The last line is
`sib_over_plain: <ratio>` (median S-IB step time / median plain step time), after
`sib_peak_memory_over_plain`. Also printed: each variant's median CPU time per step (steadier than wall
time on a loaded machine) and, for a variant with options (`+cl`, `+fastbn`), the cosine and relative
error of its parameter gradient vs the plain double backward's on the same model and batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def build(args: argparse.Namespace, opts: set[str], seed: int = 0):
    """Model (train mode), a batch and its mask, with the variant's options applied."""
    import torch

    from sib.fast_bn import use_fast_batchnorm
    from sib.models import create_model

    opts = opts | ({"cl"} if args.channels_last else set())
    torch.manual_seed(seed)
    device = torch.device(args.device)
    fmt = torch.channels_last if "cl" in opts else torch.contiguous_format
    model = create_model(args.model, args.num_classes, args.image_size).to(device).train()
    model = model.to(memory_format=fmt)
    if "fastbn" in opts:
        use_fast_batchnorm(model)
    x0 = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x0 = x0.contiguous(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    side = args.image_size
    mask = torch.zeros(args.batch_size, 1, side, side, dtype=torch.bool, device=device)
    mask[:, :, side // 4: 3 * side // 4, side // 4: 3 * side // 4] = True
    return model, x0, y, mask, fmt


def amp_dtype(args: argparse.Namespace):
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    import torch

    from sib.regularizers import create_regularizer
    from sib.step import step_loss

    spec, *opts = variant.split("+")
    spec, _, every = spec.partition("@")
    name, _, layer = spec.partition(":")
    every = int(every or 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x0, y, mask, fmt = build(args, set(opts))
    device = x0.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reg = create_regularizer(name, layer=layer or "input")

    def one(regularise: bool) -> None:
        _, ce, r = step_loss(model, reg, x0.clone(memory_format=fmt), y, mask, regularise=regularise,
                             amp_dtype=amp_dtype(args), reg_precision=args.reg_precision)
        opt.zero_grad(set_to_none=True)
        (ce if r is None else ce + r.loss).backward()
        opt.step()

    def step() -> None:  # one cycle: a regularised step, then every - 1 plain ones
        for k in range(every):
            one(k == 0)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    prof = None
    for i in range(args.warmup + args.steps):
        if args.profile and i == args.warmup:  # the timed steps, by operator
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU]
                           + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
            prof.__enter__()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t) / every)
            cpu.append((time.process_time() - c) / every)
    table = ""
    if prof is not None:
        prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=44)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # ru_maxrss is KiB
    return {"variant": variant, "median_s": statistics.median(times), "min_s": min(times),
            "cpu_s": statistics.median(cpu), "peak_mib": peak_mib, "profile": table,
            **gradient_check(args, name, set(opts))}


def gradient_check(args: argparse.Namespace, name: str, opts: set[str]) -> dict:
    """For a variant with options: cosine and relative error of its parameter gradient of one regularised
    loss vs the plain double backward's (same initial model and batch); {} for a plain variant."""
    import torch

    from sib.regularizers import create_regularizer
    from sib.step import step_loss

    if not opts or name == "none":
        return {}
    grads = []
    for o in (set(), opts):
        model, x0, y, mask, fmt = build(args, o)
        _, ce, r = step_loss(model, create_regularizer(name), x0.clone(memory_format=fmt), y, mask, regularise=True)
        g = torch.autograd.grad(ce + r.loss, [p for p in model.parameters() if p.requires_grad])
        grads.append(torch.cat([t.flatten().double() for t in g]))
    a, b = grads
    return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, 0)),
            "rel_err": float((a - b).norm() / a.norm())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18"], help="models measured one after the other")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--regularizers", nargs="+", default=["none", "sib", "sib@4", "rrr", "energy"],
                   help="registry names; name:LAYER = at a layer (cam or a module path); name@K = every K-th step "
                        "regularised (amortised per-step time); +cl: channels_last model and input; +fastbn: "
                        "sib.fast_bn.FastBatchNorm2d")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype of the steps")
    p.add_argument("--reg-precision", choices=["fp32", "amp"], default="fp32",
                   help="as the trainer's --reg-precision: fp32 runs the regularised step without autocast")
    p.add_argument("--channels-last", action="store_true", help="every variant channels_last (as +cl)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print each variant's top N operators (torch.profiler, self time) over its timed steps "
                        "(the times then include the profiler's overhead: take ratios from a run without it)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds over all variants, alternated (each variant's fastest round is kept): on a "
                        "loaded machine both sides of a ratio then see the same load")
    p.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._variant:  # child process: one variant of one model, result as JSON on the last line
        args.model = args._model
        print(json.dumps(run_variant(args, args._variant)))
        return
    if "none" not in args.regularizers:  # the reference of every ratio
        args.regularizers.insert(0, "none")
    base = [a for a in sys.argv[1:] if not a.startswith(("--_variant", "--_model"))]
    for model in args.models:
        args.model = model
        report(args, measure(args, base, model))


def measure(args: argparse.Namespace, base: list[str], model: str) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for r in args.regularizers:
            out = subprocess.run([sys.executable, __file__, *base, "--_variant", r, "--_model", model], check=True,
                                 capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            if r not in results or res["median_s"] < results[r]["median_s"]:
                results[r] = res
    return results


def report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    print(f"\nmodel={args.model} image={args.image_size}px batch={args.batch_size} device={args.device} "
          f"precision={args.precision} reg-precision={args.reg_precision} channels_last={args.channels_last}\n"
          f"threads={args.threads or 'default'} "
          f"steps={args.steps} (median of), "
          f"warmup={args.warmup}, rounds={args.rounds} (fastest kept); load average {os.getloadavg()[0]:.1f}")
    plain, plain_cpu = results["none"]["median_s"], results["none"]["cpu_s"]
    plain_mem = max(results["none"]["peak_mib"], 1e-9)
    print(f"{'variant':<16}{'median ms':>11}{'min ms':>9}{'cpu ms':>9}{'peak MiB':>10}{'x plain':>9}{'cpu x':>7}"
          f"{'mem x':>7}  gradient vs plain double backward")
    for r, res in results.items():
        check = f"cos {res['cosine']:.7f}, rel err {res['rel_err']:.1e}" if "cosine" in res else ""
        print(f"{r:<16}{res['median_s'] * 1e3:>11.1f}{res['min_s'] * 1e3:>9.1f}{res['cpu_s'] * 1e3:>9.1f}"
              f"{res['peak_mib']:>10.0f}{res['median_s'] / plain:>9.2f}{res['cpu_s'] / plain_cpu:>7.2f}"
              f"{res['peak_mib'] / plain_mem:>7.2f}  {check}")
    for r, res in results.items():
        if res.get("profile"):
            print(f"\n--- {r}: top {args.profile} operators by self time over {args.steps} steps\n{res['profile']}")
    for r, res in results.items():
        if r != "none":
            print(f"{args.model} {r}_peak_memory_over_plain: {res['peak_mib'] / plain_mem:.2f}")
            print(f"{args.model} {r}_over_plain: {res['median_s'] / plain:.2f}")
    if "sib" in results:
        print(f"sib_peak_memory_over_plain: {results['sib']['peak_mib'] / plain_mem:.2f}")
        print(f"sib_over_plain: {results['sib']['median_s'] / plain:.2f}")


if __name__ == "__main__":
    main()
