"""Run configurations: dataclasses are the single source of defaults.

Precedence (lowest to highest): dataclass defaults < `--config run.yaml` < command-line flags. Every field
of a config dataclass is a CLI flag of the same name with dashes (`batch_size` -> `--batch-size`), so a
YAML key, a flag and the saved `config.json` of a run all use one vocabulary.

Each field's one-line description and allowed values live in its metadata (`_doc`): `sib ... --help` and the
README's option table (`python -m sib.config --markdown`, pasted between README.md's `options:` markers; a test
compares them) are generated from it.
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


def _doc(text: str, choices: str | tuple[str, ...] | None = None, default: str | None = None) -> dict[str, Any]:
    """A field's metadata: its one-line description, its allowed values (a tuple, or the name of a registry
    that `allowed_values` lists), and optionally how to show its default (when the value alone says too little)."""
    return {"help": text, "choices": choices, "default_text": default}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as `config.json` in the run folder)."""

    # data
    dataset: str = field(default="synthetic", metadata=_doc("dataset (registry name)", "datasets"))
    root: str | None = field(default=None, metadata=_doc(
        "the dataset's folder, in its authors' layout (unused by the built-in synthetic and decoy_digits)"))
    image_size: int = field(default=64, metadata=_doc("side S of the square images the model sees, in pixels"))
    normalization: str = field(default="half", metadata=_doc(
        "input normalisation: half = mean 0.5, std 0.5 (the S-IB reference's); imagenet = ImageNet statistics "
        "(use it with ImageNet-pretrained weights)", "normalizations"))
    dataset_options: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "dataset-specific options, e.g. {rho: 0.9} (synthetic), {num_samples: 64}, "
        "{val_fraction: 0.2}"))
    # model
    model: str = field(default="small_cnn", metadata=_doc("classifier architecture (registry name)", "models"))
    pretrained: str | None = field(default=None, metadata=_doc(
        "initial weights: a local state-dict file (or sib checkpoint), or a torchvision weight name of the model "
        "(IMAGENET1K_V1, DEFAULT, ...; read from the torch hub cache, downloaded only if absent); a head of "
        "another class count is left freshly initialised", default="unset: random initialisation"))
    # regulariser: a name of sib.regularizers.REGULARIZERS, and its options
    regularizer: str = field(default="none", metadata=_doc(
        "explanation regulariser added to the cross-entropy (none: plain training)", "regularizers"))
    mask_source: str = field(default="adaptive", metadata=_doc(
        "sib/sib_logp foreground mask: adaptive (S-IB as published) or gt (the dataset's masks)",
        ("adaptive", "gt")))
    sib_bg_weight: float = field(default=1000.0, metadata=_doc("sib/sib_logp: weight of the background term"))
    sib_fg_weight: float = field(default=0.01, metadata=_doc("sib/sib_logp: weight of the foreground (HSIC) term"))
    sib_window: int | None = field(default=None, metadata=_doc(
        "sib/sib_logp: box-filter window of the adaptive mask, in pixels",
        default="unset: 31 px at 224 px, scaled to the image (odd, >= 3)"))
    sib_form: str = field(default="exp", metadata=_doc(
        "sib/sib_logp: exp (the reference code: w_bg exp(bg) + w_fg exp(-HSIC)) or linear (bg - HSIC)",
        ("exp", "linear")))
    reg_weight: float = field(default=1.0, metadata=_doc(
        "weight of the mask-supervised regularisers (rrr, energy, l1, rrr_star, hint)"))
    # where and on what the regulariser acts (sib.guidance): the published input gradient, or a layer's explanation
    reg_layer: str = field(default="input", metadata=_doc(
        "where the regularised explanation is taken: input (the image: every method as published), cam (the "
        "model family's CAM layer, e.g. small_cnn features, ResNet layer4) or a module path of the model "
        "(layer3, features.2, ...)"))
    reg_explanation: str = field(default="auto", metadata=_doc(
        "the explanation the regulariser shapes: gradient (of its own target), grad_cam (the label's Grad-CAM, "
        "at a layer only) or vjp (S-IB's map: sib, sib_logp); auto = gradient (vjp for sib) at the input, "
        "grad_cam (vjp for sib) at a layer", ("auto", "gradient", "grad_cam", "vjp")))
    # annotation budgets and the typology's counterexamples (sib.data.budget); training split only
    reg_mask_fraction: float = field(default=1.0, metadata=_doc(
        "share of the training images whose masks the regulariser may use (a fixed random subset per seed); the "
        "others are trained with the cross-entropy alone"))
    reg_annotation: str = field(default="mask", metadata=_doc(
        "what the regulariser is given of each training image's object: mask (the dataset's masks) or box "
        "(the mask's bounding box, a cheaper annotation)", ("mask", "box")))
    counterexamples: float = field(default=0.0, metadata=_doc(
        "share of the training images whose background is replaced, through their mask, by another training "
        "image's (the typology's counterexamples: no explanation loss; a dataset with masks); 0: off"))
    # --reg-calibrate RATIO: before epoch 1, scale the regulariser's weight(s) so that its parameter-gradient
    # norm is RATIO x the cross-entropy's on the first training batches (sib.diagnostics; calibration.json)
    reg_calibrate: float | None = field(default=None, metadata=_doc(
        "scale the regulariser's weight(s) so that its gradient norm is RATIO x the cross-entropy's on the first "
        "training batches (the factor goes to calibration.json)", default="unset: weights as given"))
    # optimisation
    optimizer: str = field(default="adamw", metadata=_doc("optimiser", ("adamw", "sgd")))
    lr: float = field(default=1e-3, metadata=_doc("learning rate (after warmup)"))
    weight_decay: float = field(default=1e-4, metadata=_doc("weight decay (decoupled for adamw)"))
    momentum: float = field(default=0.9, metadata=_doc("sgd momentum"))
    schedule: str = field(default="none", metadata=_doc(
        "learning-rate schedule after warmup: none (constant), step or cosine", "schedules"))
    warmup_epochs: float = field(default=0.0, metadata=_doc(
        "linear warmup from lr/(warmup steps) to lr, in (fractional) epochs"))
    lr_step_epochs: int = field(default=30, metadata=_doc("step schedule: multiply the lr by lr_gamma every this "
                                                          "many epochs"))
    lr_gamma: float = field(default=0.1, metadata=_doc("step schedule: the lr factor"))
    grad_clip: float | None = field(default=None, metadata=_doc(
        "max global L2 norm of the gradients", default="unset: no clipping"))
    label_smoothing: float = field(default=0.0, metadata=_doc("cross-entropy label smoothing, in [0, 1)"))
    accumulate: int = field(default=1, metadata=_doc(
        "micro-batches per optimizer step (the loss is divided by it)"))
    epochs: int = field(default=5, metadata=_doc("training epochs"))
    batch_size: int = field(default=64, metadata=_doc(
        "batch size per process (under torchrun the global batch is batch_size x world size)"))
    amp: str = field(default="none", metadata=_doc(
        "mixed precision: none, bf16 (CPU/CUDA) or fp16 (CUDA, with a GradScaler)", ("none", "bf16", "fp16")))
    # Precision of the regularised step's forward and double backward under --amp: "fp32" (default: on an
    # H200 ResNet-50 the bf16 + channels_last S-IB step took 303 ms against 213 ms in fp32, DESIGN.md) or
    # "amp" (the same autocast as the plain steps).
    reg_precision: str = field(default="fp32", metadata=_doc(
        "precision of the regularised step under --amp: fp32 (faster on an H200, DESIGN.md) or amp (the same "
        "autocast as plain steps)", ("fp32", "amp")))
    channels_last: bool = field(default=False, metadata=_doc("channels-last memory format (GPU speed)"))
    bn_double_backward: str = field(default="auto", metadata=_doc(
        "BatchNorm's backward under the regulariser: auto (sib.fast_bn's closed form on a CPU, where it was "
        "measured faster; same gradient to ~1e-6) or pytorch (PyTorch's own: bitwise the runs made before it)",
        ("auto", "pytorch")))
    every: int = field(default=1, metadata=_doc(
        "apply the regulariser on every K-th step, plain cross-entropy steps in between"))
    seed: int = field(default=0, metadata=_doc("seed of the initialisation, data order and data splits"))
    # execution
    device: str = field(default="auto", metadata=_doc(
        "auto (CUDA when present; under torchrun each rank takes cuda:LOCAL_RANK), cpu, cuda or cuda:N"))
    num_workers: int = field(default=0, metadata=_doc("data-loading worker processes"))
    out: str = field(default="runs/train", metadata=_doc("the run folder"))
    overwrite: bool = field(default=False, metadata=_doc(
        "replace the run in --out (only the files sib wrote are removed)"))
    resume: bool = field(default=False, metadata=_doc(
        "continue the run in --out from its last checkpoint (changed options are refused)"))
    eval_splits: list[str] = field(default_factory=lambda: ["test"], metadata=_doc(
        "splits whose accuracy is logged each epoch besides val (synthetic also has test_shifted)"))
    eval_batches: int | None = field(default=None, metadata=_doc(
        "cap on batches per split (per process) in the per-epoch accuracy", default="unset: all"))
    max_steps_per_epoch: int | None = field(default=None, metadata=_doc(
        "cap on training batches per epoch, for smoke runs", default="unset: all"))
    on_nonfinite: str = field(default="stop", metadata=_doc(
        "a NaN/inf loss: stop the run, or skip the batch (counted in the log)", ("stop", "skip")))
    log_every: int = field(default=10, metadata=_doc(
        "progress-bar refresh period in steps (its loss readout is a host sync)"))
    profile_steps: int = field(default=3, metadata=_doc(
        "end-of-run timing of plain vs regularised steps for summary.json (0: off)"))
    tensorboard: bool = field(default=True, metadata=_doc(
        "also write each epoch's float values of log.jsonl (ce, the regulariser's terms, train/val/split "
        "accuracies, lr, diag_*) as TensorBoard scalars at the epoch's step to <out>/tensorboard, when the "
        "tensorboard package is installed"))


