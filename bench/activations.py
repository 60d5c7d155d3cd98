"""Benchmark of the activations stage against the bottlenecks stage, measured in one run.

    .venv/bin/python bench/activations.py [IMAGE_FOLDER] [--per-class 20] [--precision float32]
        [--image-sizes 299 399]

IMAGE_FOLDER is a class-folder tree (default ../shared/datasets/flower_photos); `--per-class N`
takes the first N images of each class (0: all). It is split into a scratch workspace (nothing
is written to the repo) and every phase runs in a fresh process, so each gets its own peak RSS
and nothing warms another. Both stages run on the same split with the same backbone (from
models/backbone when `dvc repro backbone` has run, else converted into the scratch folder).
Prints one table of ratios, which hold on a noisy machine better than raw speeds. With several
`--image-sizes` (activations.image_size), each round also runs the activations stage at each,
against the same bottlenecks run (the bottlenecks are always the backbone's 299).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

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
    repo_block,
    sample_tree,
)

if TYPE_CHECKING:
    from imgclf.activations import ActivationsOptions

TRAIN_VIEWS = ("orig", "flip")
TEST_VIEWS = ("orig",)


# ---- phases (each runs in its own process) ------------------------------------------------


def run_bottlenecks(workdir: Path, precision: str) -> dict:
    from imgclf.bottlenecks import run_bottlenecks

    stats = run_bottlenecks(
        split_dir=workdir / "split",
        backbone_dir=workdir / "backbone",
        out_dir=workdir / "bottlenecks",
        precision=precision,
        batch_size=BATCH,
        progress=False,
    )
    return {"images_per_s": stats["images_per_second"], "computed": stats["computed"]}


def activations_options(precision: str, image_size: int) -> ActivationsOptions:
    """params.yaml's `activations` block with the bench's views, precision, size and batch, on
    TensorFlow and the local executor (what the bottlenecks run on)."""
    from imgclf.activations import ActivationsOptions

    return ActivationsOptions.from_params(
        repo_block(
            "activations",
            train_views=list(TRAIN_VIEWS),
            test_views=list(TEST_VIEWS),
            runtime="tensorflow",
            precision=precision,
            batch_size=BATCH,
            executor="local",
            image_size=image_size,
        )
    )


def run_activations(workdir: Path, precision: str, image_size: int) -> dict:
    from imgclf.activations import run_activations as run

    options = activations_options(precision, image_size)
    stats = run(
        split_dir=workdir / "split",
        backbone_dir=workdir / "backbone",
        out_dir=workdir / "activations",
        cache_root=workdir / "cache" / "activations",
        options=options,
        progress=False,
    )
    stats.pop("cache_dirs")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "images",
        nargs="?",
        type=Path,
        default=DEFAULT_IMAGES,
    )
    parser.add_argument("--per-class", type=int, default=0, help="images per class (0: all)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    # Other jobs on this machine swing raw speeds by 2x within minutes: each round runs both
    # stages back to back from empty caches, and only ratios within a round are compared.
    parser.add_argument("--rounds", type=int, default=2, help="bottlenecks/activations pairs")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[299],
                        help="activations.image_size values, each run in every round")  # fmt: skip
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)  # one phase's
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        report = {
            "prepare": lambda: {"images": prepare(args.workdir, args.source)},
            "bottlenecks": lambda: run_bottlenecks(args.workdir, args.precision),
            "activations": lambda: run_activations(args.workdir, args.precision, args.image_size),
        }[args.phase]()
        print(json.dumps(report))
        return

    check_image_folder(args.images)
    with tempfile.TemporaryDirectory(prefix="bench-activations-") as tmp:
        work = Path(tmp)
        source = args.images.resolve()
        if args.per_class:
            source = sample_tree(source, work / "sample", args.per_class)
        n = phase("prepare", work, script=__file__, source=source)["images"]
        print(
            f"{n} images from {args.images} ({args.per_class or 'all'} per class), batch "
            f"{BATCH}, {args.precision}, train views {list(TRAIN_VIEWS)}, test views "
            f"{list(TEST_VIEWS)}, image sizes {args.image_sizes}, {load_average()}",
            flush=True,
        )
        rounds = []  # (bottlenecks, {size: activations cold}) per round
        for _ in range(args.rounds):
            shutil.rmtree(work / "cache" / "bottlenecks", ignore_errors=True)
            bott = phase("bottlenecks", work, script=__file__, precision=args.precision)
            colds = {}
            for size in args.image_sizes:
                shutil.rmtree(work / "cache" / "activations", ignore_errors=True)
                colds[size] = phase("activations", work, script=__file__,
                                    precision=args.precision, image_size=size)  # fmt: skip
            rounds.append((bott, colds))
        warm = phase("activations", work, script=__file__, precision=args.precision,
                     image_size=args.image_sizes[-1])  # fmt: skip
        assert warm["entries"]["computed"] == 0, warm

    rows = []
    several = len(args.image_sizes) > 1
    for i, (bott, colds) in enumerate(rounds, 1):
        rows.append(
            (
                f"round {i}: bottlenecks stage (compute)",
                f"{bott['images_per_s']:.1f} img/s",
                "1.00",
                "",
            )
        )
        for size, cold in colds.items():
            at = f" at {size}" if several else ""
            rows.append(
                (
                    f"round {i}: activations stage{at} (compute), per view",
                    f"{cold['entries_per_second']:.1f} entries/s",
                    f"{bott['images_per_s'] / cold['entries_per_second']:.2f} x bottlenecks' cost",
                    "target <= 1.3",
                )
            )
    # The last size of the last round: the cold run the cached rerun repeats.
    size, cold = list(rounds[-1][1].items())[-1]
    entries = cold["entries"]["computed"]
    at = f" at {size}" if several else ""
    rows += [
        (
            f"activations stage{at}, cold (process wall)",
            f"{cold['wall_s']:.1f} s",
            f"{entries} entries",
            "",
        ),
        (f"cached rerun{at} (process wall)", f"{warm['wall_s']:.1f} s", "", "target < 10 s"),
        (
            f"peak RSS, activations{at} cold",
            f"{cold['peak_rss_gib']:.2f} GiB",
            "",
            "target < 6 GiB",
        ),
        ("peak RSS, cached rerun", f"{warm['peak_rss_gib']:.2f} GiB", "", ""),
        (
            f"activation cache on disk{at}",
            f"{cold['cache_bytes'] / 2**20:.0f} MiB",
            f"{cold['cache_bytes'] / entries / 1024:.0f} KiB an entry",
            "",
        ),
        ("outputs (.npy + index)", f"{cold['output_bytes'] / 2**20:.0f} MiB", "", ""),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
