"""The Ray executor: the cache-missing images through a Ray Data actor pool (`.[ray]` extra).

    pending (sha, path) -> batches of the stage's batch_size, in the local executor's order
      -> ray.data.from_items (one block per batch)
      -> map_batches(_BackboneWorker, concurrency=ray.actors, num_cpus=ray.cpus_per_actor)
         each actor loads the backbone once (FeatureExtractor) and computes one whole batch
         per call: the features of each image, or the error that stopped it
      -> streamed back to the driver (the stage), which writes every entry to the cache.

Why these choices:

- The same batches as the local executor. The floats of Inception V3 depend on the batch an
  image is computed in (batch 1 vs 32: up to 1.1e-6 apart) and on TensorFlow's thread count
  (oneDNN splits its sums by thread: 1 thread vs 2 moves every feature by up to ~3e-6 on some
  CPUs, none on others); so each Ray call computes exactly one of the batches the local loop
  would compute, with `cpus_per_actor` threads, and the features are bit-identical to the
  local executor's when that is the local stage's thread count (the machine's cores).
- Gathered by the driver, not written by the workers: the workers need read access to the
  images (and the backbone folder) only, not to the cache, which stays on the machine that
  runs the DVC stage. The driver is then the only writer (the cache's atomic renames need no
  shared-filesystem semantics), it knows exactly which entries are done (progress, resume),
  and a feature is small next to its image (8 KB against ~100 KB of JPEG for a bottleneck).
- Streaming, one batch per block: an entry is written as soon as its batch is back, so a
  killed job loses at most the batches in flight; the rerun sends only what the cache lacks.
- Failures: an image that cannot be read or decoded is retried (`ray.attempts` reads, in the
  actor) and then returned as an error row, its batch's other images computed without it.
  A lost worker (killed, out of memory) is restarted by Ray and its batch retried by Ray, up
  to `ray.attempts` times (a batch that kills its worker every time, say one holding an image
  that crashes the decoder, then leaves the stream: the run ends instead of retrying forever,
  and the other batches are unaffected); if the whole pool gives up, the driver runs the
  batches still missing again, up to `ray.attempts` rounds. Whatever is still missing is
  reported by name (ExtractionFailed), never dropped.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf.errors import UserError
from imgclf.executors import ExtractionFailed
from imgclf.params import RayParams

if TYPE_CHECKING:
    from imgclf.features import FeatureCache, ModelLoader, Pending, Timing, View

INSTALL_HINT = "pip install -e '.[ray]' (the optional Ray extra)"


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".strip()


class _BackboneWorker:
    """One actor of the pool: the backbone, loaded once, then one batch per call."""

    def __init__(
        self,
        load_model: ModelLoader,
        view: View | None,
        shape: tuple[int, ...],
        dtype: str,
        attempts: int,
        threads: int,
        batch_size: int,
    ) -> None:
        import tensorflow as tf

        # Ray reserves `cpus_per_actor` for this actor; TensorFlow would otherwise use every
        # core of the node in each actor. The thread count can change the last bits of the
        # floats (see the module's docstring).
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        from imgclf.features import FeatureExtractor

        self.extractor = FeatureExtractor(load_model)
        self.view, self.shape, self.dtype, self.attempts = view, shape, np.dtype(dtype), attempts
        self.batch_size = batch_size

    def _decode_error(self, path: str) -> str | None:
        """None when `path` decodes (and its view applies), else the last error of `attempts`
        tries (a file on a network filesystem can be briefly unreadable)."""
        from imgclf.images import load_rgb

        error = ""
        for attempt in range(self.attempts):
            try:
                image = load_rgb(path)
                if self.view is not None:
                    self.view(image)
                return None
            except Exception as e:  # any reason it cannot be read is reported, not raised
                error = _describe(e)
                if attempt + 1 < self.attempts:
                    time.sleep(0.1 * (attempt + 1))
        return error

    def _compute(self, paths: Sequence[str]) -> np.ndarray:
        # One call = one batch of the local loop (len(paths) <= batch_size, padded as it pads).
        (features,) = self.extractor.batches([Path(p) for p in paths], self.batch_size, self.view)
        return features.astype(self.dtype)  # the cache's dtype: what the driver stores

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shas_out: list[str] = []
        features_out: list[np.ndarray] = []
        errors_out: list[str] = []
        for shas, paths in zip(batch["shas"], batch["paths"], strict=True):
            shas, paths = [str(s) for s in shas], [str(p) for p in paths]
            try:
                features, errors = self._compute(paths), {}
            except Exception:
                # Find the images that do not decode; the others are computed together.
                errors = {p: e for p in paths if (e := self._decode_error(p)) is not None}
                if not errors:
                    raise  # not an image's fault: Ray / the driver retry the whole batch
                good = [p for p in paths if p not in errors]
                features = self._compute(good) if good else np.empty((0, *self.shape))
            rows = iter(features)
            for sha, path in zip(shas, paths, strict=True):
                shas_out.append(sha)
                errors_out.append(errors.get(path, ""))
                features_out.append(
                    np.zeros(self.shape, self.dtype) if path in errors else next(rows)
                )
        return {
            "sha": np.array(shas_out, dtype=object),
            "features": np.stack(features_out) if features_out else np.empty((0, *self.shape)),
            "error": np.array(errors_out, dtype=object),
        }


def runtime_env() -> dict[str, Any]:
    """What every worker gets: the imgclf package the driver runs (Ray's py_modules, so the
    actors run the driver's code even on a cluster whose image holds another version of it),
    and TensorFlow's start-up notices silenced (they would drown the progress bar)."""
    import imgclf

    return {
        "py_modules": [str(Path(imgclf.__file__).parent)],
        "env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")},
    }


