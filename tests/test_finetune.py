"""The fine-tune models, on a tiny cut: Inception V3's real topology at 75x75 (random weights),
cut at mixed_8 (1x1x1280), so mixed_9 and mixed_10 are the real blocks but an epoch of a few
dozen rows takes a second. The heads they start from are trained here on the toy set.
"""

from __future__ import annotations

import filecmp
import importlib
from pathlib import Path

import numpy as np
import pytest

from imgclf.activations import Activations
from imgclf.finetune.common import (
    accuracy_with_flips,
    epoch_order,
    finetune_rows,
    load_finetune_data,
    model_cut,
    predict_images,
)
from imgclf.splitting import validation_split

CLASSES = ["daisy", "rose", "tulip"]
N_PER_CLASS = 14


# ------------------------------------------------------------------------ rows (no TensorFlow)


def make_acts(n_images: int, views=("orig", "flip"), seed: int = 0) -> Activations:
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % len(CLASSES)
    ids = np.array([f"train/{CLASSES[c]}/{i}.jpg" for i, c in enumerate(labels)])
    n_views = len(views)
    return Activations(
        x=rng.normal(size=(n_views * n_images, 1, 1, 4)).astype(np.float16),
        ids=np.tile(ids, n_views),
        labels=np.tile(labels, n_views).astype(np.int64),
        view=np.repeat(np.arange(n_views), n_images),
        views=tuple(views),
    )


def test_no_view_of_a_validation_image_is_trained_on():
    acts = make_acts(30, views=("orig", "flip", "crop80_c"))
    train_rows, val_rows = finetune_rows(acts, 0.2, seed=3)
    orig = acts.of_view("orig")
    _, val_idx = validation_split(acts.labels[orig], 0.2, 3)
    # Validation: the heads' slice, orig view only.
    np.testing.assert_array_equal(val_rows, orig[val_idx])
    assert set(acts.view[val_rows]) == {0}
    val_ids = set(acts.ids[val_rows])
    assert not val_ids & set(acts.ids[train_rows])
    # Training: every view of every other image.
    assert len(train_rows) == 3 * (30 - len(val_ids))
    assert set(acts.ids[train_rows]) | val_ids == set(acts.ids)


def test_training_rows_stay_in_the_memory_map_until_a_batch_reads_them(tmp_path):
    acts = make_acts(30, views=("orig", "flip", "crop80_c"))
    np.save(tmp_path / "x.npy", acts.x)
    mapped = Activations(np.load(tmp_path / "x.npy", mmap_mode="r"), acts.ids, acts.labels,
                         acts.view, acts.views)  # fmt: skip
    data = load_finetune_data(mapped, 0.2, seed=3)
    train_rows, val_rows = finetune_rows(acts, 0.2, seed=3)
    assert data.x_train.shape == (len(train_rows), 1, 1, 4)
    np.testing.assert_array_equal(np.asarray(data.x_train), acts.x[train_rows])
    np.testing.assert_array_equal(data.x_train[np.array([5, 0])], acts.x[train_rows[[5, 0]]])
    np.testing.assert_array_equal(data.x_val, acts.x[val_rows])
    # One image code per training row: the rows of one image share it, across views.
    codes = {}
    for row, code in zip(train_rows, data.train_images, strict=True):
        assert codes.setdefault(acts.ids[row], code) == code
    assert data.n_train_images == len(codes) == len(set(codes.values()))


