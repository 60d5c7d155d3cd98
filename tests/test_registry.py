"""The model registry (imgclf/registry.py) is the one list of models: params.yaml, dvc.yaml's
generated train stages and every consumer agree with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imgclf.errors import ParamsError, UserError
from imgclf.params import Block
from imgclf.registry import (
    INPUTS,
    MODELS,
    check_activations,
    input_precision,
    model_names,
    pipeline_models,
)
from tests.test_dvc_deps import load_dvc_stages

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def test_params_models_lists_are_the_registry_in_report_order():
    assert PARAMS["models"] == model_names(inputs="bottlenecks")
    assert PARAMS["finetune_models"] == model_names(inputs="activations")
    assert pipeline_models(PARAMS) == list(MODELS)


def test_each_head_spec_names_its_params_block_and_a_module_at_the_dvc_yaml_path():
    stages = load_dvc_stages()
    for name in model_names(inputs="bottlenecks"):
        spec = MODELS[name]
        block = spec.params_class()
        assert issubclass(block, Block) and block.section == f"train_{name}" == spec.section
        block.from_params(PARAMS)  # the block in params.yaml parses
        # dvc.yaml's train@<name> depends on imgclf/heads/<name>_head.py: the module's file.
        assert spec.module == f"imgclf.heads.{name}_head"
        assert f"imgclf/heads/{name}_head.py" in stages[spec.stage]["deps"]
        assert f"train_{name}" in stages[spec.stage]["params"]
        assert spec.inputs in INPUTS and spec.base is None and not spec.fine_tuned
        for entry in ("train", "save", "load", "predictor", "count_parameters"):
            assert callable(spec.function(entry)), (name, entry)
        if spec.servable:
            assert callable(spec.function("graph_head"))
            assert callable(spec.function("weights_digest"))


def test_each_fine_tuned_spec_has_its_stage_block_base_and_layout_outputs():
    stages = load_dvc_stages()
    fine_tuned = model_names(inputs="activations")
    assert fine_tuned == ["finetune_tf", "finetune_keras"]
    for name in fine_tuned:
        spec = MODELS[name]
        assert spec.fine_tuned and spec.stage == name and spec.section == name
        spec.params_class().from_params(PARAMS)
        assert spec.base in model_names(inputs="bottlenecks") and MODELS[spec.base].servable
        stage = stages[spec.stage]
        module_file = spec.module.replace(".", "/") + ".py"
        assert module_file in stage["deps"]
        assert name in stage["params"]
        # It starts from its base head and writes where imgclf/layout.py says.
        assert f"models/heads/{spec.base}" in stage["deps"]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        assert f"models/heads/{name}" in outs
        assert f"metrics/curves/{name}.csv" in outs and f"logs/tensorboard/{name}" in outs
        assert [f"metrics/train/{name}.json"] == [next(iter(m)) for m in stage["metrics"]]
        for entry in ("train", "save", "load", "predictor", "count_parameters"):
            assert callable(spec.function(entry)), (name, entry)
        assert spec.servable and spec.has_curve
        assert callable(spec.function("graph_head"))
        assert callable(spec.function("weights_digest"))
        assert input_precision(name, PARAMS) == PARAMS["activations"]["precision"]
    assert input_precision("tf", PARAMS) == PARAMS["bottlenecks"]["precision"]
    # Features of another runtime: the served graph is TensorFlow's float32 (int8 has no TF form).
    for precision in ("float32", "bfloat16", "int8"):
        other = {**PARAMS, "bottlenecks": {"runtime": "openvino", "precision": precision}}
        assert input_precision("tf", other) == "float32"
    bf16 = {**PARAMS, "bottlenecks": {"runtime": "tensorflow", "precision": "bfloat16"}}
    assert input_precision("keras", bf16) == "bfloat16"


def test_evaluate_declares_the_metrics_of_every_model_and_reads_the_test_activations():
    evaluate = load_dvc_stages()["evaluate"]
    declared = {next(iter(m)) for m in evaluate["metrics"]}
    assert {f"metrics/evaluate/{n}.json" for n in pipeline_models(PARAMS)} <= declared
    assert {"data/activations/test.npy", "data/activations/test_index.npz"} <= set(evaluate["deps"])
    assert {"models", "finetune_models"} <= set(evaluate["params"])
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    plots = [next(iter(p)) if isinstance(p, dict) else p for p in dvc["plots"]]
    for name in pipeline_models(PARAMS):
        assert f"metrics/confusion/{name}.png" in plots
        assert f"metrics/misclassified/{name}.png" in plots


def test_pipeline_models_are_checked_against_the_registry():
    heads_only = {k: v for k, v in PARAMS.items() if k != "finetune_models"}
    assert pipeline_models(heads_only) == ["tf", "keras", "sklearn"]
    assert pipeline_models({**PARAMS, "finetune_models": []}) == ["tf", "keras", "sklearn"]
    for bad, found in (
        (["finetune_tf", "tf"], "'tf'"),  # a head is not a fine-tuned model
        (["finetune_tf", "finetune_tf"], "twice"),
        (["finetune_torch"], "'finetune_torch'"),
    ):
        with pytest.raises(ParamsError, match=rf"finetune_models.*{found}") as e:
            pipeline_models({**PARAMS, "finetune_models": bad})
        assert "finetune_tf, finetune_keras" in str(e.value)
    with pytest.raises(ParamsError, match=r"models.*a list"):
        pipeline_models({**PARAMS, "models": "tf"})
    # A fine-tune needs its head in the result: else it starts from a stale models/heads/<head>.
    assert pipeline_models({**PARAMS, "models": ["tf"], "finetune_models": ["finetune_tf"]}) == [
        "tf", "finetune_tf"
    ]  # fmt: skip
    with pytest.raises(ParamsError) as e:
        pipeline_models({**PARAMS, "models": ["tf", "sklearn"]})
    assert str(e.value) == (
        "params.yaml: finetune_models: expected fine-tuned models whose head `models:` lists "
        "(finetune_keras starts from the keras head), found 'finetune_keras' without 'keras' "
        "in models ['tf', 'sklearn']. Add keras to models, or take finetune_keras out of "
        "finetune_models."
    )


def test_a_cut_is_checked_against_the_fine_tunes_of_the_pipeline():
    from imgclf.activations import CUT_SHAPES
    from imgclf.finetune.finetune_tf import blocks_after

    tf_cuts = MODELS["finetune_tf"].cuts
    for cut in CUT_SHAPES:  # the registry says what finetune_tf's rewrite takes, no more
        if cut in tf_cuts:
            assert blocks_after(cut)
        else:
            with pytest.raises(ParamsError, match="finetune_tf can train from"):
                check_activations(cut, ["orig"], PARAMS)
            with pytest.raises(UserError, match="needs a cut at one of"):
                blocks_after(cut)
    check_activations("mixed_5", ["orig"], {**PARAMS, "finetune_models": ["finetune_keras"]})
    check_activations("mixed_5", ["orig"], {**PARAMS, "finetune_models": []})


def test_test_time_flips_need_the_flip_view_before_anything_is_computed():
    flips = {**PARAMS, "finetune_keras": {**PARAMS["finetune_keras"], "test_time_flip": True}}
    with pytest.raises(ParamsError, match=r"finetune_keras.test_time_flip: .*Add flip"):
        check_activations("mixed_8", ["orig"], flips)
    check_activations("mixed_8", ["orig", "flip"], flips)
    check_activations("mixed_8", ["orig"], PARAMS)  # no flips asked for


def test_consumers_derive_from_the_registry():
    from imgclf import end_to_end, heads, label_image, reports
    from imgclf.tracking import registered

    servable = ("tf", "keras", "finetune_tf", "finetune_keras")
    assert end_to_end.HEAD_KINDS == tuple(model_names(servable=True)) == servable
    assert registered.MODEL_HEADS == end_to_end.HEAD_KINDS
    assert heads.HEADS == ("tf", "keras", "sklearn")
    assert [reports.display_name(n) for n in MODELS] == [
        "TF", "Keras", "scikit-learn", "TF fine-tuned", "Keras fine-tuned"
    ]  # fmt: skip
    head = next(a for a in label_image.build_parser()._actions if a.dest == "head")
    assert list(head.choices) == list(end_to_end.HEAD_KINDS)
    assert set(PARAMS["track"]["registered_models"]) == set(servable)


def test_the_sklearn_baseline_is_scored_without_importing_tensorflow():
    code = (
        "import sys\n"
        "from imgclf.registry import get_model\n"
        "spec = get_model('sklearn')\n"
        "spec.function('predictor'), spec.function('train'), spec.params_class()\n"
        "from imgclf.heads.common import train_model\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_track_reads_the_gradient_columns_the_fine_tunes_write():
    from imgclf.finetune.common import GRADIENT_NORM_PREFIX, epoch_row
    from imgclf.tracking import contents

    assert contents.GRADIENT_COLUMN_PREFIX == GRADIENT_NORM_PREFIX
    row = epoch_row(2, (0.5, 0.8), (0.6, 0.7), {"mixed_9": 0.3, "head": 0.1})
    assert row["gradient_norm_mixed_9"] == 0.3 and row["gradient_norm_head"] == 0.1
