"""Stage export@<model>: one servable model of params.yaml `litert.models` as LiteRT (TFLite)
files at each of `litert.precisions`, each scored on the test images with the LiteRT interpreter
against the TF model's own test predictions (imgclf/litert.py).

    python -m stages.export finetune_tf

One stage per model (dvc.yaml's `foreach`), so a model that changes reruns its own export and
not the others' (minutes each: the int8 calibration most).

The TF model's predictions are recomputed here the way the evaluate stage computes them
(imgclf/predictions.py: the heads on the test bottlenecks, the fine-tuned models on the test
activations), so this stage needs neither evaluate's outputs nor to run after it. The files
take the backbone at float32 whatever bottlenecks.precision is, and a fine-tuned model's
blocks at float32 whatever its recipe's precision (the same weights): a phone has no bfloat16
(LiteRT converts no bfloat16 convolution), and the agreement column measures what that changes.
"""

from __future__ import annotations

import sys

import numpy as np

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.bottleneck_files import load_bottlenecks
from imgclf.config import load_params
from imgclf.errors import UserError
from imgclf.features import split_items
from imgclf.fidelity import calibration_sample
from imgclf.fileio import write_json
from imgclf.layout import Layout
from imgclf.litert import check_models, export_and_score, markdown_table
from imgclf.params import LitertParams, RuntimesParams
from imgclf.predictions import predict_heads
from imgclf.registry import pipeline_models
from imgclf.stage import stage_main


@stage_main
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise UserError(
            "stages.export",
            found=" ".join(args) or "no model name",
            expected="one model of litert.models",
            todo="Run `python -m stages.export <model>` (dvc.yaml's export@<model> stages do).",
        )
    params = load_params()
    layout = Layout.from_params(params)
    hp = LitertParams.from_params(params)
    calibration_images = RuntimesParams.from_params(params).calibration_images
    (model,) = check_models(args, pipeline_models(params))
    test = load_bottlenecks(layout.bottlenecks, "test")
    keep = len(test.ids) if hp.max_test_images == 0 else min(hp.max_test_images, len(test.ids))
    reference = predict_heads(test, layout.models, [model], layout.activations)
    _, items = split_items(layout.split)
    # The int8 calibration rule of the openvino runtime (RuntimeSetup.calibration_items):
    # train images only, round-robin over the classes in sha256 order.
    calibration = [item.path for item in calibration_sample(items["train"], calibration_images)]

    from imgclf.end_to_end import Builder

    build = Builder(layout.backbone)
    metrics = export_and_score(
        build_model=lambda name: build(layout.model_dir(name), name, float32_blocks=True),
        models=[model],
        precisions=hp.precisions,
        out_dir=layout.litert_dir(model),
        calibration_paths=calibration,
        test_paths=[layout.split / str(i) for i in test.ids[:keep]],
        test_labels=np.asarray(test.labels),
        reference=reference,
        num_threads=hp.num_threads,
    )
    metrics["calibration_images"] = len(calibration)
    write_json(layout.litert_metrics(model), metrics)
    table = markdown_table(metrics)
    layout.litert_md(model).write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
