"""Stage bottlenecks: every train/test image once through the frozen backbone, cached."""

from __future__ import annotations

from pathlib import Path

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.config import cache_dir, load_params
from imgclf.executors import Executor, make_executor
from imgclf.features import (
    FeatureCache,
    cache_key,
    fill_cache,
    gather_features,
    save_bottlenecks,
    split_items,
)
from imgclf.fileio import write_json, write_metrics
from imgclf.inception import load_backbone, read_backbone_info
from imgclf.params import BottlenecksParams
from imgclf.splitting import SUBSETS
from imgclf.stage import stage_main


def run_bottlenecks(
    *,
    split_dir: Path,
    backbone_dir: Path,
    out_dir: Path,
    precision: str,
    batch_size: int,
    progress: bool = True,
    executor: Executor | None = None,
) -> dict:
    """Fill the feature cache for the split, then write one .npz per subset.

    `executor` computes what the cache lacks (imgclf.executors; default: in this process)."""
    classes, items = split_items(split_dir)
    info = read_backbone_info(backbone_dir)
    key = cache_key(info["sha256"], info["preprocessing"], precision)
    cache = FeatureCache(cache_dir("bottlenecks"), key, dim=info["feature_dim"])

    backbone_path = backbone_dir.resolve()  # also read by Ray workers, whose cwd is not ours

    def load_model():
        backbone = load_backbone(backbone_path, precision=precision)
        return backbone.model, backbone.preprocess

    every_item = [item for subset in SUBSETS for item in items[subset]]
    stats = fill_cache(
        every_item, load_model, cache, batch_size=batch_size, progress=progress, executor=executor
    )
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
    }


@stage_main
def main() -> None:
    params = load_params()
    paths, cfg = params["paths"], BottlenecksParams.from_params(params)
    executor = make_executor(cfg.executor, params)
    try:
        stats = run_bottlenecks(
            split_dir=Path(paths["split"]),
            backbone_dir=Path(paths["backbone"]),
            out_dir=Path(paths["bottlenecks"]),
            precision=cfg.precision,
            batch_size=cfg.batch_size,
            executor=executor,
        )
    finally:
        executor.close()
    write_metrics(
        Path(paths["metrics"]) / "bottlenecks.json",
        {
            "images": stats["images"],
            "feature_dim": stats["feature_dim"],
            "precision": cfg.precision,
            "backbone_sha256": stats["backbone_sha256"],
        },
    )
    bad = stats["recomputed_bad"]
    recomputed = (
        f" ({bad} of them because their cache entry was bad: corrupt, truncated, written by an "
        "older version, or another image's entry)"
        if bad
        else ""
    )
    print(
        f"bottlenecks: {stats['computed']} computed{recomputed}, {stats['cached']} from the "
        f"cache ({stats['cache_dir']}); {stats['images_per_second']:.1f} images/s "
        f"({cfg.executor} executor)"
    )


if __name__ == "__main__":
    main()
