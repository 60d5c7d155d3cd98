"""Fine-tuning the top of Inception V3 in low-level TensorFlow: the blog's "control" side.

The blocks after the cut (mixed_9, mixed_10 at mixed_8; mixed_8 too at mixed_7) are rewritten
op by op with tf.nn (conv2d, batch_normalization, relu, pools, concat) on `tf.Variable`s of a
`tf.Module`, initialised from the backbone's weights (via `build_top`) and from the trained
`train_tf` head (a SavedModel: its final, and hidden if any, weights). Nothing is left implicit:

- the variables that train are an explicit list (`FinetuneTop.variables_to_train`: the conv
  kernels and the head); the batch-norm statistics and offsets are `trainable=False` variables
  that the step never touches, so the blocks run in inference mode by construction;
- the step is a `tf.function` with a `tf.GradientTape` over that list and the momentum update
  written out (`v = momentum * v - lr * g; w += v`, Keras' SGD formula), with a non-trainable
  step counter that the learning-rate schedule reads;
- the best epoch on validation (most images right, then the lower log loss) is kept by
  copying the variables' values.

The saved model is a SavedModel whose `serving_default` maps activations [None, h, w, c]
float32 to {"probabilities": [None, n_classes]}.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from imgclf.backbone_info import IMAGE_SIZE
from imgclf.errors import MissingInput, UserError
from imgclf.finetune.common import (
    SCHEDULES,
    TensorBoardLog,
    TrainingOrder,
    epoch_rank,
    epoch_row,
    learning_rate_at,
    model_config,
    write_config,
)
from imgclf.finetune.common import uses_test_time_flip as uses_test_time_flip  # re-exported
from imgclf.heads.common import TrainResult, save_model_dir, set_determinism, stopwatch
from imgclf.heads.tf_head import deterministic_fingerprint

SIGNATURE_KEY = "serving_default"
OUTPUT_KEY = "probabilities"
INPUT_NAME = "activations"
# The blocks this module rewrites, in build_inception_v3's order: mixed_8 (17x17 -> 8x8, a
# reduction block) and the two 8x8 blocks; and the convolutions of each kind.
BLOCKS = ("mixed_8", "mixed_9", "mixed_10")
REDUCTION_CONVS = (
    "tower.conv",
    "tower.conv_1",
    "tower_1.conv",
    "tower_1.conv_1",
    "tower_1.conv_2",
    "tower_1.conv_3",
)
CONVS = (
    "conv",
    "tower_conv",
    "tower_mixed_conv",
    "tower_mixed_conv_1",
    "tower_1_conv",
    "tower_1_conv_1",
    "tower_1_mixed_conv",
    "tower_1_mixed_conv_1",
    "tower_2_conv",
)
CONVS_OF = {"mixed_8": REDUCTION_CONVS, "mixed_9": CONVS, "mixed_10": CONVS}


def blocks_after(cut: str) -> tuple[str, ...]:
    """The blocks this module rewrites for a cut: those after it."""
    cuts = {"mixed_7": BLOCKS, "mixed_8": BLOCKS[1:], "mixed_9": BLOCKS[2:]}  # registry `cuts`
    if cut not in cuts:
        raise UserError(
            f"activations.cut: finetune_tf rewrites mixed_8, mixed_9 and mixed_10 op by op, so "
            f"it needs a cut at one of {list(cuts)}, not {cut!r}"
        )
    return cuts[cut]


def _layers_by_name(model: Any) -> dict[str, Any]:
    from imgclf.inception import all_layers

    return {layer.name: layer for layer in all_layers(model)}


class FinetuneTop(tf.Module):
    """The blocks after the cut, the pool, and the softmax head, as explicit variables."""

    def __init__(self, top: Any, head: Any, cut: str, name: str = "finetune_tf") -> None:
        """`top`: the Keras model of `build_top(backbone, cut)` (read for its weights only);
        `head`: the restored train_tf SavedModel."""
        super().__init__(name=name)
        self.blocks = list(blocks_after(cut))
        layers = _layers_by_name(top)
        self.max_pool = {}
        self.kernels, self.offsets, self.means, self.variances = {}, {}, {}, {}
        self.epsilon, self.geometry = {}, {}
        for block in self.blocks:
            self.max_pool[block] = type(layers[f"{block}.pool"]).__name__ == "MaxPooling2D"
            for conv in CONVS_OF[block]:
                key = f"{block}.{conv}"
                kernel = layers[key].kernel
                # mixed_8's two stride-2 convolutions are the ones with `valid` padding.
                self.geometry[key] = (int(layers[key].strides[0]), layers[key].padding.upper())
                bn = layers[f"{key}.bn"]
                if getattr(bn, "gamma", None) is not None:
                    raise UserError(f"{key}.bn has a scale (gamma): the 2015 graph's have none")
                self.kernels[key] = tf.Variable(kernel.numpy(), name=f"{key}/kernel")
                self.offsets[key] = tf.Variable(
                    bn.beta.numpy(), trainable=False, name=f"{key}/beta"
                )
                self.means[key] = tf.Variable(
                    bn.moving_mean.numpy(), trainable=False, name=f"{key}/moving_mean"
                )
                self.variances[key] = tf.Variable(
                    bn.moving_variance.numpy(), trainable=False, name=f"{key}/moving_variance"
                )
                self.epsilon[key] = float(bn.epsilon)
        hidden = getattr(head, "hidden_weights", None)
        self.hidden_units = 0 if hidden is None else int(hidden.shape[1])
        if hidden is not None:
            self.hidden_weights = tf.Variable(hidden.numpy(), name="head/hidden_weights")
            self.hidden_biases = tf.Variable(head.hidden_biases.numpy(), name="head/hidden_biases")
        self.final_weights = tf.Variable(head.final_weights.numpy(), name="head/final_weights")
        self.final_biases = tf.Variable(head.final_biases.numpy(), name="head/final_biases")
        self.n_classes = int(self.final_weights.shape[1])
        self.input_shape = [int(d) for d in top.input.shape[1:]]
        # The convolutions compute in what the top's layers were built for (load_backbone's
        # precision); kernels stay float32 and are cast, as Keras' mixed policy does.
        compute = {layers[key].dtype_policy.compute_dtype for key in self._conv_keys()}
        if len(compute) != 1:
            raise UserError(f"the blocks after {cut} mix compute dtypes {sorted(compute)}")
        self.compute_dtype = tf.as_dtype(compute.pop())
        # Saved with the weights: a restored model says how many steps it was trained.
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")

    def variables_to_train(self) -> list[tuple[str, tf.Variable]]:
        """The explicit list the step differentiates and updates: (name, variable)."""
        named = [(f"{key}/kernel", self.kernels[key]) for key in self._conv_keys()]
        if self.hidden_units:
            named += [("head/hidden_weights", self.hidden_weights)]
            named += [("head/hidden_biases", self.hidden_biases)]
        return [*named, ("head/final_weights", self.final_weights),
                ("head/final_biases", self.final_biases)]  # fmt: skip

    def _conv_keys(self) -> list[str]:
        return [f"{block}.{conv}" for block in self.blocks for conv in CONVS_OF[block]]

    def _conv_bn_relu(self, x: tf.Tensor, key: str, compute_dtype: tf.DType) -> tf.Tensor:
        kernel = self.kernels[key]
        if compute_dtype != tf.float32:
            x, kernel = tf.cast(x, compute_dtype), tf.cast(kernel, compute_dtype)
        strides, padding = self.geometry[key]
        x = tf.cast(tf.nn.conv2d(x, kernel, strides=strides, padding=padding), tf.float32)
        # The stored statistics, never the batch's: inference-mode batch norm.
        x = tf.nn.batch_normalization(
            x, self.means[key], self.variances[key], offset=self.offsets[key], scale=None,
            variance_epsilon=self.epsilon[key],
        )  # fmt: skip
        return tf.nn.relu(x)

    def _block(self, x: tf.Tensor, block: str, compute_dtype: tf.DType) -> tf.Tensor:
        def cbr(t: tf.Tensor, conv: str) -> tf.Tensor:
            return self._conv_bn_relu(t, f"{block}.{conv}", compute_dtype)

        if block == "mixed_8":  # the reduction: two strided towers and a strided max pool
            b3 = cbr(cbr(x, "tower.conv"), "tower.conv_1")
            b7 = cbr(cbr(cbr(cbr(x, "tower_1.conv"), "tower_1.conv_1"), "tower_1.conv_2"),
                     "tower_1.conv_3")  # fmt: skip
            return tf.concat([b3, b7, tf.nn.max_pool2d(x, 3, strides=2, padding="VALID")], -1)
        b1 = cbr(x, "conv")
        b3 = cbr(x, "tower_conv")
        b3 = tf.concat([cbr(b3, "tower_mixed_conv"), cbr(b3, "tower_mixed_conv_1")], -1)
        bd = cbr(cbr(x, "tower_1_conv"), "tower_1_conv_1")
        bd = tf.concat([cbr(bd, "tower_1_mixed_conv"), cbr(bd, "tower_1_mixed_conv_1")], -1)
        pool = tf.nn.max_pool2d if self.max_pool[block] else tf.nn.avg_pool2d
        # TF's SAME average pool leaves the padding out of the mean, as Keras' does.
        bp = cbr(pool(x, ksize=3, strides=1, padding="SAME"), "tower_2_conv")
        return tf.concat([b1, b3, bd, bp], -1)

    def features(self, activations: tf.Tensor, compute_dtype: tf.DType | None = None) -> tf.Tensor:
        """Activations at the cut -> the pooled 2048 features (pool_3). The convolutions
        compute in `compute_dtype`, by default the model's own."""
        x = activations
        for block in self.blocks:
            x = self._block(x, block, compute_dtype or self.compute_dtype)
        return tf.reduce_mean(x, axis=[1, 2])

    def logits(
        self, activations: tf.Tensor, dropout: Any = None, compute_dtype: tf.DType | None = None
    ) -> tf.Tensor:
        """`dropout`: (rate, stateless seed) to drop pooled features in training, else None."""
        x = self.features(activations, compute_dtype)
        if dropout is not None:
            rate, seed = dropout
            x = tf.nn.experimental.stateless_dropout(x, rate=rate, seed=seed)
        if self.hidden_units:
            x = tf.nn.relu(tf.matmul(x, self.hidden_weights) + self.hidden_biases)
        return tf.matmul(x, self.final_weights) + self.final_biases

    @tf.function
    def predict(self, activations: tf.Tensor) -> tf.Tensor:
        """Activations [N, h, w, c] float32 -> class probabilities [N, n_classes]."""
        return tf.nn.softmax(self.logits(activations))

    @tf.function
    def serve(self, activations: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_KEY: self.predict(activations)}

    @tf.function
    def predict_float32(self, activations: tf.Tensor) -> tf.Tensor:
        """`predict` with the convolutions in float32 whatever the model computes in: the same
        weights (they are float32), for LiteRT, which has no bfloat16 convolution."""
        return tf.nn.softmax(self.logits(activations, compute_dtype=tf.float32))


