"""Benchmark of the backbone runtimes against their targets: every runtime/precision against
TF float32, measured in one run.

    .venv/bin/python bench/runtimes.py [IMAGE_FOLDER] [--per-class 60] [--calibration 288]

IMAGE_FOLDER is a class-folder tree (default ../shared/datasets/flower_photos); `--per-class N`
takes the first N images of each class (60: 300 flower photos). It is split 80/20 into a scratch
workspace (nothing is written to the repo); every phase runs in a fresh process (own peak RSS,
nothing warm), with its own user cache, so the OpenVINO conversion and NNCF quantization are
part of the stage's first run (reported apart from its speed). For each runtime/precision:

- model alone: img/s of `runtime.predict` on preprocessed batches already in memory;
- stage end to end: img/s of the bottlenecks stage's extraction (decode, preprocess, predict,
  cache writes; one-time conversion, quantization and the fidelity gate excluded, shown apart);
- feature match vs TF float32 on every image (worst and mean cosine, max abs difference);
- a linear probe: logistic regression (scikit-learn, standardized) fitted on the train features,
  test accuracy, and its top-1 agreement with the TF float32 probe on the test images.

Ratios hold on a noisy machine better than raw speeds: compare those.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.activations import sample_tree  # noqa: E402  (needs ROOT on sys.path)
from bench.bottlenecks import BATCH, phase, prepare  # noqa: E402

COMBOS = (
    ("tensorflow", "float32"),
    ("tensorflow", "bfloat16"),
    ("openvino", "float32"),
    ("openvino", "bfloat16"),
    ("openvino", "int8"),
)


# ---- phases (each runs in its own process) ------------------------------------------------


def run_stage(workdir: Path, runtime: str, precision: str, calibration: int) -> dict:
    from imgclf.bottlenecks import run_bottlenecks

    start = time.perf_counter()
    stats = run_bottlenecks(
        split_dir=workdir / "split",
        backbone_dir=workdir / "backbone",
        out_dir=workdir / f"bottlenecks-{runtime}-{precision}",
        precision=precision,
        batch_size=BATCH,
        runtime=runtime,
        calibration_images=calibration,
        fidelity_images=20,
        progress=False,
    )
    total = time.perf_counter() - start
    return {
        "images_per_s": stats["images_per_second"],
        "computed": stats["computed"],
        # conversion, quantization, the fidelity gate, building the models
        "setup_s": total - stats["seconds"],
        "fidelity": stats["runtime"].get("fidelity"),
    }


def run_model_alone(workdir: Path, runtime: str, precision: str, calibration: int) -> dict:
    """`predict` on batches decoded beforehand; the runtime comes from the stage's cache (the
    stage phase ran first in this cache), so nothing is converted here."""
    import numpy as np

    import imgclf.quiet_tf  # noqa: F401
    from imgclf.bottlenecks import features_setup
    from imgclf.features import image_batches, split_items
    from imgclf.inception import PREPROCESSORS, load_backbone, read_backbone_info

    _, items = split_items(workdir / "split")
    info = read_backbone_info(workdir / "backbone")
    preprocess = PREPROCESSORS[info["weights"]]
    setup = features_setup(
        info,
        items["train"],
        runtime=runtime,
        precision=precision,
        calibration_images=calibration,
        fidelity_images=4,
        batch_size=BATCH,
    )
    made, _ = setup.make(
        build_model=lambda p: load_backbone(workdir / "backbone", precision=p).model,
        preprocess=preprocess,
    )
    paths = [item.path for item in items["train"][: 2 * BATCH]]
    batches = [np.asarray(b) for b in image_batches(paths, preprocess, BATCH)]
    made.predict(batches[0])  # warm-up (tracing, first-run allocations)
    rounds = 3
    start = time.perf_counter()
    for _ in range(rounds):
        for batch in batches:
            made.predict(batch)
    return {"images_per_s": rounds * sum(map(len, batches)) / (time.perf_counter() - start)}


# ---- the table ----------------------------------------------------------------------------


def compare_features(work: Path, combos: tuple[tuple[str, str], ...]) -> dict[str, dict]:
    """Feature match and linear probe of every combo, from the stages' .npz outputs."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def load(runtime: str, precision: str, subset: str):
        with np.load(work / f"bottlenecks-{runtime}-{precision}" / f"{subset}.npz") as z:
            return z["features"].astype(np.float64), z["labels"]

    def probe(runtime: str, precision: str):
        x, y = load(runtime, precision, "train")
        xt, yt = load(runtime, precision, "test")
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        clf.fit(x, y)
        pred = clf.predict(xt)
        return pred, float((pred == yt).mean())

    ref = {s: load("tensorflow", "float32", s)[0] for s in ("train", "test")}
    ref_pred, _ = probe("tensorflow", "float32")
    out = {}
    for runtime, precision in combos:
        got = {s: load(runtime, precision, s)[0] for s in ("train", "test")}
        a, b = (
            np.concatenate([ref["train"], ref["test"]]),
            np.concatenate([got["train"], got["test"]]),
        )
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        pred, acc = probe(runtime, precision)
        out[f"{runtime} {precision}"] = {
            "cos_min": float(cos.min()),
            "cos_mean": float(cos.mean()),
            "max_abs": float(np.abs(a - b).max()),
            "probe_acc": acc,
            "probe_agree": float((pred == ref_pred).mean()),
        }
    return out


