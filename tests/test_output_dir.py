"""output_dir.replace_dir: the new directory takes the output's place whole, a SIGTERM taken only after the swap."""
from __future__ import annotations

import os
import signal

import pytest

from mmoe_rec import output_dir


def test_replace_dir_swaps_whole_and_takes_a_sigterm_only_after_the_renames(tmp_path, monkeypatch):
    """Between its two renames the output is missing and the old one set aside: a SIGTERM there (whose handler
    ends the job) left the output deleted. It is now taken by the handler in force once both renames are done."""
    out, new = tmp_path / "out", tmp_path / ".out.tmp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        if src == new:  # the second rename: a SIGTERM arrives just before it
            os.kill(os.getpid(), signal.SIGTERM)
        real_replace(src, dst)
        seen.append(("renamed", dst))

    class Stopped(Exception):
        pass

    def handler(signum, frame):  # as the jobs' handler does: end the job with an exception
        seen.append(("sigterm", None))
        raise Stopped

    monkeypatch.setattr(output_dir.os, "replace", replace)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Stopped):
            output_dir.replace_dir(new, out)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [what for what, _ in seen] == ["renamed", "renamed", "sigterm"]
    # the old output removed before the signal is taken (a `.out.old-<pid>` left behind is removed by nothing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "new.txt").read_text() == "new"


def test_a_symlinked_output_folder_is_replaced_at_its_target_and_the_link_stays(tmp_path):
    """The swap put the new folder in place of the link (the target kept the old data) and then failed to remove
    the set-aside link ("Cannot call rmtree on a symbolic link"), exit 1 after the output had moved."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmoe_rec.data.synthetic import write_parquet

    target, link = tmp_path / "disk" / "out", tmp_path / "out"
    write_parquet(iter([pa.table({"x": [1, 2, 3]})]), target)
    link.symlink_to(target, target_is_directory=True)
    write_parquet(iter([pa.table({"x": [4, 5]})]), link, overwrite=True)
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert pq.read_table(target)["x"].to_pylist() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"]  # nothing set aside or left over
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["out"]


def test_missing_parents_are_named_deepest_first_and_removed_only_while_empty(tmp_path):
    out = tmp_path / "a" / "b" / "c" / "out"
    made = output_dir.missing_parents(out)
    assert made == [tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"]
    out.parent.mkdir(parents=True)
    (tmp_path / "a" / "kept.txt").write_text("written meanwhile by something else")
    output_dir.remove_empty_folders(made)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/kept.txt"]
    assert output_dir.missing_parents(tmp_path / "x") == []  # its folder exists: nothing to make or remove


def test_a_failed_features_build_or_synth_leaves_no_folder_it_made(tmp_path, capsys):
    """A review: a failed build (a missing label column) left the empty folders made above its output."""
    from mmoe_rec.cli import main

    (tmp_path / "raw.csv").write_text("city\n" + "".join(f"c{i % 5}\n" for i in range(20)))
    (tmp_path / "s.yaml").write_text("categorical: [{name: city}]\ntasks: [{name: y, column: y, type: binary}]\n")
    code = main(["features", "--schema", str(tmp_path / "s.yaml"), "--input", f"train={tmp_path / 'raw.csv'}",
                 "--output", str(tmp_path / "new" / "deeper" / "out")], process=False)
    assert code == 1 and "column 'y'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.csv", "s.yaml"]

    from mmoe_rec.data import synthetic

    def failing():
        yield synthetic.pa.table({"x": [1, 2]})
        raise RuntimeError("the generator fails")

    with pytest.raises(RuntimeError, match="generator fails"):
        synthetic.write_parquet(failing(), tmp_path / "made" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.csv", "s.yaml"]


def test_the_old_output_is_set_aside_under_a_hidden_name_of_this_process_and_siblings_stay(tmp_path, monkeypatch):
    """While the new output is renamed in, the old one sits at `.<name>.old-<pid>`: a name readers skip (a leading
    '.') and no other folder has, so a user's `out.old` or another process's set-aside folder beside it is left
    alone (a fixed name made the swap fail on it, or take it for its own)."""
    out, new = tmp_path / "out", tmp_path / ".out.tmp"
    for folder, name in ((out, "old.txt"), (new, "new.txt"), (tmp_path / "out.old", "mine.txt"),
                         (tmp_path / ".out.old-1", "other.txt")):
        folder.mkdir()
        (folder / name).write_text(name)
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(output_dir.os, "replace", replace)
    output_dir.replace_dir(new, out)
    assert seen == [f".out.old-{os.getpid()}", "out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-1", "out", "out.old"]
    assert (out / "new.txt").exists() and (tmp_path / "out.old" / "mine.txt").exists()
    assert (tmp_path / ".out.old-1" / "other.txt").exists()
