"""Stage train_sklearn: the logistic-regression baseline on the train bottlenecks."""

from __future__ import annotations

from pathlib import Path

from imgclf.config import load_params
from imgclf.heads import model_dir
from imgclf.heads.common import load_bottlenecks, split_train_val, write_training_metrics
from imgclf.heads.sklearn_head import count_parameters, save_sklearn_head, train_sklearn_head

HEAD = "sklearn"


def main() -> None:
    params = load_params()
    paths = params["paths"]
    shared = params["heads"]
    hp = params["train_sklearn"]
    train = load_bottlenecks(paths["bottlenecks"], "train")
    x_train, y_train, x_val, y_val = split_train_val(
        train, shared["validation_fraction"], shared["seed"]
    )
    result = train_sklearn_head(
        x_train,
        y_train,
        x_val,
        y_val,
        n_classes=len(train.classes),
        C=float(hp["C"]),
        max_iter=int(hp["max_iter"]),
        standardize=bool(hp["standardize"]),
        seed=int(shared["seed"]),
    )
    save_sklearn_head(result.model, model_dir(paths["models"], HEAD), train.classes)
    metrics = write_training_metrics(
        Path(paths["metrics"]),
        HEAD,
        result,
        n_parameters=count_parameters(result.model),
        n_train=len(y_train),
        n_val=len(y_val),
        n_classes=len(train.classes),
    )
    note = "" if metrics["converged"] else " (lbfgs did NOT converge: raise train_sklearn.max_iter)"
    print(
        f"train_sklearn: val_accuracy {metrics['final_val_accuracy']:.4f}, "
        f"{metrics['iterations']} lbfgs iterations, {metrics['train_seconds']:.1f} s{note}"
    )


if __name__ == "__main__":
    main()
