"""Fidelity gates: a runtime or precision other than TensorFlow float32 is held to it.

Before a stage computes (and caches) a single feature with another runtime/precision, it runs a
fixed small set of real images (`fidelity_sample`: the first train images of each class in
content order) through both and measures, per image, the cosine similarity and the largest
absolute difference of the outputs, and the top-1 agreement of a head on them: a nearest-class-
centroid classifier fitted on the reference features of those same images (so it needs no trained
model; for activations, on their spatial mean). A runtime whose numbers miss its gate (`GATES`)
stops the stage with a FidelityError naming what was measured against what was required, instead
of quietly filling the cache with worse features.

The gates are code, not params: a gate is the contract of a runtime/precision (measured on the
flowers with a margin, see the README's Runtimes section), and loosening one is a change to
review, not a knob. The number of images is a param (`runtimes.fidelity_images`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from imgclf.errors import UserError
from imgclf.features import ImageItem
from imgclf.runtimes import REFERENCE, Runtime, RuntimeRequest, make_runtime


@dataclass(frozen=True)
class Gate:
    min_cosine: float  # the worst image's cosine similarity to the reference
    min_mean_cosine: float  # the mean over the images
    max_abs_diff: float  # the largest |difference| of any value of any image
    min_agreement: float  # top-1 agreement of the centroid head, fraction of images


# (runtime, precision, kind): kind "features" = the pooled 2048-d bottlenecks (values 0..~6),
# "activations" = a cut's feature maps (mixed_8: values 0..~11). Measured on 20 flower photos
# (worst cosine / mean cosine / max abs / agreement), gates set with a margin:
#   features    tf bf16 0.99964/0.99985/0.106/1.0, ov f32 1.0/1.0/9e-6/1.0,
#               ov bf16 0.99969/0.99979/0.091/1.0, ov int8 (32 calibration images)
#               0.947/0.9933/1.78/0.95;
#   activations tf bf16 0.99921/0.99965/0.33/1.0, ov f32 1.0/1.0/7e-5/1.0,
#               ov bf16 0.99924/0.99961/0.35/1.0, ov int8 (32) 0.966/0.9895/4.0/1.0.
# int8 moves single images most (a few dozen values off by a unit), hence a gate on the mean.
GATES: dict[tuple[str, str, str], Gate] = {
    ("tensorflow", "bfloat16", "features"): Gate(0.998, 0.999, 0.5, 0.9),
    ("openvino", "float32", "features"): Gate(0.99999, 0.99999, 1e-3, 1.0),
    ("openvino", "bfloat16", "features"): Gate(0.998, 0.999, 0.5, 0.9),
    ("openvino", "int8", "features"): Gate(0.92, 0.985, 3.0, 0.85),
    ("tensorflow", "bfloat16", "activations"): Gate(0.997, 0.999, 1.0, 0.9),
    ("openvino", "float32", "activations"): Gate(0.99999, 0.99999, 1e-3, 1.0),
    ("openvino", "bfloat16", "activations"): Gate(0.997, 0.999, 1.0, 0.9),
    ("openvino", "int8", "activations"): Gate(0.93, 0.98, 6.0, 0.85),
}


class FidelityError(UserError):
    """A runtime's outputs are too far from TensorFlow float32's on the fidelity images."""


def fidelity_sample(items: Sequence[ImageItem], n: int) -> list[ImageItem]:
    """`n` train images, round-robin over the classes, each class in sha256 order.

    Content order, not file names: the same photos whatever they are called, and a fixed set as
    long as the train split keeps them. Distinct contents only.
    """
    by_class: dict[int, list[ImageItem]] = {}
    seen: set[str] = set()
    for item in sorted(items, key=lambda item: item.sha256):
        if item.sha256 not in seen:
            seen.add(item.sha256)
            by_class.setdefault(item.label, []).append(item)
    queues = [by_class[label] for label in sorted(by_class)]
    out: list[ImageItem] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out[:n]


def calibration_sample(train_items: Sequence[ImageItem], n: int) -> list[ImageItem]:
    """The int8 calibration images: `n` distinct train images, round-robin over the classes in
    content order (deterministic; never a test image: callers pass the train split only)."""
    return fidelity_sample(train_items, n)


def _pooled(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1, x.shape[-1]).mean(axis=1) if x.ndim > 2 else x


def _centroid_predictions(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.argmax(x @ centroids.T, axis=1)


def compare(reference: np.ndarray, got: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """Cosine (worst, mean), max |diff| and centroid-head top-1 agreement of `got` vs
    `reference` (same images, same order)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = got.reshape(len(got), -1).astype(np.float64)
    cosine = (ref * out).sum(1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-12
    )
    labels = np.asarray(labels)
    pooled_ref, pooled_got = _pooled(reference), _pooled(got)
    classes = np.unique(labels)
    centroids = np.stack([pooled_ref[labels == c].mean(axis=0) for c in classes])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    agree = _centroid_predictions(centroids, pooled_ref) == _centroid_predictions(
        centroids, pooled_got
    )
    return {
        "images": len(ref),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "max_abs_diff": float(np.abs(ref - out).max()),
        "top1_agreement": float(agree.mean()),
    }


