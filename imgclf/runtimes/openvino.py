"""The OpenVINO runtime: the project's own Keras model converted by `openvino.convert_model`,
compiled for the CPU at float32 or bfloat16, or quantized to int8 by NNCF first.

Nothing is downloaded: the model is converted from the Keras backbone the backbone stage wrote.
The converted model (OpenVINO IR: model.xml + model.bin) is cached under
`~/.cache/imgclf/openvino/<model_key>-<what>/`, where `model_key` names the backbone (sha256)
and the cut, and `what` is `float32` (the IR that float32 and bfloat16 both compile: bfloat16 is
the CPU plugin's inference precision, chosen when compiling) or `int8-<calibration digest>` (the
NNCF-quantized IR, which depends on its calibration images). An entry is written under a
temporary name and renamed, and its .bin's sha256 is checked on every load: a torn or edited file
is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.runtimes import RUNTIMES, RuntimeRequest, RuntimeUnavailable

try:
    import openvino as ov
except ImportError as e:  # the optional extra is not installed
    ov = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

# The CPU plugin's names for the precisions of params.yaml. int8: the quantized layers run in
# int8 (VNNI), the rest (softmax-free here: pools, concats, the final mean) in bfloat16 where
# the CPU has it; measured on this model, the features are the same as with f32 for the rest
# (cosine to TF float32 equal to 6 digits) and 1.3x faster.
INFERENCE_PRECISION = {"float32": "f32", "bfloat16": "bf16", "int8": "bf16"}
MODEL_FILE = "model.xml"
INFO_FILE = "openvino.json"


def _require_openvino() -> Any:
    if ov is None:
        raise RuntimeUnavailable(
            f"runtime openvino: the openvino package is not installed ({_IMPORT_ERROR}). "
            f"Install the optional extra: {RUNTIMES['openvino'].install}; or set the runtime "
            "back to tensorflow."
        )
    return ov


def _type_name(value: Any) -> str:
    """`bf16` for ov.Type.bf16 (its str() is `<Type: 'bfloat16'>`)."""
    to_string = getattr(value, "to_string", None)
    return to_string() if callable(to_string) else str(value)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _load_cached(folder: Path) -> Any | None:
    """The IR in `folder` if it is whole and its .bin matches the recorded sha256, else None."""
    info_path = folder / INFO_FILE
    try:
        info = json.loads(info_path.read_text())
        ok = _sha256(folder / "model.bin") == info["bin_sha256"]
    except (OSError, ValueError, KeyError):
        ok = False
    if not ok:
        shutil.rmtree(folder, ignore_errors=True)  # rebuilt below: it cannot be trusted
        return None
    return ov.Core().read_model(folder / MODEL_FILE)


def _save(model: Any, folder: Path, info: dict[str, Any]) -> None:
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # compress_to_fp16=False: the float32 IR must hold the float32 weights (the default halves
    # them, which would make "float32" a float16-weights model).
    ov.save_model(model, tmp / MODEL_FILE, compress_to_fp16=False)
    info = {**info, "bin_sha256": _sha256(tmp / "model.bin"), "openvino": ov.__version__}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process saved it first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(request: RuntimeRequest) -> Any:
    """The project's float32 Keras model as an OpenVINO model (Keras 3 models convert
    directly: convert_model traces them as a TF function)."""
    model = request.build_model("float32")
    with warnings.catch_warnings():
        # Keras warns that convert_model passes the input as a tuple, not by name: harmless.
        warnings.simplefilter("ignore", UserWarning)
        example = np.zeros((1, *model.input_shape[1:]), np.float32)  # 299x299 or the stage's size
        return ov.convert_model(model, example_input=example)


def _quantize(model: Any, request: RuntimeRequest) -> Any:
    try:
        import nncf
    except ImportError as e:
        raise RuntimeUnavailable(
            f"{request.section}.precision=int8 needs the nncf package ({e}). Install the "
            f"optional extra: {RUNTIMES['openvino'].install}."
        ) from None
    # One image per calibration item: NNCF's subset_size counts items, and collects its
    # statistics per item.
    assert request.calibration is not None
    items = [image[np.newaxis] for batch in request.calibration() for image in batch]
    if not items:
        raise ValueError("no calibration images")
    return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))


def load_ir(request: RuntimeRequest) -> tuple[Any, Path, dict[str, float]]:
    """The (cached or newly built) IR for `request`, its folder, and what building it cost."""
    _require_openvino()
    root = Path(request.cache_root)
    root.mkdir(parents=True, exist_ok=True)
    costs: dict[str, float] = {}
    float_dir = root / f"{request.model_key}-float32"
    ir = _load_cached(float_dir)
    if ir is None:
        start = time.perf_counter()
        ir = _convert(request)
        _save(ir, float_dir, {"model_key": request.model_key, "precision": "float32"})
        costs["convert_seconds"] = time.perf_counter() - start
    if request.precision != "int8":
        return ir, float_dir, costs
    int8_dir = root / f"{request.model_key}-int8-{request.calibration_digest}"
    quantized = _load_cached(int8_dir)
    if quantized is None:
        start = time.perf_counter()
        quantized = _quantize(ir, request)
        info = {
            "model_key": request.model_key,
            "precision": "int8",
            "calibration_digest": request.calibration_digest,
            "calibration_images": request.calibration_size,
        }
        _save(quantized, int8_dir, info)
        costs["quantize_seconds"] = time.perf_counter() - start
    return quantized, int8_dir, costs


class OpenVINORuntime:
    """A compiled OpenVINO model; `predict` splits each batch over the plugin's streams."""

    name = "openvino"

    def __init__(self, ir: Any, precision: str, folder: Path, costs: dict[str, float]):
        self.precision = precision
        self.folder = folder
        self.costs = costs
        core = ov.Core()
        # THROUGHPUT: one stream per core or two, each running its own part of a batch. On 2
        # cores it ran 1.6x the LATENCY hint's one stream with both threads (bench/runtimes.py).
        self.compiled = core.compile_model(
            ir,
            "CPU",
            {
                "PERFORMANCE_HINT": "THROUGHPUT",
                "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
            },
        )
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self._out: list[np.ndarray | None] = []
        self._queue.set_callback(self._done)

    def _done(self, request: Any, index: int) -> None:
        self._out[index] = request.get_output_tensor(0).data.copy()

    def predict(self, batch: Any) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(batch), dtype=np.float32)
        chunks = [c for c in np.array_split(x, min(self.requests, len(x))) if len(c)]
        self._out = [None] * len(chunks)
        for i, chunk in enumerate(chunks):
            self._queue.start_async({0: chunk}, i)
        self._queue.wait_all()  # releases the GIL: the decoding thread runs meanwhile
        return np.concatenate(self._out).astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "precision": self.precision,
            "openvino": ov.__version__,
            "inference_precision": _type_name(
                self.compiled.get_property("INFERENCE_PRECISION_HINT")
            ),
            "streams": self.requests,
            "model_dir": str(self.folder),
        }


def make(request: RuntimeRequest) -> OpenVINORuntime:
    ir, folder, costs = load_ir(request)
    return OpenVINORuntime(ir, request.precision, folder, costs)