def count_parameters(model: FinetuneTop) -> int:
    return int(sum(int(np.prod(v.shape)) for _, v in model.variables_to_train()))


def smoothed_target(labels: tf.Tensor, n_classes: int, smoothing: float) -> tf.Tensor:
    """One-hot labels smoothed by `smoothing` (as Keras' label smoothing)."""
    return tf.one_hot(labels, n_classes) * (1.0 - smoothing) + smoothing / n_classes


class MomentumTrainer:
    """SGD with momentum on an explicit variable list. Kept out of the module, so the
    SavedModel holds the model and not the velocities."""

    def __init__(self, model: FinetuneTop, *, learning_rate: float, momentum: float,
                 label_smoothing: float, schedule: str, total_steps: int,
                 dropout: float = 0.0, mixup: float = 0.0,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        self.model = model
        named = model.variables_to_train()
        self.names = [name for name, _ in named]
        self.variables = [v for _, v in named]
        self.velocities = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self.learning_rate, self.momentum = float(learning_rate), float(momentum)
        self.label_smoothing, self.schedule = float(label_smoothing), schedule
        self.total_steps = int(total_steps)
        self.dropout, self.mixup = float(dropout), float(mixup)
        self.weight_decay = float(weight_decay)
        # L2-SP: the kernels are pulled toward their pretrained values, not toward 0.
        self.kernels = [(v, tf.constant(v.numpy())) for n, v in named if n.endswith("/kernel")]

    def _loss(self, x: tf.Tensor, y: tf.Tensor, mix: Any = None, seed: Any = None):
        """(mean loss, accuracy) of a batch. In training (`mix`, `seed` given) with the
        regularizers that are on: mixup of each row with the batch's reversed rows by `mix`
        (drawn per batch), dropout of the pooled features, L2-SP on the kernels."""
        target = smoothed_target(y, self.model.n_classes, self.label_smoothing)
        training = mix is not None
        if training and self.mixup > 0:
            x = mix * x + (1.0 - mix) * tf.reverse(x, [0])
            target = mix * target + (1.0 - mix) * tf.reverse(target, [0])
        dropout = (self.dropout, seed) if training and self.dropout > 0 else None
        logits = self.model.logits(x, dropout)
        loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits))
        if training and self.weight_decay > 0:
            distance = tf.add_n([tf.reduce_sum(tf.square(v - v0)) for v, v0 in self.kernels])
            loss += 0.5 * self.weight_decay * distance
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32))
        return loss, accuracy

    @tf.function(reduce_retracing=True)
    def train_step(self, x: tf.Tensor, y: tf.Tensor, mix: tf.Tensor, seed: tf.Tensor):
        """One update on a batch; returns its (loss, accuracy) before the update."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.variables)
            loss, accuracy = self._loss(x, y, mix, seed)
        grads = tape.gradient(loss, self.variables)
        # Every update waits for every gradient. Without this, the graph may update one
        # block's kernels while the backward pass of an earlier block still reads them: the
        # weights then varied from run to run (seen on the full set from the third step on).
        with tf.control_dependencies(grads):
            lr = learning_rate_at(
                self.model.step, self.total_steps, self.learning_rate, self.schedule
            )
            for var, velocity, grad in zip(self.variables, self.velocities, grads, strict=True):
                velocity.assign(self.momentum * velocity - lr * grad)
                var.assign_add(velocity)
            self.model.step.assign_add(1)
        return loss, accuracy

    @tf.function(reduce_retracing=True)
    def gradients(self, x: tf.Tensor, y: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.variables)
            loss, _ = self._loss(x, y)
        return tape.gradient(loss, self.variables)

    @tf.function(reduce_retracing=True)
    def batch_sums(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss, accuracy = self._loss(x, y)
        n = tf.cast(tf.shape(y)[0], tf.float32)
        return loss * n, accuracy * n

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
        loss_sum = accuracy_sum = 0.0
        for i in range(0, len(y), batch_size):
            loss, acc = self.batch_sums(
                tf.constant(np.asarray(x[i : i + batch_size], np.float32)),
                tf.constant(y[i : i + batch_size], tf.int64),
            )
            loss_sum += float(loss)
            accuracy_sum += float(acc)
        return loss_sum / len(y), accuracy_sum / len(y)


def train_finetune_tf(
    top: Any,
    head: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    cut: str,
    tensorboard_dir: str | Path,
    train_images: np.ndarray | None = None,
    view_sampling: str = "one_per_image",
    epochs: int = 9,
    learning_rate: float = 1e-3,
    momentum: float = 0.9,
    batch_size: int = 32,
    label_smoothing: float = 0.0,
    schedule: str = "constant",
    dropout: float = 0.0,
    mixup: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune a FinetuneTop built from `top` (Keras, for its initial weights) and `head` (the
    restored train_tf SavedModel). Each epoch visits the training rows (`view_sampling`: all,
    or one per image of `train_images`) in an order drawn from `seed`; the model returned
    holds the best epoch on validation (`epoch_rank`: accuracy, then log loss)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"finetune_tf.schedule must be one of {SCHEDULES}, not {schedule!r}")
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("finetune_tf: empty training or validation set")
    set_determinism(seed)
    model = FinetuneTop(top, head, cut)
    order = TrainingOrder(seed, len(x_train), train_images, view_sampling, batch_size)
    trainer = MomentumTrainer(
        model,
        learning_rate=learning_rate,
        momentum=momentum,
        label_smoothing=label_smoothing,
        schedule=schedule,
        total_steps=epochs * order.steps_per_epoch,
        dropout=dropout,
        mixup=mixup,
        weight_decay=weight_decay,
    )
    # Apart from `order`, so that mixup and dropout leave the order of the rows unchanged.
    mix_rng = np.random.default_rng([seed, 1])
    probe_x = tf.constant(np.asarray(x_train[order.probe], np.float32))
    probe_y = tf.constant(y_train[order.probe], tf.int64)
    log = TensorBoardLog(tensorboard_dir)
    start_loss, start_accuracy = trainer.evaluate(x_val, y_val)
    log.scalars(0, {"loss/val": start_loss, "accuracy/val": start_accuracy})
    curve: list[dict[str, float | int]] = []
    all_norms: list[dict[str, float]] = []
    best_rank, best_epoch, best_values = None, 0, None
    with stopwatch() as timer:
        for epoch in tqdm(range(1, epochs + 1), desc="finetune_tf", unit="epoch",
                          file=sys.stderr, disable=not progress):  # fmt: skip
            loss_sum = accuracy_sum = n_rows = 0.0
            for rows in order.next_epoch():
                mix = mix_rng.beta(mixup, mixup) if mixup > 0 else 1.0
                loss, acc = trainer.train_step(
                    tf.constant(np.asarray(x_train[rows], np.float32)),
                    tf.constant(y_train[rows], tf.int64),
                    tf.constant(mix, tf.float32),
                    tf.constant(mix_rng.integers(0, 2**31, size=2), tf.int64),
                )
                loss_sum += float(loss) * len(rows)
                accuracy_sum += float(acc) * len(rows)
                n_rows += len(rows)
            train = (loss_sum / n_rows, accuracy_sum / n_rows)
            val = trainer.evaluate(x_val, y_val)
            lr = learning_rate_at(model.step - 1, trainer.total_steps, learning_rate, schedule)
            log.scalars(epoch, {"loss/train": train[0], "loss/val": val[0],
                                "accuracy/train": train[1], "accuracy/val": val[1],
                                "learning_rate": float(lr)})  # fmt: skip
            log.histograms(epoch, ((f"weights/{n}", v) for n, v in model.variables_to_train()))
            grads = trainer.gradients(probe_x, probe_y)
            all_norms.append(log.gradients(epoch, zip(trainer.names, grads, strict=True)))
            curve.append(epoch_row(epoch, train, val, all_norms[-1]))
            rank = epoch_rank(val[1], val[0], len(y_val))
            if best_rank is None or rank > best_rank:  # an exact tie keeps the earlier epoch
                best_rank, best_epoch = rank, epoch
                best_values = [v.numpy() for v in trainer.variables]
    log.close()
    assert best_values is not None
    for var, value in zip(trainer.variables, best_values, strict=True):
        var.assign(value)
    return TrainResult(
        model=model,
        curve=curve,
        summary={
            "epochs": len(curve),
            "model_step": best_epoch,
            "steps": int(model.step.numpy()),
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "momentum": momentum,
            "label_smoothing": label_smoothing,
            "start_val_accuracy": start_accuracy,
            "start_val_loss": start_loss,
            **{f"gradient_norm_{b}": value for b, value in all_norms[best_epoch - 1].items()},
        },
        train_seconds=timer["seconds"],
    )


def save_finetune_tf(
    model: FinetuneTop,
    model_dir: str | Path,
    classes: list[str],
    *,
    test_time_flip: bool = False,
    cut: str,
    image_size: int = IMAGE_SIZE,
) -> None:
    """SavedModel + finetune.json + labels.txt in `model_dir`, replaced as a whole."""
    spec = tf.TensorSpec([None, *model.input_shape], tf.float32, name=INPUT_NAME)
    model.predict.get_concrete_function(spec)
    model.predict_float32.get_concrete_function(spec)  # traced: a restored one needs a trace
    signatures = {SIGNATURE_KEY: model.serve.get_concrete_function(spec)}

    def write(tmp: Path) -> None:
        tf.saved_model.save(model, str(tmp), signatures=signatures)
        deterministic_fingerprint(tmp)
        config = model_config(test_time_flip=test_time_flip, cut=cut, image_size=image_size)
        write_config(tmp, config)

    save_model_dir(model_dir, classes, write)


def load_finetune_tf(model_dir: str | Path) -> Any:
    """The restored SavedModel (`.predict`, `.signatures["serving_default"]`)."""
    model_dir = Path(model_dir)
    if not (model_dir / "saved_model.pb").is_file():
        raise MissingInput(
            f"{model_dir} holds no SavedModel: run `dvc repro finetune_tf` to build it"
        )
    return tf.saved_model.load(str(model_dir))


def predictor(model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Activations [N, h, w, c] -> probabilities [N, n_classes] (float32), via the signature."""
    serve = load_finetune_tf(model_dir).signatures[SIGNATURE_KEY]

    def predict(activations: np.ndarray) -> np.ndarray:
        x = tf.constant(np.asarray(activations, dtype=np.float32))
        return serve(**{INPUT_NAME: x})[OUTPUT_KEY].numpy()

    return predict


def graph_head(model_dir: str | Path, float32: bool = False) -> tuple[Any, Callable[[Any], Any]]:
    """For the end-to-end graph: the restored module and its activations -> probabilities;
    `float32`: with the convolutions in float32 whatever the model was trained to compute in."""
    model = load_finetune_tf(model_dir)
    if float32:
        return model, lambda x: model.predict_float32(x)
    return model, lambda x: model.predict(x)


def weights_digest(model_dir: str | Path) -> bytes:
    """sha256 over the names, shapes, dtypes and values of the checkpoint's variables (the step
    counter included: the same start trained for longer is another model), as the TF head's."""
    from imgclf.heads.tf_head import weights_digest as checkpoint_digest

    return checkpoint_digest(model_dir)
