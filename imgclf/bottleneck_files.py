"""The bottleneck files the bottlenecks stage writes (`<dir>/train.npz`, `test.npz`,
`classes.json`) and their contract, for every stage that reads them: the heads, the label audit,
evaluate and the export. Framework-free: reading them needs numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.errors import MissingInput
from imgclf.fileio import read_json
from imgclf.splitting import SUBSETS

N_FEATURES = 2048  # Inception V3's pool_3


@dataclass(frozen=True)
class Bottlenecks:
    """One subset of the bottleneck cache: `features[i]` is the image `ids[i]` of class
    `classes[labels[i]]`."""

    features: np.ndarray  # float32 [N, 2048]
    labels: np.ndarray  # int64 [N]
    ids: np.ndarray  # str [N]
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_bottlenecks(bottleneck_dir: str | Path, subset: str) -> Bottlenecks:
    """Read `<bottleneck_dir>/<subset>.npz` and `classes.json`, checking the contract."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    bottleneck_dir = Path(bottleneck_dir)
    npz_path = bottleneck_dir / f"{subset}.npz"
    classes_path = bottleneck_dir / "classes.json"
    for path in (npz_path, classes_path):
        if not path.is_file():
            raise MissingInput(
                f"{path} not found: run the bottlenecks stage first (dvc repro bottlenecks)."
            )
    classes = read_json(classes_path)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{classes_path}: expected a non-empty JSON list of class names")
    with np.load(npz_path, allow_pickle=False) as data:
        missing = {"features", "labels", "ids"} - set(data.files)
        if missing:
            raise ValueError(f"{npz_path}: missing arrays {sorted(missing)} (has {data.files})")
        features = np.asarray(data["features"])
        labels = np.asarray(data["labels"])
        ids = np.asarray(data["ids"]).astype(str)
    # bfloat16 bottlenecks (bottlenecks.precision) are stored widened; the heads train in float32.
    features = features.astype(np.float32, copy=False)
    labels = labels.astype(np.int64, copy=False)
    n = labels.shape[0]
    if features.ndim != 2 or features.shape[0] != n or ids.shape != (n,) or labels.ndim != 1:
        raise ValueError(
            f"{npz_path}: inconsistent shapes features={features.shape} labels={labels.shape} "
            f"ids={ids.shape}; expected [N, {N_FEATURES}], [N], [N]"
        )
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(
            f"{npz_path}: labels span [{labels.min()}, {labels.max()}] but {classes_path} "
            f"lists {len(classes)} classes"
        )
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        raise ValueError(f"{npz_path}: {bad} rows have NaN/inf features; rebuild the bottlenecks")
    return Bottlenecks(features=features, labels=labels, ids=ids, classes=list(classes))
