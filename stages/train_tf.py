"""Stage train_tf: the low-level TensorFlow head (retrain.py's recipe) on the train bottlenecks."""

from __future__ import annotations

from pathlib import Path

from imgclf.config import load_params
from imgclf.heads import model_dir
from imgclf.heads.common import load_bottlenecks, split_train_val, write_training_metrics
from imgclf.heads.tf_head import count_parameters, save_tf_head, train_tf_head

HEAD = "tf"


def main() -> None:
    params = load_params()
    paths = params["paths"]
    shared = params["heads"]
    hp = params["train_tf"]
    train = load_bottlenecks(paths["bottlenecks"], "train")
    x_train, y_train, x_val, y_val = split_train_val(
        train, shared["validation_fraction"], shared["seed"]
    )
    result = train_tf_head(
        x_train,
        y_train,
        x_val,
        y_val,
        n_classes=len(train.classes),
        learning_rate=float(hp["learning_rate"]),
        steps=int(hp["steps"]),
        batch_size=int(hp["batch_size"]),
        eval_every=int(hp["eval_every"]),
        hidden_units=int(hp["hidden_units"]),
        dropout=float(hp["dropout"]),
        seed=int(shared["seed"]),
    )
    save_tf_head(result.model, model_dir(paths["models"], HEAD), train.classes)
    metrics = write_training_metrics(
        Path(paths["metrics"]),
        HEAD,
        result,
        n_parameters=count_parameters(result.model),
        n_train=len(y_train),
        n_val=len(y_val),
        n_classes=len(train.classes),
    )
    print(
        f"train_tf: val_accuracy {metrics['final_val_accuracy']:.4f} "
        f"(best {metrics['best_val_accuracy']:.4f}), {metrics['steps']} steps, "
        f"{metrics['train_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
