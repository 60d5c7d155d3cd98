"""Activations at a cut through the backbone, for every train/test image and each of its views.

The fine-tune stages train the blocks after the cut, so they need the cut's activations
(8x8x1280 at mixed_8), not the pooled features. Augmentation would normally force the whole
backbone to run every epoch; here it is a fixed list of deterministic views (a flip, crops),
each cached like a bottleneck: one entry per (image sha256, backbone, preprocessing, cut,
view, precision), float16 (160 KB an image at mixed_8). Adding a view computes only that
view; a new split computes nothing.

Outputs, per subset (`train`, `test`), in the stage's folder:

- `<subset>.npy`: float16 [n_views * n_images, h, w, c], view-major (all images of the first
  view, then all of the second...), read a batch of rows at a time (NpyRows);
- `<subset>_index.npz`: `ids`, `labels`, `view` (an index into `views`), `views` (names), one
  row per row of the .npy.
"""

from __future__ import annotations

import functools
import io
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.backbone_info import (
    CUT_SHAPES,
    IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    at_image_size,
    cut_shape,
    read_backbone_info,
)
from imgclf.errors import MissingInput, ParamsError
from imgclf.executors import EXECUTORS, Executor, fill_cache
from imgclf.features import (
    FeatureCache,
    ImageItem,
    View,
    cache_key,
    cached_rows,
    split_items,
)
from imgclf.fileio import atomic_write_bytes
from imgclf.params import IMAGE_BATCH_WHY, MAX_IMAGE_BATCH, check_runtime
from imgclf.runtime_setup import RuntimeSetup, recorded
from imgclf.splitting import SUBSETS
from imgclf.stage import peak_rss_bytes

STORAGE_DTYPE = "float16"


# --------------------------------------------------------------------------------------------
# Views: deterministic functions on the decoded uint8 [H, W, 3] image, before preprocessing


def _flip(image: np.ndarray) -> np.ndarray:
    return image[:, ::-1]


