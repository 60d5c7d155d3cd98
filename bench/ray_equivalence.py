"""The bottlenecks stage on a whole image folder with the local and the ray executor: are the
.npz files the same bytes?

    .venv/bin/python bench/ray_equivalence.py [IMAGE_FOLDER] [--actors 2] [--batch 32]

IMAGE_FOLDER (default ../shared/datasets/flower_photos) is split 80/20 into a scratch folder
(hard links), the backbone converted there, and `run_bottlenecks` runs twice, each with its own
empty cache: executor local, then executor ray (a local Ray instance). Prints the timings and
the comparison of train.npz, test.npz and classes.json (max abs difference when they differ).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import repo_block, require_ray  # noqa: E402  (needs ROOT on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = ROOT.parent / "shared" / "datasets" / "flower_photos"
    parser.add_argument("source", nargs="?", type=Path, default=default)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    require_ray()

    import imgclf.quiet_tf  # noqa: F401
    from imgclf import inception
    from imgclf.bottlenecks import run_bottlenecks
    from imgclf.executors import make_executor
    from imgclf.fileio import sha256_file, write_csv

    with tempfile.TemporaryDirectory(prefix="ray-equivalence-") as tmp:
        work = Path(tmp)
        rows = []
        for i, path in enumerate(sorted(args.source.resolve().glob("*/*.jpg"))):
            subset = "test" if i % 5 == 4 else "train"
            file = f"{subset}/{path.parent.name}/{path.name}"
            (work / "split" / file).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, work / "split" / file)
            row = {"class": path.parent.name, "file": file, "sha256": sha256_file(path)}
            rows.append({**row, "subset": subset})
        write_csv(work / "split" / "manifest.csv", ["class", "file", "sha256", "subset"], rows)
        model, info = inception.build_backbone("tf-2015")
        inception.save_backbone(model, work / "backbone", "tf-2015", info)
        del model
        print(f"{len(rows)} images, batch {args.batch}, ray with {args.actors} actors", flush=True)

        params = {"ray": repo_block("ray", address="local", actors=args.actors,
                                    cpus_per_actor=1, attempts=3)}  # fmt: skip
        out = {}
        for name in ("local", "ray"):
            os.environ["IMGCLF_CACHE_DIR"] = str(work / f"cache-{name}")
            executor = make_executor(name, params)
            start = time.perf_counter()
            try:
                stats = run_bottlenecks(
                    split_dir=work / "split",
                    backbone_dir=work / "backbone",
                    out_dir=work / f"out-{name}",
                    precision="float32",
                    batch_size=args.batch,
                    executor=executor,
                )
            finally:
                executor.close()
            print(
                f"{name}: {stats['computed']} computed in {time.perf_counter() - start:.0f} s "
                f"({stats['images_per_second']:.1f} img/s after a "
                f"{stats['startup_seconds']:.0f} s start-up)",
                flush=True,
            )
            out[name] = work / f"out-{name}"
        for file in ("train.npz", "test.npz", "classes.json"):
            a, b = (out[name] / file for name in ("local", "ray"))
            if a.read_bytes() == b.read_bytes():
                print(f"{file}: identical bytes")
            elif file.endswith(".json"):
                print(f"{file}: DIFFERENT")
            else:
                with np.load(a) as x, np.load(b) as y:
                    diff = np.abs(x["features"] - y["features"]).max()
                print(f"{file}: DIFFERENT, features max abs {diff:.3g}")


if __name__ == "__main__":
    main()
