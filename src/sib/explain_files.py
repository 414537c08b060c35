"""`sib explain`: a trained run's prediction and explanations of the image files a user brings.

Inputs are image files and folders (a folder contributes its files with an image extension, sorted by name, not
its sub-folders; a file named explicitly is read whatever its extension). Each file is read by content with
`sib.data.common.open_image`: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF, of any size; grey, palette, CMYK,
RGBA (composited on white) and 16-bit images are converted to RGB as the datasets convert them. It is then
preprocessed as the run's evaluation transform, `create_transform(train=False, image_size, normalization=...)`
at the run's image size and normalisation (the shorter side resized to round(S * 256 / 224), then a centre crop
of S x S), the transform `sib.runtime.make_dataset` gives every on-disk dataset. Runs on the built-in `synthetic`
and `decoy_digits` datasets have no resampling transform (their images are generated at S px): a user's image
gets the same resize-and-centre-crop at the run's image size, which is what an evaluation transform would do.

Output folder (`--out`; a sib "explain" folder, so `--overwrite` removes only what is listed here):

    overlays/<stem>__<method>.png  the method's map over the S x S centre crop the model saw, enlarged to at
                                   least 224 px (`sib.report.figures.overlay`); a repeated file stem gets -2, -3
    predictions.json               the run, weights, preprocessing, target mode and methods; per image: file,
                                   predicted class and probability, top-5 (class, probability), the class
                                   explained, the overlays; the files that failed and why
    predictions.csv                one row per input file (status ok / failed): file, predicted, probability,
                                   target, top-5 classes and probabilities, methods, overlays, error

A file that cannot be read (truncated, empty, not an image) is reported by name and skipped; the others are
still explained. `--target`: `predicted` (each image's top class), a class name of the run, or a class index
(a name is matched first, so a class called "3" means that class, not index 3).
"""

from __future__ import annotations

import csv
import io
import json
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sib.config import ExplainConfig
from sib.data.common import IMAGE_EXTENSIONS, ImageReadError, open_image
from sib.data.transforms import ImageSizeError, create_transform, denormalize
from sib.explain import EXPLAINERS, explain
from sib.io import atomic_write_text
from sib.report.figures import overlay
from sib.run_dir import EXPLAIN, prepare, resolve_weights

TOP_K = 5


@dataclass
class ExplainResult:
    """What `explain_images` did: `explained` holds one record per explained image (as in predictions.json),
    `failed` the (file, reason) of each file skipped."""

    out: Path
    methods: list[str]
    explained: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def text(s: str) -> str:
    """A file name (or a message holding one) as valid text: bytes that were not UTF-8 become escapes (\\xe9).

    Python keeps such bytes of a name as lone surrogates, which no UTF-8 file (predictions.csv) can hold.
    """
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def not_regular(path: Path) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder (a FIFO, a socket, a device):
    reading one can wait for ever, so it is skipped by name; None otherwise."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def collect_files(inputs: list[str]) -> list[Path]:
    """The image files named by `inputs` (files as given; a folder's image files sorted by name), each once.

    A folder's entries with an image extension that are not regular files (a FIFO named pipe.png) are kept,
    so that `explain_images` skips them by name instead of leaving them out in silence.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: no input, or the inputs hold no image file.
    """
    if not inputs:
        raise ValueError("sib explain needs at least one IMAGE_OR_FOLDER")
    files: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if (p.is_file() or not_regular(p))
                            and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{given}: no such file or folder (expected an image file or a folder of them)")
    unique = list(dict.fromkeys(files))  # a file named twice (or in a folder and by name) is explained once
    if not unique:
        raise ValueError(f"no image file in {', '.join(inputs)} (extensions read: {', '.join(IMAGE_EXTENSIONS)})")
    return unique


def resolve_target(target: str, classes: list[str]) -> int | None:
    """`--target` as a class index, or None for "predicted".

    Raises:
        ValueError: neither "predicted", a class name nor an index in [0, K); the message lists the classes.
    """
    if target == "predicted":
        return None
    if target in classes:
        return classes.index(target)
    if target.isdigit() and int(target) < len(classes):
        return int(target)
    raise ValueError(f"--target {target!r}: not a class of this run; pass 'predicted', a class name "
                     f"({', '.join(classes)}) or an index 0..{len(classes) - 1}")


