"""Benchmark of the ray executor against the local one: what Ray costs on one machine.

    .venv/bin/python bench/ray_executor.py [IMAGE_FOLDER] [--images 200] [--batch 32]

(`make bench-ray`.) IMAGE_FOLDER is a class-folder tree (default
../shared/datasets/flower_photos); the first --images photos, taken round-robin over the
classes, go through the real Inception V3 backbone (converted once into a scratch folder)
three times, each in a fresh process with an empty cache: the local executor, Ray with 1 actor,
Ray with 2 actors (a local Ray instance, `ray.address: local`, 1 CPU per actor). Prints one
table of ratios measured in this run:

- throughput in steady state: images after the first batch came back / time since then
  (the same measure for every executor, so model loading and Ray's start-up are left out);
- end to end: every image / wall time of `fill_cache`, start-ups included;
- Ray's start-up (`ray.init` of a local instance) and the first batch's latency (actors
  importing TensorFlow, loading and tracing the backbone);
- peak RSS of the driver (the stage's process) and of each actor (VmHWM, sampled);
- whether the features are bit-identical to the local executor's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import repo_block, require_ray  # noqa: E402  (needs ROOT on sys.path)


def sample_paths(folder: Path, n: int) -> list[Path]:
    classes = [sorted(d.glob("*.jpg")) for d in sorted(folder.iterdir()) if d.is_dir()]
    out: list[Path] = []
    for i in range(max(map(len, classes))):
        out += [c[i] for c in classes if i < len(c)]
    return out[:n]


class ActorMemory(threading.Thread):
    """The largest VmHWM (peak RSS) of this process's Ray actors, sampled until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.wait(0.2):
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    text = status.read_text()
                    cmd = (status.parent / "cmdline").read_bytes()
                except OSError:
                    continue
                if not cmd.startswith(b"ray::MapWorker") or not _descends(status.parent, me):
                    continue
                hwm = _vm_hwm_kib(text)
                pid = int(status.parent.name)
                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), hwm)


def _vm_hwm_kib(status: Path | str) -> int:
    """Peak RSS of a process, from /proc/<pid>/status. Not getrusage's ru_maxrss: that one
    survives exec, so a phase would report the peak of the process that started it."""
    text = status.read_text() if isinstance(status, Path) else status
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _descends(proc: Path, ancestor: int) -> bool:
    pid = int(proc.name)
    for _ in range(20):
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def run_phase(workdir: Path, executor: str, actors: int, n: int, batch: int, source: Path) -> dict:
    from imgclf.executors import fill_cache, make_executor
    from imgclf.features import FeatureCache, ImageItem, gather_features
    from imgclf.fileio import sha256_file

    paths = sample_paths(source, n)
    items = [ImageItem(str(p), p, sha256_file(p), 0) for p in paths]
    puts: list[float] = []

    class TimedCache(FeatureCache):
        def put(self, sha256: str, array: np.ndarray) -> None:
            super().put(sha256, array)
            puts.append(time.perf_counter())

    cache = TimedCache(workdir / f"cache-{executor}-{actors}", "k", dim=2048)
    params = {"ray": repo_block("ray", address="local", actors=actors, cpus_per_actor=1,
                                attempts=3)}  # fmt: skip
    backbone_dir = workdir / "backbone"

    def load_model():
        from imgclf.inception import load_backbone

        backbone = load_backbone(backbone_dir)
        return backbone.model, backbone.preprocess

    memory = ActorMemory()
    memory.start()
    ex = make_executor(executor, params)
    start = time.perf_counter()
    try:
        stats = fill_cache(items, load_model, cache, batch_size=batch, progress=False, executor=ex)
    finally:
        memory.stop.set()
        ex.close()
    wall = time.perf_counter() - start
    memory.join()
    first = puts[0] if puts else start
    n_first = sum(1 for t in puts if t <= first + 1e-3)  # the first batch written at once
    features = gather_features(items, cache)
    np.save(workdir / f"features-{executor}-{actors}.npy", features)
    return {
        "computed": stats["computed"],
        "steady_ips": (len(puts) - n_first) / (puts[-1] - first),
        "end_to_end_ips": len(items) / wall,
        "startup_s": stats["startup_seconds"],
        "first_batch_s": first - start,
        "driver_peak_gib": _vm_hwm_kib(Path("/proc/self/status")) / 2**20,
        "actor_peak_gib": [kib / 2**20 for kib in memory.peak_kib.values()],
        "driver_imported_tf": "tensorflow" in sys.modules,
    }


