"""The report's heatmap gallery: the same images explained by every run, and where the runs differ most.

For each evaluated split, two sets of images:
    the first `n_images` of the split (the same images for every run), and
    per method, the `n_differ` images with the largest spread of per-image energy pointing game across the runs
    (max - min of eval/per_image.jsonl's values, over the images every run has valid): where they differ most.
Each tile is a PNG (bytes): the run's attribution over a faded copy of the input, with the object's outline in
white, drawn by the rules of sib.report.figures.heatmap_grid (a non-negative map min-max normalised per tile on
jet; a signed map divided by its largest magnitude on blue-white-red). Models are loaded with the weights and
the explained target the run's evaluation used (eval_config.json), so a tile's caption (its EPG from
per_image.jsonl) is the value of that very map. Small images are upscaled by a whole factor (nearest) to about
128 px, larger ones shrunk to 128 px, so tiles stay a few KB.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image

from sib.config import TrainConfig
from sib.data.transforms import denormalize
from sib.explain import explain
from sib.report.inputs import Run
from sib.runtime import load_run, make_dataset, resolve_device

EPG = "energy_pointing_game"
TILE = 128  # display size (px) a tile is scaled toward
# what the gallery shows when the user names no methods: two CAMs and two gradient maps first, then the rest
PREFERRED = ["grad_cam", "eigen_cam", "saliency", "input_x_gradient", "integrated_gradients", "layer_cam",
             "grad_cam_pp", "smoothgrad", "xgrad_cam", "score_cam"]


@dataclass
class SplitGallery:
    """The gallery of one split.

    Attributes:
        split: the split's name.
        methods: explanation methods shown (columns groups).
        runs: run labels shown (columns within a method).
        same: indices of the images shown for every run.
        differ: method -> [(index, spread of EPG across runs)], largest first.
        inputs: index -> PNG of the input with the object's outline.
        labels: index -> class name (or number).
        tiles: (index, run, method) -> PNG.
        epg: (index, run, method) -> EPG of that map (from per_image.jsonl; absent where not evaluated).
        preds: (index, run) -> predicted class name.
        flat: the (index, run, method) whose map is constant (drawn as the colour scale's bottom).
    """

    split: str
    methods: list[str]
    runs: list[str]
    same: list[int]
    differ: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    inputs: dict[int, bytes] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    tiles: dict[tuple[int, str, str], bytes] = field(default_factory=dict)
    epg: dict[tuple[int, str, str], float] = field(default_factory=dict)
    preds: dict[tuple[int, str], str] = field(default_factory=dict)
    flat: set[tuple[int, str, str]] = field(default_factory=set)


def choose_methods(runs: list[Run], requested: list[str] | None, limit: int = 4) -> list[str]:
    """The methods of the gallery: those requested, else up to `limit` that every run's evaluation ran."""
    evaluated = [set(r.eval_config.get("methods", [])) for r in runs]
    common = [m for m in runs[0].eval_config.get("methods", []) if all(m in e for e in evaluated)]
    if requested:
        return list(requested)
    common.sort(key=lambda m: PREFERRED.index(m) if m in PREFERRED else len(PREFERRED))
    return common[:limit]


def _per_image(run: Run, split: str) -> tuple[dict[tuple[str, int], float], dict[int, int]]:
    """EPG per (method, index) with status ok, and the prediction per index, of one split of a run's evaluation."""
    epg: dict[tuple[str, int], float] = {}
    preds: dict[int, int] = {}
    with (run.path / "eval" / "per_image.jsonl").open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("split") != split:
                continue
            if r.get("metric") == "accuracy" and "pred" in r:
                preds[int(r["index"])] = int(r["pred"])
            elif r.get("metric") == EPG and r.get("status", "ok") == "ok" and isinstance(r.get("value"), float):
                if math.isfinite(r["value"]):
                    epg[(r["method"], int(r["index"]))] = r["value"]
    return epg, preds


def _where_they_differ(values: dict[str, dict[tuple[str, int], float]], method: str, k: int
                       ) -> list[tuple[int, float]]:
    """The k images with the largest max - min EPG across runs (images valid for every run), largest first."""
    per_run = [{i: v for (m, i), v in vals.items() if m == method} for vals in values.values()]
    common = set.intersection(*(set(p) for p in per_run)) if per_run else set()
    spread = [(i, max(p[i] for p in per_run) - min(p[i] for p in per_run)) for i in common]
    spread.sort(key=lambda t: (-t[1], t[0]))
    return spread[:k] if len(per_run) > 1 else []


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).numpy().astype(np.float32)  # (3, H, W) -> (H, W, 3)