def _overlay_names(files: list[Path]) -> list[str]:
    """A distinct stem per file: the file's stem (bytes that are not UTF-8 as "_"), then -2, -3, ... for a stem
    already taken."""
    taken: set[str] = set()
    names = []
    for f in files:
        stem, n = re.sub("[\udc80-\udcff]", "_", f.stem), 1
        while (stem if n == 1 else f"{stem}-{n}") in taken:
            n += 1
        name = stem if n == 1 else f"{stem}-{n}"
        taken.add(name)
        names.append(name)
    return names


def explain_images(cfg: ExplainConfig) -> ExplainResult:
    """Predict and explain every image of `cfg.inputs` with the run `cfg.checkpoint`; see the module docstring.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: bad arguments (nothing is explained); an unreadable
            image is not an error here: it is skipped and listed in `ExplainResult.failed`.
    """
    from sib.registry import resolve_names
    from sib.runtime import load_run, resolve_device  # builds models and data: imported only when explaining

    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required: a run folder (holding best.pt) or a checkpoint file")
    if not cfg.out:
        raise ValueError("--out is required: the folder for overlays/ and predictions.{json,csv}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size {cfg.batch_size}: must be >= 1")
    methods = resolve_names(cfg.methods, EXPLAINERS)
    files = collect_files(cfg.inputs)
    device = resolve_device(cfg.device)
    weights_file = resolve_weights(cfg.checkpoint, cfg.weights)
    model, train_cfg, ckpt = load_run(weights_file, device)
    num_classes = int(ckpt["num_classes"])
    classes = [str(c) for c in ckpt.get("classes") or []] or [str(i) for i in range(num_classes)]
    target = resolve_target(cfg.target, classes)
    run = Path(cfg.checkpoint) if Path(cfg.checkpoint).is_dir() else Path(cfg.checkpoint).parent
    out = Path(cfg.out)
    if out.resolve() == run.resolve():
        raise ValueError(f"--out {out} is the run folder of --checkpoint {cfg.checkpoint}; explanations go to a "
                         f"folder of their own")
    _refuse_inputs_inside(cfg.inputs, files, out)
    prepare(out, EXPLAIN, overwrite=cfg.overwrite, resume=False)

    transform = create_transform(train=False, image_size=train_cfg.image_size, normalization=train_cfg.normalization)
    result = ExplainResult(out=out, methods=methods)
    rows: list[dict[str, Any]] = []  # every input file in order, explained or failed (predictions.csv)
    names = dict(zip(files, _overlay_names(files), strict=True))
    for start in range(0, len(files), cfg.batch_size):
        batch: list[tuple[Path, torch.Tensor]] = []
        done: dict[Path, dict[str, Any]] = {}
        for path in files[start:start + cfg.batch_size]:
            try:
                x = _preprocess(path, transform)
            except (ImageReadError, ImageSizeError) as err:
                result.failed.append((text(str(path)), text(str(err))))
                done[path] = {"file": text(str(path)), "status": "failed", "error": text(str(err))}
                continue
            batch.append((path, x))
        if batch:
            records = _explain_batch(model, batch, methods, target, classes, train_cfg.normalization, out, names,
                                     device)
            result.explained += records
            done.update({path: r for (path, _), r in zip(batch, records, strict=True)})
        rows += [done[path] for path in files[start:start + cfg.batch_size]]  # input order

    _write_outputs(out, cfg, weights_file, ckpt, repr(transform), methods, result, rows)
    return result


def _refuse_inputs_inside(inputs: list[str], files: list[Path], out: Path) -> None:
    """Inputs inside --out: `--overwrite` would delete them before they are read (`sib explain OUT/overlays
    --out OUT --overwrite`), and without it the folder is refused anyway."""
    if not out.is_dir():
        return
    inside = [p for p in [*map(Path, inputs), *files] if p.resolve().is_relative_to(out.resolve())]
    if inside:
        raise ValueError(f"{text(str(inside[0]))}: inside --out {text(str(out))}, the folder sib explain writes "
                         f"(and --overwrite empties) before reading its inputs; copy the images elsewhere or choose "
                         f"another --out")


