"""The training loop: one loop for every regulariser, dataset and model; CPU, GPU, or torchrun DDP.

A run folder holds: `config.json` (the resolved configuration), `run.json` (git revision, torch version,
world size of each start or resume), `log.jsonl` (one line per epoch), `checkpoint.pt` (the last completed
epoch: model, optimizer, scheduler, scaler, RNG states; written atomically), `best.pt` (best validation
accuracy), `summary.json` (best validation accuracy, time per step, the regulariser's measured share of a
step), and `tensorboard/` when TensorBoard is installed.

Checkpoints are per epoch: `--resume` (or a restart after Ctrl-C, which leaves the last one intact)
continues from the start of the first unfinished epoch; a mid-epoch position is not saved. The data order
of epoch e depends only on (seed, e), so a resumed run sees the same batches as an uninterrupted one.
Under torchrun only rank 0 writes files (sib.distributed says what is per process and what is global).
Folder rules (what `--overwrite` removes, which folders are refused), checkpoint loading (weights only) and
the `--resume` compatibility check live in sib.run_dir; the device, seeding, dataset and loader construction
and accuracy, which every command shares, in sib.runtime. This module is the loop and what only it uses.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sib.config import TrainConfig, save_json, to_dict
from sib.data import collate
from sib.data.budget import TrainingAnnotations
from sib.diagnostics import EpochDiagnostics, calibrate_run
from sib.distributed import (
    DistInfo,
    EpochBatchSampler,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    shard_indices,
)
from sib.epoch import EpochLoop, NonFiniteLossError  # noqa: F401 (callers catch it from sib.train)
from sib.io import atomic_write_text
from sib.models import create_model
from sib.regularizers import Regularizer, create_regularizer
from sib.run_dir import (
    BEST,
    CHECKPOINT,
    TRAIN,
    check_resume,
    load_checkpoint,
    prepare,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from sib.runtime import accuracy, make_dataset, make_loader, resolve_device, seed_everything
from sib.schedule import create_scheduler
from sib.step import time_steps, use_cheap_double_backward


@dataclass
class TrainResult:
    out: Path
    history: list[dict[str, Any]]
    model: nn.Module


def regularizer_for(cfg: TrainConfig) -> Regularizer:
    """The run's regulariser, built from its TrainConfig fields."""
    return create_regularizer(cfg.regularizer, mask_source=cfg.mask_source, weight=cfg.reg_weight,
                              sib_bg_weight=cfg.sib_bg_weight, sib_fg_weight=cfg.sib_fg_weight,
                              sib_window=cfg.sib_window, sib_form=cfg.sib_form, layer=cfg.reg_layer,
                              explanation=cfg.reg_explanation, partial=cfg.reg_mask_fraction < 1)


def training_annotations(cfg: TrainConfig, train_ds: Dataset, reg: Regularizer) -> Dataset:
    """The training split with --counterexamples, --reg-mask-fraction and --reg-annotation applied
    (sib.data.budget); the split itself when none is set."""
    budget = cfg.reg_mask_fraction < 1 or cfg.reg_annotation != "mask"
    if not budget and cfg.counterexamples == 0:
        return train_ds
    if not getattr(train_ds, "has_masks", False):
        raise ValueError(f"--counterexamples / --reg-mask-fraction / --reg-annotation need foreground masks, and "
                         f"dataset {cfg.dataset!r} has none")
    if budget and not reg.needs_mask:
        raise ValueError(f"--reg-mask-fraction / --reg-annotation set what a mask-supervised regulariser is given; "
                         f"--regularizer {cfg.regularizer} (mask source {cfg.mask_source}) uses no mask")
    if cfg.reg_mask_fraction < 1 and not hasattr(reg, "partial"):
        raise ValueError(f"--reg-mask-fraction {cfg.reg_mask_fraction}: --regularizer {cfg.regularizer} cannot leave "
                         "images out; use rrr, energy, l1, rrr_star or hint")
    return TrainingAnnotations(train_ds, counterexamples=cfg.counterexamples, mask_fraction=cfg.reg_mask_fraction,
                               annotation=cfg.reg_annotation, seed=cfg.seed)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid names: adamw, sgd")


