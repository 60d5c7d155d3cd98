"""Benchmark of the bottleneck stage: how close it runs to the backbone's own speed.

    .venv/bin/python bench/bottlenecks.py [IMAGE_FOLDER] [--naive 48] [--ceiling-batches 6]

IMAGE_FOLDER is a class-folder tree (default ../shared/datasets/flower_photos). It is split
into a scratch workspace (nothing is written to the repo) and every phase runs in a fresh
process, so each gets its own peak RSS and nothing warms another. The backbone comes from
models/backbone when `dvc repro backbone` has run, else it is converted once into the scratch
folder. Prints one table; compare ratios, which hold on a noisy machine, not raw speeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402  (needs ROOT on sys.path)
    BATCH,
    DEFAULT_IMAGES,
    check_image_folder,
    load_average,
    phase,
    prepare,
    print_table,
)

# ---- phases (each runs in its own process) ------------------------------------------------


def run_ceiling(workdir: Path, precision: str, batches: int) -> dict:
    import tensorflow as tf

    from imgclf.inception import load_backbone

    backbone = load_backbone(workdir / "backbone", precision=precision)
    x = tf.random.uniform((BATCH, 299, 299, 3), -1.0, 1.0, seed=0)
    infer = tf.function(lambda t: backbone.model(t, training=False))
    infer(x).numpy()  # trace and warm up
    start = time.perf_counter()
    for _ in range(batches):
        infer(x).numpy()
    return {"images_per_s": batches * BATCH / (time.perf_counter() - start)}


def run_stage(workdir: Path, precision: str) -> dict:
    from imgclf.bottlenecks import run_bottlenecks

    stats = run_bottlenecks(
        split_dir=workdir / "split",
        backbone_dir=workdir / "backbone",
        out_dir=workdir / f"bottlenecks-{precision}",
        precision=precision,
        batch_size=BATCH,
        progress=False,
    )
    return {"images_per_s": stats["images_per_second"], "computed": stats["computed"]}


def run_naive(workdir: Path, images: int) -> dict:
    """What users write first: one image at a time through model.predict."""
    from imgclf.fileio import read_csv
    from imgclf.images import load_rgb
    from imgclf.inception import load_backbone

    backbone = load_backbone(workdir / "backbone")
    rows = read_csv(workdir / "split" / "manifest.csv")[: images + 1]
    paths = [workdir / "split" / row["file"] for row in rows]
    backbone.model.predict(backbone.preprocess(load_rgb(paths[0])), verbose=0)  # warm-up
    start = time.perf_counter()
    for path in paths[1:]:
        backbone.model.predict(backbone.preprocess(load_rgb(path)), verbose=0)
    return {"images_per_s": images / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "images",
        nargs="?",
        type=Path,
        default=DEFAULT_IMAGES,
    )
    parser.add_argument("--naive", type=int, default=48, help="images for the naive baseline")
    # As long as a good part of the stage's own run: this machine's speed drifts over minutes.
    parser.add_argument("--ceiling-batches", type=int, default=20)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        report = {
            "prepare": lambda: {"images": prepare(args.workdir, args.source)},
            "ceiling": lambda: run_ceiling(args.workdir, args.precision, args.ceiling_batches),
            "stage": lambda: run_stage(args.workdir, args.precision),
            "naive": lambda: run_naive(args.workdir, args.naive),
        }[args.phase]()
        print(json.dumps(report))
        return

    check_image_folder(args.images)
    with tempfile.TemporaryDirectory(prefix="bench-bottlenecks-") as tmp:
        work = Path(tmp)
        n = phase("prepare", work, script=__file__, source=args.images.resolve())["images"]
        print(f"{n} images from {args.images}, batch {BATCH}, {load_average()}", flush=True)
        r = {}
        for precision in ("float32", "bfloat16"):
            r[f"ceiling {precision}"] = phase(
                "ceiling", work, __file__, precision=precision, ceiling_batches=args.ceiling_batches
            )
            r[f"stage {precision}"] = phase("stage", work, __file__, precision=precision)
        r["naive"] = phase("naive", work, __file__, naive=args.naive)
        r["warm"] = phase("stage", work, __file__, precision="float32")
        assert r["warm"]["computed"] == 0

    ceil32, ceil16 = r["ceiling float32"]["images_per_s"], r["ceiling bfloat16"]["images_per_s"]
    stage32, stage16 = r["stage float32"]["images_per_s"], r["stage bfloat16"]["images_per_s"]
    naive = r["naive"]["images_per_s"]
    rows = [
        ("backbone alone, float32 (ceiling)", f"{ceil32:.1f} img/s", "1.00", ""),
        ("backbone alone, bfloat16", f"{ceil16:.1f} img/s", f"{ceil16 / ceil32:.2f} x fp32", ""),
        (
            "stage end to end, float32",
            f"{stage32:.1f} img/s",
            f"{stage32 / ceil32:.2f} of ceiling",
            "target >= 0.90",
        ),
        (
            "stage end to end, bfloat16",
            f"{stage16:.1f} img/s",
            f"{stage16 / stage32:.2f} x fp32 stage",
            "target >= 1.5",
        ),
        (
            "naive: model.predict per image",
            f"{naive:.1f} img/s",
            f"stage is {stage32 / naive:.1f} x faster",
            "",
        ),
        (
            "warm re-run, all cached (process wall)",
            f"{r['warm']['wall_s']:.1f} s",
            "",
            "target < 10 s",
        ),
        (
            "peak RSS, stage float32",
            f"{r['stage float32']['peak_rss_gib']:.2f} GiB",
            "",
            "target < 3 GiB",
        ),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
