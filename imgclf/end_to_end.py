"""End-to-end models: an image file in, its label and class probabilities out.

Two layers:

- `EndToEndModel`, a `tf.Module`: decoded pixels, uint8 RGB [N, H, W, 3] exactly as
  `imgclf.images.load_rgb` returns them (EXIF orientation applied, alpha on white...), any H and
  W -> probabilities [N, n_classes]. One TensorFlow graph holds the backbone's own preprocessing
  (the resize to 299x299 and the scaling its weights need), the backbone and the head: the path
  the bottlenecks stage takes (load_rgb -> Backbone.preprocess -> model), so it reproduces the
  evaluated heads on the test images, not an approximation. For a fine-tuned model
  (imgclf/finetune) the graph is the path of the activations stage and evaluate instead: the
  backbone up to the model's cut, the activations rounded to float16 as the cache stores them,
  the fine-tuned blocks and head; with test_time_flip, the same on the horizontally flipped
  pixels (the `flip` view) and the two averaged.
- `ImageClassifier`, the MLflow pyfunc model that is logged, registered and served: it takes
  encoded image files (JPEG, PNG... bytes; base64 strings in JSON, as MLflow's own image
  example), decodes each with `images.decode_image` (`load_rgb`, the same Pillow code as
  ingest, the bottlenecks and `label-image`), runs the SavedModel of the graph above and
  answers one row per image: `label`, `probability`, `probabilities` ({label: probability})
  and `error`. The probabilities are bit for bit those `label-image` prints for the same file.
  Decoding in TensorFlow instead would give other pixels (its JPEG decoder is not Pillow's)
  than the heads were trained on. A row that is not a readable image is answered with nulls
  and its `error` (`not_an_image: ...`, `truncated: ...`, `too_large: ...`,
  `unsupported_format: ...` for a format ingest refuses, as ingest's report); the other rows
  of the request are classified all the same. That includes a row that is not base64 at all
  (`not_base64`), a null or a number (`not_bytes`): the signature's `image` column is a string
  column, decoded by the model row by row, so MLflow's schema check passes such a row on
  instead of refusing the whole request (a binary column would).

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
      -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 of a JPEG>"]]}}'

Images of different sizes are fine in one request (each is run on its own). Raw pixel tensors
(`{"inputs": <H x W x 3 list>}`) are not accepted by the served model: its signature is the
`image` column; in Python, `EndToEndModel` takes the array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.pyfunc import PythonModel

from imgclf.heads.common import LABELS_FILE, read_labels, write_labels
from imgclf.images import DEFAULT_MAX_PIXELS, BadImage, decode_image
from imgclf.inception import IMAGE_SIZE, Backbone, backbone_to_cut, load_backbone
from imgclf.layout import Layout
from imgclf.registry import get_model, model_names

# The registered models servable end to end (their spec names a graph_head function).
HEAD_KINDS = tuple(model_names(servable=True))
INPUT_SPEC = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
INPUT_COLUMN = "image"
MAX_PIXELS_CONFIG = "max_image_pixels"  # the model config key of the served pixel cap
INPUT_DOC = (
    "column `image`: encoded image files (JPEG, PNG, ... bytes; base64 in JSON), decoded with "
    "Pillow as imgclf.images.load_rgb; output per image: label, probability, probabilities "
    "({label: probability}, in `labels` order), and error (null, or why the image was not "
    "classified: not_an_image, truncated, too_large...)"
)
OUTPUT_COLUMNS = ["label", "probability", "probabilities", "error"]
SAVED_MODEL_ARTIFACT = "saved_model"
LABELS_ARTIFACT = "labels"


def _load_head(
    head_dir: Path, kind: str, float32: bool = False
) -> tuple[Any, Callable[[tf.Tensor], tf.Tensor]]:
    """The trained head as a TF object (kept as an attribute so its variables are saved) and the
    function bottlenecks [N, 2048] (a fine-tuned model: activations at its cut) ->
    probabilities, usable inside a tf.function: the spec's graph_head. `kind` is one of
    HEAD_KINDS (checked by `build`). `float32`: a fine-tuned model's blocks compute in float32
    whatever its recipe's precision (the heads always do)."""
    spec = get_model(kind)
    if float32 and spec.fine_tuned:
        return spec.function("graph_head")(head_dir, float32=True)
    return spec.function("graph_head")(head_dir)


@dataclass(frozen=True)
class _Untracked:
    """A value that tf.Module does not track (a plain object, not a Trackable or a container)."""

    value: Any