def selected_combos(only: list[str] | None) -> tuple[tuple[str, str], ...]:
    """The combos `--only` names (runtime:precision), after TF float32, the reference every
    ratio divides by."""
    if not only:
        return COMBOS
    wanted = {tuple(name.split(":", 1)) for name in only}
    unknown = wanted - set(COMBOS)
    if unknown:
        known = ", ".join(f"{r}:{p}" for r, p in COMBOS)
        raise SystemExit(f"--only: unknown {sorted(unknown)}; expected some of {known}")
    return tuple(c for c in COMBOS if c == COMBOS[0] or c in wanted)


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    lines = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*lines, *(fmt.format(*row) for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_images = ROOT.parent / "shared" / "datasets" / "flower_photos"
    parser.add_argument("images", nargs="?", type=Path, default=default_images)
    parser.add_argument("--per-class", type=int, default=60, help="images per class (0: all)")
    parser.add_argument("--calibration", type=int, default=288, help="int8 calibration images")
    parser.add_argument("--only", nargs="*", help="combos to run, e.g. openvino:int8")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="tensorflow", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        run = {"prepare": None, "stage": run_stage, "model": run_model_alone}[args.phase]
        if run is None:
            report = {"images": prepare(args.workdir, args.source)}
        else:
            report = run(args.workdir, args.runtime, args.precision, args.calibration)
        print(json.dumps(report))
        return

    combos = selected_combos(args.only)
    if not args.images.is_dir():
        raise SystemExit(f"{args.images} is not a folder of class folders")
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        work = Path(tmp)
        source = sample_tree(args.images.resolve(), work / "sample", args.per_class)
        n = phase("prepare", work, script=__file__, source=source)["images"]
        train = sum(1 for _ in (work / "split" / "train").glob("*/*"))
        print(
            f"{n} images from {args.images} ({train} train), batch {BATCH}, {os.cpu_count()} "
            f"CPUs, int8 calibration on {min(args.calibration, train)} train images",
            flush=True,
        )
        r: dict[str, dict] = {}
        for runtime, precision in combos:
            name = f"{runtime} {precision}"
            kw = {"runtime": runtime, "precision": precision, "calibration": args.calibration}
            r[f"stage {name}"] = phase("stage", work, script=__file__, **kw)
            r[f"model {name}"] = phase("model", work, script=__file__, **kw)
            print(
                f"  {name}: model {r[f'model {name}']['images_per_s']:.1f} img/s, stage "
                f"{r[f'stage {name}']['images_per_s']:.1f} img/s",
                flush=True,
            )
        match = compare_features(work, combos)

    m0 = r["model tensorflow float32"]["images_per_s"]
    s0 = r["stage tensorflow float32"]["images_per_s"]
    rows = []
    for runtime, precision in combos:
        name = f"{runtime} {precision}"
        model, stage, f = r[f"model {name}"], r[f"stage {name}"], match[name]
        exact = name == "tensorflow float32"
        rows.append(
            (
                name,
                f"{model['images_per_s']:.1f}",
                f"{model['images_per_s'] / m0:.2f}x",
                f"{stage['images_per_s']:.1f}",
                f"{stage['images_per_s'] / s0:.2f}x",
                f"{stage['images_per_s'] / model['images_per_s']:.2f}",
                f"{stage['setup_s']:.0f} s",
                "exact" if exact else f"{f['cos_min']:.4f} / {f['cos_mean']:.5f}",
                "0" if exact else f"{f['max_abs']:.2g}",
                f"{100 * f['probe_acc']:.1f}%",
                f"{100 * f['probe_agree']:.1f}%",
                f"{stage['peak_rss_gib']:.2f}",
            )
        )
    header = (
        "runtime precision",
        "model img/s",
        "vs TF f32",
        "stage img/s",
        "vs TF f32",
        "stage / model",
        "setup",
        "cosine min / mean",
        "max abs",
        "probe acc",
        "probe agrees",
        "peak RSS GiB",
    )
    print(table(rows, header))
    print(
        "setup: the stage's one-time work (models built, OpenVINO conversion, NNCF quantization,"
        " fidelity gate), cached after the first run. Targets: int8 stage >= 3.5x,"
        " bf16 stage >= 2.0x TF f32; stage >= 0.85 of its model alone; peak RSS < 3 GiB."
    )


if __name__ == "__main__":
    main()
