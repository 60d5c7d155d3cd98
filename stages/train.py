"""Stage train@<model>: train one registered model (imgclf/registry.py) on the train
bottlenecks, with its params block `train_<model>` as keyword arguments.

    python -m stages.train keras
"""

from __future__ import annotations

import sys

from imgclf.config import load_params
from imgclf.errors import UserError
from imgclf.heads.common import train_model
from imgclf.registry import MODELS, get_model, model_names
from imgclf.stage import stage_main


@stage_main
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    heads = model_names(inputs="bottlenecks")
    if len(args) != 1 or args[0] not in heads:
        fine_tuned = len(args) == 1 and args[0] in MODELS
        raise UserError(
            "stages.train",
            found=" ".join(args) or "no model name",
            expected="one registered head: " + ", ".join(heads),
            todo=f"{args[0]} is a fine-tuned model: run its own stage (dvc repro {args[0]})."
            if fine_tuned
            else "Run `python -m stages.train <model>` (dvc.yaml's train@<model> stages do).",
        )
    spec = get_model(args[0])
    if spec.tensorflow:
        import imgclf.quiet_tf  # noqa: F401  (before any TensorFlow: no start-up notices)
    metrics = train_model(spec.name, load_params())
    line = (
        spec.function("summary")(metrics)
        if spec.summary
        else f"val_accuracy {metrics['final_val_accuracy']:.4f}, {metrics['train_seconds']:.1f} s"
    )
    print(f"{spec.stage}: {line}")


if __name__ == "__main__":
    main()
