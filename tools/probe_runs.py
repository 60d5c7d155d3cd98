"""What the probes (tools/*_probe.py) share: their command line (`train` writes an .npz per
split seed, with `y_val`, `y_test` and probabilities; `table` reads them) and the cells of
their tables."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workspace:
    """What every probe reads from a workspace where a seed's fine-tunes ran: its params, where
    things are, the heads' slice, and the train and test activations split as the stages do."""

    params: dict[str, Any]
    layout: Any  # imgclf.layout.Layout
    heads: Any  # imgclf.params.HeadsParams
    acts: Any  # imgclf.activations.Activations, train
    test: Any  # the same, test (None when loaded with_test=False)
    data: Any  # imgclf.finetune.common.FinetuneData

    def labels(self) -> dict[str, np.ndarray]:
        """`y_val` and `y_test` (the `orig` view of the test images): every probe file's."""
        return {"y_val": self.data.y_val, "y_test": self.test.labels[self.test.of_view("orig")]}

    def val_scores(self, predict: Callable) -> np.ndarray:
        """A model's probabilities on the `orig` view of the validation images."""
        from imgclf.finetune.common import predict_images

        return predict_images(predict, self.acts, test_time_flip=False, rows=self.data.val_rows)

    def scores(self, predict: Callable) -> tuple[np.ndarray, np.ndarray]:
        """A model's probabilities on the `orig` view of the validation and the test images."""
        from imgclf.finetune.common import predict_images

        return self.val_scores(predict), predict_images(predict, self.test, test_time_flip=False)


def load_workspace(workdir: Path, with_test: bool = True) -> Workspace:
    """The workspace at `workdir`; `with_test=False` leaves the test activations unread (the
    recipe search, which must never see a test row)."""
    import yaml

    import imgclf.quiet_tf  # noqa: F401
    from imgclf.activations import load_activations
    from imgclf.finetune.common import stage_finetune_data
    from imgclf.layout import Layout
    from imgclf.params import HeadsParams

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    layout = Layout.from_params(params, workdir)
    heads = HeadsParams.from_params(params)
    acts = load_activations(layout.activations, "train")
    test = load_activations(layout.activations, "test") if with_test else None
    data, _ = stage_finetune_data(acts, layout, heads.as_kwargs())
    return Workspace(params, layout, heads, acts, test, data)


def fine_tuned_models() -> list[str]:
    """The registry's fine-tuned models (those trained on the cached activations)."""
    from imgclf.registry import model_names

    return model_names(inputs="activations")


def models_in(runs: dict[str, dict[str, np.ndarray]]) -> list[str]:
    """The fine-tuned models whose `<model>_val` every probe file holds (files written before
    a model was registered lack it), in registry order."""
    return [m for m in fine_tuned_models() if all(f"{m}_val" in r for r in runs.values())]


def trained_head(ws: Workspace, name: str) -> Callable[[Any], Any]:
    """A `start` for train_and_score: fine-tuned model `name`'s base head as its train stage
    saved it, loaded anew at every call (Keras trains the head's layers in place)."""
    from imgclf.registry import get_model

    base = get_model(name).base
    assert base is not None, f"{name} is not a fine-tuned model"
    load = get_model(base).function("load")
    return lambda _top: load(ws.layout.model_dir(base))


def refitted_head(ws: Workspace, name: str, data: Any) -> Callable[[Any], Any]:
    """A `start` for train_and_score: fine-tuned model `name`'s base head trained anew on
    `data`'s rows (what the stage's `refit_head: true` does), given the frozen top."""
    from imgclf.finetune.common import refit_head
    from imgclf.heads.common import read_labels
    from imgclf.registry import base_params, get_model

    base = get_model(name).base
    assert base is not None, f"{name} is not a fine-tuned model"
    n_classes = len(read_labels(ws.layout.model_dir(base)))
    recipe = base_params(name, ws.params)
    return lambda top: refit_head(base, top, data, n_classes=n_classes, seed=ws.heads.seed,
                                  recipe=recipe)  # fmt: skip


def frozen_top(ws: Workspace, precision: str) -> Any:
    """The pretrained blocks after the workspace's cut, as the fine-tune stages build them."""
    from imgclf.inception import build_top, load_backbone

    backbone = load_backbone(ws.layout.backbone, precision=precision,
                             image_size=ws.params["activations"]["image_size"])  # fmt: skip
    return build_top(backbone.model, ws.params["activations"]["cut"])


