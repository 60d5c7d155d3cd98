"""The model registry: one `ModelSpec` per trainable model, the one place that says which
models exist. The train stages (`train@<name>` in dvc.yaml, from params.yaml `models:`),
the fine-tune stages, evaluate's scores and report columns, track's child runs and end-to-end
exports, and `label-image --head` all derive from `MODELS`.

Two kinds of model:

- heads (`inputs="bottlenecks"`): trained on the frozen pool features by `train@<name>`, one
  `foreach` item of params.yaml `models:` each.
- fine-tuned models (`inputs="activations"`): the blocks after `activations.cut` plus a trained
  head (`base`), fine-tuned on the cached activations by their own stage (named like the model:
  `finetune_tf`, `finetune_keras`), listed in params.yaml `finetune_models:`.

Which models a result holds is params.yaml `models:` + `finetune_models:`, in that order
(`pipeline_models`): evaluate scores exactly those (heads on the test bottlenecks, fine-tuned
models on the test activations, one report) and track logs exactly those. Every name there must
be registered here, with the right kind; `finetune_models: []` gives a heads-only result. Every
model, of either kind, lives where imgclf/layout.py says (models/heads/<name>,
metrics/train/<name>.json, metrics/curves/<name>.csv...).

Adding a head: a module `imgclf/heads/<name>_head.py` (dvc.yaml's `train@<name>` depends on
that file), an entry in `MODELS` below, a `train_<name>:` block in params.yaml with its name in
`models:`. The entry points are attribute names in the module, imported only when used, so
evaluating the scikit-learn baseline never imports TensorFlow and reading this file is cheap.
Adding a fine-tuned model: its module under imgclf/finetune/, an entry with `inputs="activations"`
and `base`, its stage in dvc.yaml and a block of the same name in params.yaml, and its name in
`finetune_models:`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from imgclf.errors import ParamsError

# What a model trains on and is scored on: the bottleneck cache (pool features), or the cached
# activations at activations.cut. Each is also the params.yaml block whose `precision` the
# backbone must run at to reproduce those inputs (an end-to-end model's backbone).
INPUTS = ("bottlenecks", "activations")
# The params.yaml lists of each kind (see the module doc).
LISTS = {"bottlenecks": "models", "activations": "finetune_models"}
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

    A fine-tuned model (`inputs="activations"`) trains on activations at the cut, starting
    from the trained head `base`; its train function is called by its own stage (see
    imgclf.finetune.common.train_and_save_finetune), its predictor maps activations [N, h, w, c]
    to probabilities, and its model folder's finetune.json says the cut and whether it averages
    with the flipped view (test_time_flip).

    A model `servable` end to end (one TensorFlow graph with the backbone, exported to MLflow
    and offered by `label-image --head`) also has, under these names:

    - graph_head(model_dir) -> (TF object holding the variables, tf function features ->
      probabilities; for a fine-tuned model, activations at the cut -> probabilities, and
      graph_head(model_dir, float32=True) computes its blocks in float32 whatever its
      recipe's precision: what the LiteRT export converts)
    - weights_digest(model_dir) -> bytes: what identifies its weights (the registry version)

    `params` is "module:Class" of its typed params block (an imgclf.params.Block subclass,
    section `train_<name>`, or `<name>` for a fine-tuned model), passed to `train` as keyword
    arguments.
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
    # A fine-tuned model: the registered head it starts from (its stage depends on that head).
    base: str | None = None
    # A fine-tuned model: the activations.cut values it can train from (None: any block output).
    cuts: tuple[str, ...] | None = None

    @property
    def fine_tuned(self) -> bool:
        return self.inputs == "activations"

    @property
    def stage(self) -> str:
        """Its DVC stage: a `foreach` item over params.yaml `models:` for a head, the stage of
        its own name for a fine-tuned model."""
        return self.name if self.fine_tuned else f"train@{self.name}"

    @property
    def section(self) -> str:
        """Its params.yaml block."""
        return str(self.params_class().section)

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
        ModelSpec(
            name="finetune_tf",
            display_name="TF fine-tuned",
            module="imgclf.finetune.finetune_tf",
            params="imgclf.params:FinetuneTfParams",
            train="train_finetune_tf",
            save="save_finetune_tf",
            load="load_finetune_tf",
            description="the TF head with Inception V3's blocks after the cut, fine-tuned in "
            "low-level TensorFlow (tf.Module, explicit variable list, momentum written out)",
            has_curve=True,
            servable=True,
            summary=None,
            inputs="activations",
            tensorflow=True,
            base="tf",
            cuts=("mixed_7", "mixed_8", "mixed_9"),  # the blocks it rewrites op by op
        ),
        ModelSpec(
            name="finetune_keras",
            display_name="Keras fine-tuned",
            module="imgclf.finetune.finetune_keras",
            params="imgclf.params:FinetuneKerasParams",
            train="train_finetune_keras",
            save="save_finetune_keras",
            load="load_finetune_keras",
            description="the Keras head with Inception V3's blocks after the cut, fine-tuned "
            "with Keras (trainable flags, compile/fit, callbacks)",
            has_curve=True,
            servable=True,
            summary=None,
            inputs="activations",
            tensorflow=True,
            base="keras",
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


def model_names(
    *,
    servable: bool | None = None,
    has_curve: bool | None = None,
    inputs: str | None = None,
) -> list[str]:
    """Registered model names in report order, optionally only the servable / curved ones, or
    those on one kind of inputs (INPUTS)."""
    return [
        s.name
        for s in MODELS.values()
        if (servable is None or s.servable == servable)
        and (has_curve is None or s.has_curve == has_curve)
        and (inputs is None or s.inputs == inputs)
    ]


def pipeline_models(params: Mapping[str, Any]) -> list[str]:
    """The models of this pipeline's result, in report order: params.yaml `models:` (heads)
    then `finetune_models:` (fine-tuned models). A missing `finetune_models:` means none. Each
    name is checked against the registry and its kind."""
    names: list[str] = []
    for inputs, key in LISTS.items():
        listed = params.get(key, [] if key == "finetune_models" else None)
        kind = model_names(inputs=inputs)
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise ParamsError(key, expected="a list of model names: " + ", ".join(kind),
                              found=repr(listed))  # fmt: skip
        for name in listed:
            if name not in kind or name in names:
                raise ParamsError(
                    key,
                    expected="registered models of this kind (imgclf/registry.py), each once: "
                    + ", ".join(kind),
                    found=repr(name) + (" twice" if name in names else ""),
                )
            names.append(name)
    for name in names:
        # Without its head in the result, a fine-tune would start from whatever models/heads/
        # held from an earlier run (another split's, which may have trained on this test set).
        base = MODELS[name].base
        if base is not None and base not in names:
            raise ParamsError(
                "finetune_models",
                expected=f"fine-tuned models whose head `models:` lists ({name} starts from "
                f"the {base} head)",
                found=f"{name!r} without {base!r} in models {params.get('models')!r}",
                todo=f"Add {base} to models, or take {name} out of finetune_models.",
            )
    return names


def check_activations(cut: str, test_views: Sequence[str], params: Mapping[str, Any]) -> None:
    """Refuse activations the fine-tuned models of this pipeline cannot use, before the
    activations stage spends its minutes (half an hour on the flowers) and the fine-tunes
    theirs: a cut a model cannot train from, or test-time flips without the flip view."""
    for name in pipeline_models(params):
        spec = MODELS[name]
        if spec.cuts is not None and cut not in spec.cuts:
            raise ParamsError(
                "activations.cut",
                found=repr(cut),
                expected=f"a cut {name} can train from: {', '.join(spec.cuts)}",
                todo=f"Set activations.cut to one of those, or take {name} out of finetune_models.",
            )
        flips = spec.fine_tuned and model_params(spec, params).get("test_time_flip")
        if flips and "flip" not in test_views:
            raise ParamsError(
                f"{spec.section}.test_time_flip",
                found=f"true, with activations.test_views {list(test_views)}",
                expected="the flip view among the test views, to average with",
                todo="Add flip to activations.test_views, or set test_time_flip: false.",
            )


def model_params(spec: ModelSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The model's params block of params.yaml, parsed and checked, as keyword arguments."""
    return spec.params_class().from_params(params).as_kwargs()


def base_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The params block of fine-tuned model `name`'s base head (its train recipe)."""
    base = get_model(name).base
    if base is None:
        raise ValueError(f"model {name!r} is not fine-tuned from a head")
    return model_params(get_model(base), params)


def input_precision(name: str, params: Mapping[str, Any]) -> str:
    """The TensorFlow precision model `name`'s end-to-end model runs the backbone at: that of
    the stage that computed its inputs (params.yaml `bottlenecks` for a head, `activations` for
    a fine-tuned model), to reproduce what was evaluated, when that stage ran the tensorflow
    runtime. Another runtime (openvino) has no TensorFlow graph of its own, and int8 no
    TensorFlow form: its models run TensorFlow float32, the reference its features passed the
    fidelity gate against (imgclf/fidelity.py), so their answers are close to, not equal to,
    what evaluate scored."""
    block = params.get(get_model(name).inputs) or {}
    if block.get("runtime", "tensorflow") != "tensorflow":
        return "float32"
    return str(block.get("precision", "float32"))


def display_name(name: str) -> str:
    return MODELS[name].display_name if name in MODELS else name
