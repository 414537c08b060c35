"""Evaluation throughput: our explainers and metrics vs Captum + pytorch-grad-cam + Quantus composed.

Same model (`create_model("resnet18", 6, 64)`, eval mode, seed 0), same 32 random 64 px images and random
rectangular masks, same methods and metrics, timed side by side in one run. Prints per-stage times (wall and CPU), the
largest value difference between the two pipelines, and as its last line `ours_speedup: <ratio>`.

Matched settings, so that values are equal: CAM maps min-max normalised on both sides (pytorch-grad-cam
always normalises); pointing game at tolerance 0 (Quantus has no tolerance); Quantus with
normalise=False and abs=False; Eigen-CAM with the Seg-Eigen-CAM sign rule on both sides. No library
offers RISE deletion/insertion for a per-pixel map on a 3-channel input (Quantus' PixelFlipping checks
`features_in_step` against H*W but flips C*H*W features), so the reference runs them as a plain loop
over steps. Score-CAM and SmoothGrad are left out: 512 masked passes per image, and noise that the
libraries draw differently.

Ours is what the evaluator runs: `explain_many` (the CAMs, saliency and input x gradient from one forward
and one backward) and the perturbation metrics sharing one `PerturbationCache` (the unperturbed forward,
which the evaluator makes anyway for its predictions, the baseline's, and a map's x * E forward).

Usage: python benchmarks/bench_eval.py [--images 32] [--ig-steps 8] [--steps 8] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import numpy as np
import torch

from sib.explain import explain_many, normalize_attr
from sib.metrics import functional as MF
from sib.metrics.faithfulness import PerturbationCache, target_probability
from sib.models import create_model

CAMS = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "eigen_cam"]
GRADS = ["saliency", "input_x_gradient", "integrated_gradients"]
LOCALISATION = ["energy_pointing_game", "pointing_game", "relevance_mass_accuracy",
                "relevance_rank_accuracy", "topk_intersection", "auroc"]
TOPK = 1024  # pixels of topk_intersection (a quarter of the image below 64 px: Quantus needs k < H*W)
PERTURBED = ["grad_cam", "saliency"]  # perturbation metrics cost (steps + 1) forward passes per image


def topk(x: torch.Tensor) -> int:
    return min(TOPK, x.shape[-2] * x.shape[-1] // 4)


def clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a loaded machine the CPU time of a 1-thread run is the
    steadier measure of work; at 2 threads wall time is what parallelism buys."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def data(n: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 6, (n,), generator=g)
    mask = torch.zeros(n, 1, size, size, dtype=torch.bool)
    corners = torch.randint(0, size // 2, (n, 2), generator=g).tolist()
    sides = torch.randint(8, size // 2, (n, 2), generator=g).tolist()
    for i, ((r, c), (h, w)) in enumerate(zip(corners, sides, strict=True)):
        mask[i, 0, r:r + h, c:c + w] = True
    return x, y, mask


# ------------------------------------------------------------------------------------------ ours


def ours(model, x, y, mask, ig_steps: int, steps: int) -> tuple[dict, dict, list[float]]:
    """As the evaluator: the single-pass methods from one shared pass (`explain_many`), the perturbation
    metrics sharing the unperturbed forward (which the evaluator makes anyway for the predictions)."""
    times = [clock()]
    scores = {}
    maps = explain_many(model, x, y, CAMS + GRADS, {"integrated_gradients": {"n_steps": ig_steps}})
    maps = {name: normalize_attr(attr, "minmax") if name in CAMS else attr for name, attr in maps.items()}
    times.append(clock())
    for name, attr in maps.items():
        scores[(name, "energy_pointing_game")] = MF.energy_pointing_game(attr, mask)
        scores[(name, "pointing_game")] = MF.pointing_game(attr, mask, tolerance=0)
        scores[(name, "relevance_mass_accuracy")] = MF.relevance_mass_accuracy(attr, mask, abs=False)
        scores[(name, "relevance_rank_accuracy")] = MF.relevance_rank_accuracy(attr, mask)
        scores[(name, "topk_intersection")] = MF.topk_intersection(attr, mask, k=topk(x))
        scores[(name, "auroc")] = MF.auroc(attr, mask)
    times.append(clock())
    with torch.no_grad():
        logits = model(x)  # the evaluator's forward (predictions): its probabilities are the clean ones
    kw = {"model": model, "x": x, "target": y,
          "cache": PerturbationCache(model, x, y, clean=target_probability(logits, y))}
    for name in PERTURBED:
        attr = maps[name]
        scores[(name, "deletion_auc")] = MF.deletion_auc(attr, **kw, n_steps=steps, baseline="zeros")
        scores[(name, "insertion_auc")] = MF.insertion_auc(attr, **kw, n_steps=steps, baseline="zeros")
        scores[(name, "average_drop")] = MF.average_drop(attr, **kw)
    times.append(clock())
    return maps, scores, np.diff(np.array(times), axis=0).tolist()  # per stage: [wall, cpu]


# ------------------------------------------------------------------------------------- reference


def reference(model, x, y, mask, ig_steps: int, steps: int) -> tuple[dict, dict, list[float]]:
    import pytorch_grad_cam as pgc
    import quantus
    from captum.attr import InputXGradient, IntegratedGradients, Saliency
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    class SignedEigenCAM(pgc.EigenCAM):
        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads,
                          eigen_smooth):
            return get_2d_projection_with_sign_correction(activations)

    cam_classes = {"grad_cam": pgc.GradCAM, "grad_cam_pp": pgc.GradCAMPlusPlus, "xgrad_cam": pgc.XGradCAM,
                   "layer_cam": pgc.LayerCAM, "eigen_cam": SignedEigenCAM}
    times = [clock()]
    maps = {}
    targets = [ClassifierOutputTarget(int(t)) for t in y]
    for name, cls in cam_classes.items():
        with cls(model=model, target_layers=[model.layer4]) as cam:
            maps[name] = cam(input_tensor=x, targets=targets)[:, None]  # (B, 1, H, W) numpy
    xg = x.clone().requires_grad_(True)
    maps["saliency"] = Saliency(model).attribute(xg, target=y, abs=True).amax(1, keepdim=True)
    maps["input_x_gradient"] = InputXGradient(model).attribute(xg, target=y).sum(1, keepdim=True)
    maps["integrated_gradients"] = IntegratedGradients(model).attribute(
        xg, baselines=0.0, target=y, n_steps=ig_steps).sum(1, keepdim=True)
    maps = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in maps.items()}
    times.append(clock())

    off = {"normalise": False, "abs": False, "disable_warnings": True, "display_progressbar": False}
    metrics = {
        "energy_pointing_game": quantus.AttributionLocalisation(positive_attributions=True, **off),
        "pointing_game": quantus.PointingGame(**off),
        "relevance_mass_accuracy": quantus.RelevanceMassAccuracy(**off),
        "relevance_rank_accuracy": quantus.RelevanceRankAccuracy(**off),
        "topk_intersection": quantus.TopKIntersection(k=topk(x), **off),
        "auroc": quantus.AUC(**off),
    }
    xn, yn, sn = x.cpu().numpy(), y.cpu().numpy(), mask.cpu().numpy().astype(float)
    with torch.no_grad():
        conf = model(x).softmax(1).gather(1, y[:, None]).squeeze(1).cpu().numpy()
    scores = {}
    for name, attr in maps.items():
        for metric_name, metric in metrics.items():
            scores[(name, metric_name)] = np.asarray(metric(model=None, x_batch=xn, y_batch=yn, a_batch=attr,
                                                            s_batch=sn, channel_first=True), dtype=float)
    times.append(clock())
    for name in PERTURBED:
        attr = maps[name]
        scores[(name, "deletion_auc")] = loop_auc(model, x, y, attr, steps, insert=False)
        scores[(name, "insertion_auc")] = loop_auc(model, x, y, attr, steps, insert=True)
        cams = np.asarray(normalize_minmax(attr))[:, 0]
        change = CamMultImageConfidenceChange()(x, cams, [ClassifierOutputSoftmaxTarget(int(t)) for t in y],
                                                model).reshape(-1)
        scores[(name, "average_drop")] = np.maximum(-change, 0) / conf
    times.append(clock())
    return maps, scores, np.diff(np.array(times), axis=0).tolist()  # per stage: [wall, cpu]


def normalize_minmax(a: np.ndarray) -> np.ndarray:
    lo = a.min(axis=(1, 2, 3), keepdims=True)
    span = a.max(axis=(1, 2, 3), keepdims=True) - lo
    return (a - lo) / np.where(span > 0, span, 1)


def loop_auc(model, x, y, attr: np.ndarray, steps: int, insert: bool) -> np.ndarray:
    """RISE deletion/insertion as a plain loop over steps (zeros baseline, stable pixel order)."""
    b, n = x.shape[0], attr[0].size
    order = np.argsort(-attr.reshape(b, -1), axis=1, kind="stable")
    flat = x.reshape(b, 3, -1)
    probs = []
    for s in range(steps + 1):
        img = flat.clone() if not insert else torch.zeros_like(flat)
        idx = torch.from_numpy(order[:, : s * n // steps]).to(x.device)
        src = torch.zeros_like(flat) if not insert else flat
        for i in range(b):
            img[i][:, idx[i]] = src[i][:, idx[i]]
        with torch.no_grad():
            probs.append(model(img.view_as(x)).softmax(1).gather(1, y[:, None]).squeeze(1).cpu().numpy())
    curve = np.stack(probs, 1)
    return (curve[:, 1:] + curve[:, :-1]).sum(1) / (2 * steps)


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both pipelines; on a shared 2-core machine OpenMP's spinning "
                             "threads make small tensor ops ~50x slower than one thread")
    parser.add_argument("--model", default="resnet18", help="a torchvision ResNet (the reference CAMs use layer4)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs of both pipelines (fastest kept)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_model(args.model, 6, args.image_size).to(device).eval()
    x, y, mask = (t.to(device) for t in data(args.images, args.image_size))
    ours(model, x[:2], y[:2], mask[:2], 2, 2)  # warm-up: lazy imports, allocator
    reference(model, x[:2], y[:2], mask[:2], 2, 2)

    t_ours, t_ref = [[math.inf, math.inf]] * 3, [[math.inf, math.inf]] * 3
    for _ in range(args.repeats):  # alternated, fastest of each stage: both pipelines see the same load
        our_maps, our_scores, t = ours(model, x, y, mask, args.ig_steps, args.steps)
        t_ours = [[min(a, b) for a, b in zip(old, new, strict=True)] for old, new in zip(t_ours, t, strict=True)]
        ref_maps, ref_scores, t = reference(model, x, y, mask, args.ig_steps, args.steps)
        t_ref = [[min(a, b) for a, b in zip(old, new, strict=True)] for old, new in zip(t_ref, t, strict=True)]
    map_diff = max(float(np.abs(our_maps[k].cpu().numpy() - ref_maps[k]).max()) for k in our_maps)
    score_diff, worst = 0.0, None
    for key, value in our_scores.items():
        ref = ref_scores[key]
        d = float(np.nanmax(np.abs(value.double().cpu().numpy() - ref))) if not np.isnan(ref).all() else 0.0
        if d > score_diff:
            score_diff, worst = d, key
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (stage times: fastest of {args.repeats} alternated runs)")
    print(f"torch threads: {args.threads}; images: {args.images} x {args.image_size} px, {args.model} "
          f"on {args.device}; methods: {', '.join(CAMS + GRADS)}")
    print(f"metrics: {', '.join(LOCALISATION)} on every method; deletion_auc, insertion_auc, average_drop "
          f"({args.steps} steps) on {', '.join(PERTURBED)}")
    print(f"{'stage':<24}{'ours wall s':>12}{'ref wall s':>12}{'ratio':>7}{'ours cpu s':>12}{'ref cpu s':>11}"
          f"{'cpu ratio':>10}")
    stages = ["explainers", "localisation metrics", "perturbation metrics"]
    for stage, a, b in [*zip(stages, t_ours, t_ref, strict=True),
                        ("total", np.sum(t_ours, 0).tolist(), np.sum(t_ref, 0).tolist())]:
        print(f"{stage:<24}{a[0]:>12.2f}{b[0]:>12.2f}{b[0] / a[0]:>7.2f}{a[1]:>12.2f}{b[1]:>11.2f}{b[1] / a[1]:>10.2f}")
    print(f"largest map difference: {map_diff:.2e}")
    print(f"largest metric difference: {score_diff:.2e} ({worst})")
    total_ours, total_ref = np.sum(t_ours, 0), np.sum(t_ref, 0)
    print(f"ours_speedup_cpu: {total_ref[1] / total_ours[1]:.2f}")
    print(f"ours_speedup: {total_ref[0] / total_ours[0]:.2f}")


if __name__ == "__main__":
    main()
