"""The TensorFlow head: low-level TF, written the way TF is used without Keras.

retrain.py's recipe by default: one softmax layer on the 2048-d bottleneck (weights from a
truncated normal with stddev 0.001, zero biases), plain SGD at 0.01, 4,000 steps of 100 images
drawn at random with replacement. `hidden_units > 0` adds a ReLU layer and `dropout > 0` drops
the input of the softmax layer during training, so the Keras recipe can be run here too.

Everything is explicit: `tf.Variable` weights, a `tf.GradientTape` in a compiled `tf.function`,
the SGD update written out as `var.assign_sub(lr * grad)`, a non-trainable `step` counter. The
trained head is a `tf.Module` saved as a SavedModel whose `serving_default` signature maps
bottlenecks [None, 2048] float32 to {"probabilities": [None, n_classes]}.

No Keras here on purpose: this module is the "TensorFlow" side of the comparison.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from imgclf.bottleneck_files import N_FEATURES
from imgclf.errors import MissingInput
from imgclf.heads.common import (
    TrainResult,
    save_model_dir,
    set_determinism,
    stopwatch,
)

SIGNATURE_KEY = "serving_default"
OUTPUT_KEY = "probabilities"
INPUT_NAME = "bottlenecks"
FINAL_STDDEV = 0.001  # retrain.py: tf.truncated_normal([2048, n_classes], stddev=0.001)


class SoftmaxHead(tf.Module):
    """[optional Dense+ReLU] -> [dropout while training] -> Dense -> softmax.

    Initial weights come from stateless RNG ops keyed by `seed`, so a head's starting point
    depends on the seed alone and not on how many random ops ran before it.
    """

    def __init__(
        self,
        n_classes: int,
        *,
        n_features: int = N_FEATURES,
        hidden_units: int = 0,
        dropout: float = 0.0,
        seed: int = 0,
        name: str = "tf_head",
    ) -> None:
        super().__init__(name=name)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"train_tf.dropout must be in [0, 1), got {dropout}")
        if hidden_units < 0:
            raise ValueError(f"train_tf.hidden_units must be >= 0, got {hidden_units}")
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        self.hidden_units = int(hidden_units)
        self.dropout = float(dropout)
        self.seed = int(seed)
        fan_in = self.n_features
        if self.hidden_units:
            # He initialisation (truncated normal, stddev sqrt(2 / fan_in)) suits a ReLU layer.
            self.hidden_weights = tf.Variable(
                tf.random.stateless_truncated_normal(
                    [fan_in, self.hidden_units],
                    seed=[self.seed, 1],
                    stddev=math.sqrt(2.0 / fan_in),
                ),
                name="hidden_weights",
            )
            self.hidden_biases = tf.Variable(tf.zeros([self.hidden_units]), name="hidden_biases")
            fan_in = self.hidden_units
        self.final_weights = tf.Variable(
            tf.random.stateless_truncated_normal(
                [fan_in, self.n_classes], seed=[self.seed, 2], stddev=FINAL_STDDEV
            ),
            name="final_weights",
        )
        self.final_biases = tf.Variable(tf.zeros([self.n_classes]), name="final_biases")
        # Saved with the weights: a restored head says how long it was trained.
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")

    def logits(self, bottlenecks: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = bottlenecks
        if self.hidden_units:
            x = tf.nn.relu(tf.matmul(x, self.hidden_weights) + self.hidden_biases)
        if training and self.dropout > 0.0:
            # Stateless, keyed by (seed, step): the same mask for the same step on every rerun.
            x = tf.nn.experimental.stateless_dropout(
                x, rate=self.dropout, seed=tf.stack([tf.constant(self.seed, tf.int64), self.step])
            )
        return tf.matmul(x, self.final_weights) + self.final_biases

    @tf.function
    def predict(self, bottlenecks: tf.Tensor) -> tf.Tensor:
        """Bottlenecks [N, 2048] float32 -> class probabilities [N, n_classes]."""
        return tf.nn.softmax(self.logits(bottlenecks, training=False))

    @tf.function
    def serve(self, bottlenecks: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_KEY: self.predict(bottlenecks)}


def count_parameters(head: tf.Module) -> int:
    """Trainable scalars in a SoftmaxHead (or a restored one)."""
    return int(sum(int(np.prod(v.shape)) for v in head.trainable_variables))


def loss_and_accuracy(logits: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(mean cross-entropy, accuracy) of logits against integer labels."""
    loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), labels), tf.float32))
    return loss, accuracy


