"""What a backbone directory holds and where the backbone can be cut, without TensorFlow.

Importing TensorFlow takes 5-15 s here; a stage whose work is all cached (the activations
stage's rerun) reads these and never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgclf.errors import MissingInput
from imgclf.fileio import read_json

INFO_FILE = "backbone.json"
WEIGHTS_KINDS = ("tf-2015", "keras-imagenet")

# Inception V3's block outputs at 299x299. Only a block output can be a cut: inside a block
# the layers after a tensor also read the block's other branches, computed before it. A table
# rather than the model's own shapes, so that a cached rerun of the activations stage imports
# no TensorFlow; tests/test_activations.py checks it against the model.
CUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mixed": (35, 35, 256),
    "mixed_1": (35, 35, 288),
    "mixed_2": (35, 35, 288),
    "mixed_3": (17, 17, 768),
    "mixed_4": (17, 17, 768),
    "mixed_5": (17, 17, 768),
    "mixed_6": (17, 17, 768),
    "mixed_7": (17, 17, 768),
    "mixed_8": (8, 8, 1280),
    "mixed_9": (8, 8, 2048),
    "mixed_10": (8, 8, 2048),
}


def read_backbone_info(backbone_dir: str | Path) -> dict[str, Any]:
    """`backbone.json` of a backbone directory, checked (cheap: builds no model)."""
    info_path = Path(backbone_dir) / INFO_FILE
    if not info_path.is_file():
        raise MissingInput(f"{info_path} not found: run the backbone stage first")
    info = read_json(info_path)
    if info.get("weights") not in WEIGHTS_KINDS:
        raise ValueError(
            f"{info_path}: unknown weights {info.get('weights')!r} (expected {WEIGHTS_KINDS})"
        )
    return info
