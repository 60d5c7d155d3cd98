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
IMAGE_SIZE = 299  # the input side the weights were trained at
MIN_IMAGE_SIZE = 75  # below it a valid convolution or pool of the stem runs out of pixels
# The compute and the maps grow with the side squared: 1024 already costs 11.7x 299's (mixed_8
# 30x30x1280, 14x the activation cache), and larger sides only upscale the photos further.
MAX_IMAGE_SIZE = 1024

# Ids change whenever the preprocessing changes, so cached features keyed on them go stale.
# The input side is part of them: the same photo at 399x399 gives other activations.
_PREPROCESSING_IDS = {
    "tf-2015": "tf2015-v1:resize_bilinear_legacy_{size}:(x-128)/128",
    "keras-imagenet": "keras-imagenet-v1:resize_bilinear_half_pixel_{size}:x/127.5-1",
}

# Inception V3's block outputs at 299x299 (`cut_shape` for another input side). Only a block
# output can be a cut: inside a block the layers after a tensor also read the block's other
# branches, computed before it. A table rather than the model's own shapes, so that a cached
# rerun of the activations stage imports no TensorFlow; tests/test_activations.py checks it
# against the model.
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


def preprocessing_id(weights: str, image_size: int = IMAGE_SIZE) -> str:
    """The id of the backbone's preprocessing (resize to `image_size`, scaling), for cache keys."""
    if weights not in _PREPROCESSING_IDS:
        raise ValueError(f"unknown weights {weights!r} (expected {WEIGHTS_KINDS})")
    return _PREPROCESSING_IDS[weights].format(size=image_size)


def cut_shape(cut: str, image_size: int = IMAGE_SIZE) -> tuple[int, int, int]:
    """The activations' shape at block output `cut` for square inputs of side `image_size`.

    Inception V3 shrinks its maps only in valid-padded layers: three 3x3 stride-2 reductions
    and two 3x3 stride-1 convolutions in the stem, then one stride-2 reduction in mixed_3 and
    one in mixed_8 (299 -> 35 -> 17 -> 8; 399 -> 47 -> 23 -> 11).
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is below Inception V3's {MIN_IMAGE_SIZE}")
    _, _, channels = CUT_SHAPES[cut]

    def reduce(side: int) -> int:
        return (side - 3) // 2 + 1

    side = reduce(reduce(reduce(image_size) - 2) - 2)  # conv s2, conv, pool s2, conv, pool s2
    blocks = list(CUT_SHAPES)
    for reduction in ("mixed_3", "mixed_8"):
        if blocks.index(cut) >= blocks.index(reduction):
            side = reduce(side)
    return side, side, channels


def at_image_size(info: dict[str, Any], image_size: int) -> dict[str, Any]:
    """`backbone.json`'s info for the backbone fed `image_size` inputs: the weights are the
    same, the preprocessing (and so every cache key built on it) is that size's."""
    return {
        **info,
        "image_size": image_size,
        "preprocessing": preprocessing_id(info["weights"], image_size),
    }