class EndToEndModel(tf.Module):
    """uint8 images [N, H, W, 3] -> probabilities [N, n_classes] (see the module doc)."""

    def __init__(
        self,
        backbone: Backbone,
        head: Any,
        head_fn: Callable,
        labels: list[str],
        kind: str,
        *,
        cut: str | None = None,
        test_time_flip: bool = False,
    ) -> None:
        """`cut`: a fine-tuned model's (its head_fn takes the activations there, not the pool
        features); `test_time_flip`: average with the flipped image, as it was scored."""
        super().__init__(name=f"end_to_end_{kind}")
        model = backbone.model if cut is None else backbone_to_cut(backbone.model, cut)
        # Saved as its variables, not as a Keras model: tf.saved_model.save walks every object
        # it can reach, and Inception's ~300 layers made that walk ~3.6 s of a ~10 s export.
        # The traced graph is the same; the variables are what it captures.
        self._backbone = _Untracked(model)
        self.backbone_variables = list(model.variables)
        self.head = head
        self._preprocess = backbone.preprocess
        self._head_fn = head_fn
        self.labels = list(labels)
        self.kind = kind
        self.cut = cut
        self.test_time_flip = bool(test_time_flip)
        self.backbone_sha256 = backbone.sha256
        self.preprocessing = backbone.preprocessing
        self.image_size = backbone.image_size

    @property
    def backbone(self) -> Any:
        """The Keras backbone (up to the cut of a fine-tuned model)."""
        return self._backbone.value

    def preprocess(self, images: Any) -> tf.Tensor:
        """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3]: the backbone's own resize and
        scaling, the pixels every other path (bottlenecks, activations) feeds the backbone."""
        return self._preprocess(images)

    def _probabilities(self, images: tf.Tensor) -> tf.Tensor:
        return self.probabilities_of_preprocessed(self._preprocess(images))

    def probabilities_of_preprocessed(
        self, pixels: tf.Tensor, *, round_activations: bool = True
    ) -> tf.Tensor:
        """float32 [N, 299, 299, 3] (the output of `preprocess`) -> probabilities: the graph
        after preprocessing, which the LiteRT export converts (imgclf/litert.py) so that a
        phone feeds a fixed-size tensor. `round_activations=False` leaves out a fine-tuned
        model's float16 rounding (a full-integer int8 graph has no float16 to round to)."""
        features = self.backbone(pixels, training=False)
        # A bfloat16 backbone (bottlenecks/activations.precision) hands out bfloat16; the heads
        # take float32, as they did on the widened bottleneck files.
        features = tf.cast(features, tf.float32)
        if self.cut is not None and round_activations:
            # The fine-tuned models were trained and evaluated on float16 activations (the
            # cache's storage): the same rounding here gives their evaluated probabilities.
            features = tf.cast(tf.cast(features, tf.float16), tf.float32)
        return self._head_fn(features)

    @tf.function(input_signature=[INPUT_SPEC])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        probabilities = self._probabilities(images)
        if self.test_time_flip:
            # The `flip` view: the decoded pixels mirrored left-right, before preprocessing.
            flipped = self._probabilities(tf.reverse(images, axis=[2]))
            probabilities = (probabilities + flipped) / 2.0
        return probabilities

    def metadata(self) -> dict[str, Any]:
        meta = {
            "labels": [str(label) for label in self.labels],  # a plain list, not tf's wrapper
            "head": self.kind,
            "backbone_sha256": self.backbone_sha256,
            "preprocessing": self.preprocessing,
            "input": INPUT_DOC,
        }
        if self.cut is not None:
            meta.update(cut=self.cut, image_size=self.image_size)
            meta["test_time_flip"] = self.test_time_flip
        return meta


def build(
    backbone: str | Path | Backbone,
    head_dir: str | Path,
    kind: str,
    precision: str = "float32",
    *,
    float32_blocks: bool = False,
) -> EndToEndModel:
    """The end-to-end model of the backbone stage's output and one trained model. `backbone`
    is the backbone folder, or a Backbone already loaded (shared by several models).
    `precision` (for a folder) should be the one the model's inputs were computed at
    (bottlenecks.precision for a head, activations.precision for a fine-tuned model), so the
    backbone computes what the model was trained and evaluated on. `float32_blocks`: a
    fine-tuned model's blocks compute in float32 even when its recipe's precision is bfloat16
    (the same weights; for LiteRT, which has no bfloat16 convolution)."""
    if kind not in model_names(servable=True):
        raise ValueError(
            f"unknown head {kind!r}: expected one of {', '.join(model_names(servable=True))}"
        )
    head_dir = Path(head_dir)
    labels = read_labels(head_dir)
    cut, flip = None, False
    if get_model(kind).fine_tuned:
        from imgclf.finetune.common import model_cut, uses_test_time_flip

        cut, flip = model_cut(head_dir), uses_test_time_flip(head_dir)
    size = image_size(head_dir, kind)
    if not isinstance(backbone, Backbone):
        backbone = load_backbone(backbone, precision=precision, image_size=size)
    elif backbone.image_size != size:
        raise ValueError(
            f"{head_dir}: the model takes {size}x{size} images, the backbone given was built "
            f"for {backbone.image_size}x{backbone.image_size}"
        )
    head, head_fn = _load_head(head_dir, kind, float32_blocks)
    return EndToEndModel(backbone, head, head_fn, labels, kind, cut=cut, test_time_flip=flip)