@dataclass
class EvalConfig:
    """What `sib evaluate` computes: explanation methods x metrics over dataset splits."""

    checkpoint: str = field(default="", metadata=_doc(
        "a run folder (holding best.pt / checkpoint.pt) or a checkpoint file", default="required"))
    weights: str = field(default="best", metadata=_doc(
        "which weights of a run folder: best (best.pt, the epoch with the best validation accuracy) or last "
        "(checkpoint.pt); a checkpoint file is used as given", ("best", "last")))
    # another dataset (or another copy of the run's) with the same classes; the run's transform is kept
    dataset: str | None = field(default=None, metadata=_doc(
        "evaluate on this dataset instead of the run's (the same class names and count; the run's image size "
        "and normalisation are kept)", "datasets", default="unset: the run's"))
    root: str | None = field(default=None, metadata=_doc(
        "the folder of --dataset (or another copy of the run's dataset)", default="unset: the run's"))
    dataset_options: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "options of the evaluated dataset (added to the run's when the dataset is the run's)"))
    splits: list[str] = field(default_factory=lambda: ["test"], metadata=_doc(
        "dataset splits to evaluate: train, val, trainval, test (synthetic: train, val, test, test_shifted)"))
    methods: list[str] = field(default_factory=lambda: ["grad_cam", "saliency"], metadata=_doc(
        "explanation methods (registry names)", "methods"))
    metrics: list[str] = field(default_factory=lambda: ["energy_pointing_game"], metadata=_doc(
        "metrics (registry names)", "metrics"))
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=_doc(
        "per-method options, e.g. {integrated_gradients: {n_steps: 16}}"))
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=_doc(
        "per-metric options, e.g. {pointing_game: {tolerance: 4}, deletion_auc: {n_steps: 16}}"))
    target: str = field(default="label", metadata=_doc(
        "explain the true class (label) or the predicted one (pred)", ("label", "pred")))
    batch_size: int = field(default=32, metadata=_doc("images per batch"))
    max_images: int | None = field(default=None, metadata=_doc(
        "images per split (the first ones)", default="unset: the whole split"))
    device: str = field(default="auto", metadata=_doc("auto (CUDA when present), cpu, cuda or cuda:N"))
    num_workers: int = field(default=0, metadata=_doc("data-loading worker processes"))
    out: str | None = field(default=None, metadata=_doc("the evaluation folder", default="unset: <run>/eval"))
    overwrite: bool = field(default=False, metadata=_doc(
        "replace the evaluation in --out (only the files sib wrote are removed)"))
    resume: bool = field(default=False, metadata=_doc(
        "continue an interrupted evaluation of the same configuration and weights"))