def _crop(percent: int, where: str) -> View:
    """A crop of `percent`% of each side: centred (`c`) or in a corner (`tl`, `tr`, `bl`, `br`)."""

    def crop(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        ch, cw = max(1, round(h * percent / 100)), max(1, round(w * percent / 100))
        top = {"t": 0, "b": h - ch, "c": (h - ch) // 2}[where[0]]
        left = {"l": 0, "r": w - cw, "c": (w - cw) // 2}[where[-1]]
        return image[top : top + ch, left : left + cw]

    return crop


def _then_flip(view: View) -> View:
    return lambda image: _flip(view(image))


def _registry() -> dict[str, View]:
    views: dict[str, View] = {"orig": lambda image: image, "flip": _flip}
    for percent in (80, 90):
        for where in ("c", "tl", "tr", "bl", "br"):
            crop = _crop(percent, where)
            views[f"crop{percent}_{where}"] = crop
            views[f"crop{percent}_{where}_flip"] = _then_flip(crop)
    return views


# A view's name is part of its cache key: changing what a name does needs a new name.
VIEWS: Mapping[str, View] = _registry()


def check_views(names: Sequence[str], key: str) -> tuple[str, ...]:
    """`names` as a tuple, or a ValueError naming the params.yaml `key` and the known views."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ParamsError(
            f"{key}: expected a non-empty list of view names, e.g. [orig, flip], got {names!r}"
        )
    unknown = [name for name in names if name not in VIEWS]
    if unknown:
        raise ParamsError(f"{key}: unknown view(s) {unknown}; known views: {', '.join(VIEWS)}")
    if len(set(names)) != len(names):
        raise ParamsError(f"{key}: a view is listed twice in {list(names)}")
    return tuple(names)


# --------------------------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class ActivationsOptions:
    cut: str
    train_views: tuple[str, ...]
    test_views: tuple[str, ...]
    runtime: str
    precision: str
    batch_size: int
    executor: str = "local"  # imgclf.executors: where the images go through the backbone
    image_size: int = IMAGE_SIZE  # the side of the square the images are resized to

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any], key: str = "activations") -> ActivationsOptions:
        """The `activations:` block of params.yaml, checked (cheap: builds no model)."""
        expected = {"cut", "train_views", "test_views", "runtime", "precision", "batch_size",
                    "executor", "image_size"}  # fmt: skip
        if not isinstance(cfg, Mapping):
            raise ParamsError(f"{key}: expected a mapping, got {cfg!r}")
        if unknown := sorted(set(cfg) - expected):
            raise ParamsError(f"{key}: unknown key(s) {unknown}; expected {sorted(expected)}")
        if missing := sorted(expected - set(cfg)):
            raise ParamsError(f"{key}: missing key(s) {missing}")
        if cfg["cut"] not in CUT_SHAPES:
            raise ParamsError(
                f"{key}.cut: {cfg['cut']!r} is not a block output of Inception V3; "
                f"expected one of {list(CUT_SHAPES)}"
            )
        check_runtime(cfg["runtime"], cfg["precision"], key)
        batch = cfg["batch_size"]
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ParamsError(f"{key}.batch_size: {batch!r}, expected an integer >= 1")
        if batch > MAX_IMAGE_BATCH:
            raise ParamsError(
                f"{key}.batch_size: {batch!r}, expected an integer between 1 and "
                f"{MAX_IMAGE_BATCH}. {IMAGE_BATCH_WHY}"
            )
        size = cfg["image_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
            raise ParamsError(
                f"{key}.image_size: {size!r}, expected an integer >= {MIN_IMAGE_SIZE} (the "
                f"backbone's weights were trained at {IMAGE_SIZE})"
            )
        if size > MAX_IMAGE_SIZE:
            raise ParamsError(
                f"{key}.image_size: {size!r}, expected an integer between {MIN_IMAGE_SIZE} and "
                f"{MAX_IMAGE_SIZE}: the backbone's compute and maps grow with the side squared "
                f"({MAX_IMAGE_SIZE} already costs {(MAX_IMAGE_SIZE / IMAGE_SIZE) ** 2:.1f}x "
                f"{IMAGE_SIZE}'s, in this stage and in the fine-tunes), and a larger side only "
                f"upscales the photos further. Lower it ({IMAGE_SIZE} is the weights' own side)."
            )
        if cfg["executor"] not in EXECUTORS:
            raise ParamsError(
                f"{key}.executor: {cfg['executor']!r}, expected one of {list(EXECUTORS)}"
            )
        return cls(
            cut=cfg["cut"],
            train_views=check_views(cfg["train_views"], f"{key}.train_views"),
            test_views=check_views(cfg["test_views"], f"{key}.test_views"),
            runtime=cfg["runtime"],
            precision=cfg["precision"],
            batch_size=batch,
            executor=cfg["executor"],
            image_size=size,
        )

    def views(self, subset: str) -> tuple[str, ...]:
        return self.train_views if subset == "train" else self.test_views


# --------------------------------------------------------------------------------------------
# The cache


def activation_cache(
    root: Path,
    *,
    backbone_sha256: str,
    preprocessing: str,
    precision: str,
    cut: str,
    view: str,
    shape: Sequence[int],
) -> FeatureCache:
    """The cache folder of one view: `<bottleneck key>-<cut>-<view>/`, float16 entries.

    `precision` is the feature tag (imgclf.runtimes.feature_tag: the precision alone for
    tensorflow, e.g. `openvino-int8-<calibration digest>` otherwise). Entries are bound to the
    folder's key as well as to the image: the views of one image have the same shape, so only
    the checksum can tell an entry moved across views.
    """
    key = f"{cache_key(backbone_sha256, preprocessing, precision)}-{cut}-{view}"
    return FeatureCache(root, key, shape=shape, dtype=STORAGE_DTYPE, bind_key=True)


ModelLoader = Callable[[], tuple[Any, Callable[[Any], Any]]]


def fill_views(
    items_by_view: Mapping[str, Sequence[ImageItem]],
    caches: Mapping[str, FeatureCache],
    load_model: ModelLoader,
    *,
    batch_size: int,
    progress: bool = True,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Fill each view's cache with the activations of its items; counts summed and per view.

    `load_model()` (the model up to the cut, and its preprocessing) is called at most once,
    and only when some view has something to compute, by the local executor; a Ray actor pool
    (`executor`) loads it once per actor and view.
    """
    load_once = functools.cache(load_model)
    per_view: dict[str, dict[str, float]] = {}
    for view, items in items_by_view.items():
        per_view[view] = fill_cache(
            items,
            load_once,
            caches[view],
            batch_size=batch_size,
            progress=progress,
            view=VIEWS[view],
            desc=f"activations {view}",
            executor=executor,
        )
    totals = {
        name: sum(stats[name] for stats in per_view.values())
        for name in ("computed", "cached", "recomputed_bad", "seconds")
    }
    seconds = totals["seconds"]
    return {
        **totals,
        "entries_per_second": totals["computed"] / seconds if seconds else 0.0,
        "per_view": per_view,
    }


# --------------------------------------------------------------------------------------------
# Outputs and the loader for the fine-tune stages


def _write_npy(path: Path, shape: tuple[int, ...], rows: Iterable[np.ndarray]) -> None:
    """An .npy written row by row under a temporary name, then renamed.

    Plain writes, not a memory map: the pages of a map count in the stage's RSS, and ten
    views' train.npy is 4.8 GB. The bytes are those `np.save` writes.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    dtype = np.dtype(STORAGE_DTYPE)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    row_shape, written = shape[1:], 0
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for row in rows:
                if row.shape != row_shape or row.dtype != dtype:
                    raise ValueError(
                        f"row of {row.shape} {row.dtype}, expected {row_shape} {dtype}"
                    )
                f.write(np.ascontiguousarray(row).data)
                written += 1
        if written != shape[0]:
            raise RuntimeError(f"{path}: {written} rows written, its header says {shape[0]}")
    except BaseException:
        # A full disk must not stay full of a hidden, half-written 4.8 GB file.
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_subset(
    out_dir: Path,
    subset: str,
    items: Sequence[ImageItem],
    views: Sequence[str],
    caches: Mapping[str, FeatureCache],
) -> int:
    """Write `<subset>.npy` and `<subset>_index.npz`; return their bytes. The entries must
    have been checked in this run (`fill_views`: only their lengths are checked here)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = caches[views[0]].shape
    n = len(items)
    # Straight from each cache entry to the file, no array of them in between. Their
    # checksums are not taken again: the stage's fill checked every entry moments ago and
    # recomputed the bad ones, and hashing ten views' 4.7 GB twice was a third of a rerun.
    rows = (row for view in views for row in cached_rows(items, caches[view], check=False))
    npy = out_dir / f"{subset}.npy"
    _write_npy(npy, (len(views) * n, *shape), rows)
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.array([item.id for item in items] * len(views), dtype=str),
        labels=np.array([item.label for item in items] * len(views), dtype=np.int64),
        view=np.repeat(np.arange(len(views), dtype=np.int64), n),
        views=np.array(list(views), dtype=str),
    )
    index = out_dir / f"{subset}_index.npz"
    atomic_write_bytes(index, buf.getvalue())
    return npy.stat().st_size + index.stat().st_size


class NpyRows:
    """The rows of an .npy file, read when indexed (`x[rows]` is an in-memory array) with
    plain reads, not through a memory map.

    A map's pages count in the reader's RSS once touched, and the fine-tunes touch every row
    of ten views' 4.8 GB train.npy over their epochs. Read this way the file stays in the page
    cache, which the kernel can drop, and the process holds only the batch it asked for.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            self.offset = f.tell()
        if fortran_order or dtype.hasobject:
            raise ValueError(f"{self.path}: expected a C-ordered numeric array, found {dtype}")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
        size, expected = self.path.stat().st_size, self.offset + shape[0] * self.row_bytes
        if size != expected:
            raise ValueError(
                f"{self.path} has {size} bytes but its header describes {expected}: it was cut "
                "short or is still being written; rerun the activations stage "
                "(dvc repro -f activations)"
            )
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.arange(len(self))[key]
        if rows.ndim == 0:
            return self._read(rows.reshape(1))[0]
        return self._read(rows)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if out.size == 0:
            return out
        buf, size = memoryview(out).cast("B"), self.row_bytes
        first = 0
        while first < len(rows):  # each run of consecutive rows in one read
            end = first + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            self._pread(buf[first * size : end * size], self.offset + int(rows[first]) * size)
            first = end
        return out

    def _pread(self, view: memoryview, offset: int) -> None:
        while view.nbytes:  # a read may return less than asked (Linux: at most ~2 GiB)
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise EOFError(f"{self.path} ended at byte {offset}, before the rows asked for")
            view, offset = view[n:], offset + n


@dataclass(frozen=True)
class Activations:
    x: np.ndarray | NpyRows  # float16 [rows, h, w, c], read when indexed unless in memory
    ids: np.ndarray  # str [rows]: the split manifest's `file`
    labels: np.ndarray  # int64 [rows]
    view: np.ndarray  # int64 [rows]: index into `views`
    views: tuple[str, ...]

    def of_view(self, name: str) -> np.ndarray:
        """Row numbers of one view (in image order)."""
        if name not in self.views:
            raise ValueError(f"view {name!r} was not computed; these were: {list(self.views)}")
        return np.flatnonzero(self.view == self.views.index(name))


def load_activations(out_dir: str | Path, subset: str, in_memory: bool = False) -> Activations:
    """The activations stage's output for `subset` (train | test); its rows are read when
    indexed (NpyRows) unless `in_memory`."""
    out_dir = Path(out_dir)
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, not {subset!r}")
    npy, index = out_dir / f"{subset}.npy", out_dir / f"{subset}_index.npz"
    for path in (npy, index):
        if not path.is_file():
            raise MissingInput(
                f"{path} not found: the activations stage writes it (dvc repro activations; "
                "it is not in DVC's cache, being rebuilt in seconds from the activation cache)"
            )
    x = np.load(npy) if in_memory else NpyRows(npy)
    with np.load(index) as z:
        ids, labels, view, views = z["ids"], z["labels"], z["view"], tuple(z["views"].tolist())
    if not len(x) == len(ids) == len(labels) == len(view):
        raise ValueError(
            f"{npy} has {len(x)} rows but {index} describes {len(ids)}: the two files come from "
            "different runs; rerun the activations stage (dvc repro -f activations)"
        )
    return Activations(x=x, ids=ids, labels=labels, view=view, views=views)


# --------------------------------------------------------------------------------------------
# The stage's work


def run_activations(
    *,
    split_dir: Path,
    backbone_dir: Path,
    out_dir: Path,
    cache_root: Path,
    options: ActivationsOptions,
    calibration_images: int = 288,
    fidelity_images: int = 20,
    progress: bool = True,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Fill the activation cache for every subset and view (with options.runtime at
    options.precision, held to its fidelity gate first), then write the outputs.

    Returns the numbers of metrics/activations.json (plus `cache_dirs`, for the message, and
    `runtime`: what computed them and the fidelity it measured).
    """
    start = time.perf_counter()
    _, items = split_items(split_dir)
    # The preprocessing id in every cache key, the runtimes' model key: this input size's.
    info = at_image_size(read_backbone_info(backbone_dir), options.image_size)
    setup = RuntimeSetup(
        runtime=options.runtime,
        precision=options.precision,
        section="activations",
        kind="activations",
        backbone_info=info,
        cut=options.cut,
        train_items=items["train"],
        calibration_images=calibration_images,
        fidelity_images=fidelity_images,
        batch_size=options.batch_size,
    )
    views = sorted({view for subset in SUBSETS for view in options.views(subset)})
    caches = {
        view: activation_cache(
            cache_root,
            backbone_sha256=info["sha256"],
            preprocessing=info["preprocessing"],
            precision=setup.feature_tag,
            cut=options.cut,
            view=view,
            shape=cut_shape(options.cut, options.image_size),
        )
        for view in views
    }
    items_by_view: dict[str, list[ImageItem]] = {view: [] for view in views}
    for subset in SUBSETS:
        for view in options.views(subset):
            items_by_view[view] += items[subset]

    backbone_path = backbone_dir.resolve()  # also read by Ray workers, whose cwd is not ours
    # The gate the activations passed, beside the first view's folder (read back below).
    record = caches[views[0]].dir.with_name(caches[views[0]].dir.name + ".fidelity.json")

    def load_model():
        # TensorFlow only when something is left to compute (its import alone takes seconds).
        import imgclf.quiet_tf  # noqa: F401
        from imgclf.inception import PREPROCESSORS, backbone_to_cut, load_backbone

        models: dict[str, Any] = {}

        def build(precision: str) -> Any:
            if precision not in models:
                models[precision] = load_backbone(
                    backbone_path, precision=precision, image_size=options.image_size
                )
            return backbone_to_cut(models[precision].model, options.cut)

        # The same for every runtime.
        preprocess = functools.partial(
            PREPROCESSORS[info["weights"]], image_size=options.image_size
        )
        return setup.make_recorded(record, build_model=build, preprocess=preprocess), preprocess

    stats = fill_views(
        items_by_view,
        caches,
        load_model,
        batch_size=options.batch_size,
        progress=progress,
        executor=executor,
    )
    report = recorded(record)
    output_bytes = sum(
        write_subset(out_dir, subset, items[subset], options.views(subset), caches)
        for subset in SUBSETS
    )
    return {
        "image_size": options.image_size,
        "images": {subset: len(items[subset]) for subset in SUBSETS},
        "views": {subset: len(options.views(subset)) for subset in SUBSETS},
        "entries": {
            "computed": stats["computed"],
            "cached": stats["cached"],
            "recomputed_bad": stats["recomputed_bad"],
        },
        "compute_seconds": round(stats["seconds"], 3),
        "entries_per_second": round(stats["entries_per_second"], 3),
        "seconds": round(time.perf_counter() - start, 3),
        "cache_bytes": sum(cache.disk_bytes() for cache in caches.values()),
        "output_bytes": output_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "cache_dirs": [str(cache.dir) for cache in caches.values()],
        "runtime": report,
    }


def describe_cut(cut: str, image_size: int = IMAGE_SIZE) -> str:
    """`mixed_8 (8x8x1280)`, for messages (`mixed_8 (11x11x1280 from 399x399 images)`)."""
    shape = "x".join(map(str, cut_shape(cut, image_size)))
    if image_size == IMAGE_SIZE:
        return f"{cut} ({shape})"
    return f"{cut} ({shape} from {image_size}x{image_size} images)"