def _load_for_resume(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The run's checkpoint, after checking that `cfg` may continue it (sib.run_dir.check_resume)."""
    ckpt = load_checkpoint(out / CHECKPOINT)
    check_resume(ckpt["config"], to_dict(cfg), to_dict(TrainConfig()), out / CHECKPOINT)
    return ckpt


def _validate(cfg: TrainConfig) -> None:
    """Refuse option values the loop cannot honour, naming the flag."""
    checks = [
        (cfg.amp in ("none", "bf16", "fp16"), f"--amp {cfg.amp!r}: valid values are none, bf16, fp16"),
        (cfg.reg_precision in ("fp32", "amp"), f"--reg-precision {cfg.reg_precision!r}: valid values are fp32, amp"),
        (cfg.bn_double_backward in ("auto", "pytorch"),
         f"--bn-double-backward {cfg.bn_double_backward!r}: valid values are auto, pytorch"),
        (cfg.on_nonfinite in ("stop", "skip"), f"--on-nonfinite {cfg.on_nonfinite!r}: valid values are stop, skip"),
        (cfg.every >= 1, f"--every {cfg.every}: must be >= 1 (1 regularises every step)"),
        (cfg.accumulate >= 1, f"--accumulate {cfg.accumulate}: must be >= 1"),
        (0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing {cfg.label_smoothing}: must be in [0, 1)"),
        (cfg.grad_clip is None or cfg.grad_clip > 0, f"--grad-clip {cfg.grad_clip}: must be > 0 (or unset)"),
        (cfg.max_steps_per_epoch is None or cfg.max_steps_per_epoch >= 1,
         f"--max-steps-per-epoch {cfg.max_steps_per_epoch}: must be >= 1 (or unset)"),
        (cfg.log_every >= 1, f"--log-every {cfg.log_every}: must be >= 1"),
        (cfg.reg_calibrate is None or (math.isfinite(cfg.reg_calibrate) and cfg.reg_calibrate > 0),
         f"--reg-calibrate {cfg.reg_calibrate}: must be a positive finite gradient-norm ratio (e.g. 0.1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def git_revision(path: Path = Path(__file__).parent) -> tuple[str | None, bool | None]:
    """(commit hash, has uncommitted changes) of the checkout holding `path`; (None, None) outside git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def _record_session(out: Path, info: DistInfo, device: torch.device, fast_bn_layers: int) -> None:
    """Append this start (or resume) to `run.json`: git revision, versions, world size, and how many BatchNorm
    layers use sib.fast_bn's double backward (0: PyTorch's everywhere)."""
    path = out / "run.json"
    sessions = json.loads(path.read_text())["sessions"] if path.exists() else []
    revision, dirty = git_revision()
    sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_revision": revision,
                     "git_dirty": dirty, "torch": torch.__version__, "world_size": info.world_size,
                     "device": str(device), "fast_bn_layers": fast_bn_layers})
    save_json({"sessions": sessions}, path)


def _tensorboard(cfg: TrainConfig, out: Path, info: DistInfo) -> Any:
    if not (cfg.tensorboard and info.is_main):
        return None
    try:  # optional: TensorBoard is not a dependency
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run as configured; see the module docstring for the run folder."""
    _validate(cfg)
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    try:
        return _train(cfg, out, device, info)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, out: Path, device: torch.device, info: DistInfo) -> TrainResult:
    """Claim the run folder (rank 0; sib.claim: one process trains a run at a time), train, release."""
    error: Exception | None = None
    held = None
    if info.is_main:
        try:
            held = prepare(out, TRAIN, overwrite=cfg.overwrite, resume=cfg.resume, claim_for="train")
        except (FileExistsError, NotADirectoryError, ValueError) as err:
            error = err
    error = broadcast_object(error, info)  # every process stops with rank 0's refusal, none waits forever
    if error is not None:
        raise error
    try:
        return _train_claimed(cfg, out, device, info)
    finally:
        if held is not None:
            held.release()


def _train_claimed(cfg: TrainConfig, out: Path, device: torch.device, info: DistInfo) -> TrainResult:
    # checked before any data or model is built: a refused resume costs nothing and changes no file
    ckpt = _load_for_resume(out, cfg) if cfg.resume and (out / CHECKPOINT).exists() else None
    seed_everything(cfg.seed)

    train_ds = make_dataset(cfg, "train", train=True)
    num_classes = train_ds.num_classes
    eval_loaders = {}
    for s in ["val", *cfg.eval_splits]:
        ds = make_dataset(cfg, s, train=False)
        eval_loaders[s] = make_loader(ds, cfg.batch_size, cfg.num_workers, indices=shard_indices(len(ds), info))
    reg = regularizer_for(cfg)
    if reg.needs_mask and not getattr(train_ds, "has_masks", False):
        raise ValueError(f"--regularizer {cfg.regularizer} (mask source {cfg.mask_source}) needs foreground "
                         f"masks, and dataset {cfg.dataset!r} has none")
    train_ds = training_annotations(cfg, train_ds, reg)
    module = create_model(cfg.model, num_classes, cfg.image_size, cfg.pretrained).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format)
    # regularised runs on a CPU: BatchNorm with a cheap double backward (run.json records how many layers)
    fast_bn_layers = use_cheap_double_backward(module, reg, device) if cfg.bn_double_backward == "auto" else 0
    # DDP at default settings: static_graph=True silently never syncs double-backprop gradients (DESIGN.md)
    model = DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if info.enabled else module
    opt = make_optimizer(cfg, module)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    batches_per_epoch = len(EpochBatchSampler(len(train_ds), cfg.batch_size, 0, info.rank, info.world_size,
                                              cfg.max_steps_per_epoch))
    sched = create_scheduler(opt, schedule=cfg.schedule, epochs=cfg.epochs,
                             steps_per_epoch=math.ceil(batches_per_epoch / cfg.accumulate),
                             warmup_epochs=cfg.warmup_epochs, step_epochs=cfg.lr_step_epochs, gamma=cfg.lr_gamma)

    history: list[dict[str, Any]] = []
    start_epoch, best_val = 0, -math.inf
    if ckpt is not None:
        if ckpt.get("num_classes") != num_classes:
            raise ValueError(f"checkpoint {out / CHECKPOINT} has {ckpt.get('num_classes')} classes, the dataset "
                             f"{num_classes}")
        module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if "scheduler" in ckpt:
            sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, history, best_val = ckpt["epoch"], ckpt["history"], ckpt["best_val"]
        if info.is_main:  # the line a requeued cluster task's log shows
            tqdm.write(f"resumed {out} from {CHECKPOINT}: {start_epoch} of {cfg.epochs} epochs done, continuing with "
                       f"epoch {start_epoch + 1}")
    loss_options = {"amp_dtype": amp_dtype, "reg_precision": cfg.reg_precision,
                    "label_smoothing": cfg.label_smoothing}
    # --reg-calibrate (scales reg's weights; calibration.json) and the per-epoch diagnostics (sib.diagnostics);
    # before config.json and run.json: a calibration that fails leaves no run behind for a rerun to refuse
    reg_scale = calibrate_run(cfg, out, module, reg, train_ds, device, info, loss_options, resumed=start_epoch > 0)
    if info.is_main:
        save_json(to_dict(cfg), out / "config.json")
        _record_session(out, info, device, fast_bn_layers)
    tb = _tensorboard(cfg, out, info)
    # the fixed batch comes from the whole val split (not this process's shard), so under torchrun every
    # process measures the same batch with the same weights and logs the same diagnostics
    diag_loader = make_loader(eval_loaders["val"].dataset, cfg.batch_size, 0) if info.enabled else eval_loaders["val"]
    diag = EpochDiagnostics(module, reg, diag_loader, device, loss_options, reg_scale)
    loop = EpochLoop(cfg, model, module, reg, opt, sched, scaler, device, info, loss_options)

    step = start_epoch * batches_per_epoch
    epoch = saved = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler = EpochBatchSampler(len(train_ds), cfg.batch_size, cfg.seed * 1_000_003 + epoch, info.rank,
                                        info.world_size, cfg.max_steps_per_epoch)
            loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate)
            row, step = loop.run(loader, epoch, step)
            for split, eval_loader in eval_loaders.items():
                row[f"{split}_acc"] = accuracy(module, eval_loader, device, cfg.eval_batches, info)
            row.update(diag())  # diag_* on the fixed validation batch, reg_scale when calibrated
            history.append(row)
            improved = row["val_acc"] > best_val
            best_val = max(best_val, row["val_acc"])
            if info.is_main:
                _save_epoch(out, cfg, module, opt, sched, scaler, epoch, history, best_val, improved, num_classes,
                            list(getattr(train_ds, "classes", [])))
                saved = epoch + 1
                if tb is not None:
                    for k, v in row.items():
                        if isinstance(v, float):
                            tb.add_scalar(k, v, row["step"])
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            barrier(info)
    except KeyboardInterrupt:
        if info.is_main:
            kept = f"holds epoch {saved}, intact" if saved else "was not written (no epoch done)"
            print(f"interrupted in epoch {epoch + 1} at step {step}: {out / CHECKPOINT} {kept}; rerun with --resume "
                  f"to continue", file=sys.stderr, flush=True)
        raise
    finally:
        if tb is not None:
            tb.close()
    if info.is_main and history:
        _write_summary(out, cfg, module, reg, eval_loaders["val"], history, device, loss_options)
    return TrainResult(out=out, history=history, model=module)


