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


def _check(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: expected one of {HEADS}")
    return head


def head_module(head: str) -> ModuleType:
    """The module implementing `head` (one of HEADS): imgclf.heads.<head>_head."""
    return importlib.import_module(f"{__name__}.{_check(head)}_head")


def model_dir(models_dir: str | Path, head: str) -> Path:
    """Where the stage of `head` saves it: <paths.models>/<head>_head."""
    return Path(models_dir) / f"{_check(head)}_head"


def load_predictor(head: str, model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function bottlenecks float32 [N, 2048] -> probabilities float32 [N, n_classes], columns
    in label order (labels.txt in `model_dir`)."""
    return head_module(head).predictor(model_dir)


__all__ = ["HEADS", "head_module", "load_predictor", "model_dir"]