def train_like_stage(
    ws: Workspace, name: str, start: Callable[[Any], Any], data: Any, *, seed: int,
    precision: str | None = None, changes: Mapping[str, Any] | None = None,
) -> Any:  # fmt: skip
    """Fine-tuned model `name` trained as its stage trains it (its recipe from the workspace's
    params with `changes` on top, its trainer, the blocks after the cut built anew, its epoch
    kept by the same rule) from the head `start(top)` returns (given the frozen blocks: a refit
    needs them) on `data`'s rows (a FinetuneData: the stage's, or a probe's selection), the
    training order seeded by `seed`, the blocks at `precision` (default: the recipe's).
    Returns the trainer's result; nothing is written."""
    import inspect
    import tempfile

    from imgclf.finetune.common import split_recipe
    from imgclf.registry import get_model, model_params

    spec = get_model(name)
    cut = ws.params["activations"]["cut"]
    recipe, settings = split_recipe({**model_params(spec, ws.params), **(changes or {})})
    train_fn = spec.function("train")
    # finetune_tf's trainer also takes the cut (its module rewrites the blocks after it).
    extra = {"cut": cut} if "cut" in inspect.signature(train_fn).parameters else {}
    # Built anew for every model: Keras trains the top's and the head's layers in place.
    top = frozen_top(ws, precision or settings.precision)
    head = start(top)
    with tempfile.TemporaryDirectory() as events:
        return train_fn(
            top, head, data.x_train, data.y_train, data.x_val, data.y_val,
            tensorboard_dir=events, train_images=data.train_images, seed=seed, progress=False,
            **extra, **recipe,
        )  # fmt: skip


def train_and_score(
    ws: Workspace, name: str, start: Callable[[Any], Any], data: Any, *, seed: int,
    precision: str | None = None, changes: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, Any]:  # fmt: skip
    """`train_like_stage`, then the model saved as its stage saves it: its probabilities on
    the `orig` view of the validation and test images, and the trainer's result."""
    import tempfile

    from imgclf.heads.common import read_labels
    from imgclf.registry import get_model

    spec = get_model(name)
    assert spec.base is not None, f"{name} is not a fine-tuned model"
    result = train_like_stage(ws, name, start, data, seed=seed, precision=precision,
                              changes=changes)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        spec.function("save")(result.model, model_dir, read_labels(ws.layout.model_dir(spec.base)),
                              test_time_flip=False, cut=ws.params["activations"]["cut"],
                              image_size=ws.params["activations"]["image_size"])  # fmt: skip
        val, test = ws.scores(spec.function("predictor")(model_dir))
    return val, test, result


def load_runs(files: list[Path]) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """The files' arrays by file stem (the split seed's name), and the validation images
    pooled over them."""
    stems = [f.stem for f in files]
    if twice := sorted({str(f) for f in files if stems.count(f.stem) > 1}):
        raise SystemExit(f"one file per split seed: {', '.join(twice)} share a name")
    runs = {f.stem: dict(np.load(f)) for f in files}
    return runs, sum(len(r["y_val"]) for r in runs.values())


def right(probs: np.ndarray, labels: np.ndarray) -> int:
    return int(np.sum(probs.argmax(1) == labels))


def mean_sd(accuracies: list[float]) -> str:
    """`0.941 ± 0.006; 0.935 0.941 ...`: the mean over seeds, then each seed's."""
    sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return f"{statistics.mean(accuracies):.3f} ± {sd:.3f}; " + " ".join(
        f"{a:.3f}" for a in accuracies
    )


def mcnemar_cell(seed: str, new: np.ndarray, old: np.ndarray, labels: np.ndarray) -> str:
    """`seed: b/c, p = …`: test images right only by `new` / only by `old` (probabilities),
    and the exact McNemar p-value."""
    from imgclf.evaluation import mcnemar_exact

    new_right, old_right = new.argmax(1) == labels, old.argmax(1) == labels
    b, c = int(np.sum(new_right & ~old_right)), int(np.sum(old_right & ~new_right))
    return f"{seed}: {b}/{c}, p = {mcnemar_exact(b, c)[0]:.3g}"


def cli(
    doc: str,
    add_options: Callable[[argparse.ArgumentParser], None],
    train: Callable[[argparse.Namespace], dict[str, np.ndarray]],
    table: Callable[[list[Path]], str],
) -> None:
    """A probe's command line: `train --workdir DIR --out F.npz [options]` writes what
    `train(args)` returns (args.workdir resolved); `table F.npz ...` prints `table(files)`."""
    from imgclf.errors import UserError

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train")
    train_parser.add_argument("--workdir", type=Path, default=ROOT)
    add_options(train_parser)
    train_parser.add_argument("--out", type=Path, required=True)
    sub.add_parser("table").add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "table":
        print(table(args.files))
        return
    args.workdir = args.workdir.resolve()
    if not (args.workdir / "params.yaml").is_file():
        raise SystemExit(
            f"error: --workdir {args.workdir} has no params.yaml: pass a clone of this project "
            "in which `dvc repro evaluate` (or one seed of tools/split_seeds.py) has run"
        )
    try:
        out = train(args)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    np.savez(args.out, **out)
