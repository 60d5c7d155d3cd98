"""Everything a stage decides before a runtime computes a feature: its cache tag, its int8
calibration images, its converted model's key, and the fidelity gate it must pass.

Shared by the bottlenecks stage (the whole backbone, `kind="features"`) and the activations
stage (the backbone up to `activations.cut`, `kind="activations"`), so both pick calibration and
fidelity images the same way: from the train split only, deterministically (imgclf/fidelity.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.backbone_info import IMAGE_SIZE
from imgclf.config import cache_dir
from imgclf.features import ImageItem, image_batches
from imgclf.fidelity import calibration_sample, fidelity_sample, gated_runtime
from imgclf.fileio import read_json, write_json
from imgclf.params import check_runtime
from imgclf.runtimes import (
    Runtime,
    RuntimeRequest,
    bfloat16_warning,
    calibration_digest,
    cpu_flags,
    feature_tag,
)


@dataclass(frozen=True)
class RuntimeSetup:
    runtime: str
    precision: str
    section: str  # the params block, for messages: bottlenecks | activations
    kind: str  # features | activations: which fidelity gate applies
    backbone_info: Mapping[str, Any]
    cut: str | None  # None: the whole backbone (pool_3 features)
    train_items: Sequence[ImageItem] = field(repr=False)
    calibration_images: int
    fidelity_images: int
    batch_size: int

    def __post_init__(self) -> None:
        check_runtime(self.runtime, self.precision, self.section)

    @cached_property
    def calibration_items(self) -> list[ImageItem]:
        """The int8 calibration images (train split only); empty for other precisions."""
        if self.precision != "int8":
            return []
        return calibration_sample(self.train_items, self.calibration_images)

    @cached_property
    def calibration_digest(self) -> str | None:
        if self.precision != "int8":
            return None
        shas = [item.sha256 for item in self.calibration_items]
        return calibration_digest(shas, str(self.backbone_info["preprocessing"]))

    @property
    def feature_tag(self) -> str:
        """What made the features, for their cache key (tensorflow: the precision alone)."""
        return feature_tag(self.runtime, self.precision, self.calibration_digest)

    @property
    def model_key(self) -> str:
        """Names the model a runtime converts: backbone weights, where it is cut, and its input
        side when not the 299 it was trained at (keys of 299 models stay as they were)."""
        key = f"{str(self.backbone_info['sha256'])[:16]}-{self.cut or 'pool_3'}"
        size = int(self.backbone_info.get("image_size", IMAGE_SIZE))
        return key if size == IMAGE_SIZE else f"{key}-{size}px"

    def make(
        self, *, build_model: Callable[[str], Any], preprocess: Callable[[Any], Any]
    ) -> tuple[Runtime, dict[str, Any]]:
        """The runtime, after it passed its fidelity gate, and what to record about it."""
        paths = [item.path for item in self.calibration_items]

        def calibration() -> Iterator[np.ndarray]:
            for batch in image_batches(paths, preprocess, self.batch_size):
                yield batch.numpy()

        request = RuntimeRequest(
            runtime=self.runtime,
            precision=self.precision,
            build_model=build_model,
            model_key=self.model_key,
            cache_root=cache_dir("openvino") if self.runtime == "openvino" else cache_dir(),
            calibration=calibration if self.precision == "int8" else None,
            calibration_digest=self.calibration_digest,
            calibration_size=len(self.calibration_items),
            section=self.section,
        )
        runtime, report = gated_runtime(
            request,
            preprocess=preprocess,
            fidelity_items=fidelity_sample(self.train_items, self.fidelity_images),
            kind=self.kind,
            batch_size=self.batch_size,
        )
        if warning := bfloat16_warning(self.runtime, self.precision, self.section, cpu_flags()):
            print(warning, file=sys.stderr)
            report["warning"] = warning
        if self.precision == "int8":
            report["calibration_images"] = len(self.calibration_items)
            report["calibration_digest"] = self.calibration_digest
        return runtime, report

    def make_recorded(
        self, record: Path, *, build_model: Callable[[str], Any], preprocess: Callable[[Any], Any]
    ) -> Runtime:
        """`make`, with what it measured written to `record`, beside the cache it fills. The
        stage reads it back with `recorded` whichever process built the runtime: its own, a Ray
        actor, or an earlier run that left everything cached."""
        runtime, report = self.make(build_model=build_model, preprocess=preprocess)
        write_json(record, report)
        return runtime


def recorded(record: Path) -> dict[str, Any]:
    """What `RuntimeSetup.make_recorded` wrote to `record` ({} if nothing ever computed)."""
    return dict(read_json(record)) if record.is_file() else {}