@dataclass
class ExplainConfig:
    """What `sib explain` does: a trained run's explanations of image files (sib.explain_files)."""

    checkpoint: str = field(default="", metadata=_doc(
        "a run folder (holding best.pt / checkpoint.pt) or a checkpoint file", default="required"))
    inputs: list[str] = field(default_factory=list, metadata=_doc(
        "image files and folders (a folder's image files, not its sub-folders); JPEG, PNG, WebP, GIF (first "
        "frame), BMP, TIFF; grey, CMYK, RGBA and 16-bit images are converted to RGB", default="required"))
    weights: str = field(default="best", metadata=_doc(
        "which weights of a run folder: best (best.pt) or last (checkpoint.pt)", ("best", "last")))
    methods: list[str] = field(default_factory=lambda: ["grad_cam", "saliency"], metadata=_doc(
        "explanation methods (registry names)", "methods"))
    target: str = field(default="predicted", metadata=_doc(
        "the class explained: predicted (each image's top class), a class NAME of the run, or a class INDEX "
        "(a name is matched first)"))
    out: str = field(default="", metadata=_doc(
        "the output folder (overlays/, predictions.json, predictions.csv)", default="required"))
    batch_size: int = field(default=16, metadata=_doc("images per batch"))
    device: str = field(default="auto", metadata=_doc("auto (CUDA when present), cpu, cuda or cuda:N"))
    overwrite: bool = field(default=False, metadata=_doc(
        "replace the explanations in --out (only the files sib explain wrote are removed)"))