def test_one_view_per_image_epochs_see_every_image_once_in_a_new_view():
    n_images, n_views = 40, 4
    images = np.tile(np.arange(n_images), n_views)  # view-major, as the activations are
    rng = np.random.default_rng(7)
    epochs = [epoch_order(rng, images, "one_per_image") for _ in range(3)]
    for order in epochs:
        assert sorted(images[order]) == list(range(n_images))  # each image once
    views = [order[np.argsort(images[order])] // n_images for order in epochs]
    assert all(len(set(v)) > 1 for v in views)  # not one view for everyone
    assert not np.array_equal(views[0], views[1])  # drawn anew each epoch
    again = np.random.default_rng(7)  # the same seed, the same epochs
    for order in epochs:
        np.testing.assert_array_equal(epoch_order(again, images, "one_per_image"), order)
    everything = epoch_order(np.random.default_rng(0), images, "all")
    assert sorted(everything) == list(range(len(images)))
    with pytest.raises(ValueError, match="one_per_image"):
        epoch_order(rng, images, "some")


def test_rows_need_the_orig_view():
    from imgclf.errors import UserError

    with pytest.raises(UserError, match=r"not `orig`.*add orig to activations\.train_views"):
        finetune_rows(make_acts(12, views=("flip",)), 0.2, seed=0)


def test_test_time_flip_averages_the_flip_of_the_same_image():
    acts = make_acts(6, views=("flip", "orig"))  # flip first: rows are matched by id
    # Shuffle the flip rows so that position alone would pair the wrong images.
    flip = acts.of_view("flip")
    perm = np.random.default_rng(1).permutation(flip.size)
    x, ids = acts.x.copy(), acts.ids.copy()
    x[flip], ids[flip] = acts.x[flip][perm], acts.ids[flip][perm]
    acts = Activations(x=x, ids=ids, labels=acts.labels, view=acts.view, views=acts.views)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.stack([batch[:, 0, 0, 0], batch[:, 0, 0, 1]], axis=1)

    orig = acts.of_view("orig")
    plain = predict_images(predict, acts, test_time_flip=False)
    np.testing.assert_allclose(plain, predict(acts.x[orig].astype(np.float32)))
    both = predict_images(predict, acts, test_time_flip=True, batch_size=4)
    for i, row in enumerate(orig):
        (match,) = [r for r in acts.of_view("flip") if acts.ids[r] == acts.ids[row]]
        expected = (predict(acts.x[[row]].astype(np.float32)) + predict(
            acts.x[[match]].astype(np.float32)
        )) / 2  # fmt: skip
        np.testing.assert_allclose(both[i], expected[0], rtol=1e-6)
    with pytest.raises(Exception, match=r"add flip to activations\.test_views"):
        predict_images(predict, make_acts(6, views=("orig",)), test_time_flip=True)


def test_validation_with_flips_scores_the_validation_images_with_their_own_flips():
    acts = make_acts(40, views=("orig", "flip"))
    data = load_finetune_data(acts, 0.25, seed=0)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.stack([batch[:, 0, 0, 0], batch[:, 0, 0, 1], batch[:, 0, 0, 2]], axis=1)

    # By hand: each validation image's orig row plus the flip row of the same id.
    flip = {acts.ids[r]: r for r in acts.of_view("flip")}
    right = 0
    for row, label in zip(data.val_rows, data.y_val, strict=True):
        pair = acts.x[[row, flip[acts.ids[row]]]].astype(np.float32)
        right += int(predict(pair).sum(axis=0).argmax() == label)
    assert 0 < right < data.val_rows.size  # a score that can tell the pairing apart
    assert accuracy_with_flips(predict, acts, data) == right / data.val_rows.size
    plain = predict_images(predict, acts, test_time_flip=False, rows=data.val_rows)
    np.testing.assert_array_equal(plain, predict(data.x_val.astype(np.float32)))
    # Without a flip view there is nothing to read.
    orig_only = make_acts(40, views=("orig",))
    assert accuracy_with_flips(predict, orig_only, load_finetune_data(orig_only, 0.25, 0)) is None


# ----------------------------------------------------------------------- the tiny real blocks


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def make_tiny() -> dict:
    """A tiny Inception V3 (75x75 input, random weights), its top from mixed_8, a separable toy
    set of mixed_8 activations and the pooled features the heads are trained on."""
    import keras

    import imgclf.quiet_tf  # noqa: F401
    from imgclf.inception import build_inception_v3, build_top

    keras.utils.set_random_seed(0)
    backbone = build_inception_v3("max", input_shape=(75, 75, 3))
    backbone.trainable = False  # as load_backbone hands it over
    top = build_top(backbone, "mixed_8")
    rng = np.random.default_rng(0)
    n = N_PER_CLASS * len(CLASSES)
    y = np.arange(n) % len(CLASSES)
    x = np.abs(rng.normal(size=(n, 1, 1, 1280))).astype(np.float32)
    for c in range(len(CLASSES)):  # each class lights up its own channels
        x[y == c, :, :, c * 400 : c * 400 + 400] += 1.5
    x = x.astype(np.float16)
    train_idx, val_idx = validation_split(y, 0.3, 0)
    return {
        "backbone": backbone,
        "top": top,
        "initial": backbone.get_weights(),
        "data": (x[train_idx], y[train_idx], x[val_idx], y[val_idx]),
        "features": top.predict(x.astype(np.float32), verbose=0),
        "split": (train_idx, val_idx),
    }


def fresh(tiny):
    """The backbone back at its initial weights (the fine-tunes train its layers in place)."""
    tiny["backbone"].set_weights(tiny["initial"])
    return tiny["top"]


def event_tags(log_dir: Path) -> dict[str, set[str]]:
    """{plugin name: tags} of every summary in the event files under `log_dir`."""
    import tensorflow as tf

    tags: dict[str, set[str]] = {}
    for path in log_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.metadata.plugin_data.plugin_name, set()).add(value.tag)
    return tags


def check_tensorboard(log_dir: Path, blocks=("mixed_9", "mixed_10", "head")) -> None:
    tags = event_tags(log_dir)
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val"} <= tags["scalars"]
    assert {f"gradient_norm/{b}" for b in blocks} <= tags["scalars"]
    histograms = tags["histograms"]
    assert any(t.startswith("weights/mixed_9.") for t in histograms)
    assert any(t.startswith("gradients/mixed_10.") for t in histograms)
    assert any(t.startswith("gradients/") and "mixed" not in t for t in histograms)  # head


