"""The local executor: the stage's own process computes batch after batch (the default)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgclf.features import FeatureCache, ModelLoader, Pending, Timing, View


class LocalExecutor:
    name = "local"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        pass  # nothing to configure: the stage's batch size is passed to `run`

    def run(
        self,
        pending: Sequence[Pending],
        load_model: ModelLoader,
        cache: FeatureCache,
        *,
        batch_size: int,
        view: View | None = None,
        desc: str = "bottlenecks",
        progress: bool = True,
    ) -> Timing:
        from tqdm import tqdm

        from imgclf.features import FeatureExtractor

        start = time.perf_counter()
        extractor = FeatureExtractor(load_model)
        ready = time.perf_counter()
        shas = [sha for sha, _ in pending]
        with tqdm(total=len(pending), unit="img", desc=desc, disable=not progress) as bar:
            done = 0
            for features in extractor.batches([p for _, p in pending], batch_size, view):
                for sha, vector in zip(shas[done : done + len(features)], features, strict=True):
                    cache.put(sha, vector)
                done += len(features)
                bar.update(len(features))
        return {"seconds": time.perf_counter() - ready, "startup_seconds": ready - start}

    def close(self) -> None:
        pass
