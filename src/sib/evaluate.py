"""Evaluation: explanation methods x metrics over dataset splits, for one trained run.

Output folder (default `<run>/eval`):
    per_image.jsonl   one line per (split, image, method, metric) value, appended batch by batch; an
                      interrupted evaluation resumes (`--resume`) without recomputing finished batches
    summary.{csv,json,md}  one row per (split, method, metric): value, 95% CI, n used, n excluded, n invalid,
                      and the pointing game's tolerance_px
    eval_config.json  the resolved configuration, and the evaluated weights (`--weights best|last`: best.pt
                      or checkpoint.pt of the run; file, sha256, epoch, step): `--resume` continues only the
                      evaluation of the same configuration and the same weights, byte for byte

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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from sib.config import EvalConfig, TrainConfig, save_json, to_dict
from sib.explain import EXPLAINERS, explain
from sib.metrics import METRICS
from sib.metrics.functional import default_tolerance, finite_rows
from sib.models import create_model
from sib.report.tables import write_table
from sib.run_dir import EVAL, file_sha256, load_checkpoint, prepare, resolve_weights
from sib.train import make_dataset, make_loader, resolve_device

# excluded: empty foreground mask (the image, not the method); invalid: the method's map was not finite (NaN or
# inf anywhere), counted per method; tolerance_px: the pointing game's radius (blank for other metrics)
SUMMARY_COLUMNS = ["run", "split", "method", "metric", "value", "ci95_low", "ci95_high", "n", "excluded", "invalid",
                   "tolerance_px"]


@dataclass
class EvalResult:
    out: Path
    summary: list[dict[str, Any]]


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


def resolve_names(requested: list[str], registry: Any) -> list[str]:
    """Expand "all" and validate names against a registry (unknown names list the valid ones)."""
    names = registry.names() if requested == ["all"] else list(requested)
    for n in names:
        registry.get(n)
    return names


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


def _read_done(path: Path) -> tuple[list[dict[str, Any]], set[tuple[str, int]]]:
    rows, done = [], set()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the interruption: that batch is redone
                    break
                rows.append(row)
    # a batch counts as done only if its end marker was written (the last line of every batch)
    done = {(r["split"], r["batch"]) for r in rows if r.get("metric") == "_batch_done"}
    rows = [r for r in rows if (r["split"], r["batch"]) in done and r["metric"] != "_batch_done"]
    return rows, done


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
    prepare(out, EVAL, overwrite=cfg.overwrite, resume=cfg.resume)
    per_image = out / "per_image.jsonl"
    identity = {k: v for k, v in to_dict(cfg).items() if k not in ("overwrite", "resume", "device", "num_workers")}
    # what was evaluated, by content: a retrained or replaced checkpoint never resumes an old evaluation
    evaluated = {"file": str(weights_file), "sha256": file_sha256(weights_file), "epoch": ckpt.get("epoch"),
                 "step": ckpt.get("step")}
    if cfg.resume and (out / "eval_config.json").exists():
        previous = json.loads((out / "eval_config.json").read_text())
        before = previous.pop("evaluated_weights", None)
        if previous != identity:
            raise ValueError(f"--resume: {out} was evaluated with another configuration "
                             f"({previous}); use --overwrite or another --out")
        if before != evaluated:
            was = f"epoch {before['epoch']}, sha256 {before['sha256'][:12]}" if before else "unrecorded weights"
            raise ValueError(f"--resume: {out} holds an evaluation of other weights ({was}) than {weights_file} "
                             f"now holds (epoch {evaluated['epoch']}, sha256 {evaluated['sha256'][:12]}); its "
                             f"rows are stale: rerun with --overwrite")
    save_json({**identity, "evaluated_weights": evaluated}, out / "eval_config.json")
    rows, done = _read_done(per_image) if cfg.resume else ([], set())
    if not cfg.resume:
        per_image.unlink(missing_ok=True)
    # rewrite the kept rows so that a half-written tail from the interruption is dropped
    with per_image.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.writelines(json.dumps({"split": s, "batch": b, "metric": "_batch_done"}) + "\n" for s, b in sorted(done))

    for split in cfg.splits:
        ds = make_dataset(train_cfg, split, train=False)
        if cfg.max_images is not None:
            ds = Subset(ds, range(min(cfg.max_images, len(ds))))
        loader = make_loader(ds, cfg.batch_size, cfg.num_workers)
        start = 0
        for b, (x, y, mask) in enumerate(tqdm(loader, desc=f"evaluate {run_name} {split}", leave=False)):
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
            rows.extend(batch_rows)
            start += n

    summary = summarise(rows, run_name)
    write_table(summary, out / "summary", SUMMARY_COLUMNS)
    return EvalResult(out=out, summary=summary)


def summarise(rows: list[dict[str, Any]], run_name: str) -> list[dict[str, Any]]:
    """Per-image rows -> one summary row per (split, method, metric), in first-seen order."""
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
        pred = model(x).argmax(dim=1)
    target = y if target_mode == "label" else pred
    labels, preds = y.tolist(), pred.tolist()
    rows = [{"index": i, "label": labels[i], "pred": preds[i], "method": "-", "metric": "accuracy",
             "value": float(labels[i] == preds[i]), "status": "ok"} for i in range(len(labels))]
    has_mask = mask is not None
    mask = mask.to(x.device) if has_mask else torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool,
                                                           device=x.device)
    keys, values, finite = [], [], []  # every (method, metric) of the batch, moved to the host in one transfer
    for method in methods:
        attr = explain(method, model, x, target, **(method_options or {}).get(method, {}))
        finite.append(finite_rows(attr).float())
        for metric in metrics:
            spec = METRICS.get(metric)
            if spec.uses_mask and not has_mask:
                continue  # localisation metrics need ground truth the dataset does not have
            keys.append((method, metric))
            values.append(spec.fn(attr, mask, model=model, x=x, target=target,
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