def _preprocess(path: Path, transform: Any) -> torch.Tensor:
    """(3, S, S) normalised: RGB whatever the mode, then the run's evaluation transform.

    Raises:
        ImageReadError: unreadable, or not a regular file (named).
        ImageSizeError: too thin or too large once resized (sib.data.transforms.SizeLimit; named).
    """
    special = not_regular(path)
    if special is not None:
        raise ImageReadError(f"{path}: not a regular file ({special}); skipped")
    try:
        x, _ = transform(open_image(path))
    except ImageSizeError as err:
        raise ImageSizeError(f"{path}: {err}") from err
    return x


def _explain_batch(model: torch.nn.Module, batch: list[tuple[Path, torch.Tensor]], methods: list[str],
                   target: int | None, classes: list[str], normalization: str, out: Path, names: dict[Path, str],
                   device: torch.device) -> list[dict[str, Any]]:
    """Predict and explain one batch of preprocessed images; write their overlays; return one record per image."""
    x = torch.stack([t for _, t in batch]).to(device)  # (B, 3, S, S) normalised
    with torch.no_grad():
        probs = model(x).softmax(dim=1)  # (B, K)
    top_p, top_i = probs.topk(min(TOP_K, probs.shape[1]), dim=1)  # (B, k) each
    pred = top_i[:, 0]
    explained = pred if target is None else torch.full_like(pred, target)  # (B,) int64
    shown = denormalize(x, normalization).cpu()  # (B, 3, S, S) in [0, 1]: the crop the model saw
    overlays: dict[str, list[str]] = {}
    for method in methods:
        attr = explain(method, model, x, explained).cpu()  # (B, 1, S, S)
        overlays[method] = []
        for i, (path, _) in enumerate(batch):
            rel = f"overlays/{names[path]}__{method}.png"
            overlay(shown[i], attr[i], out / rel)
            overlays[method].append(rel)
    top_p, top_i, explained_l = top_p.tolist(), top_i.tolist(), explained.tolist()
    records = []
    for i, (path, _) in enumerate(batch):
        records.append({
            "file": text(str(path)), "status": "ok", "predicted": classes[top_i[i][0]], "predicted_index": top_i[i][0],
            "probability": top_p[i][0],
            "top5": [{"class": classes[c], "index": c, "probability": p} for c, p in zip(top_i[i], top_p[i],
                                                                                         strict=True)],
            "target": classes[explained_l[i]], "target_index": explained_l[i],
            "overlays": {m: overlays[m][i] for m in methods}})
    return records


def _write_outputs(out: Path, cfg: ExplainConfig, weights_file: Path, ckpt: dict[str, Any], transform: str,
                   methods: list[str], result: ExplainResult, rows: list[dict[str, Any]]) -> None:
    """predictions.json (everything) and predictions.csv (one flat row per input file), written atomically."""
    document = {
        "checkpoint": text(cfg.checkpoint), "weights": {"file": text(str(weights_file)), "epoch": ckpt.get("epoch")},
        "preprocessing": transform,
        "target_mode": cfg.target, "methods": methods, "images": result.explained,
        "failed": [{"file": f, "error": e} for f, e in result.failed]}
    atomic_write_text(out / "predictions.json", json.dumps(document, indent=2) + "\n")
    columns = ["file", "status", "predicted", "probability", "target", "target_index", "methods"]
    columns += [f"top{k}_{what}" for k in range(1, TOP_K + 1) for what in ("class", "probability")]
    columns += [f"overlay_{m}" for m in methods] + ["error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: row.get(k, "") for k in ("file", "status", "predicted", "probability", "target", "target_index",
                                            "error")}
        if row["status"] == "ok":
            flat["methods"] = " ".join(methods)
            for k, entry in enumerate(row["top5"], start=1):
                flat[f"top{k}_class"], flat[f"top{k}_probability"] = entry["class"], entry["probability"]
            flat.update({f"overlay_{m}": path for m, path in row["overlays"].items()})
        writer.writerow(flat)
    atomic_write_text(out / "predictions.csv", buffer.getvalue())
