"""Benchmark of the LiteRT (TFLite) export against its targets: one model's float32, float16
and int8 files against the TF model, on the first N test images, measured in one run.

    .venv/bin/python bench/litert.py [WORKDIR] [--model tf] [--images 200] [--threads 2]

WORKDIR is a pipeline workspace where the model's stage has run (default: this repository), e.g.
a scratch clone with `data.source` set to ../shared/datasets/flower_photos and
`dvc repro train@tf`. Nothing is written there: the files go to a temporary folder. The export
is imgclf/litert.py's, as the export stage runs it (int8 calibrated on the
runtimes.calibration_images rule), and the TF model is timed on the very pixels the files get
(decoded and resized once, batch 1 like the files: what a phone app does per frame).

Printed: per precision the file size and its ratio to float32, test accuracy and its change
from the TF model's, top-1 agreement, max abs probability difference, img/s and its ratio to
TF's; conversion seconds apart. Ratios hold on a shared machine better than raw speeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?", type=Path, default=ROOT)
    parser.add_argument("--model", default="tf")
    parser.add_argument("--images", type=int, default=200, help="first N test images")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    # The TF model's threads, as many as the files': TensorFlow reads this when it starts (in
    # imgclf.quiet_tf, which keeps its C++ start-up lines off the table's output).
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)
    import numpy as np

    import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow starts here)
    from imgclf.bottleneck_files import load_bottlenecks
    from imgclf.config import load_params
    from imgclf.end_to_end import build
    from imgclf.features import split_items
    from imgclf.fidelity import calibration_sample
    from imgclf.layout import Layout
    from imgclf.litert import PRECISIONS, export_and_score, preprocessed_pixels
    from imgclf.params import RuntimesParams
    from imgclf.predictions import predict_heads

    params = load_params(args.workdir / "params.yaml")
    layout = Layout.from_params(params, args.workdir)
    test = load_bottlenecks(layout.bottlenecks, "test")
    reference = predict_heads(test, layout.models, [args.model], layout.activations)
    _, items = split_items(layout.split)
    n_cal = RuntimesParams.from_params(params).calibration_images
    calibration = [i.path for i in calibration_sample(items["train"], n_cal)]
    paths = [layout.split / str(i) for i in test.ids[: args.images]]
    model = build(layout.backbone, layout.model_dir(args.model), args.model)

    with tempfile.TemporaryDirectory() as tmp:
        metrics = export_and_score(
            build_model=lambda name: model,
            models=[args.model],
            precisions=PRECISIONS,
            out_dir=tmp,
            calibration_paths=calibration,
            test_paths=paths,
            test_labels=np.asarray(test.labels),
            reference=reference,
            num_threads=args.threads,
        )
    # TF on the same pixels, batch 1, graph-compiled (the fair comparison with an interpreter).
    import tensorflow as tf  # started quietly above

    fn = tf.function(model.probabilities_of_preprocessed)
    seconds = 0.0
    for k, pixels in enumerate(preprocessed_pixels(paths, model.preprocess)):
        x = tf.constant(pixels)
        start = time.perf_counter()
        fn(x).numpy()
        if k:  # the first call traces the graph
            seconds += time.perf_counter() - start
    tf_speed = (len(paths) - 1) / seconds

    f32 = metrics["files"][f"{args.model}-float32"]
    print(
        f"\n{args.model} on {len(paths)} test images of {args.workdir} "
        f"({len(calibration)} calibration images, {args.threads} threads)\n"
    )
    print(
        "| precision | size MB | size ratio vs float32 | accuracy | Δ vs TF (pt) | top-1 agreement "
        "| max abs Δ prob | img/s | speed vs TF | convert s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| TF (SavedModel graph) | | | {f32['tf_accuracy']:.3f} | | | | {tf_speed:.1f} | 1.00 | |"
    )
    for precision in PRECISIONS:
        r = metrics["files"][f"{args.model}-{precision}"]
        print(
            f"| {precision} | {r['size_mb']:.1f} | {1 / r['size_ratio_vs_float32']:.3f} "
            f"(1/{r['size_ratio_vs_float32']:.2f}) | {r['accuracy']:.3f} | "
            f"{100 * r['accuracy_delta']:+.1f} | {r['top1_agreement']:.3f} | "
            f"{r['max_abs_prob_diff']:.2g} | {r['images_per_second']:.1f} | "
            f"{r['images_per_second'] / tf_speed:.2f} | {r['convert_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
