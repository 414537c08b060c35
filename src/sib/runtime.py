"""What every command needs at run time: the device, the seeds, the configured dataset and its loaders, top-1
accuracy, and a trained run loaded for inference.

The building blocks that `sib train`, `sib evaluate`, `sib explain`, `sib report`, the demo and the study share
live here, one floor below the commands, so that no command imports another for them: before, they sat in
sib.train and every command climbed back into the trainer. Named for when they are used (at run time, by
whichever command runs), not "common": sib.data.common is something else. Only what more than one command
uses belongs here; what only the training loop uses stays in sib.train.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sib.config import TrainConfig
from sib.data import collate, create_dataset
from sib.data.transforms import create_transform
from sib.distributed import DistInfo, EpochBatchSampler, all_reduce_
from sib.models import create_model
from sib.run_dir import load_checkpoint, resolve_weights


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
    if cfg.dataset in ("synthetic", "decoy_digits"):  # generated at the requested size; no resampling transform
        options.setdefault("image_size", cfg.image_size)
        options.setdefault("normalization", cfg.normalization)
        return create_dataset(cfg.dataset, cfg.root, split, **options)
    transform = create_transform(train=train, image_size=cfg.image_size, normalization=cfg.normalization)
    return create_dataset(cfg.dataset, cfg.root, split, transform=transform, **options)


def make_loader(ds: Dataset, batch_size: int, num_workers: int, shuffle_seed: int | None = None,
                indices: list[int] | None = None) -> DataLoader:
    """In-order loader for evaluation (of `indices` only, when given: a process's shard); with
    `shuffle_seed`, a seeded shuffled single-process training loader (the trainer uses EpochBatchSampler)."""
    if shuffle_seed is not None:
        sampler = EpochBatchSampler(len(ds), batch_size, shuffle_seed)
        return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate)
    return DataLoader(ds, batch_size=batch_size, sampler=indices, num_workers=num_workers, collate_fn=collate)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device, max_batches: int | None = None,
             info: DistInfo | None = None) -> float:
    """Top-1 accuracy of `model` (put in eval mode, then restored) over `loader`, summed over processes."""
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
    if info is not None and info.enabled:  # every process evaluated its own shard
        totals = all_reduce_(torch.stack([correct.double(), torch.tensor(float(n), device=device)]), info)
        return totals[0].item() / max(totals[1].item(), 1)
    return correct.item() / max(n, 1)


def load_run(checkpoint: str | Path, device: torch.device, weights: str = "best"
             ) -> tuple[nn.Module, TrainConfig, dict]:
    """Model (eval mode, on `device`), training configuration and checkpoint of a run folder or checkpoint file.

    In a run folder `weights` picks the file: "best" (best.pt, the epoch chosen on validation) or "last"
    (checkpoint.pt); a checkpoint file is used as given.
    """
    ckpt = load_checkpoint(resolve_weights(checkpoint, weights))
    known = TrainConfig.__dataclass_fields__
    train_cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    model = create_model(train_cfg.model, ckpt["num_classes"], train_cfg.image_size)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), train_cfg, ckpt
