"""The bottlenecks stage's work: every train/test image once through the frozen backbone (the
pooled features), computed where the feature cache lacks them, then written as the bottleneck
files (imgclf/bottleneck_files.py says what they hold, for the stages that read them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imgclf.config import cache_dir
from imgclf.executors import Executor, fill_cache
from imgclf.features import (
    FeatureCache,
    ImageItem,
    cache_key,
    gather_features,
    save_bottlenecks,
    split_items,
)
from imgclf.fileio import write_json
from imgclf.inception import load_backbone, read_backbone_info
from imgclf.runtime_setup import RuntimeSetup, recorded
from imgclf.splitting import SUBSETS

FIDELITY_FILE = "fidelity.json"  # in the cache folder: the gate its features passed


def features_setup(
    info: Mapping[str, Any],
    train_items: Sequence[ImageItem],
    *,
    runtime: str,
    precision: str,
    calibration_images: int,
    fidelity_images: int,
    batch_size: int,
) -> RuntimeSetup:
    """The runtime setup of this stage: the whole backbone's pooled features, its calibration
    and fidelity images drawn from `train_items`. The runtime bench measures the same one."""
    return RuntimeSetup(
        runtime=runtime,
        precision=precision,
        section="bottlenecks",
        kind="features",
        backbone_info=info,
        cut=None,
        train_items=train_items,
        calibration_images=calibration_images,
        fidelity_images=fidelity_images,
        batch_size=batch_size,
    )


def run_bottlenecks(
    *,
    split_dir: Path,
    backbone_dir: Path,
    out_dir: Path,
    precision: str,
    batch_size: int,
    runtime: str = "tensorflow",
    calibration_images: int = 288,
    fidelity_images: int = 20,
    progress: bool = True,
    executor: Executor | None = None,
) -> dict:
    """Fill the feature cache for the split (with `runtime` at `precision`, held to its
    fidelity gate first), then write one .npz per subset.

    `executor` computes what the cache lacks (imgclf.executors; default: in this process)."""
    classes, items = split_items(split_dir)
    info = read_backbone_info(backbone_dir)
    setup = features_setup(
        info,
        items["train"],
        runtime=runtime,
        precision=precision,
        calibration_images=calibration_images,
        fidelity_images=fidelity_images,
        batch_size=batch_size,
    )
    key = cache_key(info["sha256"], info["preprocessing"], setup.feature_tag)
    cache = FeatureCache(cache_dir("bottlenecks"), key, dim=info["feature_dim"])

    backbone_path = backbone_dir.resolve()  # also read by Ray workers, whose cwd is not ours
    record = cache.dir / FIDELITY_FILE

    def load_model():
        # Runs where the images are computed: here, or in each Ray actor (so no functools
        # cache of a local function: it would not pickle).
        backbones: dict[str, Any] = {}

        def backbone(model_precision: str) -> Any:
            if model_precision not in backbones:
                backbones[model_precision] = load_backbone(backbone_path, precision=model_precision)
            return backbones[model_precision]

        preprocess = backbone("float32").preprocess
        made = setup.make_recorded(
            record, build_model=lambda p: backbone(p).model, preprocess=preprocess
        )
        return made, preprocess

    every_item = [item for subset in SUBSETS for item in items[subset]]
    stats = fill_cache(
        every_item, load_model, cache, batch_size=batch_size, progress=progress, executor=executor
    )
    report = recorded(record)
    for subset in SUBSETS:
        features = gather_features(items[subset], cache)
        save_bottlenecks(out_dir / f"{subset}.npz", items[subset], features)
    write_json(out_dir / "classes.json", classes)
    return {
        **stats,
        "cache_dir": str(cache.dir),
        "images": {subset: len(items[subset]) for subset in SUBSETS},
        "feature_dim": cache.dim,
        "backbone_sha256": info["sha256"],
        "runtime": report,
    }
