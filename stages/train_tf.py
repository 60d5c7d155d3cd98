"""Stage train_tf: the low-level TensorFlow head (retrain.py's recipe) on the train bottlenecks."""

from __future__ import annotations

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.config import load_params
from imgclf.heads.common import train_and_save_head
from imgclf.heads.tf_head import count_parameters, save_tf_head, train_tf_head
from imgclf.params import HeadsParams, TrainTfParams
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    metrics = train_and_save_head(
        "tf",
        paths=params["paths"],
        shared=HeadsParams.from_params(params).as_kwargs(),
        train_fn=train_tf_head,
        save_fn=save_tf_head,
        count_parameters=count_parameters,
        **TrainTfParams.from_params(params).as_kwargs(),
    )
    print(
        f"train_tf: val_accuracy {metrics['final_val_accuracy']:.4f} "
        f"(best {metrics['best_val_accuracy']:.4f}), {metrics['steps']} steps, "
        f"{metrics['train_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
