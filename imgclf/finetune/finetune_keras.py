"""Fine-tuning the top of Inception V3 in Keras 3, the way the 2017 tutorial did.

The model is the backbone's blocks after the cut (`build_top`: mixed_9, mixed_10 and the pool
at mixed_8) with the trained Keras head's own layers on top (Dense(1024, relu) -> softmax),
so fine-tuning starts exactly where `train_keras` ended. What trains is said with `trainable`
flags: every layer of the top and of the head, except the batch-norm layers, which Keras 3 then
runs in inference mode (moving statistics used and left alone, beta frozen). Then compile
(SGD with momentum, label smoothing optional, constant or cosine learning rate) and fit, with
callbacks: `KeepBestEpoch` restores the best epoch on validation (most images right, then the
lower loss), and a monitor writes TensorBoard events (fit gives callbacks no gradients, so they
are taken on a fixed probe batch at each epoch's end).

Inputs: activations at the cut, float [N, h, w, c]; output: probabilities in label order.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from imgclf.backbone_info import IMAGE_SIZE
from imgclf.errors import MissingInput
from imgclf.finetune.common import (
    SCHEDULES,
    TensorBoardLog,
    TrainingOrder,
    epoch_rank,
    epoch_row,
    model_config,
    write_config,
)
from imgclf.finetune.common import uses_test_time_flip as uses_test_time_flip  # re-exported
from imgclf.heads.common import (
    TrainResult,
    keras_weights_digest,
    normalise_keras_archive,
    save_model_dir,
    set_determinism,
    stopwatch,
    without_stderr_lines,
)
from imgclf.inception import all_layers

MODEL_FILE = "model.keras"
_TF_DATA_NOTICE = b"NodeDef mentions attribute use_unbounded_threadpool"


def build_finetune_model(top: keras.Model, head: keras.Model) -> keras.Model:
    """activations -> `top` -> the head's layers (reused, weights and all) -> probabilities,
    with the trainable flags of fine-tuning set: all but the batch-norm layers."""
    inputs = keras.Input(tuple(top.input.shape[1:]), name="activations")
    x = top(inputs)
    for layer in head.layers:
        x = layer(x)
    model = keras.Model(inputs, x, name="finetune_keras")
    model.trainable = True
    # Layer by layer: the backbone comes frozen (load_backbone), and the model's flag does not
    # reach the layers of build_top's inner model (a Functional cut out of the backbone).
    for layer in all_layers(model):
        # trainable=False is also what puts a Keras 3 BN layer in inference mode.
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    return model


def count_parameters(model: keras.Model) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))


class _Monitor(keras.callbacks.Callback):
    """TensorBoard events per epoch: the curves, weight histograms of the trained layers, and
    gradient histograms and per-block norms on a fixed probe batch; plus an epoch bar."""

    def __init__(self, log: TensorBoardLog, probe: tuple[np.ndarray, np.ndarray], loss: Any,
                 epochs: int, progress: bool) -> None:  # fmt: skip
        super().__init__()
        self.log, self.loss = log, loss
        self.probe = (tf.constant(probe[0], tf.float32), tf.constant(probe[1], tf.float32))
        self.norms: list[dict[str, float]] = []
        self.bar = tqdm(total=epochs, desc="finetune_keras", unit="epoch", file=sys.stderr,
                        disable=not progress)  # fmt: skip

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        step = epoch + 1
        self.log.scalars(
            step,
            {
                "loss/train": logs.get("loss", np.nan),
                "loss/val": logs.get("val_loss", np.nan),
                "accuracy/train": logs.get("accuracy", np.nan),
                "accuracy/val": logs.get("val_accuracy", np.nan),
                "learning_rate": float(
                    keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
                ),
            },
        )
        variables = self.model.trainable_weights
        self.log.histograms(step, ((f"weights/{v.path}", v.value) for v in variables))
        x, y = self.probe
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.model(x, training=True))
        grads = tape.gradient(loss, [v.value for v in variables])
        self.norms.append(
            self.log.gradients(step, zip([v.path for v in variables], grads, strict=True))
        )
        self.bar.set_postfix(val_accuracy=f"{logs.get('val_accuracy', 0):.3f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.bar.close()
        self.log.close()


class KeepBestEpoch(keras.callbacks.Callback):
    """EarlyStopping's restore_best_weights without the stopping, on `epoch_rank` (validation
    accuracy counted in images, then the lower validation loss): EarlyStopping watches one
    logged value, and on accuracy alone a tie keeps the earliest of the tied epochs."""

    def __init__(self, n_val: int) -> None:
        super().__init__()
        self.n_val = int(n_val)
        self.best_rank: tuple[int, float] | None = None
        self.best_epoch = 0  # 1-based, as the curve's rows
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        rank = epoch_rank(logs["val_accuracy"], logs["val_loss"], self.n_val)
        if self.best_rank is None or rank > self.best_rank:  # an exact tie keeps the earlier
            self.best_rank, self.best_epoch = rank, epoch + 1
            self.best_weights = self.model.get_weights()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def training_batches(
    x: Any, y: np.ndarray, order: TrainingOrder, epochs: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every epoch's training batches, one after another: `TrainingOrder`'s, the ones
    finetune_tf trains on, the rows read from the activations' file batch by batch and
    made float32 there. fit reads it straight through (given `steps_per_epoch`), so no batch
    depends on when Keras calls a hook: a PyDataset's next epoch is fetched ahead, before its
    `on_epoch_end`, and its batches are shuffled by fit. Given the whole array instead, fit's
    array adapter holds it as tensors several times over (8.05 GiB peak on the full set)."""
    for _ in range(epochs):
        for rows in order.next_epoch():
            yield np.asarray(x[rows], np.float32), y[rows]