class SGDTrainer:
    """Plain SGD on a SoftmaxHead. Kept out of the module so the SavedModel holds only the head."""

    def __init__(self, head: SoftmaxHead, learning_rate: float) -> None:
        self.head = head
        self.learning_rate = tf.constant(learning_rate, tf.float32)

    def train_step(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One SGD step on a batch; returns the batch's (loss, accuracy) before the update."""
        with tf.GradientTape() as tape:
            loss, accuracy = loss_and_accuracy(self.head.logits(x, training=True), y)
        variables = self.head.trainable_variables
        grads = tape.gradient(loss, variables)
        for var, grad in zip(variables, grads, strict=True):
            var.assign_sub(self.learning_rate * grad)
        self.head.step.assign_add(1)
        return loss, accuracy

    @tf.function
    def train_steps(
        self, features: tf.Tensor, labels: tf.Tensor, batch_indices: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Run one train_step per row of `batch_indices` [k, batch_size] in a single graph call
        (a tf.while_loop), so Python is entered once per evaluation, not once per step.
        Returns the mean batch loss and accuracy over the k steps."""
        n_steps = tf.shape(batch_indices)[0]
        loss_sum = tf.constant(0.0)
        accuracy_sum = tf.constant(0.0)
        for i in tf.range(n_steps):
            idx = batch_indices[i]
            loss, accuracy = self.train_step(tf.gather(features, idx), tf.gather(labels, idx))
            loss_sum += loss
            accuracy_sum += accuracy
        k = tf.cast(n_steps, tf.float32)
        return loss_sum / k, accuracy_sum / k

    @tf.function
    def evaluate(self, features: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(mean cross-entropy, accuracy) on a whole set, no dropout."""
        return loss_and_accuracy(self.head.logits(features, training=False), labels)


def train_tf_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    learning_rate: float = 0.01,
    steps: int = 4000,
    batch_size: int = 100,
    eval_every: int = 100,
    hidden_units: int = 0,
    dropout: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train a SoftmaxHead with retrain.py's loop; the curve has one row per `eval_every` steps
    (train loss/accuracy = mean over the batches since the previous row) and one at `steps`."""
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError(
            f"train_tf.steps, batch_size and eval_every must be >= 1 "
            f"(got {steps}, {batch_size}, {eval_every})"
        )
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("train_tf: empty training or validation set")
    set_determinism(seed)
    head = SoftmaxHead(
        n_classes,
        n_features=x_train.shape[1],
        hidden_units=hidden_units,
        dropout=dropout,
        seed=seed,
    )
    trainer = SGDTrainer(head, learning_rate)
    features = tf.constant(x_train, tf.float32)
    labels = tf.constant(y_train, tf.int64)
    val_features = tf.constant(x_val, tf.float32)
    val_labels = tf.constant(y_val, tf.int64)
    # retrain.py samples each batch with replacement; a seeded NumPy generator makes the batch
    # sequence a function of the seed. One [k, batch] block per evaluation interval.
    rng = np.random.default_rng(seed)
    curve: list[dict[str, float | int]] = []
    bounds = [*range(eval_every, steps, eval_every), steps]
    with stopwatch() as timer:
        done = 0
        for end in tqdm(
            bounds, desc="train_tf", unit="eval", file=sys.stderr, disable=not progress
        ):
            block = rng.integers(0, len(x_train), size=(end - done, batch_size), dtype=np.int64)
            train_loss, train_accuracy = trainer.train_steps(features, labels, tf.constant(block))
            val_loss, val_accuracy = trainer.evaluate(val_features, val_labels)
            done = end
            curve.append(
                {
                    "epoch": end * batch_size / len(x_train),
                    "step": end,
                    "train_loss": float(train_loss),
                    "train_accuracy": float(train_accuracy),
                    "val_loss": float(val_loss),
                    "val_accuracy": float(val_accuracy),
                }
            )
    return TrainResult(
        model=head,
        curve=curve,
        summary={
            "steps": int(head.step.numpy()),
            "model_step": int(head.step.numpy()),  # retrain.py keeps the last weights
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "eval_every": eval_every,
            "hidden_units": hidden_units,
            "dropout": dropout,
            "optimizer": "sgd",
        },
        train_seconds=timer["seconds"],
    )


def save_tf_head(head: SoftmaxHead, model_dir: str | Path, classes: list[str]) -> None:
    """SavedModel + labels.txt in `model_dir`, replaced as a whole (built beside it, then moved)."""
    spec = tf.TensorSpec([None, head.n_features], tf.float32, name=INPUT_NAME)
    # Tracing `predict` here also stores it on the SavedModel, callable after loading.
    head.predict.get_concrete_function(spec)
    signatures = {SIGNATURE_KEY: head.serve.get_concrete_function(spec)}

    def write(tmp: Path) -> None:
        tf.saved_model.save(head, str(tmp), signatures=signatures)
        deterministic_fingerprint(tmp)

    save_model_dir(model_dir, classes, write)


def deterministic_fingerprint(saved_model_dir: str | Path) -> None:
    """Replace the random `uuid` of a SavedModel's fingerprint.pb by one derived from the
    fingerprint's content hashes (graph, signatures, objects, checkpoint). TensorFlow draws a
    new uuid on every save, so identical trainings gave different files, hence a new dvc.lock
    hash and a new model version for the same model; same content now gives the same uuid."""
    import hashlib

    from tensorflow.core.protobuf import fingerprint_pb2

    path = Path(saved_model_dir) / "fingerprint.pb"
    if not path.is_file():
        return
    fingerprint = fingerprint_pb2.FingerprintDef()
    fingerprint.ParseFromString(path.read_bytes())
    fingerprint.ClearField("uuid")
    content = fingerprint.SerializeToString(deterministic=True)
    # Same form as TensorFlow's: a 128-bit number in decimal.
    fingerprint.uuid = str(int(hashlib.sha256(content).hexdigest()[:32], 16))
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


def load_tf_head(model_dir: str | Path) -> Any:
    """The restored SavedModel. `.predict(bottlenecks)` is a tf.function (usable inside another
    graph, e.g. after the backbone); `.signatures["serving_default"]` is the serving signature."""
    model_dir = Path(model_dir)
    if not (model_dir / "saved_model.pb").is_file():
        raise MissingInput(f"{model_dir} holds no SavedModel: run `dvc repro train@tf` to build it")
    return tf.saved_model.load(str(model_dir))


def predictor(model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Bottlenecks [N, 2048] -> probabilities [N, n_classes] (float32), via the saved signature."""
    loaded = load_tf_head(model_dir)
    serve = loaded.signatures[SIGNATURE_KEY]

    def predict(bottlenecks: np.ndarray) -> np.ndarray:
        x = tf.constant(np.asarray(bottlenecks, dtype=np.float32))
        return serve(**{INPUT_NAME: x})[OUTPUT_KEY].numpy()

    return predict


def summary_line(metrics: Mapping[str, Any]) -> str:
    return (
        f"val_accuracy {metrics['final_val_accuracy']:.4f} "
        f"(best {metrics['best_val_accuracy']:.4f}), {metrics['steps']} steps, "
        f"{metrics['train_seconds']:.1f} s"
    )


def graph_head(model_dir: str | Path) -> tuple[Any, Callable[[tf.Tensor], tf.Tensor]]:
    """For the end-to-end graph: the loaded head (kept so its variables are saved) and its
    function features -> probabilities."""
    head = load_tf_head(model_dir)
    return head, head.predict


def weights_digest(model_dir: str | Path) -> bytes:
    """sha256 over the names, shapes, dtypes and values of the checkpoint's variables."""
    import hashlib

    digest = hashlib.sha256()
    reader = tf.train.load_checkpoint(str(Path(model_dir) / "variables" / "variables"))
    for name in sorted(reader.get_variable_to_shape_map()):
        if name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        value = np.asarray(reader.get_tensor(name))
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode() + value.tobytes())
    return digest.digest()
