"""Evaluation: explanation methods x metrics over dataset splits, for one trained run.

Output folder (default `<run>/eval`):
    per_image.jsonl   one line per (split, image, method, metric) value, appended batch by batch; an
                      interrupted evaluation resumes (`--resume`) without recomputing finished batches
    summary.{csv,json,md}  one row per (split, method, metric): value, 95% CI, n used, n excluded, n invalid,
                      and the pointing game's tolerance_px
    eval_config.json  the resolved configuration, and the evaluated weights (`--weights best|last`: best.pt
                      or checkpoint.pt of the run; file, sha256, epoch, step): `--resume` continues only the
                      evaluation of the same configuration and the same weights, byte for byte; and the data
                      evaluated (`evaluated_data`: dataset, root, options, classes, label_map)

Data: the run's dataset by default; `--dataset NAME --root PATH` (and `dataset_options`) evaluate it on another
copy or another dataset with the same classes, through the run's transform (image size, normalisation). Class
names must match the run's (checkpoint "classes"; the count where the run predates them): the same names in
another order are mapped onto the run's indices (`label_map`), other names or counts are a ValueError.

Accuracy rows use method "-" and metric "accuracy". Values: a metric's `reduction` ("mean" over images,
or "class_mean": the mean of per-class means, as for the pointing game); NaN values are left out and
counted, per row of per_image.jsonl (`status`): "invalid" where the method's map of the image is not finite
(NaN or inf anywhere: a fault of the method, counted per method, whatever the mask), else "excluded" (an
empty foreground mask: the image has no object to find). The 95% interval is the normal approximation,
mean +- 1.96 * standard error (for class means, the standard error of the mean of class means).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from sib import progress
from sib.config import EvalConfig, TrainConfig, save_json, to_dict
from sib.eval_summary import SummaryStream
from sib.explain import EXPLAINERS, explain_many
from sib.io import atomic_write
from sib.metrics import METRICS
from sib.metrics.faithfulness import PerturbationCache, target_probability
from sib.metrics.functional import default_tolerance, finite_rows
from sib.registry import resolve_names
from sib.run_dir import EVAL, file_sha256, prepare, resolve_weights
from sib.runtime import load_run, make_dataset, make_loader, resolve_device
from sib.tables import write_table

# excluded: empty foreground mask (the image, not the method); invalid: the method's map was not finite (NaN or
# inf anywhere), counted per method; tolerance_px: the pointing game's radius (blank for other metrics)
SUMMARY_COLUMNS = ["run", "split", "method", "metric", "value", "ci95_low", "ci95_high", "n", "excluded", "invalid",
                   "tolerance_px"]


@dataclass
class EvalResult:
    out: Path
    summary: list[dict[str, Any]]


def _summarise(values: list[float], labels: list[int], reduction: str,
               statuses: list[str] | None = None) -> dict[str, Any]:
    """Value, 95% CI and counts of one (split, method, metric) group.

    `statuses` ("ok" / "excluded" / "invalid" per value, as `_evaluate_batch` writes them) decide which
    NaN is which; without them (rows of an older per_image.jsonl) every NaN counts as excluded.
    """
    statuses = statuses or ["excluded" if math.isnan(v) else "ok" for v in values]
    pairs = [(v, c) for v, c, st in zip(values, labels, statuses, strict=True) if st == "ok" and not math.isnan(v)]
    counts = {"excluded": statuses.count("excluded"), "invalid": statuses.count("invalid")}
    if not pairs:
        return {"value": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "n": 0, **counts}
    if reduction == "class_mean":
        by_class: dict[int, list[float]] = defaultdict(list)
        for v, c in pairs:
            by_class[c].append(v)
        means = [sum(v) / len(v) for v in by_class.values()]
        value = sum(means) / len(means)
        var = sum(_var(v) / len(v) for v in by_class.values()) / len(means) ** 2
    else:
        vs = [v for v, _ in pairs]
        value = sum(vs) / len(vs)
        var = _var(vs) / len(vs)
    half = 1.96 * math.sqrt(var)
    return {"value": value, "ci95_low": value - half, "ci95_high": value + half, "n": len(pairs), **counts}


def _var(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return sum((a - m) ** 2 for a in v) / (len(v) - 1)


def _rows_until_cut(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of per_image.jsonl, one at a time, up to a line cut by an interruption."""
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # a line cut by the interruption: that batch is redone
                    return