def _evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int) -> list[float]:
    return [float(v) for v in model.evaluate(x, y, batch_size=batch_size, verbose=0)]


def train_finetune_keras(
    top: keras.Model,
    head: keras.Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    tensorboard_dir: str | Path,
    train_images: np.ndarray | None = None,
    view_sampling: str = "one_per_image",
    epochs: int = 9,
    learning_rate: float = 1e-3,
    momentum: float = 0.9,
    batch_size: int = 32,
    label_smoothing: float = 0.0,
    schedule: str = "constant",
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `top` + `head` (both changed in place: their layers are the model's) on the
    training rows (`view_sampling`: all, or one per image of `train_images`). The curve has
    one row per epoch; the model returned holds the weights of the best epoch on validation
    (`epoch_rank`: most images right, then the lower loss)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"finetune_keras.schedule must be one of {SCHEDULES}, not {schedule!r}")
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("finetune_keras: empty training or validation set")
    set_determinism(seed)
    model = build_finetune_model(top, head)
    order = TrainingOrder(seed, len(x_train), train_images, view_sampling, batch_size)
    lr: Any = learning_rate
    if schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * order.steps_per_epoch)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=momentum),
        loss=loss,
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    # One-hot labels (label smoothing needs them), made float32 once: unlike the activations,
    # they are small. As many classes as the head's softmax layer has units.
    n_classes = int(head.layers[-1].units)
    y_train_1h = keras.utils.to_categorical(y_train, n_classes).astype(np.float32)
    y_val_1h = keras.utils.to_categorical(y_val, n_classes).astype(np.float32)
    log = TensorBoardLog(tensorboard_dir)
    with without_stderr_lines(_TF_DATA_NOTICE):
        start_loss, start_accuracy = _evaluate(model, x_val, y_val_1h, 256)
    log.scalars(0, {"loss/val": start_loss, "accuracy/val": start_accuracy})
    monitor = _Monitor(
        log,
        (np.asarray(x_train[order.probe], np.float32), y_train_1h[order.probe]),
        loss,
        epochs,
        progress,
    )
    best = KeepBestEpoch(len(y_val))
    with stopwatch() as timer, without_stderr_lines(_TF_DATA_NOTICE):
        history = model.fit(
            training_batches(x_train, y_train_1h, order, epochs),
            steps_per_epoch=order.steps_per_epoch,
            shuffle=False,  # the batches come shuffled, and the same as finetune_tf's
            validation_data=(x_val, y_val_1h),
            epochs=epochs,
            callbacks=[monitor, best],
            verbose=0,
        )
    h = history.history
    curve = [
        epoch_row(
            e + 1,
            (h["loss"][e], h["accuracy"][e]),
            (h["val_loss"][e], h["val_accuracy"][e]),
            monitor.norms[e] if e < len(monitor.norms) else None,
        )
        for e in range(len(h["loss"]))
    ]
    best_epoch = best.best_epoch  # the model holds its weights (KeepBestEpoch.on_train_end)
    norms = monitor.norms[best_epoch - 1] if monitor.norms else {}
    return TrainResult(
        model=model,
        curve=curve,
        summary={
            "epochs": len(curve),
            "model_step": best_epoch,
            "steps": len(curve) * order.steps_per_epoch,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "momentum": momentum,
            "label_smoothing": label_smoothing,
            "start_val_accuracy": start_accuracy,
            "start_val_loss": start_loss,
            **{f"gradient_norm_{block}": value for block, value in norms.items()},
        },
        train_seconds=timer["seconds"],
    )