def _scale(h: int) -> tuple[int, bool]:
    """(side of the tile, whether it is an upscale by a whole factor)."""
    if h <= TILE:
        return h * max(1, TILE // h), True
    return TILE, False


def _erode(m: np.ndarray) -> np.ndarray:
    """Erosion of a (H, W) bool image by the 4-neighbourhood (the border counts as outside nothing)."""
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return inner


def render_tile(img: np.ndarray, attr: np.ndarray | None, mask: np.ndarray | None) -> bytes:
    """A PNG tile.

    Args:
        img: (H, W, 3) float in [0, 1], the denormalised input.
        attr: (H, W) float attribution, or None for the plain input.
        mask: (H, W) bool object mask, or None (no outline).
    """
    h, w = img.shape[:2]
    if attr is not None:
        gray = img.mean(axis=2, keepdims=True)
        faded = 0.5 * gray + 0.5 * img * 0.6
        if not np.isfinite(attr).all():  # an invalid map (the evaluation counts it as "invalid"): grey, no colour
            heat, alpha = np.full((h, w, 3), 0.5, np.float32), 0.8
        elif (attr < 0).any():  # signed: zero at the centre of a diverging scale
            a = attr / max(float(np.abs(attr).max()), 1e-12)
            heat, alpha = matplotlib.colormaps["bwr"]((a + 1) / 2)[..., :3], 0.6
        else:
            a = (attr - attr.min()) / max(float(attr.max() - attr.min()), 1e-12)
            heat, alpha = matplotlib.colormaps["jet"](a)[..., :3], 0.6
        img = (1 - alpha) * faded + alpha * heat
    side, whole = _scale(h)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    pil = pil.resize((side * w // h, side), Image.NEAREST if whole else Image.BILINEAR)
    out = np.asarray(pil).copy()
    if mask is not None and mask.any():
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(pil.size, Image.NEAREST)) > 127
        # two-tone outline, visible on light and dark images alike: white on the object's own border pixels,
        # black on the background pixels touching it
        out[m & ~_erode(m)] = 255
        out[~m & ~_erode(~m)] = 0
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG")
    return buf.getvalue()


def _class_name(ds: Any, c: int) -> str:
    classes = getattr(ds, "classes", None)
    return str(classes[c]) if classes is not None and 0 <= c < len(classes) else str(c)


def build(runs: list[Run], methods: list[str], n_images: int = 6, n_differ: int = 4, device: str = "cpu"
          ) -> list[SplitGallery]:
    """The gallery of every split the runs' evaluations share (see the module docstring).

    Args:
        runs: evaluated runs with weights, in display order.
        methods: explanation methods (registry names); each run's method options from its evaluation apply.
        n_images: images shown for every run, the first of each split.
        n_differ: images per method where the runs differ most.
        device: where the models run.
    """
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    # a gallery is a few small batches: one thread. Multi-threaded MKL SVD (Eigen-CAM) measured 4.4 s on 18 maps
    # with 2 threads on a busy 2-core machine, 8 ms with one
    torch.set_num_threads(1)
    try:
        return _build(runs, methods, n_images, n_differ, dev)
    finally:
        torch.set_num_threads(threads)


def _build(runs: list[Run], methods: list[str], n_images: int, n_differ: int, dev: torch.device
           ) -> list[SplitGallery]:
    splits = [s for s in runs[0].eval_config.get("splits", []) if all(s in r.eval_config.get("splits", [])
                                                                       for r in runs)]
    values = {s: {r.label: _per_image(r, s) for r in runs} for s in splits}
    galleries = []
    for split in splits:
        g = SplitGallery(split, list(methods), [r.label for r in runs], list(range(n_images)))
        epg = {label: v[0] for label, v in values[split].items()}
        g.differ = {m: _where_they_differ(epg, m, n_differ) for m in methods}
        galleries.append(g)
    datasets: dict[str, Any] = {}
    for run in runs:
        model, cfg, _ = load_run(run.path, dev, run.eval_config.get("weights", "best"))
        key = json.dumps({k: getattr(cfg, k) for k in ("dataset", "root", "image_size", "normalization",
                                                          "dataset_options")}, sort_keys=True, default=str)
        for g in galleries:
            ds = datasets.setdefault(f"{key}/{g.split}", make_dataset(cfg, g.split, train=False))
            g.same = [i for i in g.same if i < len(ds)]
            wanted = sorted(set(g.same) | {i for rows in g.differ.values() for i, _ in rows})
            if wanted:
                _explain_run(g, run, model, cfg, ds, wanted, values[g.split][run.label], dev)
    return galleries


def _explain_run(g: SplitGallery, run: Run, model: torch.nn.Module, cfg: TrainConfig, ds: Any, wanted: list[int],
                 values: tuple[dict[tuple[str, int], float], dict[int, int]], dev: torch.device) -> None:
    """Add one run's tiles (every method, the `wanted` images) to the split's gallery."""
    samples = [ds[i] for i in wanted]
    x = torch.stack([s[0] for s in samples]).to(dev)  # (N, 3, H, W)
    y = torch.tensor([s[1] for s in samples], device=dev)
    masks = [s[2][0].numpy() if s[2] is not None else None for s in samples]  # (H, W) bool each
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    target = pred if run.eval_config.get("target") == "pred" else y
    images = denormalize(x.cpu(), cfg.normalization)
    epg, _ = values
    for n, i in enumerate(wanted):
        if i not in g.inputs:
            g.inputs[i] = render_tile(_to_rgb(images[n]), None, masks[n])
            g.labels[i] = _class_name(ds, int(y[n]))
        g.preds[(i, run.label)] = _class_name(ds, int(pred[n]))
    options = run.eval_config.get("method_options", {}) or {}
    for method in g.methods:
        attr = explain(method, model, x, target, **options.get(method, {})).float().cpu()  # (N, 1, H, W)
        for n, i in enumerate(wanted):
            a = attr[n, 0].numpy()  # (H, W)
            g.tiles[(i, run.label, method)] = render_tile(_to_rgb(images[n]), a, masks[n])
            if np.isfinite(a).all() and float(a.max() - a.min()) <= 1e-12 * max(1.0, float(np.abs(a).max())):
                g.flat.add((i, run.label, method))
            if (method, i) in epg:
                g.epg[(i, run.label, method)] = epg[(method, i)]
