"""LiteRT (TFLite) export of the end-to-end models, for phones, and their evaluation.

What a `.tflite` file holds: the graph of an `EndToEndModel` (imgclf/end_to_end.py) AFTER its
preprocessing, i.e. backbone (+ a fine-tuned model's blocks) + head, on ONE fixed input:

    input  `pixels`         float32 [1, 299, 299, 3]: RGB, resized to 299x299 and scaled
                            exactly as the backbone's preprocessing does (see `<stem>.json`:
                            its `preprocessing` id, `mean` and `std`, pixels = (x - mean) / std)
    output `probabilities`  float32 [1, n_classes], in the order of `<stem>.labels.txt`

A phone feeds a fixed-size tensor (camera frame -> resize -> normalise, as TFLite's image
classifiers do with their NormalizationOptions), and the resize of the pipeline (TensorFlow's
legacy ResizeBilinear for the 2015 weights) is not an op every delegate has; so the resize stays
out of the graph and Python does it with the project's own code: `imgclf.images.load_rgb`
(Pillow) then `EndToEndModel.preprocess` (the backbone's resize + scaling). The file then sees
the very pixels the TensorFlow path sees, and float32 matches it to ~1e-6.

Precisions (params.yaml `litert.precisions`):

- float32: the graph as is.
- float16: weights stored as float16 (half the size), computed in float32 (dequantized at load
  time; a GPU delegate may compute in float16).
- int8: full-integer post-training quantization (every op int8, TFLITE_BUILTINS_INT8 only, so
  the file runs on integer-only accelerators too), calibrated on the pipeline's int8 calibration
  images (imgclf.fidelity.calibration_sample: train images only, round-robin over the classes
  in sha256 order, `runtimes.calibration_images` of them), decoded and resized as above. The
  input and output stay float32 (one quantize op in front, one dequantize behind): the same
  interface at every precision, and no second rounding of the resized pixels to uint8.

A fine-tuned model's float16 rounding of its cut activations (how its cache stored them) is
kept at float32/float16 and left out at int8, whose activations are coarser than float16 anyway.
With test_time_flip the flip is applied to the resized pixels (TensorFlow flips before the
resize: a sub-pixel difference, within the agreement the export stage measures).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from imgclf.end_to_end import EndToEndModel
from imgclf.errors import ParamsError
from imgclf.images import load_rgb
from imgclf.params import LITERT_PRECISIONS

PRECISIONS = LITERT_PRECISIONS
INPUT_NAME = "pixels"
# (mean, std) of each preprocessing (the part of its id before ':'): pixels = (x - mean) / std
# after the resize; imgclf/inception.py PREPROCESSORS computes the same.
NORMALIZATION = {"tf2015-v1": (128.0, 128.0), "keras-imagenet-v1": (127.5, 127.5)}


def file_stem(model: str, precision: str) -> str:
    """`<model>-<precision>`: the name of a model's files at one precision."""
    return f"{model}-{precision}"


def check_precision(precision: str, key: str = "litert.precisions") -> None:
    if precision not in PRECISIONS:
        raise ParamsError(key, expected="some of " + ", ".join(PRECISIONS), found=repr(precision))


