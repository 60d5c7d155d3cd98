"""Runtimes: what computes the backbone's features (the bottlenecks stage) and the activations at
a cut (the activations stage). Where that runs (this process, a cluster) is another axis.

A runtime object has one method that matters, `predict(batch) -> np.ndarray`: a float32 batch
[N, 299, 299, 3], already decoded and preprocessed by the TensorFlow path (Pillow, the same
resize), in; float32 features out. `imgclf.executors.fill_cache` calls nothing else, so decoding,
the cache and the executor are the same whatever computes the numbers.

Registry: `RUNTIMES` maps a name (`bottlenecks.runtime`, `activations.runtime`) to the
precisions it offers and the module that builds it (imported by name, only when used: OpenVINO is
an optional extra). This module imports neither TensorFlow nor OpenVINO, so params can be checked
without them.

Features made by another runtime or precision are other numbers: `feature_tag` names them, and
that name is part of the bottleneck/activation cache key (tensorflow's tags are the precisions
alone, as before, so existing caches stay valid).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from imgclf.errors import UserError
from imgclf.params import check_runtime

REFERENCE = ("tensorflow", "float32")  # what every other runtime/precision is held to


@runtime_checkable
class Runtime(Protocol):
    """Computes features for preprocessed batches; see the module docstring."""

    name: str
    precision: str

    def predict(self, batch: Any) -> np.ndarray:
        """float32 [N, 299, 299, 3] (numpy or a tf.Tensor) -> float32 features [N, ...]."""
        ...

    def describe(self) -> dict[str, Any]:
        """Strings and numbers for the stage's .info.json (versions, the model file...)."""
        ...


@dataclass(frozen=True)
class RuntimeSpec:
    precisions: tuple[str, ...]
    module: str  # has `make(request: RuntimeRequest) -> Runtime`
    install: str  # what to do when its package is missing


RUNTIMES: dict[str, RuntimeSpec] = {
    # Today's path: the Keras model in a tf.function; bfloat16 = Keras' mixed_bfloat16 policy.
    "tensorflow": RuntimeSpec(
        precisions=("float32", "bfloat16"),
        module="imgclf.runtimes.tensorflow",
        install="TensorFlow is a core dependency: pip install -e .",
    ),
    # The same Keras model converted by openvino.convert_model; bfloat16 is an inference
    # precision hint of the CPU plugin, int8 an NNCF post-training quantization.
    "openvino": RuntimeSpec(
        precisions=("float32", "bfloat16", "int8"),
        module="imgclf.runtimes.openvino",
        install="pip install -e '.[openvino]' (make installs it: see the README, Runtimes)",
    ),
}


def calibration_digest(shas: Sequence[str], preprocessing: str) -> str:
    """12 hex digits naming an int8 calibration set: its images (by content) and their
    preprocessing. Another set quantizes another model, hence other features."""
    h = hashlib.sha256(preprocessing.encode() + b"\0")
    for sha in shas:
        h.update(sha.encode("ascii") + b"\n")
    return h.hexdigest()[:12]


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of bfloat16 arithmetic


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def resolved_precision(precision: str, flags: set[str] | None) -> str:
    """`precision`, with "auto" made concrete: bfloat16 where the CPU's `flags` (cpu_flags())
    have bfloat16 arithmetic, float32 where they have not or cannot be read. bfloat16 halves a
    fine-tune on such a CPU and is several times slower than float32 on any other (README,
    "bfloat16 on the full set")."""
    if precision != "auto":
        return precision
    return "bfloat16" if flags and flags & set(BF16_CPU_FLAGS) else "float32"


def bfloat16_warning(
    runtime: str,
    precision: str,
    section: str,
    flags: set[str] | None,
    instead: str = "float32 here (or int8 with openvino)",
) -> str:
    """What to tell a user who asked for bfloat16 on a CPU without bfloat16 arithmetic ("" if
    nothing): neither runtime fails there, but neither gains. Seen on an AVX2-only AMD EPYC:
    TensorFlow emulated it at 0.75x its float32 speed; OpenVINO's CPU plugin ran float32
    (features identical to float32's, at float32's speed) under the bfloat16 cache key.
    `instead`: the values of `{section}.precision` to advise."""
    if precision != "bfloat16" or flags is None or flags & set(BF16_CPU_FLAGS):
        return ""
    what = {
        "tensorflow": "TensorFlow emulates it, slower than float32",
        "openvino": "OpenVINO runs float32 instead: the same numbers, no faster",
    }.get(runtime, "it gains nothing")
    return (
        f"{section}: warning: {section}.precision=bfloat16, but this CPU has none of "
        f"{', '.join(BF16_CPU_FLAGS)}: {what}. Use {section}.precision={instead}."
    )


def feature_tag(runtime: str, precision: str, calibration: str | None = None) -> str:
    """The part of a feature cache key that says what computed the features."""
    if runtime == "tensorflow":
        return precision  # the keys the cache had before runtimes existed
    if precision == "int8":
        if not calibration:
            raise ValueError("int8 features need their calibration set's digest")
        return f"{runtime}-int8-{calibration}"
    return f"{runtime}-{precision}"


class RuntimeUnavailable(UserError):
    """The runtime's package is not installed."""


@dataclass(frozen=True)
class RuntimeRequest:
    """What a runtime module needs to build its runtime.

    `build_model(precision)` returns the project's Keras model (the backbone, or the backbone up
    to a cut) for a TensorFlow precision; a runtime that converts it calls it only when its
    converted model is not cached. `model_key` names that model (backbone sha256, cut), for the
    converted model's cache. `calibration()` yields preprocessed float32 batches of the int8
    calibration images (train split only), named by `calibration_digest`.
    """

    runtime: str
    precision: str
    build_model: Callable[[str], Any]
    model_key: str
    cache_root: Path
    calibration: Callable[[], Iterable[np.ndarray]] | None = None
    calibration_digest: str | None = None
    calibration_size: int = 0
    section: str = "bottlenecks"


def make_runtime(request: RuntimeRequest) -> Runtime:
    """The runtime of `request.runtime` (its module imported now), ready to predict."""
    check_runtime(request.runtime, request.precision, request.section)
    spec = RUNTIMES[request.runtime]
    int8 = request.precision == "int8"
    if int8 and (request.calibration is None or not request.calibration_digest):
        raise ValueError("an int8 runtime needs calibration batches and their digest")
    module = importlib.import_module(spec.module)
    return module.make(request)
