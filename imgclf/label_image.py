"""`label-image`: classify image files with an end-to-end model and draw the answer on them.

    label-image photo.jpg                       # the latest pipeline output, Keras head
    label-image photos/ --head tf --json        # a folder, the TF head, JSON on stdout
    label-image a.jpg b.png --model models:/flower_photos-keras@champion --csv --chart
    label-image a.jpg --model runs:/<run id>/model

The model is either built from the pipeline's outputs (paths.backbone + `<models>/heads/<head>`,
paths.models of params.yaml when run from the repository) or loaded from any MLflow model URI
(resolved in the same store as the track stage: MLFLOW_TRACKING_URI, else the repository's
mlflow.db). Both decode each file with `imgclf.images.decode_image`, as the served model does,
so the probabilities equal those `mlflow models serve` returns for the same file sent as base64
(see end_to_end.py), and a file it refuses is refused with ingest's reason (too_large,
empty_file, unsupported_format for an ICO or PSD...). A folder is read by content: every file
Pillow recognises, whatever its name; the others are counted on stderr.

For each image: the top-k labels on stdout (a table, or --json / --csv), an annotated copy in
--out-dir (`<name>.labelled.png`: the image as displayed, EXIF orientation applied, same width and
height, with the best label and its confidence in a box at the top left) and with --chart a
`<name>.chart.png` with the image beside a bar chart of every class probability.

A missing file, a file that is not an image or an unreadable model each print one line on stderr
(`label-image: error: ...`); the other images are still processed. Exit status: 0 all labelled,
1 some images failed, 2 the model could not be loaded (or bad arguments).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgclf.labels import readable
from imgclf.registry import input_precision, model_names

PROG = "label-image"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
MODEL_URI_SCHEMES = ("models:/", "runs:/", "file:", "mlflow-artifacts:", "s3:", "gs:", "http")
EXIT_OK, EXIT_SOME_FAILED, EXIT_MODEL = 0, 1, 2


def error(message: str) -> None:
    """One line on stderr per problem."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _is_image(path: Path) -> bool:
    """Whether Pillow recognises `path` from its header (ingest keeps images by content, so a
    JPEG may be named photo.txt, or have no extension at all)."""
    try:
        with Image.open(path):
            return True
    except Exception:
        return False


# --------------------------------------------------------------------------- inputs


