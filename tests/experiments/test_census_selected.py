"""experiments/census_selected.py: the choice on validation, the runs file and resuming (no training here)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from _settings import check_settings, settings_path  # noqa: E402
from census_selected import GRID, Outcome, Run, chosen_setting, print_tables, read_runs, write_runs  # noqa: E402


def outcome(valid: float, test: float = 0.95) -> Outcome:
    return Outcome(valid, test, 0.99, 5, 60.0, 1000)


def selection(contender: str, valid: dict[tuple[float, float], list[float]], seeds=(1, 2)) -> dict[Run, Outcome]:
    return {Run("select", contender, lr, wd, s): outcome(v, test=1.0 - v)  # test AUC ranks the other way round
            for (lr, wd), vals in valid.items() for s, v in zip(seeds, vals)}


def test_the_setting_with_the_best_mean_validation_auc_is_chosen_whatever_the_test_split_says():
    valid = {GRID[0]: [0.950, 0.950], GRID[1]: [0.958, 0.946], GRID[2]: [0.953, 0.951], GRID[3]: [0.940, 0.960]}
    # means 0.950, 0.952, 0.952, 0.950: GRID[1] and GRID[2] tie on the mean; the earlier one wins the tie
    assert chosen_setting(selection("MMoE", valid), "MMoE", [1, 2]) == GRID[1]
    valid[GRID[2]] = [0.954, 0.951]
    assert chosen_setting(selection("MMoE", valid), "MMoE", [1, 2]) == GRID[2]


def test_no_choice_until_every_selection_run_is_done():
    valid = {s: [0.95, 0.95] for s in GRID}
    done = selection("PLE", valid)
    done.pop(Run("select", "PLE", *GRID[3], 2))
    assert chosen_setting(done, "PLE", [1, 2]) is None
    assert chosen_setting(done, "MMoE", [1, 2]) is None  # nothing of another contender counts


def test_runs_file_round_trips_and_a_bad_line_names_the_file_and_line(tmp_path):
    done = selection("MMoE", {s: [0.95, 0.951] for s in GRID})
    done[Run("report", "MMoE", *GRID[0], 7)] = outcome(0.9512, 0.9561)
    path = tmp_path / "runs.csv"
    write_runs(path, done)
    assert read_runs(path) == done
    assert not list(tmp_path.glob("*.tmp"))
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("0.95", "n/a", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=r"runs\.csv, line 4"):
        read_runs(path)


def test_a_run_held_twice_in_the_runs_file_is_refused_naming_both_lines(tmp_path):
    done = selection("MMoE", {s: [0.95, 0.951] for s in GRID})
    done[Run("report", "MMoE", *GRID[0], 7)] = outcome(0.9512, 0.9561)
    path = tmp_path / "runs.csv"
    write_runs(path, done)
    lines = path.read_text().splitlines()
    first = len(lines)  # the report run is the last row
    lines.append(lines[-1].replace("0.9561", "0.94"))  # the same run again with another test AUC
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=rf"runs\.csv, line {first + 1}: report MMoE lr=0\.001 weight_decay=0 "
                                         rf"seed=7 is already at line {first}$"):
        read_runs(path)


def test_tables_report_only_the_chosen_setting_on_the_report_seeds(capsys):
    done = selection("MMoE", {GRID[0]: [0.95, 0.95], GRID[1]: [0.96, 0.96], GRID[2]: [0.94, 0.94],
                              GRID[3]: [0.93, 0.93]})
    done.update(selection("PLE", {s: [0.95, 0.95] for s in GRID}))
    for seed, test in ((10, 0.9560), (11, 0.9562)):
        done[Run("report", "MMoE", *GRID[1], seed)] = outcome(0.955, test)
        done[Run("report", "MMoE", *GRID[0], seed)] = outcome(0.955, 0.5)  # not chosen: must not be reported
    for seed, test in ((10, 0.9550), (11, 0.9552)):
        done[Run("report", "PLE", *GRID[0], seed)] = outcome(0.955, test)
    print_tables(done, ["MMoE", "PLE"], [1, 2], [10, 11])
    out = capsys.readouterr().out
    assert "| MMoE | 0.9500 | 0.9600 * | 0.9400 | 0.9300 |" in out
    assert "| MMoE | 1,000 | lr 0.001, wd 0.0001 | 0.9550 ± 0.0000 | 0.9561 ± 0.0001 |" in out
    assert "| PLE | 1,000 | lr 0.001, wd 0 |" in out
    assert "vs PLE: +0.0010 ± 0.0001" in out


def test_a_runs_file_made_with_other_settings_is_not_resumed(tmp_path):
    """A second invocation with --max-epochs 30 printed a first one's 1-epoch runs as the 30-epoch protocol."""
    runs = tmp_path / "runs.csv"
    settings = {"features": "/f", "max_epochs": 1, "patience": 1, "batch_size": 256, "grid": [list(g) for g in GRID]}
    check_settings(runs, settings)  # a new file: its settings are kept beside it
    write_runs(runs, selection("MMoE", {GRID[0]: [0.95, 0.95]}))
    check_settings(runs, dict(settings))  # the same settings: resumed
    with pytest.raises(SystemExit, match=r"other settings: max_epochs: the file's 1, now 30; patience: the file's 1, "
                                         r"now 3"):
        check_settings(runs, dict(settings, max_epochs=30, patience=3))
    settings_path(runs).unlink()  # runs whose settings are unknown
    with pytest.raises(SystemExit, match="settings they were made with are unknown"):
        check_settings(runs, settings)


