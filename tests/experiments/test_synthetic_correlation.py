"""experiments/synthetic_correlation.py: the statistics of its OMoE / MMoE table (no training here)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from synthetic_correlation import (  # noqa: E402
    MODELS,
    RunRecord,
    complete_seeds,
    geometric_mean_interval,
    print_all_tables,
    print_tables,
    read_runs,
    write_runs,
)


def test_geometric_mean_is_symmetric_in_the_ratio_where_the_arithmetic_mean_is_not():
    mean, lo, hi = geometric_mean_interval([2.0, 0.5])
    assert mean == pytest.approx(1.0)  # the arithmetic mean would say 1.25: MMoE "better" for no reason
    assert lo == pytest.approx(0.5) and hi == pytest.approx(2.0)  # resamples: both 2.0, both 0.5 or one of each


def test_interval_holds_the_mean_shrinks_with_agreement_and_is_reproducible():
    spread = [0.6, 1.7, 0.9, 1.4, 1.1, 0.8, 1.9, 1.2]
    mean, lo, hi = geometric_mean_interval(spread)
    assert mean == pytest.approx(math.exp(sum(math.log(v) for v in spread) / len(spread)))
    assert lo < mean < hi
    assert geometric_mean_interval(spread) == (mean, lo, hi)  # fixed resampling seed
    _, lo_tight, hi_tight = geometric_mean_interval([1.19, 1.2, 1.21, 1.2, 1.2, 1.19, 1.21, 1.2])
    assert lo < lo_tight < 1.2 < hi_tight < hi
    assert geometric_mean_interval([1.5]) == (pytest.approx(1.5),) * 3


def test_table_reports_mmoes_lead_and_its_change_with_p_paired_by_seed(capsys):
    # Two seeds, MMoE 1.5x better than OMoE at p = 0.0 and equal at p = 1.0 on both: lead 1 -> 1.5, relative 1.5.
    table = {("shared-bottom", 1.0): [1.0, 2.0], ("OMoE", 1.0): [0.5, 1.0], ("MMoE", 1.0): [0.5, 1.0],
             ("shared-bottom", 0.0): [1.0, 2.0], ("OMoE", 0.0): [0.6, 1.2], ("MMoE", 0.0): [0.4, 0.8]}
    print_tables(table, "test", [1.0, 0.0], [0, 1])
    out = capsys.readouterr().out
    assert "| OMoE / MMoE | 1.00 [1.00, 1.00] (0/2) | 1.50 [1.50, 1.50] (2/2) |" in out
    assert "| MMoE's lead relative to p = 1.0 | 1 | 1.50 [1.50, 1.50] |" in out
    assert "| OMoE | 0.50 | 0.60 |" in out  # relative to shared-bottom on the same data


def _records(seeds=(0, 1), ps=(1.0, 0.0), with_train=True):
    out = []
    for p in ps:
        for seed in seeds:
            for i, model in enumerate(MODELS):
                mse = 1.0 + 0.1 * i + 0.01 * seed + (0.2 if p == 0.0 else 0.0)
                out.append(RunRecord(p, seed, model, mse, mse / 2 if with_train else None, 10 + seed))
    return out


def test_runs_csv_round_trips_and_its_tables_equal_those_printed_after_training(tmp_path, capsys):
    records = _records()
    path = tmp_path / "runs.csv"
    write_runs(path, records)
    assert not (tmp_path / "runs.csv.tmp").exists()  # written aside, then renamed
    assert read_runs([path]) == records  # floats exactly (repr), train_mse kept

    print_all_tables(records, [1.0, 0.0], [0, 1])
    direct = capsys.readouterr().out
    half_a, half_b = tmp_path / "a.csv", tmp_path / "b.csv"  # e.g. seeds run in two sessions
    write_runs(half_a, [r for r in records if r.seed == 0])
    write_runs(half_b, [r for r in records if r.seed == 1])
    both = read_runs([half_b, half_a])
    assert complete_seeds(both, [1.0, 0.0]) == [0, 1]
    print_all_tables(both, [1.0, 0.0], [0, 1])
    assert capsys.readouterr().out == direct
    assert "== training-split MSE" in direct and "== test MSE" in direct


def test_runs_without_training_split_mse_print_only_the_test_tables(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    write_runs(path, _records(with_train=False))
    print_all_tables(read_runs([path]), [1.0, 0.0], [0, 1])
    out = capsys.readouterr().out
    assert "== test MSE" in out and "training-split" not in out


def test_saved_runs_counted_twice_incomplete_or_malformed_are_errors_naming_the_place(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_runs(a, _records())
    write_runs(b, _records(seeds=(1,)))
    with pytest.raises(ValueError, match=r"b\.csv, line 2: p=1\.0 seed=1 shared-bottom is already in .*a\.csv, line"):
        read_runs([a, b])

    partial = [r for r in _records() if not (r.seed == 1 and r.p == 0.0 and r.model == "MMoE")]
    with pytest.raises(ValueError, match=r"seed 1 lacks runs: p=0\.0 MMoE"):
        complete_seeds(partial, [1.0, 0.0])

    bad = tmp_path / "bad.csv"
    bad.write_text(a.read_text().replace("shared-bottom", "SB", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: unknown model 'SB'"):
        read_runs([bad])
    lines = a.read_text(encoding="utf-8").splitlines()

    def with_cell_on_line_4(name: str, column: int, value: str):
        fields = lines[3].split(",")
        fields[column] = value
        path = tmp_path / name
        path.write_text("\n".join(lines[:3] + [",".join(fields)] + lines[4:]) + "\n", encoding="utf-8")
        return path

    with pytest.raises(ValueError, match=r"nan\.csv, line 4: test_mse must be a positive number"):
        read_runs([with_cell_on_line_4("nan.csv", 3, "nan")])
    with pytest.raises(ValueError, match=r"neg\.csv, line 4: train_mse must be a positive number, got '-1\.0'"):
        read_runs([with_cell_on_line_4("neg.csv", 4, "-1.0")])
    (tmp_path / "cols.csv").write_text("p,seed\n1.0,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cols\.csv: expected the columns"):
        read_runs([tmp_path / "cols.csv"])


def test_shipped_200k_runs_print_the_readme_table(capsys):
    """The README's 60-seed table of the 200,000-row protocol is what the shipped runs print."""
    results = Path(__file__).resolve().parents[2] / "experiments" / "results"
    records = read_runs([results / "synthetic_rows200k_fixed10_seeds0-29_2026-11-25.csv",
                         results / "synthetic_rows200k_fixed10_seeds30-59_2026-11-25.csv"])
    ps = [1.0, 0.9, 0.5, 0.0]
    assert complete_seeds(records, ps) == list(range(60))
    print_all_tables(records, ps, list(range(60)))
    out = capsys.readouterr().out
    assert ("| OMoE / MMoE | 0.88 [0.70, 1.10] (31/60) | 1.09 [0.86, 1.35] (38/60) | 1.21 [1.00, 1.45] (39/60) "
            "| 1.42 [1.15, 1.76] (44/60) |") in out
    assert "| MMoE's lead relative to p = 1.0 | 1 | 1.23 [1.06, 1.42] | 1.37 [1.07, 1.74] | 1.61 [1.20, 2.17] |" in out


