"""`sib demo` (what `make demo` runs): cross-entropy vs S-IB on the built-in benchmark, side by side.

The most informative comparison the demo's CPU budget pays for (issues 9 and 18): cross-entropy; S-IB as
published (the reference's weights); `energy_cam_cal`, the best setting of the README's guidance studies (Rao
et al.'s Energy loss on the label's Grad-CAM at the CAM layer, its weight calibrated to the cross-entropy's
gradient: `--regularizer energy --reg-layer cam --reg-calibrate 1`); and `ce_reseed`, cross-entropy again with
the next seed. The first three share the seed, data, model, optimiser and epoch budget. `ce_reseed - ce` is
what retraining alone does, which the per-image intervals of a one-seed comparison do not cover: a difference
no larger than that is not evidence (the seed studies measure it properly, with 3 and 6 seeds per setting).
Writes to `--out`:
    ce/, sib/, energy_cam_cal/, ce_reseed/ the training runs (config, log, checkpoints) and their eval/ folders
    comparison.{csv,json,md}  one row per (split, method, metric): CE, then each run and its difference to CE
    heatmaps_<split>.png      inputs, ground-truth masks, then each run's heatmaps per method
    report/index.html         `sib report` of the demo: one page to open in a browser (its path is printed last)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from sib.config import EvalConfig, TrainConfig
from sib.data.transforms import denormalize
from sib.evaluate import evaluate, load_run
from sib.explain import explain
from sib.report.figures import heatmap_grid
from sib.report.html import write_report
from sib.report.tables import to_markdown, write_table
from sib.run_dir import DEMO, prepare
from sib.train import make_dataset, resolve_device, train

# run folder -> TrainConfig overrides (seed: added to --seed); ce_reseed measures retraining noise
RUNS: dict[str, dict[str, Any]] = {
    "ce": {"regularizer": "none", "seed": 0},
    "sib": {"regularizer": "sib", "seed": 0},
    "energy_cam_cal": {"regularizer": "energy", "reg_layer": "cam", "reg_calibrate": 1.0, "seed": 0},
    "ce_reseed": {"regularizer": "none", "seed": 1},
}
TITLES = {"ce": "CE", "sib": "S-IB", "energy_cam_cal": "Energy@CAM", "ce_reseed": "CE seed+1"}  # figure columns
# Single-pass methods only: integrated gradients, SmoothGrad and Score-CAM cost 25-128 passes per image,
# which the demo's 10-minute CPU budget cannot pay for 2 models x 2 splits (run them with `sib evaluate`).
METHODS = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "eigen_cam", "saliency", "input_x_gradient"]
METRICS = ["energy_pointing_game", "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
           "topk_iou", "auroc"]
SPLITS = ["test", "test_shifted"]
# two CAMs and two gradient maps in the figure (XGrad-CAM would repeat Grad-CAM: same weights on GAP heads)
FIGURE_METHODS = ["grad_cam", "eigen_cam", "saliency", "input_x_gradient"]


def demo_configs(quick: bool, seed: int, device: str, epochs: int | None) -> tuple[TrainConfig, EvalConfig]:
    """The demo's budget: full (minutes on 2 CPU cores) or quick (seconds, for tests)."""
    base = TrainConfig(dataset="synthetic", model="small_cnn", image_size=64, optimizer="adamw", lr=1e-3,
                       batch_size=32, epochs=8, seed=seed, device=device, eval_splits=list(SPLITS))
    # the pointing game's default tolerance is 15 px at 224 px scaled to the image: 4 px at 64 px
    ev = EvalConfig(splits=list(SPLITS), methods=list(METHODS), metrics=list(METRICS), batch_size=50,
                    max_images=300, device=device)
    if quick:
        base = dataclasses.replace(base, epochs=1, dataset_options={"num_samples": 96})
        ev = dataclasses.replace(ev, methods=["grad_cam", "saliency"], metrics=["energy_pointing_game"],
                                 max_images=32)
    if epochs is not None:
        base = dataclasses.replace(base, epochs=epochs)
    return base, ev


