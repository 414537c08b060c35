"""Cost of the per-epoch diagnostics and of --reg-calibrate, against the epoch they are added to.

    python benchmarks/bench_diagnostics.py                 # the demo's setting: small_cnn, 64 px, batch 32, CPU
    python benchmarks/bench_diagnostics.py --regularizers sib rrr --threads 1

Per regulariser: the median time of `sib.diagnostics.diagnostics` on one batch (one forward and one double
backward, what the trainer adds at each epoch end), of a regularised training step (sib.step.step_loss +
backward + AdamW), and of `calibrate` on CALIBRATION_BATCHES batches (once per run). The printed ratios:
diag / step, and diag / epoch where an epoch is `--steps-per-epoch` regularised steps (the demo: 1200
training images / batch 32 = 37 steps).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps-per-epoch", type=int, default=37)
    parser.add_argument("--regularizers", nargs="+", default=["sib", "sib_logp", "rrr", "energy"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from sib.data import collate, create_dataset
    from sib.diagnostics import CALIBRATION_BATCHES, calibrate, diagnostics
    from sib.models import create_model
    from sib.regularizers import create_regularizer
    from sib.step import step_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ds = create_dataset("synthetic", None, "val", image_size=args.image_size,
                        num_samples=args.batch_size * CALIBRATION_BATCHES)
    batches = [tuple(t.to(device) if t is not None else None
                     for t in collate([ds[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)]))
               for k in range(CALIBRATION_BATCHES)]
    torch.manual_seed(0)
    model = create_model(args.model, ds.num_classes, args.image_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.device}; epoch = {args.steps_per_epoch} regularised steps")
    for name in args.regularizers:
        reg = create_regularizer(name)

        def step(reg=reg) -> None:
            x, y, mask = batches[0]
            _, ce, r = step_loss(model, reg, x.clone(), y, mask, regularise=True)
            opt.zero_grad(set_to_none=True)
            (ce + r.loss).backward()
            opt.step()

        diag_s = timed(lambda reg=reg: diagnostics(model, reg, *batches[0]))
        step_s = timed(step)
        cal_s = timed(lambda name=name: calibrate(model, create_regularizer(name), batches, 0.1))
        print(f"{name:9s} diag {diag_s * 1e3:7.1f} ms  step {step_s * 1e3:7.1f} ms  calibrate {cal_s:6.2f} s  "
              f"diag/step {diag_s / step_s:5.2f}  diag/epoch {diag_s / (step_s * args.steps_per_epoch):6.3%}  "
              f"calibrate/epoch {cal_s / (step_s * args.steps_per_epoch):6.3%}")


if __name__ == "__main__":
    main()