def _save_epoch(out: Path, cfg: TrainConfig, module: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                scaler: torch.amp.GradScaler, epoch: int, history: list[dict], best_val: float, improved: bool,
                num_classes: int, classes: list[str]) -> None:
    """best.pt when validation improved, then checkpoint.pt (everything a resume needs), then log.jsonl.

    Checkpoints are per epoch: a resume restarts the interrupted epoch from its first batch. best.pt goes
    first: a process killed between the two writes resumes from the previous checkpoint.pt, redoes the epoch
    and writes best.pt again, whereas the other order would leave best.pt one improvement behind for good.
    Everything saved is tensors and plain data (sib.run_dir loads with weights_only=True).
    """
    state = {"model": module.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": history[-1]["step"], "history": history,
             "best_val": best_val, "rng": rng_state(), "config": to_dict(cfg), "num_classes": num_classes,
             "classes": classes}
    if improved:
        save_checkpoint({k: state[k] for k in ("model", "epoch", "step", "config", "num_classes", "classes")},
                        out / BEST)
    save_checkpoint(state, out / CHECKPOINT)
    atomic_write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _write_summary(out: Path, cfg: TrainConfig, module: nn.Module, reg: Any, val_loader: DataLoader,
                   history: list[dict], device: torch.device, loss_options: dict) -> None:
    """summary.json: best validation accuracy, time per step, and the regulariser's share of a step.

    The share is measured, not estimated: `profile_steps` plain and regularised steps are timed on one
    validation batch with a copy of the final model (sib.step.time_steps), share = 1 - plain / regularised;
    with `--every K` the amortised share is (reg - plain) / (reg + (K - 1) * plain).
    """
    best = max(history, key=lambda r: r["val_acc"])
    summary: dict[str, Any] = {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
                               "epochs": history[-1]["epoch"], "steps": history[-1]["step"],
                               "sec_per_step": sum(r["sec_per_step"] for r in history) / len(history),
                               "skipped_batches": sum(r.get("skipped", 0) for r in history)}
    if "reg_scale" in history[-1]:  # --reg-calibrate: the factor and the weights it chose
        summary.update(reg_scale=history[-1]["reg_scale"], reg_weights=reg.weights())
    if cfg.profile_steps > 0 and len(val_loader.dataset) >= 2:
        x, y, mask = next(iter(val_loader))
        batch = (x.to(device).to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format),
                 y.to(device), mask.to(device) if mask is not None else None)
        timing = time_steps(module, reg, lambda m: make_optimizer(cfg, m), batch, cfg.profile_steps, **loss_options)
        summary.update(timing)
        if "reg_step_s" in timing:
            plain, regd, k = timing["plain_step_s"], timing["reg_step_s"], cfg.every
            summary["reg_share"] = 1.0 - plain / regd
            summary["reg_share_amortised"] = (regd - plain) / (regd + (k - 1) * plain)
    save_json(summary, out / "summary.json")
    tqdm.write("summary: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()))
