"""Stage activations: each train/test image and its views through the backbone up to the cut."""

from __future__ import annotations

from pathlib import Path

# No TensorFlow import here: a fully cached run needs none (imgclf.activations imports it,
# quietly, only when some activation is left to compute).
from imgclf.activations import ActivationsOptions, describe_cut, run_activations
from imgclf.config import cache_dir, load_params
from imgclf.executors import make_executor
from imgclf.fileio import write_metrics
from imgclf.params import RuntimesParams
from imgclf.registry import check_activations
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    paths = params["paths"]
    options = ActivationsOptions.from_params(params.get("activations"))
    # Reads finetune_models and their blocks without depending on them: the arrays are the same
    # whatever they say, and a fine-tune stage added later checks its inputs itself.
    check_activations(options.cut, options.test_views, params)
    checks = RuntimesParams.from_params(params)
    executor = make_executor(options.executor, params)  # Ray is imported only if it runs
    try:
        stats = run_activations(
            split_dir=Path(paths["split"]),
            backbone_dir=Path(paths["backbone"]),
            out_dir=Path(paths["activations"]),
            cache_root=cache_dir("activations"),
            options=options,
            calibration_images=checks.calibration_images,
            fidelity_images=checks.fidelity_images,
            executor=executor,
        )
    finally:
        executor.close()
    cache_dirs = stats.pop("cache_dirs")
    described = stats.pop("runtime")
    fidelity = described.pop("fidelity", None)
    stats["runtime"] = options.runtime
    stats["precision"] = options.precision
    stats["fidelity"] = fidelity if fidelity is not None else "not measured"
    stats["runtime_info"] = described
    write_metrics(Path(paths["metrics"]) / "activations.json", stats)
    entries = stats["entries"]
    bad = entries["recomputed_bad"]
    recomputed = (
        f" ({bad} of them because their cache entry was bad: corrupt, truncated, or another "
        "image's entry)"
        if bad
        else ""
    )
    print(
        f"activations at {describe_cut(options.cut, options.image_size)}: "
        f"{entries['computed']} entries computed"
        f"{recomputed}, {entries['cached']} from the cache "
        f"({stats['cache_bytes'] / 2**20:.0f} MiB in {len(cache_dirs)} view folders under "
        f"{Path(cache_dirs[0]).parent}); {stats['entries_per_second']:.1f} entries/s "
        f"({options.runtime} {options.precision}); outputs "
        f"{stats['output_bytes'] / 2**20:.0f} MiB; peak RSS {stats['peak_rss_bytes'] / 2**30:.2f} "
        "GiB"
    )


if __name__ == "__main__":
    main()
