"""Loader speed: images per second with 0, 1 and 2 workers, and the share of an S-IB step spent waiting.

    python benchmarks/bench_data.py [--root ../shared/data/oxford-pets-mini] [--device auto]

Reads oxford-pets-mini (the train transform at 224 px: decode, random resized crop, flip, normalise, mask
alongside), or, where that folder is absent, a generated image folder of 500x375 JPEGs with mask PNGs.
The training step is S-IB-like: ResNet-18 forward, the input gradient of the true-class logits with
`create_graph=True`, its squared norm added to the cross-entropy, backward, SGD step; batch 16, 224 px.
"Waiting" is the time a real training loop (2 workers) spends in `next(loader)`, as a share of its wall
time; for 0 workers, where loading and the step run one after the other, the share is the batch's load
time over load + step time. Prints rates and ratios; asserts nothing. About 100 s on 2 CPU cores (a CPU
S-IB step takes ~20 s), under a minute on a GPU machine.

With 0 workers the transforms run in the main process with torch's intra-op threads; on a loaded machine
those threads contend and the rate drops several-fold (DataLoader workers use one thread each).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from sib.data import collate, create_dataset
from sib.data.transforms import create_transform

MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxford-pets-mini"


def generated_folder(root: Path, n: int = 96) -> Path:
    """An image_folder of n 500x375 JPEGs (2 classes) with mask PNGs, like a typical photo dataset."""
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = f"class{i % 2}"
        img = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        (root / "masks" / "train" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "train" / cls / f"{i}.jpg", quality=90)
        mask = np.zeros((375, 500), dtype=np.uint8)
        mask[100:300, 150:400] = 255
        Image.fromarray(mask).save(root / "masks" / "train" / cls / f"{i}.png")
    return root


def loader_rate(ds, workers: int, batch: int, n_images: int) -> float:
    """Images per second after the first batch (worker start-up excluded)."""
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        persistent_workers=False, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # start-up: forking workers, first decode
    seen, start = 0, time.perf_counter()
    for x, _, _ in it:
        seen += len(x)
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - start)


def sib_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    x = x.requires_grad_(True)
    logits = model(x)
    ce = torch.nn.functional.cross_entropy(logits, y)
    # (B, 3, H, W) input gradient of the true-class logits, kept in the graph (double backprop).
    (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x, create_graph=True)
    loss = ce + 1e-3 * grad.pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def waiting_share(ds, workers: int, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(share of loop time in next(loader), seconds per step) over `steps` steps after one warm-up step."""
    model = torchvision.models.resnet18(num_classes=ds.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        drop_last=True, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    x, y, _ = next(it)
    sib_step(model, opt, x.to(device), y.to(device))  # warm-up (allocator, cuDNN autotune)
    waited = 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        try:
            x, y, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, y, _ = next(it)
        waited += time.perf_counter() - t
        sib_step(model, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    sync()
    total = time.perf_counter() - start
    return waited / total, total / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(MINI))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--images", type=int, default=160, help="images timed per worker setting")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 2 on CPU, 30 on GPU)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader settings timed")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    steps = args.steps or (30 if device.type == "cuda" else 2)
    tf = create_transform(True, image_size=224)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if Path(args.root).is_dir():
            ds, source = create_dataset("oxford_pets", args.root, "trainval", transform=tf), args.root
        else:
            ds = create_dataset("image_folder", generated_folder(Path(tmp)), "trainval", transform=tf)
            source = f"generated folder ({args.root} absent)"
        print(f"data: {source}, {len(ds)} images; train transform at 224 px; torch threads "
              f"{torch.get_num_threads()}; device {device}")
        rates = {}
        for workers in args.workers:
            rates[workers] = loader_rate(ds, workers, batch=16, n_images=args.images)
            print(f"loader  workers={workers}: {rates[workers]:7.1f} images/s")
        loop_workers = max(args.workers)
        share, per_step = waiting_share(ds, loop_workers, batch=16, steps=steps, device=device)
        print(f"S-IB step (ResNet-18, batch 16, 224 px, {device.type}): {per_step * 1000:.0f} ms/step in a "
              f"loop with workers={loop_workers}: {share:.1%} of it waiting for data")
        if 0 in rates:
            load = 16 / rates[0]
            compute = max(per_step * (1 - share), 1e-9)  # the step without its waiting
            print(f"  workers=0 (load then step, serially): {load / (load + compute):.1%} waiting for data")


if __name__ == "__main__":
    main()