def check_gradient_columns(curve, log_dir: Path) -> None:
    """Each curve row carries the epoch's per-block gradient norms, the ones TensorBoard got
    (the curve CSV is where track reads them)."""
    import tensorflow as tf

    logged: dict[tuple[str, int], float] = {}
    for path in log_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag.startswith("gradient_norm/"):
                    number = float(tf.make_ndarray(value.tensor))
                    logged[(value.tag.split("/", 1)[1], int(event.step))] = number
    for row in curve:
        norms = {k[len("gradient_norm_") :]: v for k, v in row.items() if k.startswith("gradient_")}
        assert set(norms) == {"mixed_9", "mixed_10", "head"}
        for block, value in norms.items():
            assert value > 0
            assert value == pytest.approx(logged[(block, int(row["epoch"]))], rel=1e-6)


def keras_head_for(tiny):
    from imgclf.heads.keras_head import train_keras_head

    train_idx, val_idx = tiny["split"]
    f = tiny["features"]
    labels = np.arange(len(f)) % len(CLASSES)
    return train_keras_head(
        f[train_idx], labels[train_idx], f[val_idx], labels[val_idx], n_classes=3,
        hidden_units=16, epochs=5, batch_size=8, early_stopping_patience=0, progress=False,
    ).model  # fmt: skip


