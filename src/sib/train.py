"""The training loop: one loop for every regulariser, dataset and model; CPU or GPU.

A run folder holds: `config.json` (the resolved configuration), `log.jsonl` (one line per epoch),
`checkpoint.pt` (the last completed epoch, written atomically), `best.pt` (best validation accuracy).
Checkpoints are taken after each epoch; `--resume` continues from the last one. The data order of epoch e
depends only on (seed, e), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from sib.config import TrainConfig, save_json, to_dict
from sib.data import collate, create_dataset
from sib.data.transforms import create_transform
from sib.io import atomic_torch_save, atomic_write_text, prepare_out_dir
from sib.models import create_model
from sib.regularizers import create_regularizer

CHECKPOINT = "checkpoint.pt"
# configuration fields that must agree between a checkpoint and the run that resumes or evaluates it
_IDENTITY = ("dataset", "model", "image_size", "regularizer", "mask_source", "normalization")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the run stops and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out: Path
    history: list[dict[str, Any]]
    model: nn.Module


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_dataset(cfg: TrainConfig, split: str, train: bool) -> Dataset:
    """A split of the configured dataset, with the train or eval transform of the configured size."""
    options = dict(cfg.dataset_options)
    if cfg.dataset == "synthetic":  # generated at the requested size; no resampling transform needed
        options.setdefault("image_size", cfg.image_size)
        options.setdefault("normalization", cfg.normalization)
        return create_dataset(cfg.dataset, cfg.root, split, **options)
    transform = create_transform(train=train, image_size=cfg.image_size, normalization=cfg.normalization)
    return create_dataset(cfg.dataset, cfg.root, split, transform=transform, **options)


def make_loader(ds: Dataset, batch_size: int, num_workers: int, shuffle_seed: int | None = None) -> DataLoader:
    """Shuffled (seeded) loader for training, in-order loader for evaluation."""
    sampler = None
    if shuffle_seed is not None:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(shuffle_seed))
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      drop_last=shuffle_seed is not None and len(ds) > batch_size)  # never a batch of 1 for HSIC


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device, max_batches: int | None = None) -> float:
    """Top-1 accuracy of `model` (put in eval mode, then restored) over `loader`."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for i, (x, y, _) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += (model(x).argmax(dim=1) == y).sum()
        n += y.numel()
    model.train(was_training)
    return correct.item() / max(n, 1)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid names: adamw, sgd")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path, expect: TrainConfig | None = None, num_classes: int | None = None) -> dict:
    """Load a sib checkpoint, checking that it belongs to the expected configuration."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file (expected a run folder or a .pt file)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {path}: not a sib checkpoint (no 'model'/'config' entries)")
    saved = ckpt["config"]
    if expect is not None:
        wanted = to_dict(expect)
        for key in _IDENTITY:
            if saved.get(key) != wanted.get(key):
                raise ValueError(f"checkpoint {path} was trained with {key}={saved.get(key)!r}, but this run "
                                 f"has {key}={wanted.get(key)!r}; use another --out or --overwrite")
    if num_classes is not None and ckpt.get("num_classes") != num_classes:
        raise ValueError(f"checkpoint {path} has {ckpt.get('num_classes')} classes, the dataset {num_classes}")
    return ckpt


def _check_finite(step: int, terms: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteLossError(f"non-finite loss at step {step}: term(s) {', '.join(bad)} = "
                                 f"{', '.join(str(terms[k].item()) for k in bad)}; the last good checkpoint "
                                 f"is kept")


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run as configured; see the module docstring for the run folder."""
    out = Path(cfg.out)
    prepare_out_dir(out, CHECKPOINT, cfg.overwrite, cfg.resume)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    train_ds = make_dataset(cfg, "train", train=True)
    num_classes = train_ds.num_classes
    eval_loaders = {s: make_loader(make_dataset(cfg, s, train=False), cfg.batch_size, cfg.num_workers)
                    for s in ["val", *cfg.eval_splits]}
    reg = create_regularizer(cfg.regularizer, mask_source=cfg.mask_source, weight=cfg.reg_weight,
                             sib_bg_weight=cfg.sib_bg_weight, sib_fg_weight=cfg.sib_fg_weight,
                             sib_window=cfg.sib_window, sib_form=cfg.sib_form)
    if reg.needs_mask and not getattr(train_ds, "has_masks", False):
        raise ValueError(f"--regularizer {cfg.regularizer} (mask source {cfg.mask_source}) needs foreground "
                         f"masks, and dataset {cfg.dataset!r} has none")
    model = create_model(cfg.model, num_classes, cfg.image_size, cfg.pretrained).to(device)
    opt = make_optimizer(cfg, model)
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp {cfg.amp!r}: valid values are none, bf16, fp16")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    history: list[dict[str, Any]] = []
    start_epoch, best_val = 0, -math.inf
    if cfg.resume and (out / CHECKPOINT).exists():
        ckpt = load_checkpoint(out, expect=cfg, num_classes=num_classes)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, history, best_val = ckpt["epoch"], ckpt["history"], ckpt["best_val"]
    save_json(to_dict(cfg), out / "config.json")

    step = start_epoch * (len(train_ds) // cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        loader = make_loader(train_ds, cfg.batch_size, cfg.num_workers, shuffle_seed=cfg.seed * 1_000_003 + epoch)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"{cfg.regularizer} epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for x, y, mask in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True) if mask is not None else None
            x.requires_grad_(reg.needs_input_grad)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
            ce = F.cross_entropy(logits.float(), y)
            r = reg(x, logits, y, mask)
            loss = ce + r.loss
            _check_finite(step, {"ce": ce, cfg.regularizer: r.loss})
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            for k, v in {"ce": ce.detach(), "reg": r.loss.detach(), **r.parts}.items():
                sums[k] = sums.get(k, torch.zeros((), device=device)) + torch.nan_to_num(v.float(), nan=0.0)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            seen += y.numel()
            step += 1
            if step % 10 == 0:
                bar.set_postfix(ce=f"{sums['ce'].item() / bar.n if bar.n else 0:.3f}")
        n_batches = max(bar.n, 1)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                               **{k: v.item() / n_batches for k, v in sums.items()},
                               "train_acc": correct.item() / max(seen, 1),
                               "sec_per_step": (time.perf_counter() - t0) / n_batches}
        for split, eval_loader in eval_loaders.items():
            row[f"{split}_acc"] = accuracy(model, eval_loader, device, cfg.eval_batches)
        history.append(row)
        improved = row["val_acc"] > best_val
        best_val = max(best_val, row["val_acc"])
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch + 1, "history": history, "best_val": best_val, "rng": _rng_state(),
                 "config": to_dict(cfg), "num_classes": num_classes, "classes": list(getattr(train_ds, "classes", []))}
        atomic_torch_save(state, out / CHECKPOINT)
        if improved:
            atomic_torch_save({k: state[k] for k in ("model", "epoch", "config", "num_classes", "classes")},
                              out / "best.pt")
        atomic_write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return TrainResult(out=out, history=history, model=model)
