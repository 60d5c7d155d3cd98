"""Typed params.yaml blocks: parsed once, checked, errors naming the key."""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import pytest
import yaml

from imgclf import params as P
from imgclf.errors import ParamsError, UserError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
BLOCKS = [
    P.DataParams,
    P.IngestParams,
    P.SplitParams,
    P.TrackParams,
    P.BackboneParams,
    P.BottlenecksParams,
    P.RayParams,
    P.HeadsParams,
    P.AuditParams,
    P.TrainTfParams,
    P.TrainKerasParams,
    P.TrainSklearnParams,
    P.EvaluateParams,
    P.LitertParams,
]


def with_value(section: str, key: str, value) -> dict:
    params = copy.deepcopy(PARAMS)
    params[section][key] = value
    return params


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.section)
def test_the_repository_params_parse_completely(block):
    parsed = block.from_params(PARAMS)
    assert parsed.as_kwargs() == PARAMS[block.section]


@pytest.mark.parametrize(
    ("block", "key", "value", "message"),
    [
        (
            P.TrainTfParams,
            "steps",
            "abc",
            "train_tf.steps: expected a positive integer, found 'abc'.",
        ),
        (P.TrainTfParams, "steps", 0, "train_tf.steps: expected a positive integer, found 0."),
        (P.TrainTfParams, "steps", 2.5, "train_tf.steps: expected a positive integer, found 2.5."),
        (
            P.TrainTfParams,
            "dropout",
            1.0,
            "train_tf.dropout: expected a number >= 0 and < 1, found 1.0.",
        ),
        (
            P.TrainKerasParams,
            "epochs",
            True,
            "train_keras.epochs: expected a positive integer, found True.",
        ),
        (P.TrainKerasParams, "learning_rate", -1, "expected a positive number, found -1."),
        (P.TrainKerasParams, "learning_rate", "inf", "expected a positive number, found 'inf'."),
        (P.FinetuneTfParams, "learning_rate", math.inf, "expected a positive number, found inf."),
        (P.TrainSklearnParams, "standardize", "yes", "expected true or false, found 'yes'."),
        (P.HeadsParams, "validation_fraction", 1, "expected a number > 0 and <= 0.5, found 1."),
        (P.HeadsParams, "validation_fraction", 0, "expected a number > 0 and <= 0.5, found 0."),
        (P.BottlenecksParams, "batch_size", 0, "expected an integer between 1 and 1024, found 0."),
        (P.TrainKerasParams, "batch_size", "x", "between 1 and 65536, found 'x'."),
        (P.EvaluateParams, "min_accuracy", "nan", "expected a number >= 0, found 'nan'."),
        (
            P.BottlenecksParams,
            "precision",
            "fp16",
            "expected one of float32, bfloat16, int8, found 'fp16'.",
        ),
        (P.FinetuneKerasParams, "precision", "int8", "expected one of auto, float32, bfloat16, f"),
        (P.BackboneParams, "weights", "imagenet", "expected one of tf-2015, keras-imagenet"),
        (P.BottlenecksParams, "executor", "spark", "expected one of local, ray, found 'spark'."),
        (P.RayParams, "address", "localhost", "expected local, auto, ray://host:port or host:port"),
        (P.RayParams, "address", "ray://head:port", "found 'ray://head:port'."),
        (P.RayParams, "actors", 0, "ray.actors: expected a positive integer, found 0."),
        (P.RayParams, "cpus_per_actor", 0, "ray.cpus_per_actor: expected a positive number"),
        (P.DataParams, "source", " ", "data.source: expected a non-empty string, found ' '."),
        (P.SplitParams, "seed", -1, "split.seed: expected an integer >= 0, found -1."),
        (P.SplitParams, "test_fraction", 0, "between 0 and 1 (exclusive), found 0."),
        (P.IngestParams, "presplit", "merge", "expected one of keep, pool, found 'merge'."),
        (P.IngestParams, "max_image_pixels", "1e12.5", "expected a positive integer"),
        (P.TrackParams, "log_models", "flase", "expected true, false or a non-empty list of"),
        (P.TrackParams, "log_models", ["tf", "tf"], "model names, found ['tf', 'tf']."),
        (
            P.TrackParams,
            "registered_models",
            {"tf": "{datset}-tf"},
            "expected a mapping of model names to names without '/' or ':', {dataset} their "
            "only placeholder",
        ),
        # MLflow refuses these, but only at registration, after the run logged its models.
        (
            P.TrackParams,
            "registered_models",
            {"tf": "{dataset}/tf"},
            "found {'tf': '{dataset}/tf'}",
        ),
        (P.TrackParams, "registered_models", {"tf": "team:tf"}, "without '/' or ':'"),
    ],
)
def test_bad_values_name_the_key(block, key, value, message):
    with pytest.raises(ParamsError) as info:
        block.from_params(with_value(block.section, key, value))
    text = str(info.value)
    assert text.startswith(f"params.yaml: {block.section}.{key}: "), text
    assert message in text
    assert isinstance(info.value, UserError)


