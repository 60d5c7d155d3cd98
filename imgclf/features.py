"""Bottleneck features: a content-addressed cache and a streaming extractor.

A feature vector is stored under the image's sha256, in a folder named after what else
determines it (backbone weights, preprocessing, precision). So adding 10 images computes
10, re-splitting computes nothing, and new weights start a fresh folder. The same cache and
extractor hold arrays of any shape and dtype (the activations stage stores float16 feature
maps of each view of an image, one folder per view).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf.fileio import atomic_write_bytes, read_csv
from imgclf.images import load_rgb
from imgclf.runtimes import Runtime
from imgclf.splitting import SUBSETS

if TYPE_CHECKING:
    import tensorflow as tf

_DIGEST = 32  # bytes of sha256 appended to every cache entry


def _entry_digest(sha256: str, body: bytes, salt: bytes = b"") -> bytes:
    # The key is hashed with the vector: an entry copied or renamed over another image's entry
    # fails its check there, like a corrupt one, instead of giving that image its features.
    return hashlib.sha256(salt + sha256.encode("ascii") + b"\0" + body).digest()


@dataclass(frozen=True)
class ImageItem:
    id: str  # the split manifest's `file`, e.g. "test/roses/1.jpg"
    path: Path
    sha256: str
    label: int


def split_items(split_dir: Path) -> tuple[list[str], dict[str, list[ImageItem]]]:
    """The class list and, per subset, the images in manifest order (sorted by id)."""
    rows = read_csv(split_dir / "manifest.csv")
    classes = sorted({row["class"] for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    items = {
        subset: [
            ImageItem(row["file"], split_dir / row["file"], row["sha256"], index[row["class"]])
            for row in rows
            if row["subset"] == subset
        ]
        for subset in SUBSETS
    }
    return classes, items


class FeatureCache:
    """One file per image: the array's bytes followed by the sha256 of (image sha256, bytes).

    Entries are written to a temporary name and renamed, so `kill -9` leaves either no
    entry or a whole one; the checksum catches anything else (a disk error, a hand edit, an
    entry of another image copied or moved here), and a bad entry is deleted and treated as
    missing, hence recomputed; `bad` counts them. Entries written before the checksum covered
    the key fail it too and are recomputed once.

    `FeatureCache(root, key, dim)` holds float32 vectors (the bottlenecks, `<sha>.f32`);
    `FeatureCache(root, key, shape=(8, 8, 1280), dtype="float16")` any little-endian array
    (`<sha>.f16`). Values are cast to `dtype` when stored. `bind_key=True` puts the folder's
    key in the checksum too, so an entry moved to another folder of the same image (another
    view, cut or backbone) fails there as well; the bottleneck cache keeps its older format.
    """

    def __init__(
        self,
        root: Path,
        key: str,
        dim: int | None = None,
        *,
        shape: Sequence[int] | None = None,
        dtype: str = "float32",
        bind_key: bool = False,
    ):
        if (dim is None) == (shape is None):
            raise TypeError("FeatureCache needs exactly one of dim (a vector) or shape")
        self.shape: tuple[int, ...] = (int(dim),) if shape is None else tuple(map(int, shape))
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.dim = math.prod(self.shape)  # values per entry
        self.nbytes = self.dim * self.dtype.itemsize  # bytes per entry, checksum excluded
        # .f32 for float32 keeps the bottleneck cache's files where they always were.
        self.suffix = f".{self.dtype.kind}{8 * self.dtype.itemsize}"
        self.dir = Path(root) / key
        self._salt = key.encode() + b"\0" if bind_key else b""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bad = 0  # entries found bad (and deleted) by `get`
        self._bad_lock = threading.Lock()  # `get` runs on threads (get_each, missing)

    def path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}{self.suffix}"

    def get(self, sha256: str, check: bool = True) -> np.ndarray | None:
        """The entry's array, or None when absent or bad. `check=False` checks its length
        only, not its checksum: for an entry checked moments ago in this run."""
        try:
            blob = self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None
        body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
        if len(body) != self.nbytes or (
            check and _entry_digest(sha256, body, self._salt) != digest
        ):
            self.path(sha256).unlink(missing_ok=True)
            with self._bad_lock:
                self.bad += 1
            return None
        return np.frombuffer(body, dtype=self.dtype).reshape(self.shape)

    def put(self, sha256: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.size != self.dim or (array.ndim > 1 and array.shape != self.shape):
            raise ValueError(f"array of shape {array.shape}, cache expects {self.shape}")
        body = np.ascontiguousarray(array, dtype=self.dtype).tobytes()
        path = self.path(sha256)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(body + _entry_digest(sha256, body, self._salt))
        # No fsync: a killed process cannot tear a rename, and a power loss is what the
        # checksum is for.
        os.replace(tmp, path)

    def get_each(
        self, shas: Iterable[str], ahead: int = 256, check: bool = True
    ) -> Iterator[np.ndarray | None]:
        """`get` of each, in order, read and checked on a thread per core up to `ahead`
        entries before the one yielded (reading a file and sha256 release the GIL, and a
        cached rerun of ten views reads 4.7 GB of entries), so at most `ahead` are held."""
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            pending: deque[Future[np.ndarray | None]] = deque()
            for sha in shas:
                pending.append(pool.submit(self.get, sha, check))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def missing(self, shas: Sequence[str]) -> list[str]:
        """The entries of `shas` absent or bad (the bad ones deleted), checked on threads."""
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            absent = list(pool.map(lambda sha: self.get(sha) is None, shas))
        return [sha for sha, gone in zip(shas, absent, strict=True) if gone]

    def disk_bytes(self) -> int:
        """Bytes of every entry in this cache folder (all images, not only this split's)."""
        return sum(p.stat().st_size for p in self.dir.glob(f"*/*{self.suffix}"))


def cache_key(backbone_sha256: str, preprocessing: str, precision: str) -> str:
    """The folder name of a cache: everything besides the image that shapes a feature."""
    preprocessing_id = hashlib.sha256(preprocessing.encode()).hexdigest()[:12]
    return f"{backbone_sha256[:16]}-{preprocessing_id}-{precision}"


View = Callable[[np.ndarray], np.ndarray]  # uint8 [H, W, 3] -> uint8 [h, w, 3]
# What an executor (imgclf/executors) is handed and hands back.
Pending = tuple[str, Path]  # (image sha256, a path to the image)
Timing = dict[str, float]  # "seconds" computing, "startup_seconds" before the first batch


def image_batches(
    paths: Sequence[Path],
    preprocess: Callable[[tf.Tensor], tf.Tensor],
    batch_size: int,
    view: View | None = None,
) -> tf.data.Dataset:
    """Decoded, preprocessed batches, built by a tf.data thread while the model runs.

    Decoding goes through Pillow (EXIF rotation, CMYK, palette, GIF), so the features
    see exactly the pixels that ingest validated; `view` (a flip, a crop) is applied to
    those pixels before the preprocessing. Only `batch_size * prefetch` images are ever in
    memory, however many there are.
    """
    import tensorflow as tf

    def pixels(path: bytes) -> np.ndarray:
        image = load_rgb(path.decode())
        return image if view is None else np.ascontiguousarray(view(image), dtype=np.uint8)

    def decode(path: tf.Tensor) -> tf.Tensor:
        image = tf.numpy_function(pixels, [path], tf.uint8)
        image.set_shape([None, None, 3])
        return preprocess(image[tf.newaxis])[0]

    # Decoding costs ~1 ms an image against ~25 ms in the model, so one pipeline thread keeps
    # up. Autotuning and a wider pool only steal the model's two cores: with them, about one
    # process in three ran at 0.55x the model's speed instead of 0.95x (bench/bottlenecks.py).
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return (
        tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
        .map(decode, num_parallel_calls=1, deterministic=True)
        .batch(batch_size)
        .prefetch(2)
        .with_options(options)
    )


ModelLoader = Callable[[], tuple[Any, Callable[["tf.Tensor"], "tf.Tensor"]]]


def as_runtime(model: Any) -> Runtime:
    """A runtime as it is; a Keras model wrapped in the TensorFlow runtime (float32 or whatever
    policy it was built with)."""
    if isinstance(model, Runtime):
        return model
    from imgclf.runtimes.tensorflow import TensorFlowRuntime

    return TensorFlowRuntime(model)


class FeatureExtractor:
    """The one compute path of every executor: decode -> view -> preprocess -> runtime.

    Built once per process that computes (the stage itself for the local executor, each actor
    for Ray): `load_model()` runs here and returns a runtime (imgclf.runtimes; a Keras model
    runs as the TensorFlow runtime, traced once for every batch size) and its preprocessing.
    """

    def __init__(self, load_model: ModelLoader) -> None:
        model, self.preprocess = load_model()
        self.runtime = as_runtime(model)

    def batches(
        self, paths: Sequence[Path], batch_size: int, view: View | None = None
    ) -> Iterator[np.ndarray]:
        """Features of `paths` in order, one array per batch of `batch_size` images.

        The floats depend on how the images are batched (batch 1 vs 32 differ by ~1e-6), so
        every executor computes the batches the local loop would (see imgclf/executors). A
        short batch (the last one, or the images a resumed run still lacks) is padded to
        `batch_size` with copies of its last image, and the copies dropped: the kernels treat
        the rows of a short batch's tail apart (1.5e-8 on a recomputed entry, 7e-7 on a
        one-image batch, measured), so an image's floats would depend on how many images were
        missing when it was computed."""
        for batch in image_batches(paths, self.preprocess, batch_size, view):
            n = len(batch)
            if n < batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
            yield self.runtime.predict(batch)[:n]


def cached_rows(
    items: Sequence[ImageItem], cache: FeatureCache, check: bool = True
) -> Iterator[np.ndarray]:
    """The cached features of `items`, one array each, in order (they must all be cached);
    `check` as in `FeatureCache.get`."""
    shas = (it.sha256 for it in items)
    for item, vector in zip(items, cache.get_each(shas, check=check), strict=True):
        if vector is None:
            raise RuntimeError(f"no cached feature for {item.id} ({item.sha256}); rerun the stage")
        yield vector


def gather_features(items: Sequence[ImageItem], cache: FeatureCache) -> np.ndarray:
    """Stack the cached features of `items` in order (they must all be cached)."""
    features = np.empty((len(items), *cache.shape), dtype=cache.dtype.newbyteorder("="))
    for row, vector in enumerate(cached_rows(items, cache)):
        features[row] = vector
    return features


def save_bottlenecks(path: Path, items: Sequence[ImageItem], features: np.ndarray) -> None:
    """One .npz per subset: features, labels, ids (np.savez output is deterministic)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        features=features,
        labels=np.array([item.label for item in items], dtype=np.int64),
        ids=np.array([item.id for item in items], dtype=str),
    )
    atomic_write_bytes(path, buf.getvalue())