def comparison_rows(summaries: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Join the runs' summaries on (split, method, metric): CE, then each other run and its difference to CE."""
    keyed = {name: {(r["split"], r["method"], r["metric"]): r for r in rows} for name, rows in summaries.items()}
    rows = []
    for key, ce in keyed["ce"].items():
        sib = keyed["sib"].get(key)
        if sib is None:
            continue
        row = {"split": key[0], "method": key[1], "metric": key[2], "ce": ce["value"]}
        for name in keyed:
            other = keyed[name].get(key)
            if name != "ce" and other is not None:
                row |= {name: other["value"], f"{name}_minus_ce": other["value"] - ce["value"]}
        row |= {"ce_ci95": f"[{ce['ci95_low']:.3f}, {ce['ci95_high']:.3f}]",
                "sib_ci95": f"[{sib['ci95_low']:.3f}, {sib['ci95_high']:.3f}]", "n": ce["n"]}
        rows.append(row)
    return rows


def draw_heatmaps(out: Path, split: str, methods: list[str], n_images: int, device: torch.device) -> Path:
    """The first `n_images` of `split`: input, mask, then each run's heatmaps for each method."""
    models = {name: load_run(out / name, device) for name in RUNS}
    train_cfg = models["ce"][1]
    ds = make_dataset(train_cfg, split, train=False)
    samples = [ds[i] for i in range(min(n_images, len(ds)))]
    x = torch.stack([s[0] for s in samples]).to(device)
    y = torch.tensor([s[1] for s in samples], device=device)
    masks = torch.stack([s[2] for s in samples])
    columns: dict[str, torch.Tensor] = {}
    for method in methods:
        for name, (model, _, _) in models.items():
            columns[f"{method}\n{TITLES[name]}"] = explain(method, model, x, y).cpu()
    return heatmap_grid(denormalize(x.cpu(), train_cfg.normalization), masks, columns,
                        out / f"heatmaps_{split}.png", row_labels=[f"label {int(c)}" for c in y],
                        title=f"{split}: where each model's explanations fall (white outline: the object)")


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, device: str = "auto",
             overwrite: bool = False, epochs: int | None = None) -> list[dict[str, Any]]:
    """Train the RUNS (CE, S-IB, calibrated Energy at the CAM layer, CE with the next seed), evaluate them, print
    and write the comparison and figures.

    `overwrite` replaces a previous demo in `out` (its files and its runs' files, nothing else); without it
    a folder holding a demo, or anything else, is refused before any training starts.
    """
    out = Path(out)
    prepare(out, DEMO, overwrite=overwrite, resume=False)
    base, ev = demo_configs(quick, seed, device, epochs)
    t0 = time.perf_counter()
    summaries = {}
    for name, overrides in RUNS.items():
        options = {**overrides, "seed": seed + overrides["seed"]}
        print(f"== training {name} (" + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
              + f"): {base.model}, {base.epochs} epochs")
        cfg = dataclasses.replace(base, **options, out=str(out / name), overwrite=overwrite)
        train(cfg)
        print(f"== evaluating {name}: {len(ev.methods)} methods x {len(ev.metrics)} metrics on {', '.join(ev.splits)}")
        result = evaluate(dataclasses.replace(ev, checkpoint=str(out / name), overwrite=overwrite))
        summaries[name] = result.summary
    rows = comparison_rows(summaries)
    write_table(rows, out / "comparison")
    shown = [m for m in FIGURE_METHODS if m in ev.methods]
    figures = [draw_heatmaps(out, split, shown, 4 if quick else 6, resolve_device(device))
               for split in ev.splits]
    # the page a newcomer opens: same runs, gallery of the figure's methods (seconds: a few images per split)
    report = write_report([out], out / "report", overwrite=overwrite, methods=shown, device=device)
    print()
    print(to_markdown(rows, ["split", "method", "metric", "ce", "ce_ci95", "sib_minus_ce", "energy_cam_cal_minus_ce",
                             "ce_reseed_minus_ce", "n"]))
    print("ce_reseed_minus_ce: cross-entropy retrained with the next seed, minus ce: what retraining alone moves "
          "(the ci95 columns cover the sampling of images only)")
    print(f"written: {out}/comparison.{{csv,json,md}}, " + ", ".join(str(f) for f in figures))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"open the report: {report}")  # last: the one line a newcomer needs
    return rows
