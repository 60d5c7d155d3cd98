"""Stage bottlenecks: every train/test image once through the frozen backbone, cached."""

from __future__ import annotations

from pathlib import Path

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.bottlenecks import run_bottlenecks
from imgclf.config import load_params
from imgclf.executors import make_executor
from imgclf.fileio import write_metrics
from imgclf.params import BottlenecksParams, RuntimesParams
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    paths, cfg = params["paths"], BottlenecksParams.from_params(params)
    checks = RuntimesParams.from_params(params)
    executor = make_executor(cfg.executor, params)
    try:
        stats = run_bottlenecks(
            split_dir=Path(paths["split"]),
            backbone_dir=Path(paths["backbone"]),
            out_dir=Path(paths["bottlenecks"]),
            precision=cfg.precision,
            batch_size=cfg.batch_size,
            runtime=cfg.runtime,
            calibration_images=checks.calibration_images,
            fidelity_images=checks.fidelity_images,
            executor=executor,
        )
    finally:
        executor.close()
    fidelity = stats["runtime"].get("fidelity")
    write_metrics(
        Path(paths["metrics"]) / "bottlenecks.json",
        {
            "images": stats["images"],
            "feature_dim": stats["feature_dim"],
            "runtime": cfg.runtime,
            "precision": cfg.precision,
            "backbone_sha256": stats["backbone_sha256"],
            # The gate these features passed (numbers: metrics), or "reference" for TF float32.
            "fidelity": fidelity if fidelity is not None else "not measured",
            "runtime_info": {k: v for k, v in stats["runtime"].items() if k != "fidelity"},
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
        f"({cfg.runtime} {cfg.precision}, {cfg.executor} executor)"
    )


if __name__ == "__main__":
    main()