def _read_done(path: Path, stream: SummaryStream) -> set[tuple[str, int]]:
    """Keep the finished batches of an interrupted per_image.jsonl: feed their rows to `stream`, rewrite the
    file as those rows then their end markers (dropping a half-written tail), return the finished batches.

    Two passes over the file, never all its rows in memory; the rewrite is `sib.io.atomic_write`'s (a temporary
    file that replaces the old one when complete; sib.run_dir removes one a kill leaves behind).
    """
    if not path.exists():
        path.write_text("")
        return set()
    # a batch counts as done only if its end marker was written (the last line of every batch)
    done = {(r["split"], r["batch"]) for r in _rows_until_cut(path) if r.get("metric") == "_batch_done"}

    def write(f: IO[bytes]) -> None:
        for r in _rows_until_cut(path):
            if r["metric"] != "_batch_done" and (r["split"], r["batch"]) in done:
                f.write((json.dumps(r) + "\n").encode())
                stream.add(r)
        f.writelines((json.dumps({"split": s, "batch": b, "metric": "_batch_done"}) + "\n").encode()
                     for s, b in sorted(done))

    atomic_write(path, write, mode=path.stat().st_mode & 0o777)  # keep the file's own permissions
    return done


class _Relabelled(Dataset):
    """A dataset whose labels are mapped onto the run's class indices (the same class names in another order)."""

    def __init__(self, ds: Dataset, label_map: list[int]) -> None:
        self.ds, self.label_map = ds, label_map

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        x, y, mask = self.ds[i]
        return x, self.label_map[y], mask


def eval_datasets(cfg: EvalConfig, train_cfg: TrainConfig, ckpt: dict[str, Any]
                  ) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """The evaluated split datasets (the run's dataset, or `cfg.dataset`/`cfg.root`, through the run's eval
    transform), and a record of what they are for eval_config.json.

    Raises:
        ValueError: the dataset's classes are not the run's (other names or another count); names both lists.
    """
    same = cfg.dataset in (None, train_cfg.dataset)
    data_cfg = replace(train_cfg, dataset=train_cfg.dataset if same else cfg.dataset,
                       root=cfg.root if cfg.root is not None else train_cfg.root if same else None,
                       dataset_options={**(train_cfg.dataset_options if same else {}), **cfg.dataset_options})
    run_classes = [str(c) for c in ckpt.get("classes") or []]
    datasets: dict[str, Dataset] = {}
    label_map = None
    where = f"--dataset {data_cfg.dataset}" + (f" --root {data_cfg.root}" if data_cfg.root else "")
    for split in cfg.splits:
        ds = make_dataset(data_cfg, split, train=False)
        classes = [str(c) for c in getattr(ds, "classes", [])]
        if run_classes and classes:
            if sorted(classes) != sorted(run_classes):
                missing, extra = sorted(set(run_classes) - set(classes)), sorted(set(classes) - set(run_classes))
                raise ValueError(f"{where} (split {split}): its classes are not the run's: the run has "
                                 f"{len(run_classes)} ({_names(run_classes)}), the dataset {len(classes)} "
                                 f"({_names(classes)}); missing: {_names(missing) or '-'}; not in the run: "
                                 f"{_names(extra) or '-'}")
            if classes != run_classes:  # the same names in another order: evaluate under the run's indices
                label_map = [run_classes.index(c) for c in classes]
                ds = _Relabelled(ds, label_map)
        elif getattr(ds, "num_classes", ckpt["num_classes"]) != ckpt["num_classes"]:
            raise ValueError(f"{where} (split {split}): {ds.num_classes} classes, the run {ckpt['num_classes']}")
        datasets[split] = ds
    record = {"dataset": data_cfg.dataset, "root": data_cfg.root, "dataset_options": data_cfg.dataset_options,
              "image_size": data_cfg.image_size, "normalization": data_cfg.normalization,
              "classes": run_classes or None, "label_map": label_map}
    return datasets, record


