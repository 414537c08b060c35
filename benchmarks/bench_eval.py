"""Evaluation throughput: our explainers and metrics vs Captum + pytorch-grad-cam + Quantus composed.

Same model (`create_model("resnet18", 6, 64)`, eval mode, seed 0), same 32 random 64 px images and random
rectangular masks, same methods and metrics, timed side by side in one run. Prints per-stage times, the
largest value difference between the two pipelines, and as its last line `ours_speedup: <ratio>`.

Matched settings, so that values are equal: CAM maps min-max normalised on both sides (pytorch-grad-cam
always normalises); pointing game at tolerance 0 (Quantus has no tolerance); Quantus with
normalise=False and abs=False; Eigen-CAM with the Seg-Eigen-CAM sign rule on both sides. No library
offers RISE deletion/insertion for a per-pixel map on a 3-channel input (Quantus' PixelFlipping checks
`features_in_step` against H*W but flips C*H*W features), so the reference runs them as a plain loop
over steps. Score-CAM and SmoothGrad are left out: 512 masked passes per image, and noise that the
libraries draw differently.

Usage: python benchmarks/bench_eval.py [--images 32] [--ig-steps 8] [--steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from sib.explain import explain, normalize_attr
from sib.metrics import functional as MF
from sib.models import create_model

CAMS = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "eigen_cam"]
GRADS = ["saliency", "input_x_gradient", "integrated_gradients"]
LOCALISATION = ["energy_pointing_game", "pointing_game", "relevance_mass_accuracy",
                "relevance_rank_accuracy", "topk_intersection", "auroc"]
TOPK = 1024
PERTURBED = ["grad_cam", "saliency"]  # perturbation metrics cost (steps + 1) forward passes per image


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
    times = [time.perf_counter()]
    maps, scores = {}, {}
    for name in CAMS + GRADS:
        opts = {"n_steps": ig_steps} if name == "integrated_gradients" else {}
        attr = explain(name, model, x, y, **opts)
        maps[name] = normalize_attr(attr, "minmax") if name in CAMS else attr
    times.append(time.perf_counter())
    for name, attr in maps.items():
        scores[(name, "energy_pointing_game")] = MF.energy_pointing_game(attr, mask)
        scores[(name, "pointing_game")] = MF.pointing_game(attr, mask, tolerance=0)
        scores[(name, "relevance_mass_accuracy")] = MF.relevance_mass_accuracy(attr, mask, abs=False)
        scores[(name, "relevance_rank_accuracy")] = MF.relevance_rank_accuracy(attr, mask)
        scores[(name, "topk_intersection")] = MF.topk_intersection(attr, mask, k=TOPK)
        scores[(name, "auroc")] = MF.auroc(attr, mask)
    times.append(time.perf_counter())
    for name in PERTURBED:
        attr = maps[name]
        kw = {"model": model, "x": x, "target": y}
        scores[(name, "deletion_auc")] = MF.deletion_auc(attr, **kw, n_steps=steps, baseline="zeros")
        scores[(name, "insertion_auc")] = MF.insertion_auc(attr, **kw, n_steps=steps, baseline="zeros")
        scores[(name, "average_drop")] = MF.average_drop(attr, **kw)
    times.append(time.perf_counter())
    return maps, scores, np.diff(times).tolist()


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
    times = [time.perf_counter()]
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
    maps = {k: v.detach().numpy() if isinstance(v, torch.Tensor) else v for k, v in maps.items()}
    times.append(time.perf_counter())

    off = {"normalise": False, "abs": False, "disable_warnings": True, "display_progressbar": False}
    metrics = {
        "energy_pointing_game": quantus.AttributionLocalisation(positive_attributions=True, **off),
        "pointing_game": quantus.PointingGame(**off),
        "relevance_mass_accuracy": quantus.RelevanceMassAccuracy(**off),
        "relevance_rank_accuracy": quantus.RelevanceRankAccuracy(**off),
        "topk_intersection": quantus.TopKIntersection(k=TOPK, **off),
        "auroc": quantus.AUC(**off),
    }
    xn, yn, sn = x.numpy(), y.numpy(), mask.numpy().astype(float)
    with torch.no_grad():
        conf = model(x).softmax(1).gather(1, y[:, None]).squeeze(1).numpy()
    scores = {}
    for name, attr in maps.items():
        for metric_name, metric in metrics.items():
            scores[(name, metric_name)] = np.asarray(metric(model=None, x_batch=xn, y_batch=yn, a_batch=attr,
                                                            s_batch=sn, channel_first=True), dtype=float)
    times.append(time.perf_counter())
    for name in PERTURBED:
        attr = maps[name]
        scores[(name, "deletion_auc")] = loop_auc(model, x, y, attr, steps, insert=False)
        scores[(name, "insertion_auc")] = loop_auc(model, x, y, attr, steps, insert=True)
        cams = np.asarray(normalize_minmax(attr))[:, 0]
        change = CamMultImageConfidenceChange()(x, cams, [ClassifierOutputSoftmaxTarget(int(t)) for t in y],
                                                model).reshape(-1)
        scores[(name, "average_drop")] = np.maximum(-change, 0) / conf
    times.append(time.perf_counter())
    return maps, scores, np.diff(times).tolist()


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
        idx = torch.from_numpy(order[:, : s * n // steps])
        src = torch.zeros_like(flat) if not insert else flat
        for i in range(b):
            img[i][:, idx[i]] = src[i][:, idx[i]]
        with torch.no_grad():
            probs.append(model(img.view_as(x)).softmax(1).gather(1, y[:, None]).squeeze(1).numpy())
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
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("resnet18", 6, 64).eval()
    x, y, mask = data(args.images)
    ours(model, x[:2], y[:2], mask[:2], 2, 2)  # warm-up: lazy imports, allocator
    reference(model, x[:2], y[:2], mask[:2], 2, 2)

    our_maps, our_scores, t_ours = ours(model, x, y, mask, args.ig_steps, args.steps)
    ref_maps, ref_scores, t_ref = reference(model, x, y, mask, args.ig_steps, args.steps)
    map_diff = max(float(np.abs(our_maps[k].numpy() - ref_maps[k]).max()) for k in our_maps)
    score_diff, worst = 0.0, None
    for key, value in our_scores.items():
        ref = ref_scores[key]
        d = float(np.nanmax(np.abs(value.double().numpy() - ref))) if not np.isnan(ref).all() else 0.0
        if d > score_diff:
            score_diff, worst = d, key
    print(f"torch threads: {args.threads}; images: {args.images} x 64 px, resnet18, methods: {', '.join(CAMS + GRADS)}")
    print(f"metrics: {', '.join(LOCALISATION)} on every method; deletion_auc, insertion_auc, average_drop "
          f"({args.steps} steps) on {', '.join(PERTURBED)}")
    print(f"{'stage':<28}{'ours (s)':>10}{'reference (s)':>15}{'ratio':>8}")
    for stage, a, b in zip(["explainers", "localisation metrics", "perturbation metrics"], t_ours, t_ref,
                           strict=True):
        print(f"{stage:<28}{a:>10.2f}{b:>15.2f}{b / a:>8.2f}")
    print(f"{'total':<28}{sum(t_ours):>10.2f}{sum(t_ref):>15.2f}{sum(t_ref) / sum(t_ours):>8.2f}")
    print(f"largest map difference: {map_diff:.2e}")
    print(f"largest metric difference: {score_diff:.2e} ({worst})")
    print(f"ours_speedup: {sum(t_ref) / sum(t_ours):.2f}")


if __name__ == "__main__":
    main()