def gate_for(runtime: str, precision: str, kind: str) -> Gate | None:
    """The gate of a runtime/precision (None for the reference itself)."""
    if (runtime, precision) == REFERENCE:
        return None
    try:
        return GATES[(runtime, precision, kind)]
    except KeyError:
        raise KeyError(
            f"no fidelity gate for {runtime}/{precision} {kind}: add one to imgclf/fidelity.py"
        ) from None


def enforce(measured: Mapping[str, float], gate: Gate, *, what: str, section: str) -> None:
    """FidelityError when `measured` misses `gate`; `what` names the runtime and precision."""
    misses = []
    if measured["cosine_min"] < gate.min_cosine:
        misses.append(
            f"worst image's cosine similarity {measured['cosine_min']:.5f} < {gate.min_cosine}"
        )
    if measured["cosine_mean"] < gate.min_mean_cosine:
        misses.append(
            f"mean cosine similarity {measured['cosine_mean']:.5f} < {gate.min_mean_cosine}"
        )
    if measured["max_abs_diff"] > gate.max_abs_diff:
        misses.append(f"max abs difference {measured['max_abs_diff']:.3g} > {gate.max_abs_diff}")
    if measured["top1_agreement"] < gate.min_agreement:
        misses.append(
            f"top-1 agreement of the centroid head {measured['top1_agreement']:.3f} < "
            f"{gate.min_agreement}"
        )
    if misses:
        raise FidelityError(
            f"{what} misses its fidelity gate against TensorFlow float32 on "
            f"{int(measured['images'])} train images: " + "; ".join(misses) + ". Nothing was "
            "computed or cached with it. Use another runtime or precision "
            f"({section}.runtime / {section}.precision), or, if these numbers are acceptable "
            "for your data, review the gate in imgclf/fidelity.py (GATES)."
        )


def measure(
    runtime: Runtime, reference: Runtime, batches: Iterable[Any], labels: Sequence[int]
) -> dict[str, float]:
    """Both runtimes on the same preprocessed batches, compared (see `compare`)."""
    ref, got = [], []
    for batch in batches:
        x = np.asarray(batch, dtype=np.float32)
        ref.append(reference.predict(x))
        got.append(runtime.predict(x))
    return compare(np.concatenate(ref), np.concatenate(got), labels)


def gate_report(measured: Mapping[str, float], gate: Gate) -> dict[str, Any]:
    """What the stage records: the numbers and the gate they passed."""
    return {**measured, "gate": asdict(gate)}


def gated_runtime(
    request: RuntimeRequest,
    *,
    preprocess: Any,
    fidelity_items: Sequence[ImageItem],
    kind: str,
    batch_size: int,
) -> tuple[Runtime, dict[str, Any]]:
    """`make_runtime(request)`, held to its gate on `fidelity_items` before it is returned.

    Returns the runtime and what the stage records (its description, the fidelity numbers).
    The reference is TensorFlow float32 built from the same `request.build_model`.
    """
    from imgclf.features import image_batches

    runtime = make_runtime(request)
    report: dict[str, Any] = runtime.describe()
    gate = gate_for(request.runtime, request.precision, kind)
    if gate is None:
        return runtime, {**report, "fidelity": "reference"}
    reference = make_runtime(replace(request, runtime=REFERENCE[0], precision=REFERENCE[1]))
    batches = image_batches([item.path for item in fidelity_items], preprocess, batch_size)
    measured = measure(runtime, reference, batches, [item.label for item in fidelity_items])
    del reference
    enforce(
        measured,
        gate,
        what=(
            f"{request.section}.runtime={request.runtime} with "
            f"{request.section}.precision={request.precision}"
        ),
        section=request.section,
    )
    return runtime, {**report, "fidelity": gate_report(measured, gate)}
