"""The three heads trained on the same bottlenecks: low-level TensorFlow, Keras, scikit-learn.

Each head module (`tf_head`, `keras_head`, `sklearn_head`) has `train_<head>_head`,
`save_<head>_head`, `load_<head>_head`, `count_parameters` and `predictor`; the framework is only
imported when that head is used, so evaluating the scikit-learn baseline never loads TensorFlow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

HEADS = ("tf", "keras", "sklearn")

# head -> (module, model directory name under paths.models)
_MODULES = {"tf": "imgclf.heads.tf_head", "keras": "imgclf.heads.keras_head",
            "sklearn": "imgclf.heads.sklearn_head"}  # fmt: skip
MODEL_DIRS = {head: f"{head}_head" for head in HEADS}


def head_module(head: str) -> ModuleType:
    """The module implementing `head` (one of HEADS)."""
    if head not in _MODULES:
        raise ValueError(f"unknown head {head!r}: expected one of {HEADS}")
    return importlib.import_module(_MODULES[head])


def model_dir(models_dir: str | Path, head: str) -> Path:
    """Where the stage of `head` saves it: <paths.models>/<head>_head."""
    if head not in MODEL_DIRS:
        raise ValueError(f"unknown head {head!r}: expected one of {HEADS}")
    return Path(models_dir) / MODEL_DIRS[head]


def load_predictor(head: str, model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function bottlenecks float32 [N, 2048] -> probabilities float32 [N, n_classes], columns
    in label order (labels.txt in `model_dir`). The loaded model is on its `.model` attribute."""
    return head_module(head).predictor(model_dir)


__all__ = ["HEADS", "MODEL_DIRS", "head_module", "load_predictor", "model_dir"]
