"""The Keras head: Keras 3, Sequential API, compile/fit with callbacks.

The tutorial's recipe by default: Dense(1024, relu) -> [Dropout] -> Dense(n_classes, softmax),
RMSprop, (sparse) categorical cross-entropy, EarlyStopping on the validation loss that restores
the best weights. The saved head is `model.keras`; the loaded keras.Model is what an end-to-end
model (backbone -> head) is built from.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

from imgclf.bottleneck_files import N_FEATURES
from imgclf.errors import MissingInput
from imgclf.heads.common import (
    TrainResult,
    keras_weights_digest,
    normalise_keras_archive,
    save_model_dir,
    set_determinism,
    stopwatch,
    without_stderr_lines,
)

MODEL_FILE = "model.keras"


def build_model(
    n_classes: int, *, n_features: int = N_FEATURES, hidden_units: int = 1024, dropout: float = 0.0
) -> keras.Sequential:
    """bottlenecks [N, n_features] -> probabilities [N, n_classes]; hidden_units=0 gives
    retrain.py's single softmax layer. Dropout, when set, is on the input of the softmax layer
    (as in the TF head)."""
    if hidden_units < 0:
        raise ValueError(f"train_keras.hidden_units must be >= 0, got {hidden_units}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"train_keras.dropout must be in [0, 1), got {dropout}")
    layers: list[keras.layers.Layer] = [keras.Input(shape=(n_features,), name="bottlenecks")]
    if hidden_units:
        layers.append(keras.layers.Dense(hidden_units, activation="relu", name="hidden"))
    if dropout:
        layers.append(keras.layers.Dropout(dropout, name="dropout"))
    layers.append(keras.layers.Dense(n_classes, activation="softmax", name="probabilities"))
    return keras.Sequential(layers, name="keras_head")


def count_parameters(model: keras.Model) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))


class _EpochProgress(keras.callbacks.Callback):
    """A tqdm bar over epochs on stderr (fit's own bar is per batch and noisy in DVC logs)."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        super().__init__()
        self.bar = tqdm(total=epochs, desc="train_keras", unit="epoch", file=sys.stderr,
                        disable=not enabled)  # fmt: skip

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.bar.set_postfix(
            val_accuracy=f"{(logs or {}).get('val_accuracy', 0):.3f}", refresh=False
        )
        self.bar.update(1)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.bar.close()


# With op determinism on (set_determinism), tf.data's make_deterministic rewrite turns the
# ParallelMapDatasetV2 of Keras's array adapter (keras/src/trainers/data_adapters/
# array_data_adapter.py, `grab_batch`) into a MapDataset and copies its attributes, including
# `use_unbounded_threadpool`, which MapDataset does not have; TensorFlow 2.21 then logs
# "E0000 ... NodeDef mentions attribute use_unbounded_threadpool which is not in the op
# definition ... Unknown attributes will be ignored" once per fit. It is harmless (the attribute
# is dropped and the sequential map is what determinism wants), TF_CPP_MIN_LOG_LEVEL cannot
# silence it without silencing real errors, and avoiding the rewrite would mean feeding fit
# another pipeline, i.e. another shuffle order and other results. So that one line is dropped.
_TF_DATA_NOTICE = b"NodeDef mentions attribute use_unbounded_threadpool"


def train_keras_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    hidden_units: int = 1024,
    dropout: float = 0.0,
    learning_rate: float = 1e-4,
    epochs: int = 60,
    batch_size: int = 100,
    early_stopping_patience: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """compile + fit; the curve has one row per epoch (train loss/accuracy = fit's running mean
    over the epoch, with dropout; validation on the whole slice after the epoch). The returned
    model holds the weights of the epoch with the lowest validation loss."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_keras.epochs and batch_size must be >= 1 ({epochs}, {batch_size})")
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("train_keras: empty training or validation set")
    set_determinism(seed)
    model = build_model(
        n_classes, n_features=x_train.shape[1], hidden_units=hidden_units, dropout=dropout
    )
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks: list[keras.callbacks.Callback] = [
        _EpochProgress(epochs, progress),
    ]
    early_stopping = None
    if early_stopping_patience > 0:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=early_stopping_patience, restore_best_weights=True
        )
        callbacks.append(early_stopping)
    with stopwatch() as timer, without_stderr_lines(_TF_DATA_NOTICE):
        history = model.fit(
            np.asarray(x_train, np.float32),
            np.asarray(y_train, np.int64),
            validation_data=(np.asarray(x_val, np.float32), np.asarray(y_val, np.int64)),
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
            callbacks=callbacks,
            verbose=0,
        )
    h = history.history
    curve = [
        {
            "epoch": float(epoch + 1),  # fit sees every training image once per epoch
            "step": epoch + 1,
            "train_loss": float(h["loss"][epoch]),
            "train_accuracy": float(h["accuracy"][epoch]),
            "val_loss": float(h["val_loss"][epoch]),
            "val_accuracy": float(h["val_accuracy"][epoch]),
        }
        for epoch in range(len(h["loss"]))
    ]
    # EarlyStopping(restore_best_weights) hands back the lowest-val_loss epoch, even when it did
    # not stop early; without it the last epoch's weights are kept.
    model_epoch = early_stopping.best_epoch + 1 if early_stopping is not None else len(curve)
    return TrainResult(
        model=model,
        curve=curve,
        summary={
            "epochs": len(curve),
            "max_epochs": epochs,
            "model_step": model_epoch,
            "steps": len(curve) * -(-len(x_train) // batch_size),
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "hidden_units": hidden_units,
            "dropout": dropout,
            "early_stopping_patience": early_stopping_patience,
            "optimizer": "rmsprop",
        },
        train_seconds=timer["seconds"],
    )


def save_keras_head(model: keras.Model, model_dir: str | Path, classes: list[str]) -> None:
    """model.keras + labels.txt in `model_dir`, replaced as a whole. The same weights give the
    same bytes (see `normalise_keras_archive`)."""

    def write(tmp: Path) -> None:
        model.save(tmp / MODEL_FILE)
        normalise_keras_archive(tmp / MODEL_FILE)

    save_model_dir(model_dir, classes, write)


def load_keras_head(model_dir: str | Path) -> keras.Model:
    """The trained keras.Model (bottlenecks -> probabilities), e.g. to stack on the backbone."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise MissingInput(f"{path} not found: run `dvc repro train@keras` to build it")
    return keras.saving.load_model(path, compile=False)


def predictor(model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Bottlenecks [N, 2048] -> probabilities [N, n_classes] (float32)."""
    model = load_keras_head(model_dir)

    def predict(bottlenecks: np.ndarray) -> np.ndarray:
        x = np.asarray(bottlenecks, dtype=np.float32)
        return np.asarray(model.predict(x, batch_size=512, verbose=0), dtype=np.float32)

    return predict


def summary_line(metrics: Mapping[str, Any]) -> str:
    return (
        f"val_accuracy {metrics['final_val_accuracy']:.4f} "
        f"(best {metrics['best_val_accuracy']:.4f}; kept epoch {metrics['model_step']} of "
        f"{metrics['epochs']}), {metrics['train_seconds']:.1f} s"
    )


def graph_head(model_dir: str | Path) -> tuple[Any, Callable[[Any], Any]]:
    """For the end-to-end graph: the loaded model and its inference call."""
    model = load_keras_head(model_dir)
    return model, lambda x: model(x, training=False)


def weights_digest(model_dir: str | Path) -> bytes:
    """sha256 over the paths, shapes, dtypes and values of the model's weights."""
    return keras_weights_digest(load_keras_head(model_dir))