@dataclass
class LauncherConfig:
    """Where `sib study --launcher slurm` runs a study: the SLURM resources of one run (one array task each).

    The study file's `launcher:` section holds these keys; each is also a flag of `sib study` (flags win). Where
    a study runs (`--launcher local|slurm`) is chosen on the command line, not in the file: the same file runs
    on a laptop for a smoke test and on the cluster. sib.launch turns these into submitit's executor options.
    """

    partition: str | None = field(default=None, metadata=_doc(
        "SLURM partition of the runs", default="the cluster's default"))
    time_min: int = field(default=240, metadata=_doc(
        "time limit of one run, in minutes (SLURM sends USR2 90 s before it: the run is requeued and resumes)"))
    cpus_per_run: int = field(default=1, metadata=_doc(
        "CPU cores of one run (its torch threads; data loaders share them)"))
    gpus_per_run: int = field(default=0, metadata=_doc(
        "GPUs of one run on one node; above 1 the run is DDP, one process per GPU started by srun"))
    mem_gb: float | None = field(default=None, metadata=_doc(
        "memory of one run in GB", default="the partition's default"))
    array_parallelism: int = field(default=64, metadata=_doc("most runs of the study at once (the array's %N)"))
    account: str | None = field(default=None, metadata=_doc("SLURM account charged", default="yours"))
    qos: str | None = field(default=None, metadata=_doc("SLURM quality of service", default="the default"))
    max_requeues: int = field(default=3, metadata=_doc(
        "requeues of one run after time-outs or preemptions; past it the run is reported failed"))
    sbatch: list[str] = field(default_factory=list, metadata=_doc(
        "extra sbatch options as KEY=VALUE (constraint=a100) or KEY (exclusive)"))
    setup: list[str] = field(default_factory=list, metadata=_doc(
        "shell lines each task runs before the run (module load ..., source ...)"))
    poll_s: float = field(default=30.0, metadata=_doc("seconds between the status checks of --wait"))

    def sbatch_options(self) -> dict[str, Any]:
        """`sbatch` as submitit's `slurm_additional_parameters`: {"constraint": "a100", "exclusive": True}."""
        options: dict[str, Any] = {}
        for item in self.sbatch:
            key, sep, value = item.partition("=")
            key = key.strip().lstrip("-").replace("-", "_")
            if not key:
                raise ValueError(f"--sbatch {item!r}: expected KEY=VALUE or KEY (an sbatch option without --)")
            options[key] = value if sep else True
        return options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) of an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def allowed_values(choices: str | tuple[str, ...] | None) -> list[str]:
    """The values a field accepts: a tuple as given, or a registry's names (imported only when asked for)."""
    if choices is None or isinstance(choices, tuple):
        return list(choices or ())
    if choices == "datasets":
        from sib.data import DATASETS

        return DATASETS.names()
    if choices == "models":
        from sib.models import available_models

        return available_models()
    if choices == "regularizers":
        from sib.regularizers import REGULARIZERS

        return REGULARIZERS.names()
    if choices == "methods":
        from sib.explain import EXPLAINERS

        return ["all", *EXPLAINERS.names()]
    if choices == "metrics":
        from sib.metrics import METRICS

        return ["all", *METRICS.names()]
    if choices == "normalizations":
        from sib.data.transforms import NORMALIZATIONS

        return sorted(NORMALIZATIONS)
    if choices == "schedules":
        from sib.schedule import SCHEDULES

        return list(SCHEDULES)
    raise ValueError(f"no list of allowed values named {choices!r}")


