"""The TensorFlow runtime: the Keras model in one tf.function (the path the stages always had)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from imgclf.runtimes import RuntimeRequest


class TensorFlowRuntime:
    """A Keras model as a runtime; `precision` is the policy it was built with."""

    name = "tensorflow"

    def __init__(self, model: Any, precision: str = "float32"):
        self.model = model
        self.precision = precision

        # One trace for every batch size (the last batch is usually short): tracing Inception
        # V3 costs seconds. The cast: a bfloat16 model's outputs are stored as float32.
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def infer(images: tf.Tensor) -> tf.Tensor:
            return tf.cast(model(images, training=False), tf.float32)

        self._infer = infer

    def predict(self, batch: Any) -> np.ndarray:
        return self._infer(batch).numpy()

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "precision": self.precision, "tensorflow": tf.__version__}


def make(request: RuntimeRequest) -> TensorFlowRuntime:
    return TensorFlowRuntime(request.build_model(request.precision), request.precision)