def test_cached_data_is_rebuilt_when_asked_for_another_size(tmp_path):
    import json

    import synthetic_correlation as sc

    small = sc.make_data(tmp_path, 0.5, 0, 300)
    assert sum(json.loads((small / "manifest.json").read_text())["rows"].values()) == 300
    again = sc.make_data(tmp_path, 0.5, 0, 500)  # the same folder: it used to return the 300-row data
    assert sum(json.loads((again / "manifest.json").read_text())["rows"].values()) == 500


def test_runs_files_of_other_settings_are_not_tabulated_together(tmp_path, capsys):
    """--tables-from merged runs of 20k rows with early stopping and 200k rows of fixed epochs into one "60-seed"
    table without a word. Each runs file now keeps its settings beside it; files of other or unknown settings are
    refused together, and the shipped files of one protocol still print together."""
    from _settings import check_same_settings, settings_line

    records = [RunRecord(1.0, 0, m, 1.0, None, 3) for m in MODELS]
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    write_runs(a, records, {"rows": 20000, "max_epochs": 100, "lr": 3e-3, "fixed_epochs": False, "patience": 3})
    write_runs(b, [r._replace(seed=1) for r in records],
               {"rows": 200000, "max_epochs": 10, "lr": 1e-3, "fixed_epochs": True, "patience": None})
    write_runs(c, [r._replace(seed=2) for r in records])  # made before settings were kept
    assert settings_line(a) == "settings of a.csv: fixed_epochs False, lr 0.003, max_epochs 100, patience 3, rows 20000"
    with pytest.raises(SystemExit, match=r"a\.csv and .*b\.csv hold runs made with other settings \(fixed_epochs: "
                                         r"False against True; lr: 0\.003 against 0\.001; max_epochs"):
        check_same_settings([a, b])
    with pytest.raises(SystemExit, match=r"c\.csv: no settings file beside it"):
        check_same_settings([a, c])
    check_same_settings([c])  # one file alone: its tables, whatever made it
    results = Path(__file__).resolve().parents[2] / "experiments" / "results"
    shipped = [results / "synthetic_rows200k_fixed10_seeds0-29_2026-11-25.csv",
               results / "synthetic_rows200k_fixed10_seeds30-59_2026-11-25.csv"]
    check_same_settings(shipped)
    with pytest.raises(SystemExit, match="other settings"):
        check_same_settings([results / "synthetic_max100_seeds0-29_2026-11-25.csv", shipped[1]])


def test_the_data_folder_is_not_made_over_files_the_experiment_did_not_make(tmp_path):
    import synthetic_correlation as sc

    foreign = tmp_path / "features_p0.5_s0"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="did not make"):
        sc.make_data(tmp_path, 0.5, 0, 300)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_shipped_max100_runs_print_the_readme_table(capsys):
    """The README's 30-seed table of the 20,000-row protocol with at most 100 epochs is what the shipped runs print."""
    results = Path(__file__).resolve().parents[2] / "experiments" / "results"
    records = read_runs([results / "synthetic_max100_seeds0-29_2026-11-25.csv"])
    ps = [1.0, 0.9, 0.5, 0.0]
    assert complete_seeds(records, ps) == list(range(30))
    print_all_tables(records, ps, list(range(30)))
    out = capsys.readouterr().out
    assert "| OMoE | 0.84 | 0.74 | 0.83 | 0.81 |" in out and "| MMoE | 1.14 | 0.92 | 0.88 | 0.87 |" in out
    assert ("| OMoE / MMoE | 0.95 [0.75, 1.21] (14/30) | 0.94 [0.75, 1.13] (16/30) | 1.04 [0.85, 1.28] (15/30) "
            "| 1.04 [0.85, 1.27] (18/30) |") in out
    assert "| MMoE's lead relative to p = 1.0 | 1 | 0.99 [0.80, 1.23] | 1.10 [0.91, 1.32] | 1.10 [0.86, 1.43] |" in out