# The bounds that stop an absurd value before it runs out of memory (or leaves the models a
# handful of training images): the message gives the value, the bound and why.
@pytest.mark.parametrize(
    ("block", "key", "value", "bound", "why"),
    [
        (P.HeadsParams, "validation_fraction", 0.95, "<= 0.5", "label audit's folds"),
        (P.BottlenecksParams, "batch_size", 10**9, "between 1 and 1024", "5.6 GB for 1024"),
        (P.FinetuneTfParams, "batch_size", 1025, "between 1 and 1024", "5.6 GB for 1024"),
        (P.FinetuneKerasParams, "batch_size", "1e9", "between 1 and 1024", "5.6 GB for 1024"),
        (P.TrainTfParams, "batch_size", 65537, "between 1 and 65536", "512 MB a step"),
        (P.TrainKerasParams, "batch_size", 10**12, "between 1 and 65536", "512 MB a step"),
    ],
)
def test_values_above_a_bound_say_the_bound_and_why(block, key, value, bound, why):
    with pytest.raises(ParamsError) as info:
        block.from_params(with_value(block.section, key, value))
    text = str(info.value)
    assert text.startswith(f"params.yaml: {block.section}.{key}: expected "), text
    assert f"{bound}, found {value!r}." in text and why in text and "Lower it" in text, text
    # The bound itself is accepted, and a bad value below it gets no reason about the bound.
    top = float(bound.split()[-1]) if "." in bound else int(bound.split()[-1])
    assert getattr(block.from_params(with_value(block.section, key, top)), key) == top
    with pytest.raises(ParamsError) as below:
        block.from_params(with_value(block.section, key, -1))
    assert "Lower it" not in str(below.value)


def test_numbers_as_pyyaml_reads_them():
    # PyYAML reads 1e-4 (no dot) as a string; float() reads it, as the stages always did.
    parsed = P.TrainKerasParams.from_params(with_value("train_keras", "learning_rate", "1e-4"))
    assert parsed.learning_rate == 1e-4
    assert P.TrainTfParams.from_params(with_value("train_tf", "steps", 10.0)).steps == 10


def test_missing_and_unknown_keys_are_errors():
    params = copy.deepcopy(PARAMS)
    del params["train_tf"]["eval_every"]
    with pytest.raises(ParamsError, match=r"train_tf\.eval_every: .*found no such key"):
        P.TrainTfParams.from_params(params)
    with pytest.raises(ParamsError, match=r"train_tf\.learning_rat: .*learning_rat\. Check"):
        P.TrainTfParams.from_params(with_value("train_tf", "learning_rat", 0.1))
    with pytest.raises(ParamsError, match=r"params\.yaml: evaluate: expected a block of"):
        P.EvaluateParams.from_params({"paths": {}})


def test_a_block_inside_a_block_is_as_strict_and_named_in_full():
    params = copy.deepcopy(PARAMS)
    params["ingest"]["download"]["workers"] = 0
    with pytest.raises(ParamsError, match=r"ingest\.download\.workers: expected a positive int"):
        P.IngestParams.from_params(params)
    params["ingest"]["download"] = {**PARAMS["ingest"]["download"], "timout_s": 5}
    with pytest.raises(ParamsError, match=r"ingest\.download\.timout_s: .*timout_s\. Check"):
        P.IngestParams.from_params(params)
    del params["ingest"]["download"]
    with pytest.raises(ParamsError, match=r"ingest\.download: expected a block of workers, "):
        P.IngestParams.from_params(params)
    parsed = P.IngestParams.from_params(PARAMS)
    assert parsed.download.timeout_s == PARAMS["ingest"]["download"]["timeout_s"]


def test_registered_models_name_servable_models_only():
    from imgclf.tracking.registered import registered_model_names

    # The block checks the templates; tracking checks the names against the registry (params
    # imports no registry, so the stages that read params do not depend on every model).
    typo = P.TrackParams.from_params(
        with_value("track", "registered_models", {"finetune_kerass": "{dataset}-ft"})
    )
    with pytest.raises(ParamsError) as info:
        registered_model_names(typo.registered_models, "flowers.tgz")
    assert str(info.value).startswith(
        "params.yaml: track.registered_models.finetune_kerass: expected a servable model of "
        "imgclf/registry.py: tf, keras, finetune_tf, finetune_keras"
    )
    # The scikit-learn baseline has no end-to-end model to register.
    with pytest.raises(ParamsError, match=r"registered_models\.sklearn"):
        registered_model_names({"sklearn": "s"}, "flowers.tgz")
    partial = P.TrackParams.from_params(with_value("track", "registered_models", {"tf": "mine"}))
    assert registered_model_names(partial.registered_models, "flowers.tgz")["tf"] == "mine"


def test_ingest_options_come_from_the_typed_block():
    from imgclf.ingest.records import IngestOptions

    options = IngestOptions.from_params(PARAMS)
    assert options == IngestOptions()  # the defaults of direct calls are params.yaml's
    block = PARAMS["ingest"]
    assert options.download_timeout_s == block["download"]["timeout_s"]
    assert options.max_expansion_ratio == block["max_expansion_ratio"]
    assert options.presplit == block["presplit"]
    with pytest.raises(ParamsError, match=r"ingest\.min_images_per_class: .*found 'abc'"):
        IngestOptions.from_params(with_value("ingest", "min_images_per_class", "abc"))