_OUR_MODELS = ("tiny_cnn", "small_cnn", "mlp")


def _allowed_text(choices: str | tuple[str, ...] | None, full: bool) -> str:
    """Allowed values as text; `full=False` abbreviates the ~80 torchvision model names (the README's table)."""
    values = allowed_values(choices)
    if choices == "models" and not full:
        return (", ".join(_OUR_MODELS) + ", or any torchvision classification model (resnet18, resnet50, "
                "densenet121, vgg16_bn, vit_b_16, ...; `sib train --help` lists them all)")
    return ", ".join(values)


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return "{}"
    return str(value)


def field_help(cls: type, name: str, full: bool = True) -> str:
    """One line: the field's description, its default and, where the values are a closed set, the allowed ones."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if "help" not in f.metadata:
        raise ValueError(f"{cls.__name__}.{name} has no help text (dataclasses.field(metadata=_doc(...)))")
    default = _default_text(f)
    text = f"{f.metadata['help']} ({'required' if default == 'required' else f'default: {default}'})"
    allowed = _allowed_text(f.metadata.get("choices"), full)
    return f"{text}. Allowed: {allowed}." if allowed else f"{text}."


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls`, its help from the field's metadata; defaults are left as None so YAML
    values are not overridden (the help states the dataclass default)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _base_type(hints[f.name])
        origin = typing.get_origin(tp)
        text = field_help(cls, f.name).replace("%", "%%")  # argparse expands %-formats in help
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif origin is list:
            parser.add_argument(_flag(f.name), nargs="+", default=None, metavar=f.name.upper(), help=text)
        elif origin is dict:
            continue  # structured options come from the YAML file
        else:
            parser.add_argument(_flag(f.name), type=tp, default=None, metavar=f.name.upper(), help=text)


# The configurations whose options the README's table documents, under the command that takes them.
DOCUMENTED = (("sib train", "TrainConfig"), ("sib evaluate", "EvalConfig"), ("sib explain", "ExplainConfig"),
              ("sib study --launcher slurm", "LauncherConfig"))


def options_markdown() -> str:
    """The README's option tables, generated from the field metadata (README.md holds this text verbatim between
    its `options:start` / `options:end` markers; tests/test_cli_help.py keeps them in step)."""
    lines: list[str] = []
    for command, name in DOCUMENTED:
        cls = globals()[name]
        hints = typing.get_type_hints(cls)
        lines += [f"`{command}` ({name}; YAML keys are the option names with underscores):", "",
                  "| option | default | allowed | description |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            tp, _ = _base_type(hints[f.name])
            option = f"`{f.name}` (YAML only)" if typing.get_origin(tp) is dict else f"`{_flag(f.name)}`"
            if tp is bool:
                option = f"`{_flag(f.name)}` / `--no-{f.name.replace('_', '-')}`"
            cells = [option, _default_text(f), _allowed_text(f.metadata.get("choices"), full=False),
                     f.metadata["help"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


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


if __name__ == "__main__":
    # `python -m sib.config --markdown`: print the README's option tables
    _parser = argparse.ArgumentParser(prog="python -m sib.config", description="print the option tables")
    _parser.add_argument("--markdown", action="store_true", help="the README's option tables, as Markdown")
    if _parser.parse_args().markdown:
        print(options_markdown(), end="")
    else:
        _parser.print_help()
