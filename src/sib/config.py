"""Run configurations: dataclasses are the single source of defaults.

Precedence (lowest to highest): dataclass defaults < `--config run.yaml` < command-line flags. Every field
of a config dataclass is a CLI flag of the same name with dashes (`batch_size` -> `--batch-size`), so a
YAML key, a flag and the saved `config.json` of a run all use one vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as `config.json` in the run folder)."""

    # data
    dataset: str = "synthetic"
    root: str | None = None
    image_size: int = 64
    normalization: str = "half"
    dataset_options: dict[str, Any] = field(default_factory=dict)  # YAML only, e.g. {rho: 0.9}
    # model
    model: str = "small_cnn"
    pretrained: str | None = None
    # regulariser: a name of sib.regularizers.REGULARIZERS, and its options
    regularizer: str = "none"
    mask_source: str = "adaptive"  # "adaptive" (S-IB as published) or "gt" (dataset masks)
    sib_bg_weight: float = 1000.0
    sib_fg_weight: float = 0.01
    sib_window: int | None = None
    sib_form: str = "exp"
    reg_weight: float = 1.0  # weight of the rrr / energy regularisers
    # --reg-calibrate RATIO: before epoch 1, scale the regulariser's weight(s) so that its parameter-gradient
    # norm is RATIO x the cross-entropy's on the first training batches (sib.diagnostics; calibration.json)
    reg_calibrate: float | None = None
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "none"  # learning-rate schedule after warmup: "none" (constant), "step" or "cosine"
    warmup_epochs: float = 0.0  # linear warmup from lr/(warmup steps) to lr, in (fractional) epochs
    lr_step_epochs: int = 30  # "step": multiply the lr by lr_gamma every this many epochs
    lr_gamma: float = 0.1
    grad_clip: float | None = None  # max global L2 norm of the gradients (None: no clipping)
    label_smoothing: float = 0.0
    accumulate: int = 1  # micro-batches per optimizer step (the loss is divided by it)
    epochs: int = 5
    batch_size: int = 64  # per process: under torchrun the global batch is batch_size * world size
    amp: str = "none"  # "none", "bf16" (CPU/CUDA) or "fp16" (CUDA, with a GradScaler)
    # Precision of the regularised step's forward and double backward under --amp: "fp32" (default: on an
    # H200 ResNet-50 the bf16 + channels_last S-IB step took 303 ms against 213 ms in fp32, DESIGN.md) or
    # "amp" (the same autocast as the plain steps).
    reg_precision: str = "fp32"
    channels_last: bool = False
    every: int = 1  # apply the regulariser on every K-th step, plain cross-entropy steps in between
    seed: int = 0
    # execution
    device: str = "auto"  # "auto" picks CUDA when present; under torchrun each rank takes cuda:LOCAL_RANK
    num_workers: int = 0
    out: str = "runs/train"
    overwrite: bool = False
    resume: bool = False
    eval_splits: list[str] = field(default_factory=lambda: ["test"])
    eval_batches: int | None = None  # cap on batches per split (per process) in the per-epoch accuracy
    max_steps_per_epoch: int | None = None  # cap on training batches per epoch, for smoke runs (None: all)
    on_nonfinite: str = "stop"  # NaN/inf loss: "stop" the run, or "skip" the batch (counted in the log)
    # progress-bar refresh period in steps: its loss readout and the finiteness check are the only host syncs
    log_every: int = 10
    profile_steps: int = 3  # end-of-run timing of plain vs regularised steps for summary.json (0: off)
    tensorboard: bool = True  # also write TensorBoard scalars when the package is installed


@dataclass
class EvalConfig:
    """What `sib evaluate` computes: explanation methods x metrics over dataset splits."""

    checkpoint: str = ""  # a run folder (holding checkpoint.pt) or a checkpoint file
    # which weights of a run folder: "best" (best.pt, the epoch with the best validation accuracy) or "last"
    # (checkpoint.pt, the last completed epoch); a checkpoint file is used as given
    weights: str = "best"
    splits: list[str] = field(default_factory=lambda: ["test"])
    methods: list[str] = field(default_factory=lambda: ["grad_cam", "saliency"])
    metrics: list[str] = field(default_factory=lambda: ["energy_pointing_game"])
    # per-method options, YAML only: {integrated_gradients: {n_steps: 16}}
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per-metric options, YAML only: {pointing_game: {tolerance: 4}, deletion_auc: {n_steps: 16}}
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: str = "label"  # explain the true class ("label") or the predicted one ("pred")
    batch_size: int = 32
    max_images: int | None = None  # per split; None: the whole split
    device: str = "auto"
    num_workers: int = 0
    out: str | None = None  # default: <run>/eval
    overwrite: bool = False
    resume: bool = False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) of an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls`; defaults are left as None so YAML values are not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _base_type(hints[f.name])
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None)
        elif origin is list:
            parser.add_argument(_flag(f.name), nargs="+", default=None, metavar=f.name.upper())
        elif origin is dict:
            continue  # structured options come from the YAML file
        else:
            parser.add_argument(_flag(f.name), type=tp, default=None, metavar=f.name.upper())


def build_config(cls: type, args: argparse.Namespace | None = None, yaml_path: str | Path | None = None,
                 **overrides: Any) -> Any:
    """Defaults < YAML file < parsed flags (those not None) < keyword overrides."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"--config {path}: unknown option(s) {unknown}; valid: {sorted(names)}")
        values.update(loaded)
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    values.update(overrides)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_json(obj: Any, path: Path) -> None:
    from sib.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
