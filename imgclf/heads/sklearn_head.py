"""The baseline: scikit-learn's multinomial logistic regression on the same bottlenecks.

Any neural head has to beat this. lbfgs on the multinomial (softmax) loss, i.e. the same model as
retrain.py's single softmax layer, fitted to convergence with L2 strength 1/C instead of 4,000
SGD steps. `standardize: true` puts a StandardScaler in front: the Inception pool features are
non-negative with very different scales per dimension, and standardizing makes lbfgs converge in
far fewer iterations (and C mean the same thing on every feature). The scaler's mean/scale are
fitted on the training part only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from imgclf.errors import MissingInput
from imgclf.heads.common import (
    TrainResult,
    accuracy_and_loss,
    read_labels,
    save_model_dir,
    stopwatch,
)

MODEL_FILE = "model.joblib"


def build_model(
    *, C: float = 1.0, max_iter: int = 2000, standardize: bool = True, seed: int = 0
) -> Pipeline:
    # lbfgs fits the multinomial loss for more than two classes (the only behaviour left in
    # scikit-learn >= 1.7, hence no multi_class argument).
    classifier = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    steps = [StandardScaler(), classifier] if standardize else [classifier]
    return make_pipeline(*steps)


def count_parameters(model: Pipeline) -> int:
    """Coefficients + intercepts (the scaler's statistics are not learnt by gradient)."""
    clf: LogisticRegression = model[-1]
    return int(clf.coef_.size + clf.intercept_.size)


def predict_proba(model: Pipeline, bottlenecks: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all `n_classes` labels (columns follow label order even if a class
    was absent from training)."""
    probs = model.predict_proba(np.asarray(bottlenecks, dtype=np.float32))
    out = np.zeros((probs.shape[0], n_classes), dtype=np.float32)
    out[:, model.classes_.astype(int)] = probs
    return out


def train_sklearn_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    C: float = 1.0,
    max_iter: int = 2000,
    standardize: bool = True,
    seed: int = 0,
) -> TrainResult:
    """Fit on the training part; validation accuracy/loss on the shared slice."""
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("train_sklearn: empty training or validation set")
    model = build_model(C=C, max_iter=max_iter, standardize=standardize, seed=seed)
    with warnings.catch_warnings(record=True) as caught, stopwatch() as timer:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(np.asarray(x_train, np.float32), np.asarray(y_train))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    val_accuracy, val_loss = accuracy_and_loss(predict_proba(model, x_val, n_classes), y_val)
    train_accuracy, train_loss = accuracy_and_loss(
        predict_proba(model, x_train, n_classes), y_train
    )
    return TrainResult(
        model=model,
        summary={
            "C": C,
            "max_iter": max_iter,
            "standardize": standardize,
            "iterations": int(np.max(model[-1].n_iter_)),
            "converged": converged,
            "train_accuracy": train_accuracy,
            "train_loss": train_loss,
            # One fit, so final = best; named like the other heads' for the comparison table.
            "final_val_accuracy": val_accuracy,
            "final_val_loss": val_loss,
            "best_val_accuracy": val_accuracy,
            "best_val_loss": val_loss,
        },
        train_seconds=timer["seconds"],
    )


def save_sklearn_head(model: Pipeline, model_dir: str | Path, classes: list[str]) -> None:
    save_model_dir(model_dir, classes, lambda tmp: joblib.dump(model, tmp / MODEL_FILE))


def load_sklearn_head(model_dir: str | Path) -> Pipeline:
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise MissingInput(f"{path} not found: run `dvc repro train@sklearn` to build it")
    return joblib.load(path)


def predictor(model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Bottlenecks [N, 2048] -> probabilities [N, n_classes] (float32)."""
    model = load_sklearn_head(model_dir)
    n_classes = len(read_labels(model_dir))

    def predict(bottlenecks: np.ndarray) -> np.ndarray:
        return predict_proba(model, bottlenecks, n_classes)

    return predict


def summary_line(metrics: Mapping[str, Any]) -> str:
    note = "" if metrics["converged"] else " (lbfgs did NOT converge: raise train_sklearn.max_iter)"
    return (
        f"val_accuracy {metrics['final_val_accuracy']:.4f}, "
        f"{metrics['iterations']} lbfgs iterations, {metrics['train_seconds']:.1f} s{note}"
    )
