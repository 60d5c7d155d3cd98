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
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 32


def phase(name: str, workdir: Path, script: str | Path = __file__, **kwargs) -> dict:
    """Run one phase of `script` (this file, or another bench) in a fresh Python; return its
    JSON report plus its peak RSS."""
    cmd = [sys.executable, str(script), "--phase", name, "--workdir", str(workdir)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGCLF_CACHE_DIR": str(workdir / "cache")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    start = time.perf_counter()
    # TensorFlow's C++ start-up notices go to stderr whatever TF_CPP_MIN_LOG_LEVEL says:
    # keep them out of the table, show them only when a phase fails.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=workdir)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace"))
            raise SystemExit(f"phase {name} failed (status {status})")
    report = json.loads(out.decode().strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - start
    report["peak_rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return report


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
    from stages.bottlenecks import run_bottlenecks

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


def prepare(workdir: Path, image_folder: Path) -> int:
    """Split the folder into workdir/split (hard links) and put a backbone in workdir."""
    from imgclf.fileio import sha256_file, write_csv
    from imgclf.images import BadImage, inspect_image
    from imgclf.splitting import assign_subsets, write_split_trees

    rows = []
    for path in sorted(image_folder.glob("*/*")):
        try:
            inspect_image(path)
        except BadImage:
            continue
        rows.append(
            {
                "class": path.parent.name,
                "file": f"{path.parent.name}/{path.name}",
                "sha256": sha256_file(path),
            }
        )
    subsets = assign_subsets(rows, test_fraction=0.2, seed=0, min_per_class=1)
    split_rows = write_split_trees(rows, subsets, image_folder, workdir / "split")
    write_csv(workdir / "split" / "manifest.csv", ["class", "file", "sha256", "subset"], split_rows)

    backbone = workdir / "backbone"
    if (ROOT / "models" / "backbone" / "backbone.json").is_file():
        backbone.symlink_to(ROOT / "models" / "backbone")
    else:
        from imgclf.inception import build_backbone, save_backbone

        model, source = build_backbone("tf-2015")
        save_backbone(model, backbone, "tf-2015", source)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "images",
        nargs="?",
        type=Path,
        default=ROOT.parent / "shared" / "datasets" / "flower_photos",
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

    if not args.images.is_dir():
        raise SystemExit(f"{args.images} is not a folder of class folders")
    with tempfile.TemporaryDirectory(prefix="bench-bottlenecks-") as tmp:
        work = Path(tmp)
        n = phase("prepare", work, source=args.images.resolve())["images"]
        print(f"{n} images from {args.images}, batch {BATCH}, {os.cpu_count()} CPUs", flush=True)
        r = {}
        for precision in ("float32", "bfloat16"):
            r[f"ceiling {precision}"] = phase(
                "ceiling", work, precision=precision, ceiling_batches=args.ceiling_batches
            )
            r[f"stage {precision}"] = phase("stage", work, precision=precision)
        r["naive"] = phase("naive", work, naive=args.naive)
        r["warm"] = phase("stage", work, precision="float32")
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
    header = ("measure", "value", "ratio", "target")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    print(fmt.format(*header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(fmt.format(*row))


if __name__ == "__main__":
    main()