class Builder:
    """Builds the end-to-end models of one backbone folder, loading the backbone once per
    (precision, input side) for every model that runs it so (~2 s a load)."""

    def __init__(self, backbone_dir: str | Path) -> None:
        self.backbone_dir = Path(backbone_dir)
        self._backbones: dict[tuple[str, int], Backbone] = {}

    def __call__(
        self,
        head_dir: str | Path,
        kind: str,
        precision: str = "float32",
        *,
        float32_blocks: bool = False,
    ) -> EndToEndModel:
        key = (precision, image_size(head_dir, kind))
        if key not in self._backbones:
            self._backbones[key] = load_backbone(
                self.backbone_dir, precision=precision, image_size=key[1]
            )
        return build(self._backbones[key], head_dir, kind, float32_blocks=float32_blocks)


def image_size(head_dir: str | Path, kind: str) -> int:
    """The side images are resized to for model `kind` in `head_dir`: the backbone's own 299
    for a head on the pool features, the activations' (finetune.json) for a fine-tuned one."""
    if not get_model(kind).fine_tuned:
        return IMAGE_SIZE
    from imgclf.finetune.common import model_image_size

    return model_image_size(head_dir)


def example_input() -> Any:
    """A small deterministic PNG (64x48), base64 in the `image` column: the logged input
    example, and the serving example MLflow writes beside it (what a client sends)."""
    import base64
    import io

    from PIL import Image

    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return pd.DataFrame({INPUT_COLUMN: [base64.b64encode(buf.getvalue()).decode("ascii")]})


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return ModelSignature(
        # string, not binary: MLflow decodes a binary column's base64 itself and refuses the
        # whole request over one row that is not base64; the model decodes each row instead.
        inputs=Schema([ColSpec(DataType.string, INPUT_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "probability"),
                ColSpec(Map(DataType.double), "probabilities"),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
    )


def pip_requirements() -> list[str]:
    """Pinned to this environment; given explicitly because MLflow's inference of them loads the
    model again in a subprocess (tens of seconds for Inception V3)."""
    from importlib.metadata import version

    return [
        f"{pkg}=={version(pkg)}" for pkg in ("tensorflow", "keras", "numpy", "pandas", "pillow")
    ]


def _input_values(model_input: Any) -> list[Any]:
    """The rows of a pyfunc input: a DataFrame with an `image` column (base64 text from a
    served request, bytes from Python), a dict or a list of bytes/base64 strings."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(
                f"expected a column {INPUT_COLUMN!r} of encoded image files, got columns "
                f"{list(model_input.columns)}"
            )
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, dict):
        return list(np.atleast_1d(model_input[INPUT_COLUMN]))
    return list(model_input)


def _decode_row(value: Any, max_pixels: int) -> np.ndarray:
    """One row's pixels (uint8 [H, W, 3]); a row that is not a readable image raises BadImage
    with ingest's reason codes (not_an_image, truncated, too_large above `max_pixels`...)."""
    import base64
    import binascii

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=False)
        except binascii.Error as e:
            raise BadImage("not_base64", f"text that is not base64 ({e})") from None
    if not isinstance(value, bytes | bytearray | memoryview):
        # pandas may hold a JSON null as NaN in a column of text
        null = value is None or (isinstance(value, float) and np.isnan(value))
        found = "null" if null else type(value).__name__
        raise BadImage(
            "not_bytes", f"expected the bytes of an image file (or base64 text), got {found}"
        )
    return decode_image(bytes(value), max_pixels)


class ImageClassifier(PythonModel):
    """The served model (see the module doc): encoded image files -> label + probabilities.
    One bad row does not fail the request: its `error` says why, and the other rows are
    answered; `error` is null on every row that was classified. An image above the model
    config's `max_image_pixels` (the tracked run's ingest.max_image_pixels) is `too_large`."""

    max_image_pixels: int = DEFAULT_MAX_PIXELS

    def load_context(self, context: Any) -> None:
        self._model = tf.saved_model.load(context.artifacts[SAVED_MODEL_ARTIFACT])
        self.labels = read_labels(Path(context.artifacts[LABELS_ARTIFACT]).parent)
        config = context.model_config or {}
        self.max_image_pixels = int(config.get(MAX_PIXELS_CONFIG, DEFAULT_MAX_PIXELS))

    def answer(self, value: Any) -> dict[str, Any]:
        """One row of the answer: label, probability, probabilities, error."""
        try:
            pixels = _decode_row(value, self.max_image_pixels)
        except BadImage as e:
            return {"label": None, "probability": None, "probabilities": None, "error": str(e)}
        probs = self._model(tf.constant(pixels[np.newaxis], tf.uint8)).numpy()[0]
        best = int(probs.argmax())
        return {
            "label": self.labels[best],
            "probability": float(probs[best]),
            "probabilities": {label: float(v) for label, v in zip(self.labels, probs, strict=True)},
            "error": None,
        }

    # DataFrame hints: MLflow warns about hints it cannot use (Any) and about missing ones.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        rows = [self.answer(value) for value in _input_values(model_input)]
        # object columns: a row without an answer stays null in JSON, not NaN.
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)


