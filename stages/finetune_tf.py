"""Stage finetune_tf: the blocks after the cut and the TF head, fine-tuned in low-level TF."""

from __future__ import annotations

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.config import load_params
from imgclf.finetune.common import report, train_and_save_finetune
from imgclf.finetune.finetune_tf import count_parameters, save_finetune_tf, train_finetune_tf
from imgclf.heads.tf_head import load_tf_head
from imgclf.params import FinetuneTfParams, HeadsParams
from imgclf.registry import base_params
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    cut = params["activations"]["cut"]
    metrics = train_and_save_finetune(
        "finetune_tf",
        paths=params["paths"],
        shared=HeadsParams.from_params(params).as_kwargs(),
        cut=cut,
        image_size=params["activations"]["image_size"],
        load_head=load_tf_head,
        train_fn=lambda *args, **kw: train_finetune_tf(*args, cut=cut, **kw),
        save_fn=save_finetune_tf,
        count_parameters=count_parameters,
        recipe=FinetuneTfParams.from_params(params).as_kwargs(),
        base_recipe=base_params("finetune_tf", params),
    )
    print(report("finetune_tf", metrics))


if __name__ == "__main__":
    main()