def _names(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run the evaluation described by `cfg`; see the module docstring for outputs."""
    device = resolve_device(cfg.device)
    weights_file = resolve_weights(cfg.checkpoint, cfg.weights)
    model, train_cfg, ckpt = load_run(weights_file, device)
    run_name = Path(cfg.checkpoint).name if Path(cfg.checkpoint).is_dir() else Path(cfg.checkpoint).stem
    methods = resolve_names(cfg.methods, EXPLAINERS)
    metrics = resolve_names(cfg.metrics, METRICS)
    for kind, options, names in (("method_options", cfg.method_options, methods),
                                 ("metric_options", cfg.metric_options, metrics)):
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"{kind} names {unknown}, which are not among those evaluated: {names}")
    if cfg.target not in ("label", "pred"):
        raise ValueError(f"--target {cfg.target!r}: valid values are label, pred")
    run = Path(cfg.checkpoint) if Path(cfg.checkpoint).is_dir() else Path(cfg.checkpoint).parent
    out = Path(cfg.out) if cfg.out else run / "eval"
    if out.resolve() == run.resolve():
        raise ValueError(f"--out {out} is the run folder of --checkpoint {cfg.checkpoint}; an evaluation writes to "
                         f"a folder of its own (default: {run / 'eval'})")
    datasets, evaluated_data = eval_datasets(cfg, train_cfg, ckpt)  # a class mismatch is refused before any write
    # one process evaluates into a folder at a time (sib.claim): two would append every row twice
    with prepare(out, EVAL, overwrite=cfg.overwrite, resume=cfg.resume, claim_for="evaluate"):
        per_image = out / "per_image.jsonl"
        identity = {k: v for k, v in to_dict(cfg).items() if k not in ("overwrite", "resume", "device", "num_workers")}
        # what was evaluated, by content: a retrained or replaced checkpoint never resumes an old evaluation
        evaluated = {"file": str(weights_file), "sha256": file_sha256(weights_file), "epoch": ckpt.get("epoch"),
                     "step": ckpt.get("step")}
        if cfg.resume and (out / "eval_config.json").exists():
            # a field the saved configuration predates counts as its default (dataset, root, dataset_options)
            previous = {**{k: v for k, v in to_dict(EvalConfig()).items() if k in identity},
                        **json.loads((out / "eval_config.json").read_text())}
            before = previous.pop("evaluated_weights", None)
            previous.pop("evaluated_data", None)
            if previous != identity:
                raise ValueError(f"--resume: {out} was evaluated with another configuration "
                                 f"({previous}); use --overwrite or another --out")
            if before != evaluated:
                was = f"epoch {before['epoch']}, sha256 {before['sha256'][:12]}" if before else "unrecorded weights"
                raise ValueError(f"--resume: {out} holds an evaluation of other weights ({was}) than {weights_file} "
                                 f"now holds (epoch {evaluated['epoch']}, sha256 {evaluated['sha256'][:12]}); its "
                                 f"rows are stale: rerun with --overwrite")
        save_json({**identity, "evaluated_weights": evaluated, "evaluated_data": evaluated_data},
                  out / "eval_config.json")
        # summaries from streamed sums: no list of all rows (memory flat in the number of images)
        stream = SummaryStream()
        if cfg.resume:
            done = _read_done(per_image, stream)
        else:
            per_image.write_text("")
            done = set()

        for split in cfg.splits:
            ds = datasets[split]
            if cfg.max_images is not None:
                ds = Subset(ds, range(min(cfg.max_images, len(ds))))
            loader = make_loader(ds, cfg.batch_size, cfg.num_workers)
            start, t0 = 0, time.perf_counter()
            for b, (x, y, mask) in enumerate(progress.bar(loader, f"evaluate {run_name} {split}", leave=False)):
                n = y.numel()
                if (split, b) in done:
                    start += n
                    continue
                batch_rows = _evaluate_batch(model, x.to(device), y.to(device), mask, methods, metrics, cfg.target,
                                             cfg.method_options, cfg.metric_options)
                for r in batch_rows:
                    r.update(split=split, batch=b, index=start + r["index"])
                with per_image.open("a") as f:  # rows, then the batch's end marker
                    f.writelines(json.dumps(r) + "\n" for r in batch_rows)
                    f.write(json.dumps({"split": split, "batch": b, "metric": "_batch_done"}) + "\n")
                for r in batch_rows:
                    stream.add(r)
                start += n
            kept = sum(1 for done_split, _ in done if done_split == split)
            progress.stage_done(f"evaluate {run_name} {split}: {start} images in {time.perf_counter() - t0:.1f} s"
                                + (f" ({kept} batches kept from before)" if kept else ""))

        summary = stream.summary(run_name)
        write_table(summary, out / "summary", SUMMARY_COLUMNS)
        return EvalResult(out=out, summary=summary)


def summarise(rows: list[dict[str, Any]], run_name: str) -> list[dict[str, Any]]:
    """Per-image rows -> one summary row per (split, method, metric), in first-seen order.

    The two-pass form over rows held in memory (for callers that have them); `evaluate` streams its rows
    through `sib.eval_summary.SummaryStream`, which gives the same rows (tested against this one).
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["split"], r["method"], r["metric"])].append(r)
    summary = []
    for (split, method, metric), rs in groups.items():
        reduction = "mean" if metric == "accuracy" else METRICS.get(metric).reduction
        statuses = [r["status"] for r in rs] if all("status" in r for r in rs) else None
        stats = _summarise([r["value"] for r in rs], [r["label"] for r in rs], reduction, statuses)
        tolerances = sorted({r["tolerance_px"] for r in rs if r.get("tolerance_px") is not None})
        tolerance = (tolerances[0] if len(tolerances) == 1 else ", ".join(map(str, tolerances))) if tolerances else None
        summary.append({"run": run_name, "split": split, "method": method, "metric": metric, **stats,
                        "tolerance_px": tolerance})
    return summary


