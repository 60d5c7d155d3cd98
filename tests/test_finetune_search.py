"""tools/finetune_search.py: recipe variants scored on the validation slice of a pipeline
result, which it leaves as it was (run on the tiny real pipeline result of test_tracking)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_tracking import tiny_result

ROOT = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def run_probe(tool: str, workdir: Path, out: Path, *train_args: str) -> tuple[dict, str]:
    """tools/<tool> `train` on the pipeline result in `workdir`, writing `out`, which must
    leave the workspace as it was; then `table` on `out`. Returns the arrays and the table."""
    import numpy as np

    before = {name: digest(workdir / name) for name in ("data", "models", "metrics")}
    command = [sys.executable, str(ROOT / "tools" / tool)]
    proc = subprocess.run(
        [*command, "train", "--workdir", str(workdir), *train_args, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert before == {name: digest(workdir / name) for name in ("data", "models", "metrics")}
    table = subprocess.run([*command, "table", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert table.returncode == 0, table.stderr[-3000:]
    return dict(np.load(out)), table.stdout


def test_variants_are_scored_on_validation_and_the_workspace_is_untouched(tmp_path_factory):
    # The default model (finetune_tf) on every view its stage trained on, named with --views:
    # a variant that changes nothing is then the stage's own training, twice in one process
    # (the same validation loss as its metrics, written to 6 digits).
    workdir, params = tiny_result(tmp_path_factory)
    views = params["activations"]["train_views"]
    before = {name: digest(workdir / name) for name in ("data", "models", "metrics")}
    out = tmp_path_factory.mktemp("search") / "search.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "finetune_search.py"), "--workdir", str(workdir),
         "--views", ",".join(views), "--out", str(out),
         "--variant", "base={}", "--variant", 'mixup={"mixup": 0.4, "epochs": 2}',
         "--variant", "again={}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["base", "mixup", "again"]
    assert len(rows[0]["val_accuracy"]) == params["finetune_tf"]["epochs"] == 1
    assert len(rows[1]["val_accuracy"]) == 2 and rows[1]["changes"] == {"mixup": 0.4, "epochs": 2}
    assert all(r["model"] == "finetune_tf" and r["views"] == views for r in rows)
    assert all(0 <= r["best_val_accuracy"] <= 1 for r in rows)
    assert "| mixup " in proc.stdout and "validation" in proc.stdout
    assert {name: digest(workdir / name) for name in before} == before
    assert_reproduces_the_stage(workdir, "finetune_tf", [rows[0], rows[2]])


def assert_reproduces_the_stage(workdir: Path, model: str, rows: list[dict]) -> None:
    stage = json.loads((workdir / "metrics" / "train" / f"{model}.json").read_text())
    for row in rows:
        assert row["val_loss"][-1] == pytest.approx(stage["final_val_loss"], rel=2e-5)
        assert row["best_val_accuracy"] == pytest.approx(stage["best_val_accuracy"], abs=1e-5)


def test_the_search_reproduces_the_keras_stage_from_its_own_recipe(tmp_path_factory):
    # As finetune_tf above, in the other framework: Keras trains its top and head in place, so
    # each variant needs fresh ones.
    workdir, _ = tiny_result(tmp_path_factory)
    out = tmp_path_factory.mktemp("search") / "finetune_keras.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "finetune_search.py"), "--workdir", str(workdir),
         "--model", "finetune_keras", "--out", str(out), "--variant", "base={}",
         "--variant", "again={}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["finetune_keras"] * 2
    assert_reproduces_the_stage(workdir, "finetune_keras", rows)


def test_a_mistyped_key_or_view_stops_before_any_training(tmp_path_factory):
    workdir, _ = tiny_result(tmp_path_factory)
    # From the command line once (argparse to the message, exit status, nothing trained) ...
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "finetune_search.py"), "--workdir", str(workdir),
         "--variant", 'typo={"mixupp": 0.4}'],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "--variant typo: unknown key(s) ['mixupp']" in proc.stderr
    assert "validation" not in proc.stdout
    # ... and the other checks in this process: each Python start with TensorFlow costs ~7 s.
    from tools.finetune_search import search

    with pytest.raises(SystemExit, match=r"--views: \['flop'\] not in"):
        search(workdir, {"base": {}}, ["orig", "flop"])
    # mixup is a regularizer of finetune_tf's trainer only.
    with pytest.raises(SystemExit, match=r"--variant m: unknown key\(s\) \['mixup'\]; "
                       "finetune_keras takes some of"):  # fmt: skip
        search(workdir, {"m": {"mixup": 0.4}}, None, "finetune_keras")


def test_the_image_size_probe_cross_validates_train_images_only(tmp_path_factory):
    # tools/image_size_probe.py on the tiny result: two sizes, the same folds, McNemar against
    # the first; it reads the train bottlenecks' ids, so no test image is ever featurised.
    workdir, _ = tiny_result(tmp_path_factory)
    before = {name: digest(workdir / name) for name in ("data", "models", "metrics")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "image_size_probe.py"), "--workdir", str(workdir),
         "--sizes", "299,331", "--folds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| 299", "| 331", "| average"]
    assert "| 299 | " in table[1] and "0 / 0, p = 1 |" in table[1]  # the reference itself
    assert before == {name: digest(workdir / name) for name in ("data", "models", "metrics")}


def test_the_ensemble_probe_starts_from_the_stages_models_and_varies_only_the_order(
    tmp_path_factory,
):
    # tools/ensemble_probe.py on the tiny result: member 0 is each stage's saved model (so its
    # validation accuracy is the stage's, to the image), member 1 is trained with another
    # training-order seed (so its probabilities differ), and the workspace is left as it was.
    import numpy as np

    workdir, _ = tiny_result(tmp_path_factory)
    out = tmp_path_factory.mktemp("ensemble") / "a.npz"
    run, table = run_probe("ensemble_probe.py", workdir, out, "--members", "2")
    for name in ("finetune_tf", "finetune_keras"):
        val = run[f"{name}_val"]
        assert val.shape[:2] == (2, len(run["y_val"]))
        assert run[f"{name}_test"].shape[:2] == (2, len(run["y_test"]))
        stage = json.loads((workdir / "metrics" / "train" / f"{name}.json").read_text())
        right = int(np.sum(val[0].argmax(1) == run["y_val"]))
        assert right == round(stage["best_val_accuracy"] * stage["n_val"])
        assert not np.array_equal(val[0], val[1]), f"{name}: member 1 is member 0"
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    # The validation table (what a choice is made on), then the test table, read after.
    assert [row.split(" | ")[0] for row in rows] == ["| members averaged", "| 1", "| 2"] * 2
    assert "validation, right of" in rows[0] and "test accuracy" in rows[3]
    n_val = len(run["y_val"])
    right_tf = int(np.sum(run["finetune_tf_val"][0].argmax(1) == run["y_val"]))
    assert f"| 1 | {right_tf} ({right_tf / n_val:.4f})" in rows[1]


def test_the_whole_backbone_probe_trains_every_layer_from_the_stages_start(tmp_path_factory):
    # tools/whole_backbone_probe.py on the tiny result: the stage's model is scored as the stage
    # scored it (its validation count, to the image), the probe's model differs from it and
    # changed the backbone's first convolution (which no stage trains), the workspace is left
    # as it was, and the table puts validation before test.
    import numpy as np

    workdir, _ = tiny_result(tmp_path_factory)
    out = tmp_path_factory.mktemp("whole") / "seed0.npz"
    # The tiny backbone's random weights diverge over all layers at the stage's rate (1e-3).
    run, table = run_probe("whole_backbone_probe.py", workdir, out, "--learning-rate", "1e-6")
    stage = json.loads((workdir / "metrics" / "train" / "finetune_keras.json").read_text())
    right = int(np.sum(run["stage_val"].argmax(1) == run["y_val"]))
    assert right == round(stage["best_val_accuracy"] * stage["n_val"])
    assert run["whole_val"].shape == run["stage_val"].shape
    assert run["whole_test"].shape == run["stage_test"].shape == (len(run["y_test"]), 3)
    assert not np.allclose(run["whole_val"], run["stage_val"], atol=1e-4)
    assert float(run["first_conv_change"]) > 0, "the backbone's first layer did not train"
    assert int(run["peak_rss_bytes"]) > 2**20
    assert len(run["whole_val_by_epoch"]) == stage["epochs"] == 1
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["| finetune_keras", "| stage", "| whole"] * 2
    assert table.index("validation, right of") < table.index("test accuracy")
    assert f"| stage | {right} (" in table


def test_the_learning_curve_subsets_nest_and_keep_every_class():
    import numpy as np

    from tools.learning_curve_probe import nested_image_subset

    labels = np.repeat([0, 1, 2], [40, 20, 3])
    quarter, half, whole = (nested_image_subset(labels, f, seed=7) for f in (0.25, 0.5, 1.0))
    assert set(quarter) < set(half) < set(whole) == set(range(len(labels)))
    # Stratified: round(f × n) of each class, at least one of the smallest.
    assert [int(np.sum(labels[half] == c)) for c in range(3)] == [20, 10, 2]
    assert [int(np.sum(labels[quarter] == c)) for c in range(3)] == [10, 5, 1]
    assert np.array_equal(half, nested_image_subset(labels, 0.5, seed=7))
    assert not np.array_equal(half, nested_image_subset(labels, 0.5, seed=8))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\], not 0"):
        nested_image_subset(labels, 0, seed=7)


def test_equal_steps_give_a_smaller_set_more_epochs():
    from tools.learning_curve_probe import epochs_at

    assert [epochs_at(f, 3, equal_steps=False) for f in (0.25, 0.5, 1)] == [3, 3, 3]
    assert [epochs_at(f, 3, equal_steps=True) for f in (0.25, 0.5, 0.7, 1)] == [12, 6, 4, 3]


def test_one_seeds_passes_with_different_fractions_merge_into_one_curve(tmp_path):
    # A quarter run in a later pass than the half and the whole set: `table` reads one seed's
    # files (one name, two folders) as one curve, and refuses files that are not one seed's.
    import numpy as np

    from tools.learning_curve_probe import merge_passes, table

    rng = np.random.default_rng(0)
    y_val, y_test = rng.integers(0, 5, 20), rng.integers(0, 5, 30)

    def write(folder: str, fractions: list[float], y_val=y_val) -> Path:
        n = len(fractions)
        arrays = {"y_val": y_val, "y_test": y_test, "fractions": np.array(fractions),
                  "n_train_images": np.array([round(100 * f) for f in fractions])}  # fmt: skip
        for m in ("finetune_tf", "finetune_keras"):
            arrays |= {f"{m}_val": rng.random((n, 20, 5)), f"{m}_test": rng.random((n, 30, 5)),
                       f"{m}_start_val": np.full(n, 0.5), f"{m}_epoch": np.ones(n, np.int64),
                       f"{m}_epochs_run": np.array([round(3 / f) for f in fractions])}  # fmt: skip
        (tmp_path / folder).mkdir(exist_ok=True)
        np.savez(tmp_path / folder / "seed0.npz", **arrays)
        return tmp_path / folder / "seed0.npz"

    later, earlier = write("quarter", [0.25]), write("half_all", [0.5, 1.0])
    runs, n_val = merge_passes([earlier, later])
    assert list(runs) == ["seed0"] and n_val == 20
    run = runs["seed0"]
    assert list(run["fractions"]) == [0.25, 0.5, 1.0]
    assert list(run["finetune_keras_epochs_run"]) == [12, 6, 3]
    np.testing.assert_array_equal(run["finetune_tf_val"][0], np.load(later)["finetune_tf_val"][0])
    np.testing.assert_array_equal(run["finetune_tf_test"][1:], np.load(earlier)["finetune_tf_test"])
    printed = table([earlier, later])
    assert "| 25 (0.25) |" in printed and "| 100 (1) |" in printed
    assert "0.25 → 0.5: " in printed and "0.5 → 1: " in printed

    with pytest.raises(SystemExit, match="give each fraction of a seed in one file only"):
        merge_passes([earlier, write("again", [1.0])])
    with pytest.raises(SystemExit, match="not a split seed's images"):
        merge_passes([earlier, write("other_seed", [0.25], y_val=y_val[::-1])])
    # The probes that read one pass per seed refuse two files of one name, not keep the last.
    from tools.probe_runs import load_runs

    with pytest.raises(SystemExit, match=r"one file per split seed: .* share a name"):
        load_runs([earlier, later])


def test_the_learning_curve_probe_trains_on_fewer_images_and_leaves_the_workspace(
    tmp_path_factory,
):
    # tools/learning_curve_probe.py on the tiny result: at fraction 1 every training image
    # outside the validation slice (the stage's count), at 0.5 about half, with all views and
    # (--equal-steps) twice the stage's epochs; each model's head refitted and fine-tuned; the
    # workspace left as it was.
    import numpy as np

    workdir, _ = tiny_result(tmp_path_factory)
    out = tmp_path_factory.mktemp("curve") / "seed0.npz"
    run, table = run_probe(
        "learning_curve_probe.py", workdir, out, "--fractions", "1", "0.5", "--equal-steps"
    )
    assert list(run["fractions"]) == [0.5, 1.0]
    stage = json.loads((workdir / "metrics" / "train" / "finetune_tf.json").read_text())
    half, whole = (int(n) for n in run["n_train_images"])
    assert whole == stage["n_train_images"] and 0 < half < whole
    for name in ("finetune_tf", "finetune_keras"):
        assert run[f"{name}_val"].shape[:2] == (2, len(run["y_val"]))
        assert run[f"{name}_test"].shape[:2] == (2, len(run["y_test"]))
        assert not np.array_equal(run[f"{name}_val"][0], run[f"{name}_val"][1])
        epochs = yaml.safe_load((workdir / "params.yaml").read_text())[name]["epochs"]
        assert list(run[f"{name}_epochs_run"]) == [2 * epochs, epochs]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[:3]] == [
        "| training images (fraction), mean a seed",
        f"| {half} (0.5)",
        f"| {whole} (1)",
    ]
    assert "validation points per doubling, 0.5 → 1:" in table
    assert "the epoch kept of the epochs run, per seed: 0.5: " in table
    assert rows[-1].startswith("| 1 | ") and "Test, read after:" in table


def test_the_tta_probe_scores_every_cached_view_of_validation_and_never_the_test_set(
    tmp_path_factory,
):
    # tools/tta_probe.py on the tiny result: the orig view is each stage's model as the stage
    # scored it (to the image), each view is scored on the same validation images, the averages
    # in the table are of those views, no test row is read, and the workspace is left as it was.
    import numpy as np

    workdir, params = tiny_result(tmp_path_factory)
    run, table = run_probe("tta_probe.py", workdir, tmp_path_factory.mktemp("tta") / "a.npz")
    views = list(run["views"])
    assert views == list(params["activations"]["train_views"]) and len(views) > 1
    assert not [key for key in run if key.endswith("_test")]
    y = run["y_val"]
    for name in ("finetune_tf", "finetune_keras"):
        val = run[f"{name}_val"]
        assert val.shape[:2] == (len(views), len(y))
        stage = json.loads((workdir / "metrics" / "train" / f"{name}.json").read_text())
        right = int(np.sum(val[views.index("orig")].argmax(1) == y))
        assert right == round(stage["best_val_accuracy"] * stage["n_val"])
    every = next(line for line in table.splitlines() if line.startswith("| every cached"))
    all_views = int(np.sum(run["finetune_tf_val"].mean(0).argmax(1) == y))
    assert every.split(" | ")[1].startswith(f"{all_views} ({all_views / len(y):.4f})")


def test_the_wise_ft_probe_runs_from_the_frozen_model_to_the_stages(tmp_path_factory):
    # tools/wise_ft_probe.py on the tiny result: a = 1 is each stage's model and a = 0 its
    # start, both as the stage scored them (to the image); the points between are other models;
    # the output-space mix agrees with the weights at both ends; validation comes before test.
    import numpy as np

    workdir, _ = tiny_result(tmp_path_factory)
    run, table = run_probe("wise_ft_probe.py", workdir, tmp_path_factory.mktemp("wise") / "a.npz")
    alphas = list(run["alphas"])
    assert alphas[0] == 0.0 and alphas[-1] == 1.0
    y = run["y_val"]
    for name in ("finetune_tf", "finetune_keras"):
        wval, oval = run[f"{name}_wval"], run[f"{name}_oval"]
        assert wval.shape[:2] == oval.shape[:2] == (len(alphas), len(y))
        assert run[f"{name}_wtest"].shape[:2] == (len(alphas), len(run["y_test"]))
        stage = json.loads((workdir / "metrics" / "train" / f"{name}.json").read_text())
        assert int(np.sum(wval[-1].argmax(1) == y)) == round(
            stage["best_val_accuracy"] * stage["n_val"]
        )
        assert int(np.sum(wval[0].argmax(1) == y)) == round(
            stage["start_val_accuracy"] * stage["n_val"]
        )
        np.testing.assert_allclose(oval[[0, -1]], wval[[0, -1]], atol=1e-6)
        # The tiny models' probabilities saturate: "another model" is a difference above 1e-6.
        middle = wval[len(alphas) // 2]
        for other in (wval[0], wval[-1], oval[len(alphas) // 2]):
            assert np.abs(middle - other).max() > 1e-6, f"{name}: the weights were not moved"
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")]
    assert rows[:2] == ["| a", "| 0"] and rows[len(alphas)] == "| 1"
    assert table.index("validation, right of") < table.index("Test, read after")


def test_the_swa_windows_are_the_last_epochs_run():
    from tools.swa_probe import windows

    assert windows(9) == [(5, 9), (3, 9), (7, 9), (1, 9)]  # the screen's first
    assert windows(2) == [(1, 2)] * 4


def test_the_swa_probe_puts_back_the_epochs_it_snapshots(tmp_path_factory):
    # tools/swa_probe.py on the tiny result (one fine-tune epoch): its kept epoch is each
    # stage's model as the stage scored it, and every window is that one epoch, so putting the
    # snapshot back must give the same probabilities, on validation and test (a snapshot of
    # the wrong variables, or in another order, would not).
    import numpy as np

    workdir, _ = tiny_result(tmp_path_factory)
    out = tmp_path_factory.mktemp("swa") / "a.npz"
    run, table = run_probe("swa_probe.py", workdir, out, "--score-test")
    y = run["y_val"]
    for name in ("finetune_tf", "finetune_keras"):
        val, test = run[f"{name}_val"], run[f"{name}_test"]
        assert val.shape[:2] == (5, len(y)) and test.shape[:2] == (5, len(run["y_test"]))
        assert run[f"{name}_windows"].tolist() == [[1, 1]] * 4
        stage = json.loads((workdir / "metrics" / "train" / f"{name}.json").read_text())
        assert int(np.sum(val[0].argmax(1) == y)) == round(
            stage["best_val_accuracy"] * stage["n_val"]
        )
        for scores in (val, test):
            np.testing.assert_allclose(scores[1:], np.broadcast_to(scores[0], scores[1:].shape),
                                       atol=1e-6)  # fmt: skip
    assert table.index("validation, right of") < table.index("Test, read after")