def fixed_input_function(model: EndToEndModel, precision: str = "float32") -> Any:
    """The concrete function pixels float32 [1, 299, 299, 3] -> probabilities [1, C] (see the
    module doc) that is converted."""
    check_precision(precision)
    size = model.image_size
    spec = tf.TensorSpec([1, size, size, 3], tf.float32, name=INPUT_NAME)
    rounding = precision != "int8"

    @tf.function(input_signature=[spec])
    def probabilities(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        p = model.probabilities_of_preprocessed(pixels, round_activations=rounding)
        if model.test_time_flip:
            flipped = tf.reverse(pixels, axis=[2])
            p = (p + model.probabilities_of_preprocessed(flipped, round_activations=rounding)) / 2
        return {"probabilities": p}

    return probabilities.get_concrete_function()


def convert(
    model: EndToEndModel,
    precision: str,
    calibration: Callable[[], Iterable[np.ndarray]] | None = None,
) -> bytes:
    """The .tflite flatbuffer of `model` at `precision`. int8 needs `calibration`: a function
    returning an iterable of float32 [1, 299, 299, 3] inputs (the representative dataset)."""
    check_precision(precision)
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    # Frozen first: given the variables, TF 2.21's converter keeps them as resource variables
    # (READ_VARIABLE ops, a 0.3 MB file that reads the weights from nowhere); as constants the
    # weights are in the file and can be quantized.
    frozen = convert_variables_to_constants_v2(fixed_input_function(model, precision))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], model)
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if calibration is None:
            raise ValueError("int8 conversion needs calibration images (a representative dataset)")

        fed = [0]

        def representative() -> Iterator[list[np.ndarray]]:
            for pixels in calibration():
                fed[0] += 1
                yield [np.asarray(pixels, np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        # Full-integer: a float op left in the graph is a conversion error, not a silent
        # fallback (inference_input/output_type stay float32: see the module doc).
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    flatbuffer = bytes(converter.convert())
    if precision == "int8" and not fed[0]:
        # The converter only warns, then writes a float file under the int8 name.
        raise ValueError("int8 conversion got no calibration image (an empty representative set)")
    return flatbuffer


def preprocessed_pixels(
    paths: Iterable[str | Path], preprocess: Callable[[Any], Any]
) -> Iterator[np.ndarray]:
    """float32 [1, 299, 299, 3] per image file: load_rgb (Pillow, as ingest and the bottlenecks
    stage) then `preprocess` (EndToEndModel.preprocess: the backbone's resize and scaling)."""
    for path in paths:
        yield np.asarray(preprocess(load_rgb(path)[np.newaxis]), np.float32)


@dataclass(frozen=True)
class ExportedFile:
    model: str
    precision: str
    tflite: Path
    labels: Path
    info: Path
    size_bytes: int
    convert_seconds: float


def sidecar(model: EndToEndModel, name: str, precision: str) -> dict[str, Any]:
    """What an app needs to feed and read the file (written as `<stem>.json`)."""
    mean, std = NORMALIZATION.get(str(model.preprocessing).split(":")[0], (None, None))
    return {
        "model": name,
        "precision": precision,
        "labels": [str(label) for label in model.labels],
        "input": {
            "name": INPUT_NAME,
            "shape": [1, model.image_size, model.image_size, 3],
            "dtype": "float32",
            "pixels": (
                f"RGB, resized to {model.image_size}x{model.image_size} by the preprocessing "
                "below, then (x - mean) / std"
            ),
            "mean": mean,
            "std": std,
        },
        "output": {"name": "probabilities", "dtype": "float32", "order": "labels"},
        "preprocessing": str(model.preprocessing),
        "backbone_sha256": str(model.backbone_sha256),
    }


def export(
    model: EndToEndModel,
    out_dir: str | Path,
    name: str,
    precision: str,
    calibration: Callable[[], Iterable[np.ndarray]] | None = None,
) -> ExportedFile:
    """Write `<out_dir>/<name>-<precision>.tflite`, `.labels.txt` (one class per line, label
    order, as retrain.py's output_labels.txt) and `.json` (the sidecar)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(name, precision)
    start = time.perf_counter()
    flatbuffer = convert(model, precision, calibration)
    seconds = time.perf_counter() - start
    tflite = out_dir / f"{stem}.tflite"
    tmp = tflite.with_suffix(".tflite.tmp")
    tmp.write_bytes(flatbuffer)
    tmp.replace(tflite)  # never a half-written file under the final name
    labels = out_dir / f"{stem}.labels.txt"
    labels.write_text("".join(f"{label}\n" for label in model.labels), encoding="utf-8")
    info = out_dir / f"{stem}.json"
    info.write_text(json.dumps(sidecar(model, name, precision), indent=2) + "\n", encoding="utf-8")
    return ExportedFile(name, precision, tflite, labels, info, len(flatbuffer), seconds)


def read_labels_file(path: str | Path) -> list[str]:
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def interpreter_class() -> tuple[Any, str]:
    """LiteRT's Interpreter (`ai-edge-litert`, the maintained package) or, without it, TF's
    deprecated `tf.lite.Interpreter` (the same runtime, bundled with TF 2.21)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        return tf.lite.Interpreter, "tf.lite"


def load_interpreter(path: str | Path, num_threads: int = 2) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .tflite file (run the export stage)")
    cls, _ = interpreter_class()
    interpreter = cls(model_path=str(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


def predict(path: str | Path, inputs: Iterable[np.ndarray], *, num_threads: int = 2) -> np.ndarray:
    """Probabilities float32 [N, C] of the .tflite file on `inputs` (float32 [1, 299, 299, 3]
    each, as `preprocessed_pixels` gives), one invoke per image: the file's batch is 1."""
    interpreter = load_interpreter(path, num_threads)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    rows = []
    for i, pixels in enumerate(inputs):
        pixels = np.asarray(pixels, np.float32)
        if pixels.shape != tuple(inp["shape"]):
            raise ValueError(
                f"{path}: input {i} has shape {pixels.shape}, the file takes "
                f"{tuple(inp['shape'])} (resize with EndToEndModel.preprocess first)"
            )
        interpreter.set_tensor(inp["index"], pixels)
        interpreter.invoke()
        rows.append(np.array(interpreter.get_tensor(out["index"]), np.float32))
    return np.concatenate(rows) if rows else np.zeros((0, int(out["shape"][-1])), np.float32)


def compare(
    probabilities: np.ndarray, reference: np.ndarray, labels: Sequence[int]
) -> dict[str, float]:
    """The file's test metrics against the TF model's probabilities on the same images."""
    labels = np.asarray(labels)
    got, ref = probabilities.argmax(axis=1), reference.argmax(axis=1)
    accuracy, tf_accuracy = float(np.mean(got == labels)), float(np.mean(ref == labels))
    return {
        "accuracy": accuracy,
        "tf_accuracy": tf_accuracy,
        "accuracy_delta": accuracy - tf_accuracy,
        "top1_agreement": float(np.mean(got == ref)),
        "max_abs_prob_diff": float(np.max(np.abs(probabilities - reference))),
    }


def targets(rows: Mapping[str, Mapping[str, float]], *, max_drop: float = 0.01) -> dict[str, Any]:
    """The export's targets for one model's files (precision -> metrics): the int8 file at most
    1/3.5 of the float32 file, each file's accuracy within `max_drop` of the TF model's."""
    out: dict[str, Any] = {}
    if "int8" in rows and "float32" in rows:
        ratio = rows["float32"]["size_mb"] / rows["int8"]["size_mb"]
        out["int8_size_ratio"] = ratio
        out["int8_size_ok"] = ratio >= 3.5
    out["accuracy_ok"] = {
        p: r["accuracy_delta"] >= -max_drop for p, r in rows.items() if "accuracy_delta" in r
    }
    return out


# -- the export stage -------------------------------------------------------------------------
def check_models(names: Sequence[str], pipeline: Sequence[str]) -> list[str]:
    """`litert.models`, checked: each servable end to end (imgclf/registry.py) and a model of
    this pipeline's result (params.yaml `models` + `finetune_models`, so it is trained)."""
    from imgclf.registry import MODELS

    servable = [name for name in pipeline if MODELS[name].servable]
    for name in names:
        if name in servable:
            continue
        if name not in MODELS:
            why = "not a registered model (imgclf/registry.py)"
        elif not MODELS[name].servable:
            why = "not servable end to end (it has no TensorFlow graph)"
        else:
            why = "not trained by this pipeline (not in params.yaml models / finetune_models)"
        raise ParamsError(
            "litert.models",
            expected="servable models of this pipeline: " + ", ".join(servable),
            found=f"{name!r}, {why}",
        )
    return list(names)


@dataclass
class _Scored:
    """One exported file while the test images stream through it."""

    exported: ExportedFile
    interpreter: Any
    rows: list[np.ndarray]
    seconds: float = 0.0


def _invoke(interpreter: Any, pixels: np.ndarray) -> np.ndarray:
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    interpreter.set_tensor(inp["index"], pixels)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(out["index"]), np.float32)


def export_and_score(
    *,
    build_model: Callable[[str], EndToEndModel],
    models: Sequence[str],
    precisions: Sequence[str],
    out_dir: str | Path,
    calibration_paths: Sequence[Path],
    test_paths: Sequence[Path],
    test_labels: np.ndarray,
    reference: Mapping[str, np.ndarray],
    num_threads: int,
) -> dict[str, Any]:
    """Convert each model at each precision into `out_dir`, then score its files on the test
    images in one pass (each image decoded and resized once, fed to each file), against the
    TF model's own probabilities `reference[model]` (rows = `test_paths`). Returns the metrics
    (numbers only: metrics/litert/<model>.json). A failure names the model and precision."""
    from imgclf.errors import StageFailed

    for precision in precisions:
        check_precision(precision)
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # the stage's out, even with no models
    scored: dict[tuple[str, str], _Scored] = {}
    for name in models:
        model = build_model(name)
        preprocess = model.preprocess  # its input side: 299, or a fine-tuned model's own
        calibration = functools.partial(preprocessed_pixels, calibration_paths, preprocess)
        for precision in precisions:
            try:
                exported = export(model, out_dir, name, precision, calibration)
                interpreter = load_interpreter(exported.tflite, num_threads)
            except Exception as e:  # a converter error: say which file it was
                summary = " ".join(f"{type(e).__name__}: {e}".split())[:2000]
                raise StageFailed(
                    f"LiteRT export of {name} at {precision} failed: {summary}. Leave it out "
                    "with `litert.precisions` / `litert.models` in params.yaml, or report it"
                ) from e
            print(
                f"export: {file_stem(name, precision)}.tflite  "
                f"{exported.size_bytes / 1e6:.1f} MB in {exported.convert_seconds:.0f} s"
            )
            scored[(name, precision)] = _Scored(exported, interpreter, [])
        del model
        # One model's files at a time (each image decoded and resized once for all of them),
        # their interpreters then dropped: memory holds one model's files, however many.
        mine = [s for (n, _), s in scored.items() if n == name]
        for pixels in preprocessed_pixels(test_paths, preprocess):
            for s in mine:
                start = time.perf_counter()
                s.rows.append(_invoke(s.interpreter, pixels))
                s.seconds += time.perf_counter() - start
        for s in mine:
            s.interpreter = None
    files: dict[str, dict[str, float]] = {}
    for (name, precision), s in scored.items():
        probs = np.concatenate(s.rows) if s.rows else np.zeros((0, 0), np.float32)
        ref = np.asarray(reference[name])[: len(probs)]
        row = {
            "size_mb": s.exported.size_bytes / 1e6,
            **(compare(probs, ref, test_labels[: len(probs)]) if len(probs) else {}),
            "convert_seconds": s.exported.convert_seconds,
            "invoke_seconds": s.seconds,
            "images_per_second": len(probs) / s.seconds if s.seconds > 0 else 0.0,
        }
        float32 = scored.get((name, "float32"))
        if float32 is not None:
            row["size_ratio_vs_float32"] = float32.exported.size_bytes / s.exported.size_bytes
        files[file_stem(name, precision)] = row
    return {"test_images": len(test_paths), "files": files}


def markdown_table(metrics: Mapping[str, Any], *, max_drop: float = 0.01) -> str:
    """metrics/litert/<model>.md: one row per file, then the issue's targets, checked."""
    lines = [
        f"LiteRT (TFLite) files on {metrics['test_images']} test images, scored with the "
        "LiteRT interpreter (batch 1) against the TF model's own test predictions.",
        "",
        "| File | Size (MB) | × smaller than float32 | Test accuracy | TF model | Δ (pt) "
        "| Top-1 agreement | Max abs Δ prob | img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_model: dict[str, dict[str, Mapping[str, float]]] = {}
    for stem, row in metrics["files"].items():
        name, _, precision = stem.rpartition("-")
        by_model.setdefault(name, {})[precision] = row
        ratio = row.get("size_ratio_vs_float32")
        lines.append(
            f"| `{stem}.tflite` | {row['size_mb']:.1f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {row.get('accuracy', 0):.3f} | "
            f"{row.get('tf_accuracy', 0):.3f} | {100 * row.get('accuracy_delta', 0):+.1f} | "
            f"{row.get('top1_agreement', 0):.3f} | {row.get('max_abs_prob_diff', 0):.2g} | "
            f"{row['images_per_second']:.1f} |"
        )
    lines += ["", f"Targets: int8 file ≤ float32 / 3.5; accuracy within "
              f"{100 * max_drop:g} pt of the TF model."]  # fmt: skip
    for name, rows in by_model.items():
        t = targets(rows, max_drop=max_drop)
        parts = []
        if "int8_size_ratio" in t:
            verdict = "met" if t["int8_size_ok"] else "MISSED"
            parts.append(f"int8 {t['int8_size_ratio']:.2f}× smaller ({verdict})")
        missed = [p for p, ok in t["accuracy_ok"].items() if not ok]
        parts.append("accuracy: " + (f"MISSED at {', '.join(missed)}" if missed else "met"))
        lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"
