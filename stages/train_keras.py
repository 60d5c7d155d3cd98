"""Stage train_keras: the Keras head (the tutorial's recipe) on the train bottlenecks."""

from __future__ import annotations

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.config import load_params
from imgclf.heads.common import train_and_save_head
from imgclf.heads.keras_head import count_parameters, save_keras_head, train_keras_head
from imgclf.params import HeadsParams, TrainKerasParams
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    metrics = train_and_save_head(
        "keras",
        paths=params["paths"],
        shared=HeadsParams.from_params(params).as_kwargs(),
        train_fn=train_keras_head,
        save_fn=save_keras_head,
        count_parameters=count_parameters,
        **TrainKerasParams.from_params(params).as_kwargs(),
    )
    print(
        f"train_keras: val_accuracy {metrics['final_val_accuracy']:.4f} "
        f"(best {metrics['best_val_accuracy']:.4f}; kept epoch {metrics['model_step']} of "
        f"{metrics['epochs']}), {metrics['train_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