def test_keras_finetune_trains_only_what_it_declares_and_saves_the_same_bytes(tiny, tmp_path):
    import keras

    from imgclf.finetune.finetune_keras import (
        predictor,
        save_finetune_keras,
        train_finetune_keras,
        uses_test_time_flip,
    )
    from imgclf.heads.common import read_labels
    from imgclf.inception import all_layers

    backbone = tiny["backbone"]
    results, dirs = [], []
    for run in range(2):
        top = fresh(tiny)
        before = {w.path: np.array(w) for w in backbone.weights}
        head = keras_head_for(tiny)
        head_before = [np.array(w) for w in head.weights]
        result = train_finetune_keras(
            top, head, *tiny["data"], tensorboard_dir=tmp_path / f"tb{run}",
            epochs=2, batch_size=8, learning_rate=0.01, progress=False,
        )  # fmt: skip
        after = {w.path: np.array(w) for w in backbone.weights}
        # The convolutions of the blocks after the cut train; nothing before it, and no BN
        # variable (moving statistics nor beta), changes.
        changed = {p for p in before if not np.array_equal(before[p], after[p])}
        assert changed, "no weight of the top changed"
        for path in changed:
            assert path.startswith(("mixed_9.", "mixed_10.")) and path.endswith("/kernel"), path
        assert any(p.startswith("mixed_9.") for p in changed)
        assert any(p.startswith("mixed_10.") for p in changed)
        assert all(
            not np.array_equal(b, np.array(a))
            for b, a in zip(head_before, head.weights, strict=True)
        )
        bn = [
            layer
            for layer in all_layers(result.model)
            if "BatchNormalization" in type(layer).__name__
        ]
        assert bn and not any(layer.trainable for layer in bn)
        s = result.summary
        assert max(r["val_accuracy"] for r in result.curve) >= s["start_val_accuracy"]
        assert min(r["val_loss"] for r in result.curve) < s["start_val_loss"]
        assert [r["epoch"] for r in result.curve] == [1.0, 2.0]
        check_tensorboard(tmp_path / f"tb{run}")
        check_gradient_columns(result.curve, tmp_path / f"tb{run}")
        save_finetune_keras(
            result.model, tmp_path / f"m{run}", CLASSES, test_time_flip=True, cut="mixed_8"
        )
        results.append((result.curve, s["model_step"]))
        dirs.append(tmp_path / f"m{run}")
    assert results[0] == results[1]
    cmp = filecmp.dircmp(dirs[0], dirs[1])
    assert sorted(cmp.same_files) == ["finetune.json", "labels.txt", "model.keras"]
    assert not cmp.diff_files
    assert filecmp.cmp(dirs[0] / "model.keras", dirs[1] / "model.keras", shallow=False)

    predict = predictor(dirs[1])
    x_val = tiny["data"][2].astype(np.float32)
    probs = predict(x_val)
    assert probs.shape == (len(x_val), 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    expected = np.asarray(keras.ops.convert_to_numpy(result.model(x_val)))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert read_labels(dirs[1]) == CLASSES and uses_test_time_flip(dirs[1])
    assert model_cut(dirs[1]) == "mixed_8"


def tf_head_dir(tiny, folder: Path) -> Path:
    from imgclf.heads.tf_head import save_tf_head, train_tf_head

    train_idx, val_idx = tiny["split"]
    f = tiny["features"]
    labels = np.arange(len(f)) % len(CLASSES)
    result = train_tf_head(
        f[train_idx], labels[train_idx], f[val_idx], labels[val_idx], n_classes=3,
        steps=60, batch_size=8, eval_every=30, learning_rate=0.05, progress=False,
    )  # fmt: skip
    save_tf_head(result.model, folder, CLASSES)
    return folder


@pytest.mark.parametrize("cut", ["mixed_8", "mixed_7"])
def test_tf_blocks_rewritten_op_by_op_are_the_keras_blocks(tiny, tmp_path, cut):
    import tensorflow as tf

    from imgclf.finetune.finetune_tf import FinetuneTop
    from imgclf.heads.tf_head import load_tf_head
    from imgclf.inception import build_top

    fresh(tiny)
    top = build_top(tiny["backbone"], cut)
    model = FinetuneTop(top, load_tf_head(tf_head_dir(tiny, tmp_path / "head")), cut)
    if cut == "mixed_8":
        x = tiny["data"][0].astype(np.float32)
    else:  # mixed_7 (3x3x768 on the tiny input): mixed_8's strided towers and pool too
        shape = (16, *top.input.shape[1:])
        x = np.abs(np.random.default_rng(0).normal(size=shape)).astype(np.float32)
        assert {key.split(".")[0] for key in model.kernels} == {"mixed_8", "mixed_9", "mixed_10"}
    np.testing.assert_allclose(
        model.features(tf.constant(x)).numpy(), top.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    if cut == "mixed_7":  # one step trains the reduction block's kernels too
        from imgclf.finetune.finetune_tf import MomentumTrainer

        before = {key: kernel.numpy() for key, kernel in model.kernels.items()}
        trainer = MomentumTrainer(model, learning_rate=0.01, momentum=0.9, label_smoothing=0.0,
                                  schedule="constant", total_steps=1)  # fmt: skip
        trainer.train_step(tf.constant(x), tf.constant(np.arange(16) % 3, tf.int64),
                           tf.constant(1.0), tf.constant([0, 0], tf.int64))  # fmt: skip
        assert all(not np.array_equal(before[k], v.numpy()) for k, v in model.kernels.items())
    # The explicit list is exactly what tf.Module counts as trainable.
    declared = {v.ref() for _, v in model.variables_to_train()}
    assert declared == {v.ref() for v in model.trainable_variables}
    assert not model.step.trainable


def test_tf_finetune_updates_only_the_explicit_list_and_is_deterministic(tiny, tmp_path):
    import tensorflow as tf

    from imgclf.finetune.finetune_tf import predictor, save_finetune_tf, train_finetune_tf
    from imgclf.heads.tf_head import load_tf_head

    head_dir = tf_head_dir(tiny, tmp_path / "head")
    runs = []
    for run in range(2):
        top = fresh(tiny)
        before = {w.path: np.array(w) for w in tiny["backbone"].weights}
        result = train_finetune_tf(
            top, load_tf_head(head_dir), *tiny["data"], cut="mixed_8",
            tensorboard_dir=tmp_path / f"tb{run}", epochs=2, batch_size=8,
            learning_rate=0.01, schedule="cosine", label_smoothing=0.1, progress=False,
        )  # fmt: skip
        model = result.model
        # The Keras top only lent its initial values: it is untouched.
        assert all(np.array_equal(before[w.path], np.array(w)) for w in tiny["backbone"].weights)
        # Kernels and head moved; every BN variable is where the backbone had it.
        for key, kernel in model.kernels.items():
            layer_before = before[f"{key}/kernel"]
            assert not np.array_equal(kernel.numpy(), layer_before), key
            np.testing.assert_array_equal(model.means[key].numpy(), before[f"{key}.bn/moving_mean"])
            np.testing.assert_array_equal(
                model.variances[key].numpy(), before[f"{key}.bn/moving_variance"]
            )
            np.testing.assert_array_equal(model.offsets[key].numpy(), before[f"{key}.bn/beta"])
        assert int(model.step.numpy()) == 2 * -(-len(tiny["data"][1]) // 8)
        s = result.summary
        assert max(r["val_accuracy"] for r in result.curve) >= s["start_val_accuracy"]
        assert min(r["val_loss"] for r in result.curve) < s["start_val_loss"]
        check_tensorboard(tmp_path / f"tb{run}")
        check_gradient_columns(result.curve, tmp_path / f"tb{run}")
        save_finetune_tf(model, tmp_path / f"m{run}", CLASSES, cut="mixed_8")
        runs.append((result.curve, s))
    assert runs[0][0] == runs[1][0]
    # The same weights, byte for byte. (saved_model.pb names its functions after a
    # per-process counter: it is identical across fresh processes, see the test below.)
    for name in ("variables.data-00000-of-00001", "variables.index"):
        assert filecmp.cmp(tmp_path / "m0/variables" / name, tmp_path / "m1/variables" / name,
                           shallow=False)  # fmt: skip

    x_val = tiny["data"][2].astype(np.float32)
    probs = predictor(tmp_path / "m1")(x_val)
    assert probs.shape == (len(x_val), 3) and probs.dtype == np.float32
    np.testing.assert_allclose(
        probs, result.model.predict(tf.constant(x_val)).numpy(), rtol=1e-5, atol=1e-6
    )


def test_epoch_rank_counts_images_then_prefers_the_lower_loss():
    from imgclf.finetune.common import epoch_rank

    # 3 of 10 right, summed two ways: the floats differ, the count does not.
    assert 0.1 + 0.2 != 0.3
    assert epoch_rank(0.1 + 0.2, 0.5, 10) == epoch_rank(0.3, 0.5, 10)
    assert epoch_rank(0.3, 0.4, 10) > epoch_rank(0.3, 0.5, 10)  # a tie: the lower loss
    assert epoch_rank(0.4, 0.9, 10) > epoch_rank(0.3, 0.1, 10)  # one more image right wins


def test_both_fine_tunes_keep_the_lowest_loss_of_the_epochs_tied_on_accuracy(tiny, tmp_path):
    """On the tiny set every epoch from the first or second has all 12 validation images right
    while the loss keeps falling: the kept epoch is the tied one with the lowest loss (not the
    earliest, which both kept before), and the model returned holds its weights."""
    import keras
    import tensorflow as tf

    from imgclf.finetune.finetune_keras import train_finetune_keras
    from imgclf.finetune.finetune_tf import train_finetune_tf
    from imgclf.heads.common import accuracy_and_loss
    from imgclf.heads.tf_head import load_tf_head

    x_val, y_val = tiny["data"][2].astype(np.float32), tiny["data"][3]
    common = {"tensorboard_dir": tmp_path / "tb", "epochs": 3, "batch_size": 8,
              "learning_rate": 0.01, "progress": False}  # fmt: skip
    tf_result = train_finetune_tf(fresh(tiny), load_tf_head(tf_head_dir(tiny, tmp_path / "h")),
                                  *tiny["data"], cut="mixed_8", **common)  # fmt: skip
    tf_probs = tf_result.model.predict(tf.constant(x_val)).numpy()
    keras_result = train_finetune_keras(fresh(tiny), keras_head_for(tiny), *tiny["data"],
                                        **common)  # fmt: skip
    keras_probs = keras.ops.convert_to_numpy(keras_result.model(x_val))
    for result, probs in ((tf_result, tf_probs), (keras_result, keras_probs)):
        counts = [round(row["val_accuracy"] * len(y_val)) for row in result.curve]
        tied = [row for row, n in zip(result.curve, counts, strict=True) if n == max(counts)]
        assert len(tied) >= 2, "no tie on validation accuracy: the case this test is for"
        lowest = min(tied, key=lambda row: row["val_loss"])
        assert lowest is not tied[0]
        assert result.summary["model_step"] == lowest["step"]
        accuracy, loss = accuracy_and_loss(probs, y_val)
        assert accuracy == lowest["val_accuracy"]
        assert loss == pytest.approx(lowest["val_loss"], rel=1e-4)


def two_views(tiny):
    """The tiny training set with a second, noisy view of each image (view-major rows)."""
    x_train, y_train, x_val, y_val = tiny["data"]
    noisy = (x_train + np.random.default_rng(1).normal(0, 0.3, x_train.shape)).astype(np.float16)
    images = np.tile(np.arange(len(y_train)), 2)
    return np.concatenate([x_train, noisy]), np.tile(y_train, 2), x_val, y_val, images


def test_both_fine_tunes_can_train_on_one_view_per_image_each_epoch(tiny, tmp_path):
    from imgclf.finetune.finetune_keras import train_finetune_keras
    from imgclf.finetune.finetune_tf import train_finetune_tf
    from imgclf.heads.tf_head import load_tf_head

    x_train, y_train, x_val, y_val, images = two_views(tiny)
    n_images, epochs, batch = len(y_train) // 2, 2, 8
    head = load_tf_head(tf_head_dir(tiny, tmp_path / "head"))
    tf_curves = []
    for run in range(2):
        result = train_finetune_tf(
            fresh(tiny), head, x_train, y_train, x_val, y_val, cut="mixed_8",
            tensorboard_dir=tmp_path / f"tf{run}", train_images=images,
            view_sampling="one_per_image", epochs=epochs, batch_size=batch,
            learning_rate=0.01, schedule="cosine", progress=False,
        )  # fmt: skip
        # An epoch is one row per image: half the rows, half the steps of `all`.
        assert result.summary["steps"] == epochs * -(-n_images // batch)
        tf_curves.append(result.curve)
    assert tf_curves[0] == tf_curves[1]
    keras_curves = []
    for run in range(2):
        result = train_finetune_keras(
            fresh(tiny), keras_head_for(tiny), x_train, y_train, x_val, y_val,
            tensorboard_dir=tmp_path / f"k{run}", train_images=images,
            view_sampling="one_per_image", epochs=epochs, batch_size=batch,
            learning_rate=0.01, schedule="cosine", progress=False,
        )  # fmt: skip
        assert result.summary["steps"] == epochs * -(-n_images // batch)
        assert int(result.model.optimizer.iterations.numpy()) == epochs * -(-n_images // batch)
        keras_curves.append(result.curve)
    assert keras_curves[0] == keras_curves[1]
    assert len(keras_curves[0]) == epochs
    with pytest.raises(ValueError, match="view_sampling"):
        train_finetune_tf(fresh(tiny), head, x_train, y_train, x_val, y_val, cut="mixed_8",
                          tensorboard_dir=tmp_path / "bad", view_sampling="one")  # fmt: skip


class ReadLog:
    """Training rows that record which positions each read asked for (as SelectedRows, whose
    rows both fine-tunes read batch by batch)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.reads = x, []

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    def __getitem__(self, positions):
        self.reads.append(np.asarray(positions).tolist())
        return self.x[positions]


def test_both_fine_tunes_train_on_the_same_batches_in_the_same_order(tiny, tmp_path):
    """The seed's TrainingOrder gives both frameworks the probe batch and every epoch's batches,
    read from the rows batch by batch (Keras never receives the whole array)."""
    from imgclf.finetune.common import TrainingOrder
    from imgclf.finetune.finetune_keras import train_finetune_keras
    from imgclf.finetune.finetune_tf import train_finetune_tf
    from imgclf.heads.tf_head import load_tf_head

    x_train, y_train, x_val, y_val = tiny["data"]
    epochs, batch = 2, 8
    order = TrainingOrder(3, len(y_train), None, "all", batch)
    expected = [b.tolist() for _ in range(epochs) for b in order.next_epoch()]
    assert expected[0] != sorted(expected[0] + expected[1])[: len(expected[0])]  # shuffled
    common = {"epochs": epochs, "batch_size": batch, "learning_rate": 0.01, "seed": 3,
              "view_sampling": "all", "progress": False}  # fmt: skip
    tf_rows = ReadLog(x_train)
    train_finetune_tf(fresh(tiny), load_tf_head(tf_head_dir(tiny, tmp_path / "h")), tf_rows,
                      y_train, x_val, y_val, cut="mixed_8", tensorboard_dir=tmp_path / "t",
                      **common)  # fmt: skip
    keras_rows = ReadLog(x_train)
    train_finetune_keras(fresh(tiny), keras_head_for(tiny), keras_rows, y_train, x_val, y_val,
                         tensorboard_dir=tmp_path / "k", **common)  # fmt: skip
    for rows in (tf_rows, keras_rows):
        # The probe batch, then each epoch's batches, each read once: never the whole array.
        assert rows.reads == [order.probe.tolist(), *expected]


def test_refit_head_fits_the_base_head_to_the_pooled_features_of_every_train_view(tiny, tmp_path):
    import tensorflow as tf

    from imgclf.finetune.common import FinetuneData, SelectedRows, pooled_features, refit_head
    from imgclf.finetune.finetune_keras import train_finetune_keras
    from imgclf.finetune.finetune_tf import train_finetune_tf
    from imgclf.heads.keras_head import train_keras_head
    from imgclf.heads.tf_head import train_tf_head

    x_train, y_train, x_val, y_val, images = two_views(tiny)
    np.save(tmp_path / "x.npy", x_train)
    rows = np.random.default_rng(0).permutation(len(y_train))  # both views, mixed
    data = FinetuneData(
        x_train=SelectedRows(np.load(tmp_path / "x.npy", mmap_mode="r"), rows),
        y_train=y_train[rows], train_images=images[rows], x_val=x_val, y_val=y_val,
        val_rows=np.arange(len(y_val)), n_train_images=len(y_train) // 2,
        n_val_images=len(y_val), views=("orig", "noisy"),
    )  # fmt: skip
    top = fresh(tiny)
    pooled = pooled_features(top, data.x_train, progress=False)
    expected = top.predict(x_train[rows].astype(np.float32), verbose=0)
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
    pooled_val = pooled_features(top, x_val, progress=False)

    # The registered head's own train function and recipe, on every training row's features.
    recipe = dict(steps=60, batch_size=8, eval_every=30, learning_rate=0.05, hidden_units=0,
                  dropout=0.0)  # fmt: skip
    head = refit_head("tf", top, data, n_classes=3, seed=0, recipe=recipe)
    by_hand = train_tf_head(pooled, data.y_train, pooled_val, y_val, n_classes=3, seed=0,
                            progress=False, **recipe).model  # fmt: skip
    np.testing.assert_array_equal(head.final_weights.numpy(), by_hand.final_weights.numpy())
    # Fine-tuning starts from it: its first validation score is the refitted head's.
    result = train_finetune_tf(top, head, x_train, y_train, x_val, y_val, cut="mixed_8",
                               tensorboard_dir=tmp_path / "tb", epochs=1, batch_size=8,
                               progress=False)  # fmt: skip
    start = np.mean(head.predict(tf.constant(pooled_val)).numpy().argmax(1) == y_val)
    assert result.summary["start_val_accuracy"] == pytest.approx(start)

    recipe = dict(hidden_units=16, dropout=0.0, learning_rate=1e-3, epochs=3, batch_size=8,
                  early_stopping_patience=0)  # fmt: skip
    head = refit_head("keras", fresh(tiny), data, n_classes=3, seed=0, recipe=recipe)
    by_hand = train_keras_head(pooled, data.y_train, pooled_val, y_val, n_classes=3, seed=0,
                               progress=False, **recipe)  # fmt: skip
    for mine, theirs in zip(head.get_weights(), by_hand.model.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    start = np.mean(head.predict(pooled_val, verbose=0).argmax(1) == y_val)
    result = train_finetune_keras(fresh(tiny), head, x_train, y_train, x_val, y_val,
                                  tensorboard_dir=tmp_path / "tbk", epochs=1,
                                  batch_size=8, progress=False)  # fmt: skip
    assert result.summary["start_val_accuracy"] == pytest.approx(start)


_FRESH_PROCESS = """
import sys
from pathlib import Path
import numpy as np
import tests.test_finetune as t
out = Path(sys.argv[1])
tiny = t.make_tiny()
from imgclf.finetune.finetune_keras import save_finetune_keras, train_finetune_keras
from imgclf.finetune.finetune_tf import save_finetune_tf, train_finetune_tf
from imgclf.heads.tf_head import load_tf_head
r = train_finetune_keras(t.fresh(tiny), t.keras_head_for(tiny), *tiny["data"],
                         tensorboard_dir=out / "tb_k", epochs=1, batch_size=8, progress=False)
save_finetune_keras(r.model, out / "models/finetune_keras", t.CLASSES, cut="mixed_8")
head = load_tf_head(t.tf_head_dir(tiny, out / "tf_head"))
r = train_finetune_tf(t.fresh(tiny), head, *tiny["data"], cut="mixed_8",
                      tensorboard_dir=out / "tb_t", epochs=1, batch_size=8, progress=False)
save_finetune_tf(r.model, out / "models/finetune_tf", t.CLASSES, cut="mixed_8")
"""


def test_identical_fine_tunes_in_fresh_processes_write_identical_model_files(tmp_path):
    """What two `dvc repro --force` of the fine-tune stages do: the same bytes in models/, so
    dvc.lock keeps its hashes and MLflow sees the same model."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    outputs = []
    for run in ("a", "b"):
        proc = subprocess.run(
            [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / run)],
            cwd=root,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        models = tmp_path / run / "models"
        outputs.append(
            {str(f.relative_to(models)): f.read_bytes() for f in sorted(models.rglob("*"))
             if f.is_file()}
        )  # fmt: skip
    assert "finetune_tf/saved_model.pb" in outputs[0] and "finetune_keras/model.keras" in outputs[0]
    assert outputs[0].keys() == outputs[1].keys()
    assert [name for name in outputs[0] if outputs[0][name] != outputs[1][name]] == []


def test_tf_regularizers_for_the_recipe_search_change_training_and_stay_deterministic(
    tiny, tmp_path
):
    # dropout, mixup and L2-SP (weight_decay) are the search tool's knobs
    # (tools/finetune_search.py): each must really act, and the same way on every run. (Off,
    # they leave the stage's training as it was: the fresh-process determinism test and the
    # rerun of the default recipe in docs/finetuning-levers.md, 95.6% at epoch 2, cover that.)
    from imgclf.finetune.finetune_tf import train_finetune_tf
    from imgclf.heads.tf_head import load_tf_head

    head_dir = tf_head_dir(tiny, tmp_path / "head")

    def kernels(**regularizer):
        result = train_finetune_tf(
            fresh(tiny), load_tf_head(head_dir), *tiny["data"], cut="mixed_8",
            tensorboard_dir=tmp_path / "tb", epochs=1, batch_size=8, learning_rate=0.01,
            progress=False, **regularizer,
        )  # fmt: skip
        return np.concatenate([v.numpy().ravel() for _, v in result.model.variables_to_train()])

    plain = kernels()
    for regularizer in ({"dropout": 0.5}, {"mixup": 0.4}, {"weight_decay": 10.0}):
        assert not np.array_equal(kernels(**regularizer), plain), regularizer
    # The random ones (a Beta draw per batch, a dropout mask per step) repeat from the seed.
    both = {"dropout": 0.5, "mixup": 0.4}
    np.testing.assert_array_equal(kernels(**both), kernels(**both))


def test_histogram_buckets_are_tensorboards():
    # TensorBoard's own bucketing (what tf.summary.histogram writes), on what it is used for:
    # weights (with ties and a single extreme), constants and nothing.
    from tensorboard.plugins.histogram.summary_v2 import _buckets

    from imgclf.finetune.common import histogram_buckets

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3, 3, 64, 32)).astype(np.float32)
    weights[0, 0, :8] = 0.0
    for values in (weights, np.array([2.5]), np.full(7, -1.0, np.float32), np.arange(100.0)):
        np.testing.assert_allclose(
            histogram_buckets(values), _buckets(values).numpy(), rtol=1e-12, atol=1e-12
        )
    assert histogram_buckets(np.zeros(0)).shape == (30, 3)


def test_a_diverged_fine_tune_stops_naming_the_tensor_and_the_fix(tmp_path):
    # NaN weights once reached the bucketing as "'list' argument must have no negative
    # elements" (found training the whole backbone: tools/whole_backbone_probe.py).
    from imgclf.finetune.common import TensorBoardLog, TrainingDiverged

    log = TensorBoardLog(tmp_path / "events")
    log.histograms(1, [("weights/ok", np.ones(4))])
    bad = np.array([[0.5, np.nan], [np.inf, 1.0]], np.float32)
    with pytest.raises(TrainingDiverged) as raised:
        log.histograms(2, [("weights/ok", np.ones(4)), ("gradients/mixed_9.conv/kernel", bad)])
    message = str(raised.value)
    assert "by epoch 2" in message and "gradients/mixed_9.conv/kernel holds 2 NaN" in message
    assert "Lower the learning rate" in message


def bfloat16_top(tiny):
    """The tiny backbone built under Keras' mixed_bfloat16 policy, as load_backbone(precision=
    "bfloat16") builds it, with the float32 fixture's weights."""
    from imgclf.inception import build_inception_v3, build_top, dtype_policy

    with dtype_policy("bfloat16"):
        backbone = build_inception_v3("max", input_shape=(75, 75, 3))
    backbone.set_weights(tiny["initial"])
    backbone.trainable = False
    return build_top(backbone, "mixed_8")


def test_bfloat16_precision_computes_the_blocks_in_bfloat16_in_both_frameworks(tiny, tmp_path):
    import tensorflow as tf

    from bench.finetune import conv_compute_dtype, conv_dtypes  # read as the bench reads
    from imgclf.finetune.finetune_keras import (
        load_finetune_keras,
        save_finetune_keras,
        train_finetune_keras,
    )
    from imgclf.finetune.finetune_tf import (
        FinetuneTop,
        predictor,
        save_finetune_tf,
        train_finetune_tf,
    )
    from imgclf.heads.tf_head import load_tf_head
    from imgclf.inception import all_layers

    head = load_tf_head(tf_head_dir(tiny, tmp_path / "head"))
    x = tf.constant(tiny["data"][0].astype(np.float32))
    exact = FinetuneTop(fresh(tiny), head, "mixed_8")
    top16 = bfloat16_top(tiny)
    rounded = FinetuneTop(top16, head, "mixed_8")
    assert (exact.compute_dtype, rounded.compute_dtype) == (tf.float32, tf.bfloat16)
    # bfloat16 keeps 8 bits of mantissa: close to the float32 features, not equal to them.
    f32, f16 = exact.features(x).numpy(), rounded.features(x).numpy()
    assert f16.dtype == np.float32 and not np.array_equal(f32, f16)
    np.testing.assert_allclose(f16, f32, rtol=0.1, atol=0.1 * float(np.abs(f32).max()))

    result = train_finetune_tf(
        top16, head, *tiny["data"], cut="mixed_8", tensorboard_dir=tmp_path / "tb_tf",
        epochs=1, batch_size=8, learning_rate=0.01, progress=False,
    )  # fmt: skip
    assert all(k.dtype == tf.float32 for k in result.model.kernels.values())  # weights stay f32
    save_finetune_tf(result.model, tmp_path / "tf16", CLASSES, cut="mixed_8")
    assert conv_compute_dtype(tmp_path / "tf16", "tf") == "bfloat16"  # the SavedModel's ops
    probs = predictor(tmp_path / "tf16")(tiny["data"][2].astype(np.float32))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    result = train_finetune_keras(
        top16, keras_head_for(tiny), *tiny["data"],
        tensorboard_dir=tmp_path / "tb_keras", epochs=1, batch_size=8, learning_rate=0.01,
        progress=False,
    )  # fmt: skip
    save_finetune_keras(result.model, tmp_path / "keras16", CLASSES, cut="mixed_8")
    assert conv_compute_dtype(tmp_path / "keras16", "keras") == "bfloat16"
    saved = load_finetune_keras(tmp_path / "keras16")
    convs = [layer for layer in all_layers(saved) if type(layer).__name__ == "Conv2D"]
    assert convs and {layer.dtype_policy.variable_dtype for layer in convs} == {"float32"}

    # What the LiteRT export converts: the same weights with float32 convolutions (LiteRT has
    # no bfloat16 one, tests/test_litert.py), close to what the bfloat16 models predict.
    for kind, folder in [
        ("finetune_tf", tmp_path / "tf16"),
        ("finetune_keras", tmp_path / "keras16"),
    ]:
        module = importlib.import_module(f"imgclf.finetune.{kind}")
        spec = tf.TensorSpec([1, *x.shape[1:]], tf.float32)
        saved, predict = module.graph_head(folder)  # the objects keep the variables alive
        rebuilt, predict_float32 = module.graph_head(folder, float32=True)
        as_saved = tf.function(predict).get_concrete_function(spec)
        as_float32 = tf.function(predict_float32).get_concrete_function(spec)
        assert conv_dtypes(as_saved) == {"bfloat16"}, kind
        assert conv_dtypes(as_float32) == {"float32"}, kind
        np.testing.assert_allclose(as_float32(x[:1]).numpy(), as_saved(x[:1]).numpy(), atol=0.05)
        converter = tf.lite.TFLiteConverter.from_concrete_functions([as_float32], rebuilt)
        assert len(converter.convert()) > 0, kind