def expand_inputs(args: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to label (folders expanded to their image files, recursively, sorted, hidden and
    system files left out as ingest does) and the (input, problem) pairs of arguments, or
    files and folders inside them, that name nothing usable."""
    from imgclf.dataturks import is_url
    from imgclf.sources import UNREADABLE, UNREADABLE_FOLDER, walk_source

    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for arg in args:
        path = Path(arg)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:  # a broken link too
            problems.append(
                (arg, "a URL: label-image reads files; download it first (curl -O <url>)")
                if is_url(arg)
                else (arg, "no such file or folder")
            )
            continue
        except OSError as e:  # EACCES: a folder on the way that this user cannot enter
            problems.append((arg, f"cannot be read ({e.strerror})"))
            continue
        if stat.S_ISDIR(mode):
            found, others = [], 0
            for p, reason in walk_source(path):
                if reason is None and (p.suffix.lower() in IMAGE_SUFFIXES or _is_image(p)):
                    found.append(p)
                elif reason is None:
                    others += 1
                elif reason == UNREADABLE_FOLDER:
                    problems.append(
                        (readable(str(p)), "a folder this user cannot list: not labelled")
                    )
                elif reason == UNREADABLE:
                    problems.append((readable(str(p)), "this user cannot read it: not labelled"))
            if not found:
                besides = f" ({others} files that are not images)" if others else ""
                problems.append((arg, f"folder has no image files{besides}"))
            elif others:  # counted, not failed: a folder may hold a README or a CSV
                print(f"{PROG}: {arg}: {others} files that are not images, not labelled",
                      file=sys.stderr)  # fmt: skip
            files.extend(sorted(found))
        elif stat.S_ISREG(mode):
            files.append(path)
        else:
            problems.append((arg, "not a regular file"))
    return files, problems


# --------------------------------------------------------------------------- drawing


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's own bundled font (no system fonts): reproducible on every machine.
    return ImageFont.load_default(size=size)


def annotate(image: Image.Image, text: str) -> Image.Image:
    """A copy of `image` with `text` in a filled box at the top left; same size as `image`."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    size = max(10, round(min(w, h) * 0.07))
    font = _font(size)
    # Shrink the text until it fits the width (down to a legible minimum; then it is clipped).
    while size > 8 and draw.textlength(text, font=font) > w - 8:
        size -= 1
        font = _font(size)
    left, _top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    box = (0, 0, min(w, right - left + 2 * pad), min(h, bottom + 2 * pad))
    draw.rectangle(box, fill=(20, 20, 20))
    draw.text((pad - left, pad), text, font=font, fill=(255, 255, 80))
    return out


def probability_chart(
    image: Image.Image, labels: Sequence[str], probs: np.ndarray, height: int = 360
) -> Image.Image:
    """The image (scaled to `height`) beside a horizontal bar chart of every class probability,
    highest first."""
    img = image.convert("RGB")
    scale = height / img.height
    thumb = img.resize((max(1, min(round(img.width * scale), 2 * height)), height))
    order = np.argsort(-probs, kind="stable")
    font = _font(14)
    label_w = max(
        60, *(int(ImageDraw.Draw(thumb).textlength(str(labels[i]), font=font)) for i in order)
    )
    bar_w, row_h, margin = 220, 24, 12
    chart_w = margin + label_w + 8 + bar_w + 64
    rows = min(len(order), max(1, (height - 2 * margin) // row_h))
    canvas = Image.new("RGB", (thumb.width + chart_w, height), (255, 255, 255))
    canvas.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = thumb.width + margin
    for row, i in enumerate(order[:rows]):
        y = margin + row * row_h
        p = float(probs[i])
        draw.text((x0, y + 4), str(labels[i]), font=font, fill=(0, 0, 0))
        bx = x0 + label_w + 8
        draw.rectangle((bx, y + 3, bx + bar_w, y + row_h - 5), outline=(200, 200, 200))
        colour = (214, 96, 32) if row == 0 else (70, 110, 170)
        if p > 0:
            draw.rectangle((bx, y + 3, bx + max(1, round(bar_w * p)), y + row_h - 5), fill=colour)
        draw.text((bx + bar_w + 6, y + 4), f"{p:.1%}", font=font, fill=(0, 0, 0))
    return canvas


# --------------------------------------------------------------------------- labelling


@dataclass
class Labelled:
    image: str
    probabilities: dict[str, float]
    top: list[tuple[str, float]]
    width: int
    height: int
    annotated: str | None = None
    chart: str | None = None


@dataclass
class OutputNames:
    """Unique output names in --out-dir (two inputs called photo.jpg do not overwrite). Names
    are compared case-folded: Photo.jpg and photo.jpg are one file on macOS and Windows."""

    out_dir: Path
    used: set[str] = field(default_factory=set)

    def stem(self, path: Path) -> str:
        stem, n = path.stem, 1
        while stem.casefold() in self.used:
            n += 1
            stem = f"{path.stem}-{n}"
        self.used.add(stem.casefold())
        return stem


def label_one(
    path: Path,
    predictor: Any,
    *,
    top_k: int,
    names: OutputNames | None,
    chart: bool,
) -> Labelled:
    """Classify one file; write its annotated copy (and chart) when `names` is given."""
    from imgclf.images import decode_image

    # As ingest and the served model decode: the same refusals (too_large, empty_file...).
    pixels = decode_image(path.read_bytes())
    if predictor.predict_files is not None:
        # A logged model decodes the file itself, with the same load_rgb: send it as served.
        probs = np.asarray(predictor.predict_files([path.read_bytes()]), dtype=np.float64)[0]
    else:
        probs = np.asarray(predictor.predict(pixels[np.newaxis]), dtype=np.float64)[0]
    labels = predictor.labels or [f"class_{i}" for i in range(len(probs))]
    if len(labels) != len(probs):
        raise ValueError(f"the model gives {len(probs)} probabilities for {len(labels)} labels")
    order = np.argsort(-probs, kind="stable")[:top_k]
    result = Labelled(
        image=readable(str(path)),  # a name that is not UTF-8 prints as \xNN
        probabilities={str(label): float(p) for label, p in zip(labels, probs, strict=True)},
        top=[(str(labels[i]), float(probs[i])) for i in order],
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
    )
    if names is not None:
        stem = names.stem(path)
        image = Image.fromarray(pixels, "RGB")
        best, confidence = result.top[0]
        annotated = annotate(image, f"{best} {confidence:.1%}")
        result.annotated = str(names.out_dir / f"{stem}.labelled.png")
        _save(annotated, result.annotated)
        if chart:
            result.chart = str(names.out_dir / f"{stem}.chart.png")
            _save(probability_chart(annotated, labels, probs), result.chart)
    return result


class OutputError(Exception):
    """An output file could not be written: the output's fault, not the image's."""


def _save(image: Image.Image, path: str) -> None:
    try:
        image.save(path)
    except OSError as e:
        Path(path).unlink(missing_ok=True)  # no half-written PNG left behind
        raise OutputError(f"cannot write {path} ({e.strerror or e})") from None


# --------------------------------------------------------------------------- output


def print_table(results: Sequence[Labelled], out=None) -> None:
    out = out or sys.stdout
    if not results:
        return
    name_w = max(len("image"), *(len(r.image) for r in results))
    label_w = max(len("label"), *(len(lab) for r in results for lab, _ in r.top))
    print(f"{'image':<{name_w}}  {'#':>2}  {'label':<{label_w}}  confidence", file=out)
    for r in results:
        for rank, (label, p) in enumerate(r.top, 1):
            name = r.image if rank == 1 else ""
            print(f"{name:<{name_w}}  {rank:>2}  {label:<{label_w}}  {p:>9.2%}", file=out)


def print_json(
    results: Sequence[Labelled], failures: Sequence[dict], source: str, out=None
) -> None:
    doc = {
        "model": source,
        "results": [
            {
                "image": r.image,
                "top": [{"label": lab, "confidence": p} for lab, p in r.top],
                "probabilities": r.probabilities,
                "width": r.width,
                "height": r.height,
                "annotated": r.annotated,
                "chart": r.chart,
            }
            for r in results
        ],
        "errors": list(failures),
    }
    json.dump(doc, out or sys.stdout, indent=2)
    print(file=out or sys.stdout)


def print_csv(results: Sequence[Labelled], out=None) -> None:
    writer = csv.writer(out or sys.stdout, lineterminator="\n")
    writer.writerow(["image", "rank", "label", "confidence", "annotated"])
    for r in results:
        for rank, (label, p) in enumerate(r.top, 1):
            writer.writerow([r.image, rank, label, f"{p:.6f}", r.annotated or ""])


# --------------------------------------------------------------------------- models


def _pipeline_defaults(head: str) -> tuple[Path, str, Path | None]:
    """(paths.models, the precision of `head`'s inputs, paths.backbone) of ./params.yaml when
    run from the repository, else (./models, float32, None: <models>/backbone). The precision
    is bottlenecks.precision for a head, activations.precision for a fine-tuned model."""
    try:
        from imgclf.config import load_params

        params = load_params()
        paths = params["paths"]
        return Path(paths["models"]), input_precision(head, params), Path(paths["backbone"])
    except (FileNotFoundError, KeyError, TypeError):
        return Path("models"), "float32", None


def is_mlflow_uri(model: str) -> bool:
    return model.startswith(MODEL_URI_SCHEMES) or (Path(model) / "MLmodel").is_file()


def load_model(model: str | None, head: str, models_dir: Path | None) -> Any:
    """A Predictor (imgclf.end_to_end) for --model / --head / --models-dir."""
    import imgclf.quiet_tf  # noqa: F401
    from imgclf import end_to_end

    if model is None:
        default_dir, precision, backbone = _pipeline_defaults(head)
        if models_dir is not None:  # another models folder: its own backbone
            backbone = None
        return end_to_end.local_predictor(models_dir or default_dir, head, precision, backbone)
    if not is_mlflow_uri(model):
        raise ValueError(
            f"{model!r} is neither an MLflow model URI (models:/<name>/<version>, "
            "runs:/<run id>/model, ...) nor a folder with an MLmodel file"
        )
    from imgclf.tracking.store import open_existing_store, resolve_store, use_store

    # A models:/ or runs:/ URI is read from the store; a folder with an MLmodel file is not.
    store = open_existing_store() if model.startswith(("models:/", "runs:/")) else resolve_store()
    use_store(store)
    return end_to_end.mlflow_predictor(model)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Label images with the pipeline's end-to-end model (Inception V3 + a "
        "head) or any MLflow model URI; print the top labels and write annotated copies.",
    )
    parser.add_argument(
        "images",
        nargs="+",
        help="image files and/or folders (searched recursively for .jpg .png .gif .bmp .webp .tif)",
    )
    parser.add_argument(
        "-m",
        "--model",
        help="an MLflow model URI: models:/<name>@champion, models:/<name>/3, "
        "runs:/<run id>/model, or a folder with an MLmodel file. Default: the latest pipeline "
        "output, built from paths.backbone + <models-dir>/heads/<head>",
    )
    parser.add_argument(
        "--head",
        # Every registered model servable end to end (imgclf/registry.py).
        choices=model_names(servable=True),
        default="keras",
        help="which trained model when --model is not given: a head on the frozen features "
        "or a fine-tuned model (finetune_tf, finetune_keras) (default: keras)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="the pipeline's models folder (default: paths.models, i.e. models)",
    )
    parser.add_argument("-k", "--top-k", type=int, default=3, help="labels to show (default 3)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON on stdout (all probabilities)")
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout (one row per label)")
    parser.add_argument(
        "-o",
        "--out-dir",
        type=Path,
        default=Path("labelled"),
        help="where annotated copies go (default: ./labelled)",
    )
    parser.add_argument("--no-annotate", action="store_true", help="do not write annotated copies")
    parser.add_argument(
        "--chart",
        action="store_true",
        help="also write <name>.chart.png: the image beside a bar chart of the class probabilities",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        error(f"--top-k must be >= 1, got {args.top_k}")
        return EXIT_MODEL
    # Quiet the frameworks: the only stderr lines a user should see are ours.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    files, problems = expand_inputs(args.images)
    failures = [{"image": item, "error": why} for item, why in problems]
    for item, why in problems:
        error(f"{item}: {why}")
    if not files:
        if args.json:
            print_json([], failures, args.model or "")
        return EXIT_SOME_FAILED
    # Before the model loads, and only when there is something to label (no empty ./labelled).
    if not args.no_annotate:
        try:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error(
                f"--out-dir {args.out_dir}: cannot make that folder ({e.strerror or e}); give "
                "another with -o, or --no-annotate"
            )
            return EXIT_MODEL

    try:
        predictor = load_model(args.model, args.head, args.models_dir)
    except Exception as e:  # any loader failure (missing file, bad URI, registry...) is one line
        error(f"cannot load model {args.model or f'{args.head} head'}: {_first_line(e)}")
        return EXIT_MODEL

    from tqdm import tqdm

    names = None if args.no_annotate else OutputNames(args.out_dir)
    results: list[Labelled] = []
    for path in tqdm(files, desc=PROG, unit="image", file=sys.stderr, disable=None):
        try:
            results.append(
                label_one(path, predictor, top_k=args.top_k, names=names, chart=args.chart)
            )
        except Exception as e:
            why, item = _image_error(e), readable(str(path))
            failures.append({"image": item, "error": why})
            error(f"{item}: {why}")

    if args.json:
        print_json(results, failures, predictor.source)
    elif args.csv:
        print_csv(results)
    else:
        print_table(results)
        if names is not None and results:
            print(f"annotated images in {args.out_dir}/", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _image_error(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    from imgclf.images import BadImage

    if isinstance(e, BadImage):
        return str(e)
    if isinstance(e, UnidentifiedImageError):
        return "not an image (Pillow cannot identify the file)"
    if isinstance(e, OutputError):
        return str(e)
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return f"unreadable or damaged image ({e})"
    return _first_line(e)


def _first_line(e: Exception) -> str:
    """`Type: first line of the message` (at most 300 characters of it)."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())
