"""Synthetic generators: the MMoE paper's correlation control, the rec generator's relatedness, the CLI + schemas."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmoe_rec.data.synthetic import MMoESynthetic, RecSynthetic
from mmoe_rec.data.synthetic import main as synth_main
from mmoe_rec.features.build import main as features_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("p", [-0.5, 0.0, 0.5, 0.9])
def test_mmoe_linear_parts_have_correlation_p(p):
    g = MMoESynthetic(p=p, seed=3)
    assert g.d == 100 and g.c == 1.0 and g.m == 10  # the paper's constants
    assert np.linalg.norm(g.w1) == pytest.approx(1.0) and np.linalg.norm(g.w2) == pytest.approx(1.0)
    assert g.w1 @ g.w2 == pytest.approx(p)  # cosine of the weight vectors is exactly p
    s = g.sample(20_000, np.random.default_rng(0))
    assert np.corrcoef(s["lin1"], s["lin2"])[0, 1] == pytest.approx(p, abs=0.03)


def test_mmoe_label_correlation_is_monotone_in_p():
    ps = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
    corr = []
    for p in ps:  # same seed: same sine constants and same x, only p changes
        s = MMoESynthetic(p=p, seed=0).sample(20_000, np.random.default_rng(1))
        corr.append(np.corrcoef(s["y1"], s["y2"])[0, 1])
    assert all(b > a for a, b in zip(corr, corr[1:])), corr
    assert abs(corr[0]) < 0.05 and corr[-1] > 0.99


def test_rec_relatedness_moves_label_correlation():
    corr = []
    for r in (0.0, 0.5, 1.0):
        t = RecSynthetic(relatedness=r, num_users=5_000, num_items=2_000, seed=0).sample(60_000, np.random.default_rng(1))
        corr.append(np.corrcoef(t["click"].to_numpy(), t["conversion"].to_numpy())[0, 1])
    assert abs(corr[0]) < 0.03 and corr[1] > corr[0] + 0.05 and corr[2] > corr[1] + 0.05, corr


def test_rec_popularity_is_skewed_and_data_has_missing_age():
    t = RecSynthetic(num_users=5_000, num_items=2_000, seed=0).sample(50_000, np.random.default_rng(2))
    counts = np.sort(np.unique(t["item_id"].to_numpy(), return_counts=True)[1])[::-1]
    assert counts[:20].sum() > 0.2 * counts.sum()  # Zipf: the top 1 % of items get a large share
    assert 0.07 < t["user_age"].null_count / t.num_rows < 0.13
    assert t["tags"].type.value_type.bit_width == 64 and min(len(x) for x in t["tags"].to_pylist()[:500]) >= 1


@pytest.mark.parametrize("kind,schema,args", [
    ("mmoe", "synthetic_mmoe.yaml", ["--p", "0.7"]),
    ("rec", "synthetic_rec.yaml", ["--relatedness", "0.3", "--users", "2000", "--items", "500"]),
])
def test_synth_cli_output_builds_with_shipped_schema(tmp_path, kind, schema, args):
    raw, out = tmp_path / "raw", tmp_path / "features"
    assert synth_main([kind, "--rows", "3000", "--chunk-rows", "1000", "--output", str(raw)] + args) == 0
    assert pq.read_table(raw).num_rows == 3000
    assert features_main(["--schema", str(ROOT / "configs/features" / schema), "--input", str(raw),
                          "--output", str(out), "--valid-fraction", "0.1", "--test-fraction", "0.1"]) == 0
    assert sum(pq.read_table(out / s).num_rows for s in ("train", "valid", "test")) == 3000


def test_synth_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        synth_main(["--help"])
    assert e.value.code == 0 and "mmoe" in capsys.readouterr().out


def test_synth_refuses_a_non_empty_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["mmoe", "--rows", "500", "--d", "4", "--output", str(out)]
    assert synth_main(args) == 1
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "user data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left beside it
    assert synth_main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"] and pq.read_table(out).num_rows == 500
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old directory left
    assert synth_main(args + ["--overwrite"]) == 0  # rerunnable


def test_synth_and_features_errors_give_the_traceback_on_request(tmp_path, capsys, monkeypatch):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    assert synth_main(["mmoe", "--rows", "50", "--d", "4", "--output", str(out)]) == 1
    assert "MMOE_REC_TRACEBACK=1" in capsys.readouterr().err  # the hint, as every mmoe-rec job prints it
    monkeypatch.setenv("MMOE_REC_TRACEBACK", "1")
    with pytest.raises(FileExistsError):
        synth_main(["mmoe", "--rows", "50", "--d", "4", "--output", str(out)])
    with pytest.raises(ValueError, match="p must be in"):
        synth_main(["mmoe", "--rows", "50", "--p", "3", "--output", str(tmp_path / "p3")])
    from mmoe_rec.features.errors import FeatureDataError

    with pytest.raises(FeatureDataError, match="not empty"):
        features_main(["--schema", str(ROOT / "configs/features/synthetic_mmoe.yaml"), "--input", str(out),
                       "--output", str(out)])


def test_synth_into_an_empty_directory_or_onto_a_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synth_main(["mmoe", "--rows", "100", "--d", "4", "--output", str(empty)]) == 0
    assert pq.read_table(empty).num_rows == 100
    f = tmp_path / "file.parquet"
    f.write_text("x")
    assert synth_main(["mmoe", "--rows", "100", "--d", "4", "--output", str(f), "--overwrite"]) == 1
    assert "not a directory" in capsys.readouterr().err and f.read_text() == "x"
