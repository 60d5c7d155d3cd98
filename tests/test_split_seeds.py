"""The tables tools/split_seeds.py prints (the whole run is in tests/test_pipeline.py)."""

from __future__ import annotations

import json
import os
import subprocess

from imgclf.layout import Layout
from tools.split_seeds import (
    cost_table,
    mcnemar_table,
    stage_costs,
    summary_table,
    validation_scores,
    validation_table,
    with_git_identity,
)


def test_mcnemar_cells_name_the_counts_and_never_print_p_zero():
    tests = {  # comparison.json's 6 decimals: 0.0 is below 1e-6
        0: {"tf_vs_keras": {"b": 2, "c": 30, "p_value": 0.0, "p_holm": 0.0}},
        1: {"tf_vs_keras": {"b": 5, "c": 9, "p_value": 0.424, "p_holm": 1.0}},
        2: {},
        3: {"tf_vs_keras": {"b": 19, "c": 7, "p_value": 0.029, "p_holm": 0.17}},
        4: {"tf_vs_keras": {"b": 5, "c": 9, "p_value": 0.424}},  # written before Holm
    }
    table = mcnemar_table(tests)
    assert (
        "| TF vs Keras | 2/30, < 1e-6 (Holm < 1e-6) * | 5/9, 0.424 (Holm 1) | – "
        "| 19/7, 0.029 (Holm 0.17) | 5/9, 0.424 |"
    ) in table
    assert ", 0 " not in table


def test_summary_keeps_only_models_scored_on_every_seed():
    results = {0: {"tf": 0.9, "keras": 0.8}, 1: {"tf": 0.92}}
    table = summary_table(results)
    assert "| TF | 0.910 ± 0.014 | 0.900 – 0.920 |" in table
    assert "Keras" not in table


def test_validation_is_read_at_the_kept_step_and_pooled_over_seeds(tmp_path):
    layout = Layout.of(metrics=tmp_path)
    for name in ("tf", "sklearn", "finetune_tf"):
        layout.train_metrics(name).parent.mkdir(parents=True, exist_ok=True)
        layout.curve(name).parent.mkdir(parents=True, exist_ok=True)
    # Kept step 2 of 3: neither the best accuracy (step 3) nor the final row.
    layout.train_metrics("tf").write_text(json.dumps({
        "model_step": 2, "n_val": 200, "best_val_accuracy": 0.95, "final_val_accuracy": 0.95,
        "final_val_loss": 0.3,
    }))  # fmt: skip
    layout.curve("tf").write_text(
        "epoch,train_loss,val_loss,train_accuracy,val_accuracy,step\n"
        "1.0,0.5,0.40,0.8,0.900,1\n2.0,0.3,0.20,0.9,0.930,2\n3.0,0.2,0.30,0.95,0.950,3\n"
    )
    layout.train_metrics("sklearn").write_text(json.dumps({
        "n_val": 100, "final_val_accuracy": 0.91, "final_val_loss": 0.33,
    }))  # fmt: skip
    layout.curve("sklearn").write_text(
        "epoch,train_loss,val_loss,train_accuracy,val_accuracy,step\n"
    )

    # A fine-tuned model: each epoch's accuracy too, to choose `epochs` by.
    layout.train_metrics("finetune_tf").write_text(json.dumps({
        "model_step": 2, "n_val": 100, "final_val_accuracy": 0.9, "final_val_loss": 0.3,
        "val_accuracy_with_flips": 0.97,
    }))  # fmt: skip
    layout.curve("finetune_tf").write_text(
        "epoch,train_loss,val_loss,train_accuracy,val_accuracy,step\n"
        "1.0,0.5,0.40,0.8,0.91,1\n2.0,0.3,0.20,0.9,0.95,2\n"
    )

    scores = validation_scores(layout)
    assert scores == {
        "tf": {"accuracy": 0.93, "loss": 0.2, "n": 200},
        "sklearn": {"accuracy": 0.91, "loss": 0.33, "n": 100},
        "finetune_tf": {
            "accuracy": 0.95, "loss": 0.2, "n": 100, "by_epoch": [0.91, 0.95], "with_flips": 0.97,
        },
    }  # fmt: skip
    other_seed = {
        "tf": {"accuracy": 0.96, "loss": 0.1, "n": 100},
        "finetune_tf": {
            "accuracy": 0.96, "loss": 0.1, "n": 100, "by_epoch": [0.93, 0.96], "with_flips": 0.98,
        },
    }  # fmt: skip
    table = validation_table({0: scores, 1: other_seed})
    # 186 + 96 right of 300 evaluated; sklearn is not on seed 1, so it has no row.
    assert "| TF | 0.9400 (282/300) | 0.930/0.960 | 0.1500 |  |  |" in table
    # With flips: 97 + 98 of 200.
    assert (
        "| TF fine-tuned | 0.9550 (191/200) | 0.950/0.960 | 0.1500 | 0.9200, 0.9550 "
        "| 0.9750 (195/200) |" in table
    )
    assert "scikit-learn" not in table


