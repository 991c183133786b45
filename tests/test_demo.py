"""`make demo` end to end on a small stream: synth -> features -> fit -> register -> score, through the CLI."""
from __future__ import annotations

import pyarrow.parquet as pq

from mmoe_rec import demo


def test_the_demo_trains_registers_and_scores_the_rows_it_never_trained_on(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the demo's own store in its work dir
    work = tmp_path / "demo_out"
    assert demo.main(["--workdir", str(work), "--rows", "3000", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    scores = pq.read_table(work / "scores.parquet")
    # the second file of the stream: the 3000 rows after the training file's, none of them trained on
    new_rows = pq.read_table(sorted((work / "demo" / "raw" / "synthetic_rec").glob("*.parquet"))[1])
    assert scores.num_rows == new_rows.num_rows == 3000
    assert scores.column("row_id").to_pylist() == new_rows.column("row_id").to_pylist()
    for task in ("click", "conversion"):
        s = scores.column(f"score_{task}").to_numpy()
        assert ((s > 0) & (s < 1)).all() and s.std() > 0  # probabilities that depend on the row
    assert set(scores.column("model_name").to_pylist()) == {"mmoe-synthetic"}
    assert "val/click/auc" in out and "plots: plots/" in out
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    version = client.get_model_version_by_alias("mmoe-synthetic", "champion")
    assert set(scores.column("model_version").to_pylist()) == {str(version.version)}
    assert not (work / "features").exists()  # the README's step-2 features are left alone
