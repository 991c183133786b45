"""experiments/_runner.py: the shared train-and-test helper of the results scripts, on the tiny feature dir."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from _runner import train_and_test  # noqa: E402

MODEL = {"class_path": "mmoe_rec.models.mmoe.MMoE",
         "init_args": {"embedding_dim": 4, "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}}


def _mmoe(feature_dir):
    from mmoe_rec.features.spec import FeatureSpec
    from mmoe_rec.models.mmoe import MMoE

    return MMoE(FeatureSpec.load(feature_dir / "spec.json"), **MODEL["init_args"])


def test_fixed_epochs_train_every_epoch_and_report_the_training_split_too(feature_dir):
    r = train_and_test(str(feature_dir), MODEL, seed=0, max_epochs=2, monitor="val/loss", mode="min",
                       patience=None, eval_train=True, batch_size=256, lr=0.01)
    assert r["epochs"] == 2
    for task in ("click", "convert"):  # the labels follow the features: the tested weights learnt (0.74 / 0.67 seen)
        assert r[f"test/{task}/auc"] > 0.6 and r[f"train_eval/{task}/auc"] > 0.6
        assert 0 < r[f"train_eval/{task}/logloss"] < 0.7
    assert r["params"] == sum(p.numel() for p in _mmoe(feature_dir).parameters())
    assert "best_monitor" not in r  # no checkpoint was chosen: the final weights were tested


def test_early_stopping_tests_the_best_checkpoint_without_training_split_metrics(feature_dir):
    r = train_and_test(str(feature_dir), MODEL, seed=0, max_epochs=2, monitor="val/loss", mode="min", patience=1,
                       batch_size=256)
    assert 1 <= r["epochs"] <= 2
    assert "test/click/auc" in r and not any(k.startswith("train_eval/") for k in r)
    assert r["best_monitor"] > 0  # the best validation loss: what a selection on validation reads