def save_finetune_keras(
    model: keras.Model,
    model_dir: str | Path,
    classes: list[str],
    *,
    test_time_flip: bool = False,
    cut: str,
    image_size: int = IMAGE_SIZE,
) -> None:
    """model.keras + finetune.json + labels.txt in `model_dir`, replaced as a whole; the same
    weights give the same bytes."""

    # A fresh, uncompiled Model on the same layers: saving the compiled one would also store
    # the optimizer's momentum, which doubles the file and is of no use to a trained model.
    plain = keras.Model(model.inputs, model.outputs, name=model.name)

    def write(tmp: Path) -> None:
        plain.save(tmp / MODEL_FILE)
        normalise_keras_archive(tmp / MODEL_FILE)
        config = model_config(test_time_flip=test_time_flip, cut=cut, image_size=image_size)
        write_config(tmp, config)

    save_model_dir(model_dir, classes, write)


def load_finetune_keras(model_dir: str | Path) -> keras.Model:
    """The fine-tuned keras.Model: activations at the cut -> probabilities."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise MissingInput(f"{path} not found: run `dvc repro finetune_keras` to build it")
    return keras.saving.load_model(path, compile=False)


def predictor(model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Activations [N, h, w, c] -> probabilities [N, n_classes] (float32), label order. Whether
    to average with the flipped view is `uses_test_time_flip(model_dir)`."""
    model = load_finetune_keras(model_dir)
    return functools.partial(predict_in_batches, model)


def predict_in_batches(model: keras.Model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """`model`'s float32 outputs for the rows of `x`, batch by batch: the same numbers as
    `model.predict`, whose tf.data pipeline logs a C++ "NodeDef mentions attribute" error line
    after a `fit` in the same process."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    batches = [model.predict_on_batch(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate([np.asarray(b, dtype=np.float32) for b in batches])


def as_float32(model: keras.Model) -> keras.Model:
    """The same model with every layer computing in float32 (a mixed_bfloat16 model's weights
    are float32 already, and are copied): what LiteRT converts, it has no bfloat16 convolution."""

    def to_float32(config: Any) -> None:
        if isinstance(config, dict):
            if config.get("class_name") == "DTypePolicy":
                config["config"]["name"] = "float32"
            for value in config.values():
                to_float32(value)
        elif isinstance(config, list):
            for value in config:
                to_float32(value)

    config = keras.saving.serialize_keras_object(model)
    to_float32(config)
    clone = keras.saving.deserialize_keras_object(config)
    clone.set_weights(model.get_weights())
    return clone


def graph_head(model_dir: str | Path, float32: bool = False) -> tuple[Any, Callable[[Any], Any]]:
    """For the end-to-end graph: the loaded model and its inference call (batch norm in
    inference mode, as it was trained and scored); `float32`: computing in float32 whatever
    the model was trained to compute in (`as_float32`)."""
    model = load_finetune_keras(model_dir)
    if float32:
        model = as_float32(model)
    return model, lambda x: model(x, training=False)


def weights_digest(model_dir: str | Path) -> bytes:
    """sha256 over the paths, shapes, dtypes and values of the model's weights."""
    return keras_weights_digest(load_finetune_keras(model_dir))
