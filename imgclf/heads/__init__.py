"""The trained heads, one module per model of the registry (imgclf/registry.py).

Each head module has the train/save/load/predictor/count_parameters functions its `ModelSpec`
names; the framework is only imported when that head is used, so evaluating the scikit-learn
baseline never loads TensorFlow. The names below are the registry's, kept for callers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from imgclf.layout import Layout
from imgclf.registry import get_model, model_names

# The heads on the frozen pool features (the fine-tuned models are registered too, on
# activations: imgclf.finetune).
HEADS = tuple(model_names(inputs="bottlenecks"))


def head_module(head: str) -> ModuleType:
    """The module implementing registered model `head`."""
    return get_model(head).load_module()


def model_dir(models_dir: str | Path, head: str) -> Path:
    """Where the train (or fine-tune) stage of `head` saves it: <paths.models>/heads/<head>."""
    return Layout.of(models=models_dir).model_dir(get_model(head).name)


def load_predictor(head: str, model_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function features float32 [N, F] (activations [N, h, w, c] for a fine-tuned model) ->
    probabilities float32 [N, n_classes], columns in label order (labels.txt in `model_dir`)."""
    return get_model(head).function("predictor")(model_dir)


__all__ = ["HEADS", "head_module", "load_predictor", "model_dir"]
