"""Executors: where the cache-missing images go through the backbone (the registry).

An executor gets the pending entries (image sha256, path) of one cache and fills that cache;
what computes a feature is `imgclf.features.FeatureExtractor` (decode -> view -> preprocess ->
model) in every executor, so the numbers do not depend on where they were computed.

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
from typing import TYPE_CHECKING, Any, Protocol

from imgclf.errors import UserError

if TYPE_CHECKING:
    from imgclf.features import FeatureCache, ModelLoader, View

# name -> "module:Class"; the class is built with the whole params.yaml (its own block in it).
EXECUTORS: dict[str, str] = {
    "local": "imgclf.executors.local:LocalExecutor",
    "ray": "imgclf.executors.ray_data:RayExecutor",
}

Pending = tuple[str, Path]  # (image sha256, a path to the image)
Timing = dict[str, float]  # "seconds" computing, "startup_seconds" before the first batch


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
        shown = list(failures.items())[:10]
        more = f" and {len(failures) - len(shown)} more" if len(failures) > len(shown) else ""
        lines = "; ".join(f"{path}: {error}" for path, error in shown)
        super().__init__(
            f"{len(failures)} of {total} images ({desc}) failed after {attempts} attempt(s) "
            f"each: {lines}{more}. The {total - len(failures)} others are cached, so a rerun "
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