def test_the_tables_of_a_runs_file_say_what_settings_made_them(tmp_path):
    from _settings import settings_line

    runs = tmp_path / "runs.csv"
    assert "not recorded" in settings_line(runs)
    check_settings(runs, {"max_epochs": 1, "patience": 1})
    assert settings_line(runs) == "settings of runs.csv: max_epochs 1, patience 1"


def test_the_census_feature_folder_is_built_only_where_nothing_else_would_be_replaced(tmp_path):
    """`--features DIR` was rebuilt with `--overwrite` whatever it held: `--features .` wiped the folder. Only a
    folder the experiments made (its made_for.json), an empty one or none is (re)built now."""
    from census_results import build_features

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"mine: holds files these experiments did not make"):
        build_features(foreign, seed=0)
    assert (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    with pytest.raises(SystemExit, match="did not make"):
        build_features(a_file, seed=0)
    assert a_file.read_text() == "keep me too"


def test_shipped_runs_print_the_readme_tables(capsys):
    """The README's census tables (choice on validation, report seeds 200-204) are what the shipped runs print."""
    shipped = Path(__file__).resolve().parents[2] / "experiments" / "results" / "census_selected_2026-11-25.csv"
    done = read_runs(shipped)
    contenders = ["shared-bottom", "OMoE", "MMoE", "PLE", "DeepCTR-Torch MMoE", "torch-rechub MMoE"]
    print_tables(done, contenders, [100, 101], [200, 201, 202, 203, 204])
    out = capsys.readouterr().out
    assert "| MMoE | 0.9570 * | 0.9569 | 0.9565 | 0.9560 |" in out
    assert "| DeepCTR-Torch MMoE | 0.9562 * | 0.9562 | 0.9561 | 0.9562 |" in out
    assert "| MMoE | 399,178 | lr 0.001, wd 0 | 0.9569 ± 0.0004 | 0.9560 ± 0.0006 | 0.9948 ± 0.0001 | 5 |" in out
    assert "| PLE | 472,186 | lr 0.001, wd 0 | 0.9568 ± 0.0004 | 0.9562 ± 0.0006 | 0.9948 ± 0.0000 | 5 |" in out
    for line in ("vs shared-bottom: +0.0005 ± 0.0003", "vs OMoE: +0.0001 ± 0.0003", "vs PLE: -0.0003 ± 0.0004",
                 "vs DeepCTR-Torch MMoE: +0.0005 ± 0.0003", "vs torch-rechub MMoE: +0.0003 ± 0.0004"):
        assert line in out
    # the report runs are exactly the chosen setting on the report seeds: nothing else was tested for the report
    report = [r for r in done if r.stage == "report"]
    assert len(report) == 30 and {r.seed for r in report} == {200, 201, 202, 203, 204}
    for c in contenders:
        pick = chosen_setting(done, c, [100, 101])
        assert {(r.lr, r.weight_decay) for r in report if r.contender == c} == {pick}
