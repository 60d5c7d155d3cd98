"""End-to-end models: image pixels in, class probabilities out (backbone + preprocessing + head).

The input is the decoded image itself: uint8 RGB [N, H, W, 3], exactly what
`imgclf.images.load_rgb` returns for a file (EXIF orientation applied, alpha on white...), with
any H and W. The model does the rest in one TensorFlow graph: the backbone's own preprocessing
(the resize to 299x299 and the scaling its weights need), the backbone, the head. Why this input:

- it is the path the bottlenecks stage takes (load_rgb -> Backbone.preprocess -> model), so an
  end-to-end model reproduces the evaluated heads on the test images, not an approximation;
- there is no second resize to keep in sync: `label-image`, `mlflow models serve` and a Python
  caller all send the same array and get the same probabilities (bit for bit, same graph);
- JSON serving works with MLflow's standard tensor input, `{"inputs": <nested list>}`.

The cost: images of different sizes cannot share a batch, so callers send one image per request
(or batch only equal-sized ones), and a JSON request carries H*W*3 numbers (a 500x375 photo is
about 2 MB of JSON). Encoded bytes decoded inside the model would be smaller on the wire but
would decode with TensorFlow's JPEG decoder instead of Pillow's, i.e. not the pixels the heads
were trained on.

Logged with `mlflow.tensorflow.log_model` as a `tf.Module` (a SavedModel): the same format for
the low-level TF head (itself a SavedModel) and the Keras head (a Keras 3 model, traced into the
graph), and the pyfunc flavour MLflow serves. The class labels travel in the MLmodel metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from imgclf.heads import model_dir
from imgclf.heads.common import read_labels
from imgclf.inception import Backbone, load_backbone

HEAD_KINDS = ("tf", "keras")
INPUT_SPEC = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
INPUT_DOC = (
    "uint8 RGB [N, H, W, 3] as imgclf.images.load_rgb decodes an image file (any H, W; one image "
    "per request unless sizes match); output float32 [N, n_classes], columns in `labels` order"
)


def _load_head(head_dir: Path, kind: str) -> tuple[Any, Callable[[tf.Tensor], tf.Tensor]]:
    """The trained head as a TF object (kept as an attribute so its variables are saved) and the
    function bottlenecks [N, 2048] -> probabilities, usable inside a tf.function. `kind` is one
    of HEAD_KINDS (checked by `build`)."""
    if kind == "tf":
        from imgclf.heads.tf_head import load_tf_head

        head = load_tf_head(head_dir)
        return head, head.predict
    from imgclf.heads.keras_head import load_keras_head

    head = load_keras_head(head_dir)
    return head, lambda x: head(x, training=False)


class EndToEndModel(tf.Module):
    """uint8 images [N, H, W, 3] -> probabilities [N, n_classes] (see the module doc)."""

    def __init__(
        self, backbone: Backbone, head: Any, head_fn: Callable, labels: list[str], kind: str
    ) -> None:
        super().__init__(name=f"end_to_end_{kind}")
        self.backbone = backbone.model
        self.head = head
        self._preprocess = backbone.preprocess
        self._head_fn = head_fn
        self.labels = list(labels)
        self.kind = kind
        self.backbone_sha256 = backbone.sha256
        self.preprocessing = backbone.preprocessing

    @tf.function(input_signature=[INPUT_SPEC])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        features = self.backbone(self._preprocess(images), training=False)
        # A bfloat16 backbone (bottlenecks.precision) hands out bfloat16; the heads take float32,
        # as they did on the widened bottleneck files.
        return self._head_fn(tf.cast(features, tf.float32))

    def metadata(self) -> dict[str, Any]:
        return {
            "labels": [str(label) for label in self.labels],  # a plain list, not tf's wrapper
            "head": self.kind,
            "backbone_sha256": self.backbone_sha256,
            "preprocessing": self.preprocessing,
            "input": INPUT_DOC,
        }


def build(
    backbone: str | Path | Backbone, head_dir: str | Path, kind: str, precision: str = "float32"
) -> EndToEndModel:
    """The end-to-end model of the backbone stage's output and one trained head. `backbone` is
    the backbone folder, or a Backbone already loaded (shared by several models). `precision`
    (for a folder) should be the bottlenecks stage's (bottlenecks.precision), so the backbone
    computes what the heads were trained and evaluated on."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head {kind!r}: expected one of {HEAD_KINDS}")
    head_dir = Path(head_dir)
    labels = read_labels(head_dir)
    if not isinstance(backbone, Backbone):
        backbone = load_backbone(backbone, precision=precision)
    head, head_fn = _load_head(head_dir, kind)
    return EndToEndModel(backbone, head, head_fn, labels, kind)


def example_input() -> np.ndarray:
    """A small deterministic image batch (uint8 [1, 48, 64, 3]): the logged input example."""
    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return image[np.newaxis]


def signature(n_classes: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    # Unnamed tensors: pyfunc then hands the model a plain array (a named input would arrive
    # as a dict, which MLflow's tf.Module wrapper refuses).
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes))]),
    )


def pip_requirements() -> list[str]:
    """Pinned to this environment; given explicitly because MLflow's inference of them loads the
    model again in a subprocess (tens of seconds for Inception V3)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("tensorflow", "keras", "numpy")]


def log_model(
    model: EndToEndModel, *, registered_model_name: str | None = None, name: str = "model"
) -> Any:
    """Log `model` in the active MLflow run (tensorflow flavour, pyfunc-servable), with signature,
    input example and labels metadata; register it as a new version of `registered_model_name`."""
    import mlflow

    return mlflow.tensorflow.log_model(
        model,
        name=name,
        signature=signature(len(model.labels)),
        input_example=example_input(),
        registered_model_name=registered_model_name,
        pip_requirements=pip_requirements(),
        metadata=model.metadata(),
    )


@dataclass
class Predictor:
    """A loaded model, local or from MLflow: `predict(uint8 [N,H,W,3]) -> float [N, C]`."""

    predict: Callable[[np.ndarray], np.ndarray]
    labels: list[str]
    source: str


def local_predictor(
    models_dir: str | Path, kind: str = "keras", precision: str = "float32"
) -> Predictor:
    """The end-to-end model built from the pipeline's latest outputs in `models_dir`."""
    backbone_dir, head_dir = Path(models_dir) / "backbone", model_dir(models_dir, kind)
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
    """A logged end-to-end model (`models:/name/version`, `runs:/id/model`, a local MLmodel
    directory...), loaded through pyfunc like `mlflow models serve` does."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    meta = model.metadata.metadata or {}
    labels = list(meta.get("labels") or [])
    if not labels:
        print(
            f"warning: {model_uri} has no labels metadata; classes are shown as indices",
            file=sys.stderr,
        )

    def predict(images: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(np.asarray(images, np.uint8)), dtype=np.float32)

    return Predictor(predict, labels, model_uri)
