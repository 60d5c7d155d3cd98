"""The model registry (imgclf/registry.py) is the one list of models: params.yaml, dvc.yaml's
generated train stages and every consumer agree with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from imgclf.params import Block
from imgclf.registry import INPUTS, MODELS, model_names
from tests.test_dvc_deps import load_dvc_stages

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def test_params_models_list_is_the_registry_in_report_order():
    assert PARAMS["models"] == list(MODELS)


def test_each_spec_names_its_params_block_and_a_module_at_the_dvc_yaml_path():
    stages = load_dvc_stages()
    for name, spec in MODELS.items():
        block = spec.params_class()
        assert issubclass(block, Block) and block.section == f"train_{name}"
        block.from_params(PARAMS)  # the block in params.yaml parses
        # dvc.yaml's train@<name> depends on imgclf/heads/<name>_head.py: the module's file.
        assert spec.module == f"imgclf.heads.{name}_head"
        assert f"imgclf/heads/{name}_head.py" in stages[spec.stage]["deps"]
        assert f"train_{name}" in stages[spec.stage]["params"]
        assert spec.inputs in INPUTS
        for entry in ("train", "save", "load", "predictor", "count_parameters"):
            assert callable(spec.function(entry)), (name, entry)
        if spec.servable:
            assert callable(spec.function("graph_head"))
            assert callable(spec.function("weights_digest"))


def test_consumers_derive_from_the_registry():
    from imgclf import end_to_end, label_image, reports, tracking

    assert end_to_end.HEAD_KINDS == tuple(model_names(servable=True)) == ("tf", "keras")
    assert tuple(MODELS) == tracking.HEADS and tracking.MODEL_HEADS == end_to_end.HEAD_KINDS
    assert [reports.display_name(n) for n in MODELS] == ["TF", "Keras", "scikit-learn"]
    head = next(a for a in label_image.build_parser()._actions if a.dest == "head")
    assert list(head.choices) == list(end_to_end.HEAD_KINDS)


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