def _evaluate_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                    methods: list[str], metrics: list[str], target_mode: str,
                    method_options: dict[str, dict[str, Any]] | None = None,
                    metric_options: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """All (image, method, metric) values of one batch as rows (index within the batch).

    Each row has a `status`: "invalid" where the method's map of that image is not finite (NaN or inf
    anywhere; whatever the mask), else "excluded" where the value is NaN (an empty foreground mask), else
    "ok". Pointing-game rows also carry `tolerance_px`, the radius used (the option, or 15 px at 224 px
    scaled to the image).
    """
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(dim=1)
    target = y if target_mode == "label" else pred
    labels, preds = y.tolist(), pred.tolist()
    rows = [{"index": i, "label": labels[i], "pred": preds[i], "method": "-", "metric": "accuracy",
             "value": float(labels[i] == preds[i]), "status": "ok"} for i in range(len(labels))]
    has_mask = mask is not None
    mask = mask.to(x.device) if has_mask else torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool,
                                                           device=x.device)
    # the single-pass methods from one forward and one backward; the perturbation metrics share the
    # unperturbed forward above (and the baselines' and each map's x * E forward) through one cache
    maps = explain_many(model, x, target, methods, method_options)
    cache = PerturbationCache(model, x, target, clean=target_probability(logits, target))
    keys, values, finite = [], [], []  # every (method, metric) of the batch, moved to the host in one transfer
    for method in methods:
        attr = maps[method]
        finite.append(finite_rows(attr).float())
        for metric in metrics:
            spec = METRICS.get(metric)
            if spec.uses_mask and not has_mask:
                continue  # localisation metrics need ground truth the dataset does not have
            keys.append((method, metric))
            shared = {"cache": cache} if spec.needs_model else {}
            values.append(spec.fn(attr, mask, model=model, x=x, target=target, **shared,
                                  **(metric_options or {}).get(metric, {})).float())
    host = torch.cat([torch.stack(values), torch.stack(finite)]).tolist() if values else []  # (M + methods, B)
    ok = dict(zip(methods, host[len(values):], strict=True)) if values else {}
    for (method, metric), vs in zip(keys, host[:len(values)], strict=True):
        extra = {}
        if metric == "pointing_game":
            extra["tolerance_px"] = (metric_options or {}).get(metric, {}).get(
                "tolerance", default_tolerance(*x.shape[-2:]))
        rows += [{"index": i, "label": labels[i], "pred": preds[i], "method": method, "metric": metric, "value": v,
                  "status": "invalid" if not ok[method][i] else "excluded" if math.isnan(v) else "ok", **extra}
                 for i, v in enumerate(vs)]
    return rows
