"""Executors: where the cache-missing images go through the backbone (the registry).

`fill_cache` is what the bottlenecks and activations stages call: it finds the images a
feature cache lacks and hands them to an executor. An executor gets the pending entries (image
sha256, path) of one cache and fills that cache; what computes a feature is
`imgclf.features.FeatureExtractor` (decode -> view -> preprocess -> model) in every executor,
so the numbers do not depend on where they were computed.

    local  the stage's own process, batch after batch (imgclf/executors/local.py)
    ray    a Ray Data actor pool, local or on a cluster (imgclf/executors/ray_data.py; the
           optional extra `.[ray]`)

`bottlenecks.executor` and `activations.executor` in params.yaml name one; the `ray:` block
configures the Ray one. Modules are imported by name only when chosen, so the local path never
imports Ray. Adding an executor: a module with a class implementing `Executor`, an entry in
`EXECUTORS`, its name in imgclf.params.EXECUTORS.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from imgclf.errors import UserError, first_few
from imgclf.features import FeatureCache, ImageItem, ModelLoader, Pending, Timing, View

# name -> "module:Class"; the class is built with the whole params.yaml (its own block in it).
EXECUTORS: dict[str, str] = {
    "local": "imgclf.executors.local:LocalExecutor",
    "ray": "imgclf.executors.ray_data:RayExecutor",
}


class Executor(Protocol):
    """Computes the features of `pending` into `cache`, each batch written as soon as it is
    done (a killed run resumes from the cache). Entries that cannot be computed are reported
    by raising `ExtractionFailed` after every other entry was written, never dropped."""

    name: str

    def run(
        self,
        pending: Sequence[Pending],
        load_model: ModelLoader,
        cache: FeatureCache,
        *,
        batch_size: int,
        view: View | None,
        desc: str,
        progress: bool,
    ) -> Timing: ...

    def close(self) -> None: ...


class ExtractionFailed(UserError):
    """Some images could not be computed (after the retries); the others are cached.

    `failures` maps each image's path to the last error seen for it."""

    def __init__(self, failures: Mapping[str, str], total: int, attempts: int, desc: str) -> None:
        lines = first_few([f"{path}: {error}" for path, error in failures.items()], 10, "; ")
        super().__init__(
            f"{len(failures)} of {total} images ({desc}) failed after {attempts} attempt(s) "
            f"each: {lines}. The {total - len(failures)} others are cached, so a rerun "
            "computes only these: fix or remove the files (re-run ingest), or the worker nodes' "
            "access to them"
        )
        self.failures = dict(failures)


def executor_class(name: str) -> Callable[..., Executor]:
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    module, _, cls = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_executor(name: str, params: Mapping[str, Any]) -> Executor:
    """The executor `name`, configured from params.yaml (`params`: the whole file)."""
    return executor_class(name)(params)


def fill_cache(
    items: Sequence[ImageItem],
    load_model: ModelLoader,
    cache: FeatureCache,
    *,
    batch_size: int,
    progress: bool = True,
    view: View | None = None,
    desc: str = "bottlenecks",
    executor: Executor | None = None,
) -> dict[str, float]:
    """Compute the features of every item whose content is not cached yet.

    `load_model()` returns the runtime (imgclf.runtimes: anything with `predict(batch)`; a
    Keras model runs as the TensorFlow runtime) and its preprocessing; it is only called when
    something is left to compute (building Inception V3 takes seconds). `view` transforms the
    decoded pixels first (see `imgclf.features.image_batches`); `cache` must then be that view's
    own. `executor` (default: the local loop) computes the missing entries and writes each
    batch to `cache` as soon as it is done, so an interrupted run resumes where it stopped.
    Returns counts and throughput.
    """
    first_path: dict[str, Path] = {}
    for item in items:
        first_path.setdefault(item.sha256, item.path)
    bad_before = cache.bad
    todo = cache.missing(sorted(first_path))
    stats = {
        "images": len(items),
        "computed": len(todo),
        "recomputed_bad": cache.bad - bad_before,  # of `computed`: entries that failed a check
        "cached": len(first_path) - len(todo),
        "seconds": 0.0,
        "startup_seconds": 0.0,
        "images_per_second": 0.0,
    }
    if not todo:
        return stats
    if executor is None:
        from imgclf.executors.local import LocalExecutor

        executor = LocalExecutor()
    timing = executor.run(
        [(sha, first_path[sha]) for sha in todo],
        load_model,
        cache,
        batch_size=batch_size,
        view=view,
        desc=desc,
        progress=progress,
    )
    # `seconds` as before: computing only, after the model (and a cluster) got ready.
    seconds = timing["seconds"]
    return {
        **stats,
        "seconds": seconds,
        "startup_seconds": timing["startup_seconds"],
        "images_per_second": len(todo) / seconds,
    }
