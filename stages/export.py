"""Stage export: the servable models of params.yaml `litert.models` as LiteRT (TFLite) files at
each of `litert.precisions`, each scored on the test images with the LiteRT interpreter against
the TF model's own test predictions (imgclf/litert.py).

The TF model's predictions are recomputed here the way the evaluate stage computes them
(imgclf/predictions.py: the heads on the test bottlenecks, the fine-tuned models on the test
activations), so this stage needs neither evaluate's outputs nor to run after it. The files
take the backbone at float32 whatever bottlenecks.precision is, and a fine-tuned model's
blocks at float32 whatever its recipe's precision (the same weights): a phone has no bfloat16
(LiteRT converts no bfloat16 convolution), and the agreement column measures what that changes.
"""

from __future__ import annotations

import numpy as np

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.bottleneck_files import load_bottlenecks
from imgclf.config import load_params
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
def main() -> None:
    params = load_params()
    layout = Layout.from_params(params)
    hp = LitertParams.from_params(params)
    calibration_images = RuntimesParams.from_params(params).calibration_images
    models = check_models(hp.models, pipeline_models(params))
    test = load_bottlenecks(layout.bottlenecks, "test")
    keep = len(test.ids) if hp.max_test_images == 0 else min(hp.max_test_images, len(test.ids))
    reference = predict_heads(test, layout.models, models, layout.activations)
    _, items = split_items(layout.split)
    # The int8 calibration rule of the openvino runtime (RuntimeSetup.calibration_items):
    # train images only, round-robin over the classes in sha256 order.
    calibration = [item.path for item in calibration_sample(items["train"], calibration_images)]

    from imgclf.end_to_end import Builder

    build = Builder(layout.backbone)
    metrics = export_and_score(
        build_model=lambda name: build(layout.model_dir(name), name, float32_blocks=True),
        models=models,
        precisions=hp.precisions,
        out_dir=layout.litert,
        calibration_paths=calibration,
        test_paths=[layout.split / str(i) for i in test.ids[:keep]],
        test_labels=np.asarray(test.labels),
        reference=reference,
        num_threads=hp.num_threads,
    )
    metrics["calibration_images"] = len(calibration)
    write_json(layout.litert_metrics, metrics)
    table = markdown_table(metrics)
    layout.litert_md.write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