def phase(workdir: Path, **kwargs) -> dict:
    cmd = [sys.executable, __file__, str(kwargs.pop("source")), "--workdir", str(workdir)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, env=env, check=False)
        if proc.returncode != 0:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-5000:])
            raise SystemExit(f"phase {kwargs} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = ROOT.parent / "shared" / "datasets" / "flower_photos"
    parser.add_argument("source", nargs="?", type=Path, default=default)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--executor", help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    source = args.source.resolve()

    if args.executor:  # one phase, in its own process
        report = run_phase(
            args.workdir, args.executor, args.actors, args.images, args.batch, source
        )
        print(json.dumps(report))
        return

    if not source.is_dir():
        raise SystemExit(f"{source} is not a folder of class folders")
    if args.images < 6 * args.batch:
        # Ray hands back batches in bursts: with few after the first, "steady state" is mostly
        # the time inside one burst (at batch 32, 2 actors: 64 images gave 4,084 img/s and 128
        # gave 1.54x local, where 200, the default, gives 1.01x).
        raise SystemExit(
            f"--images {args.images} is under 6 batches of {args.batch}: the steady-state rate "
            "needs several batches after the first; give --images of at least "
            f"{6 * args.batch} (or a smaller --batch)"
        )
    require_ray()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up lines)
        from imgclf import inception

        model, info = inception.build_backbone("tf-2015")
        inception.save_backbone(model, work / "backbone", "tf-2015", info)
        del model
        print(
            f"{args.images} images of {source}, batch {args.batch}, {os.cpu_count()} CPUs",
            flush=True,
        )
        runs = {}
        for name, executor, actors in [
            ("local", "local", 1),
            ("ray, 1 actor", "ray", 1),
            ("ray, 2 actors", "ray", 2),
        ]:
            kw = {"executor": executor, "actors": actors, "images": args.images}
            runs[name] = phase(work, batch=args.batch, source=source, **kw)
            runs[name]["features"] = np.load(work / f"features-{executor}-{actors}.npy")
            print(f"  {name}: done", flush=True)

    local = runs["local"]
    print()
    print("| executor | steady img/s | vs local | end to end img/s | vs local | start-up s | "
          "first batch s | driver peak GiB | actor peak GiB | features vs local |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in runs.items():
        diff = float(np.abs(r["features"] - local["features"]).max())
        same = "bit-identical" if diff == 0 else f"max abs {diff:.2e}"
        actors = ", ".join(f"{g:.2f}" for g in r["actor_peak_gib"]) or "-"
        print(
            f"| {name} | {r['steady_ips']:.1f} | {r['steady_ips'] / local['steady_ips']:.2f} | "
            f"{r['end_to_end_ips']:.1f} | {r['end_to_end_ips'] / local['end_to_end_ips']:.2f} | "
            f"{r['startup_s']:.1f} | {r['first_batch_s']:.1f} | {r['driver_peak_gib']:.2f} | "
            f"{actors} | {'-' if name == 'local' else same} |"
        )
    two = runs["ray, 2 actors"]["steady_ips"] / local["steady_ips"]
    print(
        f"\nRay overhead with 2 actors in steady state: {100 * (1 - two):.0f}% "
        "(target < 15%); start-up = ray.init of a local instance (local: model load)."
    )


if __name__ == "__main__":
    main()
