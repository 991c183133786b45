"""Synthetic generators: the MMoE paper's correlation control, the rec generator's relatedness, the CLI + schemas."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmoe_rec.data import synthetic
from mmoe_rec.data.synthetic import REC_COLUMNS, MMoESynthetic, RecSynthetic
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


def test_synth_files_hold_at_most_rows_per_file(tmp_path):
    out = tmp_path / "raw"
    assert synth_main(["rec", "--rows", "300", "--chunk-rows", "100", "--rows-per-file", "128", "--users", "200",
                       "--items", "100", "--output", str(out)]) == 0
    files = sorted(out.glob("part-*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [128, 128, 44]  # chunks split at file boundaries
    assert pq.read_table(out)["row_id"].to_pylist() == list(range(300))


@pytest.mark.parametrize("kind,args", [("mmoe", ["--d", "4"]), ("rec", ["--users", "200", "--items", "100"])])
def test_synth_rows_depend_only_on_seed_and_row_index(tmp_path, monkeypatch, kind, args):
    def rows(n: int, chunk_rows: int, rows_per_file: int = 1_000_000):
        out = tmp_path / f"raw_{n}_{chunk_rows}_{rows_per_file}"
        assert synth_main([kind, "--rows", str(n), "--chunk-rows", str(chunk_rows), "--rows-per-file",
                           str(rows_per_file), "--seed", "3", "--output", str(out)] + args) == 0
        return pq.read_table(out)

    monkeypatch.setattr(synthetic, "BLOCK_ROWS", 6_000)  # several blocks in a small test
    t = rows(20_000, 100)
    assert t.equals(rows(20_000, 64)) and t.equals(rows(20_000, 262_144, rows_per_file=7_000))  # memory settings
    assert t["row_id"].to_pylist() == list(range(20_000))


def test_synth_makes_the_data_it_made_before_blocks(tmp_path):
    # values of the generator before 2026-12-06 (one generator per default-sized chunk): the README's synthetic
    # experiments, made with the default chunk size, are made again the same
    assert synth_main(["mmoe", "--rows", "300", "--d", "4", "--seed", "3", "--chunk-rows", "7",
                       "--output", str(tmp_path / "m")]) == 0
    m = pq.read_table(tmp_path / "m")
    assert m["y1"].to_pylist()[:3] == [2.9647271633148193, 0.184503436088562, 2.9233078956604004]
    assert m["x0"].to_pylist()[299] == 2.5496280193328857
    assert synth_main(["rec", "--rows", "300", "--users", "200", "--items", "100", "--seed", "3",
                       "--output", str(tmp_path / "r")]) == 0
    r = pq.read_table(tmp_path / "r")
    assert r["user_id"].to_pylist()[:5] == [118, 100, 120, 129, 191]
    assert r["item_id"].to_pylist()[295:] == [23, 2, 40, 22, 82]
    assert sum(r["click"].to_pylist()) == 46 and r["price"].to_pylist()[:2] == [23.597722087723113, 20.993134468003504]


def test_synth_refuses_non_positive_row_counts(tmp_path, capsys):
    for flag in ("--rows", "--chunk-rows", "--rows-per-file"):
        out = tmp_path / flag.strip("-")
        assert synth_main(["mmoe", "--d", "4", "--output", str(out), flag, "0"]) == 2
        assert f"error: {flag} must be at least 1, got 0" in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--d", 1, "--d must be at least 2 (two orthogonal unit vectors are needed), got 1"),
    ("--d", 0, "--d must be at least 2"),
    ("--m", -1, "--m must be at least 0, got -1"),
    ("--noise-std", -1.0, "--noise-std must be a finite number >= 0, got -1.0"),
    ("--noise-std", float("nan"), "--noise-std must be a finite number >= 0, got nan"),
    ("--c", float("inf"), "--c must be a finite number, got inf"),
    ("--seed", -1, "--seed must be at least 0, got -1"),
])
def test_synth_mmoe_refuses_bad_generator_options_before_writing(tmp_path, capsys, flag, value, message):
    out = tmp_path / "raw"
    args = ["mmoe", "--rows", "10", "--output", str(out), flag, str(value)]
    assert synth_main(args if flag == "--d" else [*args, "--d", "4"]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no temporary directory left
    field = flag[2:].replace("-", "_")
    with pytest.raises(ValueError, match=re.escape(message)):  # the same check for the generator used from Python
        MMoESynthetic(p=0.5, **{"d": 4, field: value})
    MMoESynthetic(p=0.5, d=2, m=0, noise_std=0.0, c=0.0)  # the edge values are allowed


@pytest.mark.parametrize("tasks,column", [("click,price", "price"), ("row_id,click", "row_id"),
                                          ("click,click", "click")])
def test_synth_refuses_a_task_named_like_another_column(tmp_path, capsys, tasks, column):
    out = tmp_path / "raw"
    assert synth_main(["rec", "--rows", "100", "--users", "200", "--items", "100", "--tasks", tasks,
                       "--output", str(out)]) == 2
    assert f"task name '{column}'" in capsys.readouterr().err and not out.exists()
    t = RecSynthetic(num_users=200, num_items=100).sample(10, np.random.default_rng(0))
    assert t.column_names == [*REC_COLUMNS, "click", "conversion"]  # the names refused are the columns written


@pytest.mark.parametrize("args,message", [
    (["--users", "0"], "--users must be at least 1, got 0"),  # an IndexError traceback before
    (["--items", "0"], "--items must be at least 1, got 0"),
    (["--tags", "0"], "--tags must be at least 1, got 0"),
    (["--zipf", "nan"], "--zipf must be a finite number >= 0, got nan"),  # every row one user and one item
    (["--seed", "-1"], "--seed must be at least 0, got -1"),  # numpy's message named no flag
    (["--tasks", "click,,conversion"], "task name '' is empty or padded"),  # a label column named ''
    (["--tasks", "click, conversion"], "task name ' conversion' is empty or padded"),
])
def test_synth_rec_refuses_bad_generator_options_before_writing(tmp_path, capsys, args, message):
    out = tmp_path / "raw"
    assert synth_main(["rec", "--rows", "10", "--users", "20", "--items", "10", "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err
    assert not out.exists()


def test_mmoe_weight_vectors_have_norm_c_and_the_linear_parts_keep_correlation_p():
    """--c scales both weight vectors (the paper's c); only c = 1 was checked, so a c that did nothing passed."""
    g = MMoESynthetic(p=0.6, c=2.5, d=20, seed=1)
    assert np.linalg.norm(g.w1) == pytest.approx(2.5) and np.linalg.norm(g.w2) == pytest.approx(2.5)
    assert g.w1 @ g.w2 == pytest.approx(0.6 * 2.5 ** 2)
    s = g.sample(20_000, np.random.default_rng(0))
    assert np.std(s["lin1"]) == pytest.approx(2.5, rel=0.03) and np.std(s["lin2"]) == pytest.approx(2.5, rel=0.03)
    assert np.corrcoef(s["lin1"], s["lin2"])[0, 1] == pytest.approx(0.6, abs=0.03)


def test_rec_rows_carry_their_own_users_interests_and_age_and_their_own_items_tags():
    """Each impression's user attributes (interests, age) are the drawn user's and its tags the drawn item's: a row
    of the same user_id always has the same interests and age, and its tags are that item's, as the world holds
    them (an id's attributes looked up by another index made them noise the model could not learn)."""
    g = RecSynthetic(num_users=300, num_items=200, num_tags=50, seed=4)
    t = g.sample(5_000, np.random.default_rng(5))
    user_rank = np.argsort(g.user_ids)[t["user_id"].to_numpy() - 1]  # id -> popularity rank
    item_rank = np.argsort(g.item_ids)[t["item_id"].to_numpy() - 1]
    assert (g.user_ids[user_rank] == t["user_id"].to_numpy()).all()
    assert t["interests"].to_pylist() == g.user_interests.take(user_rank).to_pylist()
    age = t["user_age"].to_numpy(zero_copy_only=False)
    present = ~np.isnan(age)
    assert present.sum() > 4_000 and (age[present] == g.user_age[user_rank][present]).all()
    expected_tags = [g.tag_values[g.tag_offsets[r]:g.tag_offsets[r + 1]].tolist() for r in item_rank]
    assert t["tags"].to_pylist() == expected_tags
    # the same user id: the same interests and age in every row (a check that needs no internals)
    by_user: dict[int, set] = {}
    for uid, interests, a in zip(t["user_id"].to_pylist(), t["interests"].to_pylist(), t["user_age"].to_pylist()):
        by_user.setdefault(uid, set()).add(interests)
        if a is not None:
            by_user[uid].add(a)
    assert max(len(v) for v in by_user.values()) <= 2 and len(by_user) > 50
    by_item: dict[int, set] = {}
    for iid, tags in zip(t["item_id"].to_pylist(), t["tags"].to_pylist()):
        by_item.setdefault(iid, set()).add(tuple(tags))
    assert all(len(v) == 1 for v in by_item.values())


@pytest.mark.parametrize("relatedness", [1.5, -0.1])
def test_rec_relatedness_outside_0_1_is_refused(tmp_path, capsys, relatedness):
    """r > 1 made sqrt(1 - r) NaN: every logit NaN and every label 0, written without a word."""
    with pytest.raises(ValueError, match=re.escape(f"relatedness must be in [0, 1], got {relatedness}")):
        RecSynthetic(relatedness=relatedness, num_users=20, num_items=10)
    out = tmp_path / "raw"
    assert synth_main(["rec", "--rows", "10", "--users", "20", "--items", "10", "--relatedness", str(relatedness),
                       "--output", str(out)]) == 2
    assert f"relatedness must be in [0, 1], got {relatedness}" in capsys.readouterr().err and not out.exists()
    RecSynthetic(relatedness=1.0, num_users=20, num_items=10)  # the edges are allowed
    RecSynthetic(relatedness=0.0, num_users=20, num_items=10)


def test_write_parquet_refuses_zero_rows_per_file_and_leaves_nothing(tmp_path):
    """The library function (the CLI checks its flags first): a ZeroDivisionError from the row arithmetic before."""
    gen = MMoESynthetic(p=0.5, d=2)
    with pytest.raises(ValueError, match="rows_per_file must be at least 1, got 0"):
        synthetic.write_parquet(gen.tables(10, 5), tmp_path / "out" / "raw", rows_per_file=0)
    assert list(tmp_path.iterdir()) == []


def test_rec_needs_two_tasks():
    with pytest.raises(ValueError, match="needs at least two tasks"):
        RecSynthetic(tasks=("click",), num_users=20, num_items=10)


def test_write_parquet_never_writes_into_a_temporary_folder_of_another_process_of_the_same_pid(tmp_path):
    """`.<name>.tmp-<pid>` of a killed process whose pid came round again: its files would join the output. (It
    was removed; it may also be a live job's of another container sharing the folder: the temporary's random
    suffix now keeps the two apart, and the other one is left alone.)"""
    import os

    out = tmp_path / "raw"
    stale = tmp_path / f".raw.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "part-00007.parquet").write_bytes(b"half of a killed run")
    files = synthetic.write_parquet(MMoESynthetic(p=0.5, d=2).tables(10, 5), out)
    assert [f.name for f in files] == ["part-00000.parquet"] and pq.read_table(out).num_rows == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "raw"]
    assert [p.name for p in stale.iterdir()] == ["part-00007.parquet"]


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_mmoe_labels_follow_the_papers_formula_for_both_tasks(p):
    """y_t = w_tᵀx + Σ_j sin(α_j·w_tᵀx + β_j) + ε_t with ε_t ~ N(0, noise_std²), recomputed from x for each task
    (the pinned values of an earlier test cover y1 only; the monotone-correlation test misses e.g. y2's noise)."""
    g = MMoESynthetic(p=p, seed=5)
    u2 = (g.w2 - p * g.w1) / np.sqrt(1 - p ** 2)  # the paper's u2, recovered from w2
    assert g.w1 @ u2 == pytest.approx(0.0, abs=1e-12) and np.linalg.norm(u2) == pytest.approx(1.0)
    s = g.sample(20_000, np.random.default_rng(2))
    assert s["x"].mean() == pytest.approx(0.0, abs=0.01) and s["x"].std() == pytest.approx(1.0, abs=0.01)
    for w, y, lin in ((g.w1, "y1", "lin1"), (g.w2, "y2", "lin2")):
        np.testing.assert_allclose(s[lin], s["x"] @ w, rtol=0, atol=1e-12)
        clean = s[lin] + np.sin(np.outer(s[lin], g.alpha) + g.beta).sum(axis=1)
        eps = s[y] - clean
        assert abs(eps.mean()) < 5e-4 and eps.std() == pytest.approx(0.01, rel=0.03), (y, eps.mean(), eps.std())
    quiet = MMoESynthetic(p=p, seed=5, noise_std=0.0).sample(1_000, np.random.default_rng(2))
    for y, lin in (("y1", "lin1"), ("y2", "lin2")):
        np.testing.assert_allclose(quiet[y], quiet[lin] + np.sin(np.outer(quiet[lin], g.alpha) + g.beta).sum(1),
                                   rtol=0, atol=1e-12)


def test_mmoe_written_labels_match_the_written_inputs(tmp_path):
    """The Parquet's y1, y2 are the labels of its own x rows (float32 inputs: the recomputed labels differ by far
    less than the noise), across blocks and chunks."""
    out = tmp_path / "m"
    assert synth_main(["mmoe", "--rows", "3000", "--d", "8", "--p", "0.7", "--seed", "4", "--chunk-rows", "777",
                       "--noise-std", "0", "--output", str(out)]) == 0
    g = MMoESynthetic(p=0.7, d=8, seed=4, noise_std=0.0)
    t = pq.read_table(out)
    x = np.stack([t[f"x{j}"].to_numpy() for j in range(8)], axis=1).astype(np.float64)
    for w, y in ((g.w1, "y1"), (g.w2, "y2")):
        lin = x @ w
        np.testing.assert_allclose(t[y].to_numpy(), lin + np.sin(np.outer(lin, g.alpha) + g.beta).sum(1),
                                   rtol=0, atol=1e-4)
