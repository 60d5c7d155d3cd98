"""Each model's test-set probabilities, from the models the train and fine-tune stages saved:
the heads on the test bottlenecks, the fine-tuned models on the test activations (the `orig`
view, averaged with `flip` for a model saved with test_time_flip). The evaluate stage scores
them; the export stage compares its LiteRT files with them.

One report needs one test set: the activations' rows must be the bottlenecks' images in the
same order, which is checked (`aligned_test_activations`) rather than assumed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from imgclf.bottleneck_files import Bottlenecks
from imgclf.errors import UserError
from imgclf.heads import HEADS, load_predictor, model_dir
from imgclf.registry import get_model


def aligned_test_activations(test: Bottlenecks, activations_dir: str | Path) -> Any:
    """The test activations, checked to hold every test bottleneck's image, in the same order
    and with the same label, in their `orig` view: the fine-tuned models' rows of the report
    are then image for image those of the heads (McNemar pairs them by position)."""
    from imgclf.activations import load_activations

    acts = load_activations(activations_dir, "test")
    index = Path(activations_dir) / "test_index.npz"
    if "orig" not in acts.views:
        raise UserError(
            f"{index} holds the views {list(acts.views)} but not `orig`, which the fine-tuned "
            "models are scored on: add orig to activations.test_views and rerun (dvc repro)"
        )
    orig = acts.of_view("orig")
    ids, labels = acts.ids[orig], acts.labels[orig]
    if len(ids) != len(test.ids) or not np.array_equal(ids, test.ids):
        differ = next(
            (i for i, (a, b) in enumerate(zip(ids, test.ids, strict=False)) if a != b),
            min(len(ids), len(test.ids)),
        )
        found = ids[differ] if differ < len(ids) else "nothing"
        expected = test.ids[differ] if differ < len(test.ids) else "nothing"
        raise UserError(
            f"{index} lists {len(ids)} test images and the test bottlenecks {len(test.ids)}; "
            f"they differ from row {differ} on ({found} in the activations, {expected} in the "
            "bottlenecks): the two come from different splits. Rerun both stages on the "
            "current split (dvc repro bottlenecks activations)"
        )
    if not np.array_equal(labels, test.labels):
        (bad,) = np.flatnonzero(labels != test.labels)[:1]
        raise UserError(
            f"{index} labels test image {ids[bad]} as class {int(labels[bad])}, the test "
            f"bottlenecks as {int(test.labels[bad])}: rerun the activations stage (dvc repro "
            "activations)"
        )
    return acts


def predict_heads(
    test: Bottlenecks,
    models_dir: str | Path,
    heads: Sequence[str] = HEADS,
    activations_dir: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Each model's test-set probabilities, from the models the train and fine-tune stages
    saved (a missing model raises FileNotFoundError naming the stage to run): the heads on
    the bottlenecks, the fine-tuned models on the test activations in `activations_dir`."""
    from imgclf.finetune.common import predict_images, uses_test_time_flip

    acts = None
    out = {}
    # Shared by evaluate and export: the bar names the work, not the stage.
    for head in tqdm(heads, desc="test predictions", unit="model", file=sys.stderr):
        folder = model_dir(models_dir, head)
        if not get_model(head).fine_tuned:
            out[head] = load_predictor(head, folder)(test.features)
            continue
        if activations_dir is None:
            raise ValueError(f"{head} is scored on the test activations: give activations_dir")
        if acts is None:
            acts = aligned_test_activations(test, activations_dir)
        predict = load_predictor(head, folder)
        out[head] = predict_images(predict, acts, test_time_flip=uses_test_time_flip(folder))
    return out
