"""The records ingest passes from step to step: its options, the candidates it collects,
the items it skips (each with a reason), the images it keeps and the result it writes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf.archives import ArchiveLimits
from imgclf.errors import UserError
from imgclf.images import DEFAULT_MAX_PIXELS
from imgclf.labels import readable
from imgclf.params import (
    BAD_LINE_MODES,
    CROSS_CLASS_MODES,
    MULTIPLE_LABEL_MODES,
    PRESPLIT_MODES,
    IngestParams,
)


class IngestError(UserError, RuntimeError):
    """The input cannot make a usable image set; the message says why and what to do."""


@dataclass(frozen=True)
class IngestOptions:
    on_multiple_labels: str = "error"
    cross_class_duplicates: str = "drop"
    min_images_per_class: int = 20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    download_workers: int = 8
    download_timeout_s: float = 20
    download_retries: int = 2
    presplit: str = "keep"
    on_bad_line: str = "skip"
    max_extracted_bytes: int = ArchiveLimits.max_bytes
    max_expansion_ratio: float = ArchiveLimits.max_ratio

    def __post_init__(self) -> None:
        for key, value, modes in (
            ("presplit", self.presplit, PRESPLIT_MODES),
            ("on_bad_line", self.on_bad_line, BAD_LINE_MODES),
        ):
            if value not in modes:
                raise IngestError(
                    f"ingest.{key} must be one of {', '.join(modes)}, not {value!r} "
                    f"(params.yaml, or dvc exp run -S ingest.{key}={modes[0]})"
                )
        if self.on_multiple_labels not in MULTIPLE_LABEL_MODES:
            raise IngestError(
                f"ingest.on_multiple_labels must be one of {', '.join(MULTIPLE_LABEL_MODES)}, "
                f"not {self.on_multiple_labels!r}"
            )
        if self.cross_class_duplicates not in CROSS_CLASS_MODES:
            raise IngestError(
                f"ingest.cross_class_duplicates must be one of {', '.join(CROSS_CLASS_MODES)}, "
                f"not {self.cross_class_duplicates!r}"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> IngestOptions:
        """From params.yaml's `ingest:` block, parsed strictly (imgclf/params.py: IngestParams):
        a missing or misspelt key is an error, not a default."""
        p = IngestParams.from_params(params)
        return cls(
            on_multiple_labels=p.on_multiple_labels,
            cross_class_duplicates=p.cross_class_duplicates,
            min_images_per_class=p.min_images_per_class,
            max_image_pixels=p.max_image_pixels,
            download_workers=p.download.workers,
            download_timeout_s=p.download.timeout_s,
            download_retries=p.download.retries,
            presplit=p.presplit,
            on_bad_line=p.on_bad_line,
            max_extracted_bytes=p.max_extracted_bytes,
            max_expansion_ratio=p.max_expansion_ratio,
        )

    @property
    def archive_limits(self) -> ArchiveLimits:
        try:
            return ArchiveLimits(self.max_extracted_bytes, self.max_expansion_ratio)
        except ValueError as e:
            raise IngestError(str(e)) from None


@dataclass(frozen=True)
class Candidate:
    """An item with a label and a local file, not yet validated."""

    label: str  # normalised original label
    path: Path  # the file to read (in the source, or the download cache)
    origin: str
    name: str  # original base name
    line: int | None = None  # line of the Dataturks export, for reports
    subset: str = ""  # "train" | "test" given by a kept pre-split tree, else ""
    nested: bool = False  # found in a sub-folder of its class folder (flattened)


@dataclass(frozen=True)
class Skip:
    origin: str
    reason: str
    detail: str

    def __post_init__(self) -> None:
        # A name that is not UTF-8 reaches here raw, in a path or an error message (OSError,
        # Pillow): the report must still be writable.
        object.__setattr__(self, "origin", readable(self.origin))
        object.__setattr__(self, "detail", readable(self.detail))


@dataclass(frozen=True)
class IngestedImage:
    class_dir: str
    label: str
    file: str  # class_dir/name
    sha256: str
    width: int
    height: int
    format: str
    origin: str
    path: Path  # where the bytes are read from
    subset: str = ""
    nested: bool = False


@dataclass
class Collected:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)  # every class seen, even if all items fail
    items: int = 0
    downloads_requested: int = 0
    downloads_failed: int = 0
    multiple_labels: int = 0
    bad_lines: list[int] | None = None  # an export's malformed lines; None for a tree
    presplit: dict[str, Any] | None = None  # {"mode", "folders": {folder: subset}} if detected
    not_utf8: list[str] = field(default_factory=list)  # files whose path is not UTF-8 (readable)


@dataclass
class IngestResult:
    source: str
    kind: str
    images: list[IngestedImage]
    skipped: list[Skip]
    class_counts: dict[str, int]  # class_dir -> images (every class seen, zero included)
    labels: dict[str, str]  # class_dir -> label
    stats: dict[str, Any]
    problems: list[str]  # why the set is unusable; empty when usable

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def classes_with_images(self) -> int:
        return sum(1 for n in self.class_counts.values() if n > 0)