class RayExecutor:
    name = "ray"

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.options = RayParams.from_params(params)
        self._owns_ray = False
        self.connect_seconds = 0.0

    def connect(self) -> float:
        """Start (address `local`) or join the Ray cluster; the seconds it took."""
        try:
            import ray
        except ImportError:
            raise UserError(
                f"the ray executor needs Ray, which is not installed: {INSTALL_HINT}"
            ) from None
        if ray.is_initialized():  # a test or a notebook connected already: use that cluster
            return 0.0
        start = time.perf_counter()
        o = self.options
        common = {
            "runtime_env": runtime_env(),
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "configure_logging": True,
        }
        if o.address == "local":
            # A private instance for this stage, gone with it; as many CPUs as the pool asks,
            # at least the node's (Ray's logical CPUs only schedule, they do not pin).
            need = int(np.ceil(o.actors * o.cpus_per_actor))
            ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, **common)
        else:
            ray.init(address=o.address, **common)
        self._owns_ray = True
        self.connect_seconds = time.perf_counter() - start
        return self.connect_seconds

    def close(self) -> None:
        """Stop the local instance, or disconnect from the cluster (which keeps running)."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dataset(
        self,
        batches: Sequence[Sequence[Pending]],
        load_model: ModelLoader,
        cache: FeatureCache,
        view: View | None,
        batch_size: int,
    ) -> Any:
        import ray.data

        o = self.options
        rows = [
            {"shas": [sha for sha, _ in b], "paths": [str(Path(p).resolve()) for _, p in b]}
            for b in batches
        ]
        # One block per batch: results stream back batch by batch (bigger blocks would come
        # back only when all their batches are done), and a lost worker costs one batch.
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        with warnings.catch_warnings():
            # max_restarts and max_task_retries below have no named parameter yet: Ray 2.60
            # warns on every run that such remote args go in 2.64, and the `.[ray]` extra stays
            # below 2.64 (pyproject.toml).
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            return ds.map_batches(
                _BackboneWorker,
                fn_constructor_kwargs={
                    # A cached loader (functools.cache: the activations stage reuses one model
                    # across views in its own process) pickles as a reference to a local name;
                    # the actors get the function itself and load the model once each.
                    "load_model": getattr(load_model, "__wrapped__", load_model),
                    "view": view,
                    "shape": cache.shape,
                    "dtype": cache.dtype.newbyteorder("=").str,
                    "attempts": o.attempts,
                    "threads": max(1, int(np.ceil(o.cpus_per_actor))),
                    "batch_size": batch_size,
                },
                batch_size=1,
                batch_format="numpy",
                # One batch in flight per actor: a worker that dies takes only its own batch
                # with it (the queue of a busy actor is short next to a batch's seconds).
                compute=ray.data.ActorPoolStrategy(size=o.actors, max_tasks_in_flight_per_actor=1),
                num_cpus=o.cpus_per_actor,
                # A dead actor is restarted (the pool keeps its size), but its batch is retried
                # only `attempts` times: Ray Data's default, without bound, would loop forever on
                # an image that crashes the decoder. Such a batch is then dropped from the stream
                # (max_errored_blocks, set in `run`) and reported; the other batches go on.
                max_restarts=-1,
                max_task_retries=o.attempts,
            )

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

        start = time.perf_counter()
        self.connect()
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images, Ray's would count blocks
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # "execution finished" notices
        ready = time.perf_counter()

        batches = [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]
        path_of = {sha: str(path) for sha, path in pending}
        done: set[str] = set()
        failed: dict[str, str] = {}  # sha -> the error of an image the workers could not read
        lost_error = ""
        o = self.options
        label = f"{desc} (ray: {o.actors} actor{'s' * (o.actors > 1)})"
        # A batch that failed every try is reported, not fatal; the caller's setting is put
        # back afterwards (a notebook's own Ray Data work keeps its default).
        errored_before, context.max_errored_blocks = context.max_errored_blocks, -1
        with tqdm(total=len(pending), unit="img", desc=label, disable=not progress) as bar:
            left = batches
            for _round in range(o.attempts):
                gave_up = False
                try:
                    results = self._dataset(left, load_model, cache, view, batch_size).iter_batches(
                        batch_size=None, batch_format="numpy"
                    )
                    for block in results:
                        for sha, features, error in zip(
                            block["sha"], block["features"], block["error"], strict=True
                        ):
                            if sha in done or sha in failed:
                                continue  # a batch rerun after a lost worker
                            if error:
                                failed[sha] = str(error)
                            else:
                                cache.put(sha, features)
                                done.add(sha)
                            bar.update(1)
                except Exception as e:  # the pool gave up (ray.exceptions.*): run what is left
                    lost_error, gave_up = _describe(e), True
                # Whole batches again (also their done images): the same batches, same floats.
                left = [b for b in batches if any(s not in done and s not in failed for s, _ in b)]
                if not left or not gave_up:  # Ray has already retried each batch it dropped
                    break
        context.max_errored_blocks = errored_before
        for sha, _ in (p for b in left for p in b):
            if sha not in done and sha not in failed:
                # Only the batch is known, not which of its images (if any) killed the worker.
                failed[sha] = (
                    f"lost with its batch of {batch_size}: its worker died on every try "
                    f"({lost_error or f'{o.attempts + 1} tries'}); if one image crashes the "
                    "decoder, executor local names it"
                )
        if failed:
            raise ExtractionFailed(
                {path_of[sha]: error for sha, error in sorted(failed.items())},
                total=len(pending),
                attempts=o.attempts,
                desc=desc,
            )
        return {
            "seconds": time.perf_counter() - ready,
            "startup_seconds": ready - start,
        }
