"""The model registry: one `ModelSpec` per trainable model, the one place that says which
models exist. The train stages (`train@<name>` in dvc.yaml, from params.yaml `models:`),
evaluate's scores and report columns, track's child runs and end-to-end exports, and
`label-image --head` all derive from `MODELS`.

Adding a model: a module `imgclf/heads/<name>_head.py` (dvc.yaml's `train@<name>` depends on
that file), an entry in `MODELS` below, a `train_<name>:` block in params.yaml with its name in
`models:`. The entry points are attribute names in the module, imported only when used, so
evaluating the scikit-learn baseline never imports TensorFlow and reading this file is cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# What a model trains on. Every model today reads the bottleneck cache; the fine-tuned models
# (issue 12) will read cached activations of an earlier backbone layer.
INPUTS = ("bottlenecks", "activations")
# The functions a servable model's module has under these names.
SERVING_ENTRIES = ("graph_head", "weights_digest")


@dataclass(frozen=True)
class ModelSpec:
    """One trainable model. `train`, `save`, `load`, `predictor`, `count_parameters` and
    `summary` name functions of `module`:

    - train(x_train, y_train, x_val, y_val, *, n_classes, seed, **params) -> TrainResult
    - save(model, model_dir, classes); load(model_dir) -> model
    - predictor(model_dir) -> (features float32 [N, F] -> probabilities [N, n_classes])
    - count_parameters(model) -> int
    - summary(metrics) -> str: the train stage's one-line summary (None: a generic one)

    A model `servable` end to end (one TensorFlow graph with the backbone, exported to MLflow
    and offered by `label-image --head`) also has, under these names:

    - graph_head(model_dir) -> (TF object holding the variables, tf function features ->
      probabilities)
    - weights_digest(model_dir) -> bytes: what identifies its weights (the registry version)

    `params` is "module:Class" of its typed params block (an imgclf.params.Block subclass,
    section `train_<name>`), passed to `train` as keyword arguments.
    """

    name: str
    display_name: str
    module: str
    params: str
    train: str
    save: str
    load: str
    description: str
    predictor: str = "predictor"
    count_parameters: str = "count_parameters"
    has_curve: bool = False
    servable: bool = False
    summary: str | None = "summary_line"
    inputs: str = "bottlenecks"
    # Imports TensorFlow: its stage silences TF's start-up notices first (imgclf.quiet_tf).
    tensorflow: bool = False

    @property
    def stage(self) -> str:
        """Its DVC stage (a `foreach` over params.yaml `models:`)."""
        return f"train@{self.name}"

    def load_module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def function(self, entry: str) -> Callable[..., Any]:
        """The function behind entry point `entry` ("train", "predictor"...), imported now."""
        attr = entry if entry in SERVING_ENTRIES else getattr(self, entry)
        if attr is None or (entry in SERVING_ENTRIES and not self.servable):
            raise ValueError(f"model {self.name!r} has no {entry} function")
        return getattr(self.load_module(), attr)

    def params_class(self) -> Any:
        module, _, cls = self.params.partition(":")
        return getattr(importlib.import_module(module), cls)


# Report order: columns of comparison.md, child runs in MLflow.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="tf",
            display_name="TF",
            module="imgclf.heads.tf_head",
            params="imgclf.params:TrainTfParams",
            train="train_tf_head",
            save="save_tf_head",
            load="load_tf_head",
            description="retrain.py's softmax head in low-level TensorFlow (tf.Variable, "
            "GradientTape, SGD)",
            has_curve=True,
            servable=True,
            tensorflow=True,
        ),
        ModelSpec(
            name="keras",
            display_name="Keras",
            module="imgclf.heads.keras_head",
            params="imgclf.params:TrainKerasParams",
            train="train_keras_head",
            save="save_keras_head",
            load="load_keras_head",
            description="the Keras tutorial's head (Dense + softmax, RMSprop, EarlyStopping)",
            has_curve=True,
            servable=True,
            tensorflow=True,
        ),
        ModelSpec(
            name="sklearn",
            display_name="scikit-learn",
            module="imgclf.heads.sklearn_head",
            params="imgclf.params:TrainSklearnParams",
            train="train_sklearn_head",
            save="save_sklearn_head",
            load="load_sklearn_head",
            description="scikit-learn's multinomial logistic regression (lbfgs)",
        ),
        # New models above this line.
    ]
}


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(
            f"unknown head {name!r}: expected one of the registered models "
            f"{', '.join(MODELS)} (imgclf/registry.py)"
        )
    return MODELS[name]


def model_names(*, servable: bool | None = None, has_curve: bool | None = None) -> list[str]:
    """Registered model names in report order, optionally only the servable / curved ones."""
    return [
        s.name
        for s in MODELS.values()
        if (servable is None or s.servable == servable)
        and (has_curve is None or s.has_curve == has_curve)
    ]


def model_params(spec: ModelSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The model's params block of params.yaml, parsed and checked, as keyword arguments."""
    return spec.params_class().from_params(params).as_kwargs()


def display_name(name: str) -> str:
    return MODELS[name].display_name if name in MODELS else name