@pytest.mark.parametrize("address", ["local", "auto", "ray://10.0.0.5:10001", "head:6379"])
def test_ray_addresses(address):
    assert P.RayParams.from_params(with_value("ray", "address", address)).address == address


def test_executor_choices_agree_with_the_registry():
    from imgclf.executors import EXECUTORS

    assert tuple(EXECUTORS) == P.EXECUTORS


def test_choices_agree_with_the_backbone_module():
    from imgclf import inception

    assert P.BACKBONE_WEIGHTS == inception.WEIGHTS_KINDS
    assert set(P.PRECISIONS) == set(inception.PRECISIONS)


def test_runtime_choices_agree_with_the_runtime_registry():
    from imgclf.runtimes import RUNTIMES

    assert {name: spec.precisions for name, spec in RUNTIMES.items()} == P.RUNTIME_PRECISIONS
    assert set(P.ALL_PRECISIONS) == {p for spec in RUNTIMES.values() for p in spec.precisions}


def test_int8_needs_a_runtime_that_offers_it():
    params = with_value("bottlenecks", "precision", "int8")
    with pytest.raises(ParamsError) as info:
        P.BottlenecksParams.from_params(params)
    text = str(info.value)
    assert text.startswith("params.yaml: bottlenecks.precision: expected one of float32, bfloat16")
    assert "with bottlenecks.runtime=tensorflow, found 'int8'" in text
    assert "offered by bottlenecks.runtime: openvino" in text
    params["bottlenecks"]["runtime"] = "openvino"
    assert P.BottlenecksParams.from_params(params).precision == "int8"
    with pytest.raises(ParamsError, match=r"bottlenecks\.runtime: expected one of tensorflow, "):
        P.BottlenecksParams.from_params(with_value("bottlenecks", "runtime", "onnx"))


@pytest.mark.slow
def test_train_signature_defaults_have_not_drifted_from_params_yaml():
    # The stages pass every key; these defaults only serve direct calls (tests, notebooks),
    # which must get the recipe params.yaml documents.
    from imgclf.heads.keras_head import train_keras_head
    from imgclf.heads.sklearn_head import train_sklearn_head
    from imgclf.heads.tf_head import train_tf_head

    for fn, block in [
        (train_tf_head, P.TrainTfParams),
        (train_keras_head, P.TrainKerasParams),
        (train_sklearn_head, P.TrainSklearnParams),
    ]:
        signature = inspect.signature(fn)
        defaults = {k: signature.parameters[k].default for k in PARAMS[block.section]}
        assert defaults == PARAMS[block.section], fn.__name__
        assert signature.parameters["seed"].default == PARAMS["heads"]["seed"]

    # The fine-tunes' trainers take their block but the stage's own settings (split_recipe).
    from imgclf.finetune.common import split_recipe
    from imgclf.finetune.finetune_keras import train_finetune_keras
    from imgclf.finetune.finetune_tf import train_finetune_tf

    for fn, block in [
        (train_finetune_tf, P.FinetuneTfParams),
        (train_finetune_keras, P.FinetuneKerasParams),
    ]:
        recipe, _ = split_recipe(PARAMS[block.section])
        signature = inspect.signature(fn)
        assert {k: signature.parameters[k].default for k in recipe} == recipe, fn.__name__
        assert signature.parameters["seed"].default == PARAMS["heads"]["seed"]


def test_dvc_exp_run_set_rewrites_only_the_lines_it_sets(tmp_path):
    # `make run DATA=...` and `make exp SET=...` go through `dvc exp run -S`, which writes
    # params.yaml back through its own YAML round trip: flow lists become block lists, and a
    # comment or blank line after a block list is dropped. params.yaml is kept in the layout
    # that survives it, so a user's `git diff params.yaml` shows what they set and nothing else.
    from dvc.utils.hydra import apply_overrides

    written = tmp_path / "params.yaml"
    written.write_text((ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    apply_overrides(str(written), ["data.source=../shared/datasets/flower_photos"])
    apply_overrides(str(written), ["train_keras.learning_rate=0.0003", "split.seed=3"])
    before = (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines()
    after = written.read_text(encoding="utf-8").splitlines()
    assert len(after) == len(before), "dvc exp run -S dropped or added lines of params.yaml"
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert [new.strip() for _, new in changed] == [
        "source: ../shared/datasets/flower_photos",
        "seed: 3",
        "learning_rate: 0.0003",
    ], changed


def test_loaded_params_dump_as_yaml_and_read_back_the_same():
    """load_params returns a dict subclass (a missing section is a user error); yaml.safe_dump
    refused it, and a bench that wrote a scratch params.yaml from it stopped, unseen."""
    from imgclf.config import load_params

    params = load_params(ROOT / "params.yaml")
    assert type(params) is not dict
    assert yaml.safe_load(yaml.safe_dump(params, sort_keys=False)) == PARAMS