def save_saved_model(model: EndToEndModel, path: str | Path) -> Path:
    """The graph as a SavedModel (`labels` travel with it), fingerprint made deterministic."""
    from imgclf.heads.tf_head import deterministic_fingerprint

    path = Path(path)
    tf.saved_model.save(model, str(path))
    deterministic_fingerprint(path)
    return path


def log_model(
    model: EndToEndModel,
    *,
    registered_model_name: str | None = None,
    name: str = "model",
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> Any:
    """Log `model` in the active MLflow run as an `ImageClassifier` pyfunc (servable by
    `mlflow models serve`), with signature, input example, labels metadata and the imgclf
    package (for the decoding code); register it as a new version of `registered_model_name`.
    `max_image_pixels` (the run's ingest.max_image_pixels) is the served model's pixel cap, in
    its model config: `mlflow.pyfunc.load_model(uri, model_config={...})` can change it."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        saved = save_saved_model(model, Path(tmp) / SAVED_MODEL_ARTIFACT)
        labels_dir = Path(tmp) / LABELS_ARTIFACT
        write_labels(labels_dir, model.labels)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("served_model.py")),
            artifacts={
                SAVED_MODEL_ARTIFACT: str(saved),
                LABELS_ARTIFACT: str(labels_dir / LABELS_FILE),
            },
            code_paths=[str(Path(__file__).parent)],
            signature=signature(),
            input_example=example_input(),
            registered_model_name=registered_model_name,
            pip_requirements=pip_requirements(),
            metadata=model.metadata(),
            model_config={MAX_PIXELS_CONFIG: int(max_image_pixels)},
        )


@dataclass
class Predictor:
    """A loaded model, local or from MLflow. `predict(uint8 [N,H,W,3]) -> float [N, C]` for
    decoded pixels; `predict_files(list of encoded files) -> float [N, C]` when the model
    decodes them itself (a logged ImageClassifier): label-image then sends the file."""

    predict: Callable[[np.ndarray], np.ndarray] | None
    labels: list[str]
    source: str
    predict_files: Callable[[list[bytes]], np.ndarray] | None = None


def local_predictor(
    models_dir: str | Path,
    kind: str = "keras",
    precision: str = "float32",
    backbone_dir: str | Path | None = None,
) -> Predictor:
    """The end-to-end model built from the pipeline's latest outputs: the head in `models_dir`
    (imgclf/layout.py) and the backbone in `backbone_dir` (paths.backbone; default
    <models_dir>/backbone, params.yaml's layout)."""
    head_dir = Layout.of(models=models_dir).model_dir(kind)
    backbone_dir = Path(models_dir) / "backbone" if backbone_dir is None else Path(backbone_dir)
    missing = [str(d) for d in (backbone_dir, head_dir) if not d.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found: run the pipeline (dvc repro) or give "
            "--models-dir, or an MLflow model with --model"
        )
    model = build(backbone_dir, head_dir, kind, precision)

    def predict(images: np.ndarray) -> np.ndarray:
        return model(tf.constant(images, tf.uint8)).numpy()

    return Predictor(predict, model.labels, f"{backbone_dir} + {head_dir}")


def mlflow_predictor(model_uri: str) -> Predictor:
    """A logged end-to-end model (`models:/name@champion`, `runs:/id/model`, a local MLmodel
    directory...), loaded through pyfunc like `mlflow models serve` does, fed encoded files."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    meta = model.metadata.metadata or {}
    labels = list(meta.get("labels") or [])
    if not labels:
        raise ValueError(f"{model_uri} has no labels metadata: not an imgclf end-to-end model")

    def predict_files(files: list[bytes]) -> np.ndarray:
        out = model.predict(pd.DataFrame({INPUT_COLUMN: files}))
        errors = [e for e in out.get("error", []) if e is not None]
        if errors:
            raise ValueError(errors[0])
        return np.array([[row[label] for label in labels] for row in out["probabilities"]])

    return Predictor(None, labels, model_uri, predict_files=predict_files)
