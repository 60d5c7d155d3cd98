"""Stage finetune_keras: the blocks after the cut and the Keras head, fine-tuned with fit."""

from __future__ import annotations

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.config import load_params
from imgclf.finetune.common import report, train_and_save_finetune
from imgclf.finetune.finetune_keras import (
    count_parameters,
    save_finetune_keras,
    train_finetune_keras,
)
from imgclf.heads.keras_head import load_keras_head
from imgclf.params import FinetuneKerasParams, HeadsParams
from imgclf.registry import base_params
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    recipe = FinetuneKerasParams.from_params(params).as_kwargs()
    metrics = train_and_save_finetune(
        "finetune_keras",
        paths=params["paths"],
        shared=HeadsParams.from_params(params).as_kwargs(),
        cut=params["activations"]["cut"],
        image_size=params["activations"]["image_size"],
        load_head=load_keras_head,
        train_fn=train_finetune_keras,
        save_fn=save_finetune_keras,
        count_parameters=count_parameters,
        recipe=recipe,
        base_recipe=base_params("finetune_keras", params),
    )
    print(report("finetune_keras", metrics))


if __name__ == "__main__":
    main()