def test_a_repo_without_a_git_identity_gets_gits_fallback_and_a_configured_one_wins(tmp_path):
    """dvc exp run commits: without an identity it stopped with DVC's "Git user name and
    email must be configured" when split_seeds ran outside make."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_CONFIG_NOSYSTEM": "1"}  # fmt: skip
    env = with_git_identity(bare, tmp_path)
    assert env["GIT_AUTHOR_NAME"] == env["GIT_COMMITTER_NAME"] != ""
    assert "@" in env["GIT_AUTHOR_EMAIL"] and env["GIT_AUTHOR_EMAIL"] == env["GIT_COMMITTER_EMAIL"]
    commit = ["git", "commit", "-q", "--allow-empty", "-m", "x"]
    subprocess.run(commit, cwd=tmp_path, env=env, check=True)  # what dvc exp run needs
    # A variable the caller set, and an identity the repository has, are kept.
    assert with_git_identity({**bare, "GIT_AUTHOR_NAME": "me"}, tmp_path)["GIT_AUTHOR_NAME"] == "me"
    subprocess.run(["git", "config", "user.name", "Ann"], cwd=tmp_path, check=True)
    subprocess.run(["git", "config", "user.email", "ann@example.org"], cwd=tmp_path, check=True)
    assert "GIT_AUTHOR_NAME" not in with_git_identity(bare, tmp_path)
    assert "GIT_AUTHOR_EMAIL" not in with_git_identity(bare, tmp_path)


def test_costs_are_the_fine_tunes_seconds_and_peak_rss_per_seed(tmp_path):
    layout = Layout.of(metrics=tmp_path)
    layout.train_metrics("tf").parent.mkdir(parents=True)
    layout.train_metrics("tf").write_text(json.dumps({"train_seconds": 3.0}))
    layout.train_metrics("finetune_tf").write_text(
        json.dumps({"train_seconds": 250.4, "peak_rss_bytes": 2.5 * 2**30})
    )
    # Written before the stages recorded their peak RSS.
    layout.train_metrics("finetune_keras").write_text(json.dumps({"train_seconds": 275.0}))
    costs = stage_costs(layout)
    assert costs == {  # the frozen heads have no cost target of their own
        "finetune_tf": {"seconds": 250.4, "peak_rss_bytes": 2.5 * 2**30},
        "finetune_keras": {"seconds": 275.0},
    }
    other = {"finetune_tf": {"seconds": 260.0, "peak_rss_bytes": 2**31}}
    table = cost_table({0: costs, 1: other})
    assert "| TF fine-tuned | 250 / 260 | 2.50 / 2.00 |" in table
    assert "Keras" not in table  # not on every seed
    assert cost_table({0: {"finetune_keras": costs["finetune_keras"]}}).endswith(
        "| Keras fine-tuned | 275 | – |"
    )


def test_a_negative_or_non_integer_seed_is_refused_by_the_command_line():
    import argparse

    import pytest

    from tools.split_seeds import seed_number

    assert seed_number("3") == 3
    for bad in ("-1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="integer >= 0"):
            seed_number(bad)
