"""output_dir.replace_dir: the new directory takes the output's place whole, a SIGTERM taken only after the swap."""
from __future__ import annotations

import errno
import os
import re
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
            output_dir.replace_dir(new, out, overwrite=True)
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
    """While the new output is renamed in, the old one sits at `.<name>.old-<pid>-<random>`: a name readers skip (a
    leading '.') and no other folder has, so a user's `out.old` or another process's set-aside folder beside it is
    left alone (a fixed name made the swap fail on it, or take it for its own; the pid alone repeats across
    containers that share a volume)."""
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
    output_dir.replace_dir(new, out, overwrite=True)
    assert len(seen) == 2 and re.fullmatch(rf"\.out\.old-{os.getpid()}-[0-9a-f]{{8}}", seen[0]) and seen[1] == "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-1", "out", "out.old"]
    assert (out / "new.txt").exists() and (tmp_path / "out.old" / "mine.txt").exists()
    assert (tmp_path / ".out.old-1" / "other.txt").exists()


def _folder(path, name: str):
    path.mkdir()
    (path / name).write_text(name)
    return path


def test_without_overwrite_the_swap_refuses_an_output_another_job_filled_meanwhile(tmp_path):
    """The empty-output check runs at a job's start, the swap at its end: the rename itself refuses a folder that is
    not empty (ENOTEMPTY / EEXIST), so another job's output that came in between stays whole; an empty one is
    replaced, as the check allows."""
    new, out = _folder(tmp_path / ".out.tmp", "mine.txt"), _folder(tmp_path / "out", "theirs.txt")
    with pytest.raises(FileExistsError, match="another job wrote this output while this one ran"):
        output_dir.replace_dir(new, out, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and (new / "mine.txt").exists()
    (out / "theirs.txt").unlink()
    output_dir.replace_dir(new, out, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and not new.exists()


def test_synth_without_overwrite_leaves_an_output_another_job_wrote_meanwhile(tmp_path, monkeypatch):
    import pyarrow as pa

    from mmoe_rec.data import synthetic

    out = tmp_path / "out"
    real = synthetic.replace_dir

    def other_job_finishes_first(*args, **kwargs):
        _folder(out, "theirs.txt")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "replace_dir", other_job_finishes_first)
    with pytest.raises(FileExistsError, match="another job wrote this output"):
        synthetic.write_parquet(iter([pa.table({"x": [1, 2]})]), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "theirs.txt").exists()


def test_two_overwriting_jobs_keep_one_whole_output_and_the_later_one_fails_saying_so(tmp_path, monkeypatch):
    """Job A moved the output aside, job B renamed its own in, A's rename failed (ENOTEMPTY): a bare OSError, and
    the original data left at A's hidden `.out.old-...` for good. A now fails saying so, B's output stays, and the
    old one (both asked to replace it) goes; after any other failure of the second rename the old one goes back."""
    out, new = _folder(tmp_path / "out", "old.txt"), _folder(tmp_path / ".out.tmp-a", "a.txt")
    real_replace = os.replace

    def b_renames_in_between(src, dst):
        if src == new:
            _folder(out, "b.txt")  # job B's rename, into the gap between A's two
        real_replace(src, dst)

    monkeypatch.setattr(output_dir.os, "replace", b_renames_in_between)
    with pytest.raises(FileExistsError, match="another job replaced this output while this one replaced it too"):
        output_dir.replace_dir(new, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-a", "out"]  # the caller removes its new one

    def fails(src, dst):
        if src == new:
            raise OSError(18, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(output_dir.os, "replace", fails)
    with pytest.raises(OSError, match="cross-device"):
        output_dir.replace_dir(new, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # put back
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-a", "out"]


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-hard-links"])
def test_publish_file_without_overwrite_never_replaces_a_file_that_appeared(tmp_path, monkeypatch, links):
    """A file put in place by a rename replaced one that another job wrote after this job's check: a hard link
    fails where the name exists (EEXIST); where the file system has no hard links, an exclusive create claims it."""
    if not links:
        def no_links(src, dst):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(output_dir.os, "link", no_links)
    out = tmp_path / "scores.parquet"
    (tmp := tmp_path / ".scores.parquet.tmp").write_text("mine")
    out.write_text("theirs")
    with pytest.raises(FileExistsError, match="another job wrote this file while this one ran"):
        output_dir.publish_file(tmp, out, overwrite=False)
    assert out.read_text() == "theirs" and tmp.exists()
    out.unlink()
    output_dir.publish_file(tmp, out, overwrite=False)
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]
    tmp.write_text("again")
    output_dir.publish_file(tmp, out, overwrite=True)
    assert out.read_text() == "again" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]


def test_a_rename_refused_for_another_reason_than_an_output_come_meanwhile_is_not_reported_as_one(tmp_path,
                                                                                                  monkeypatch):
    """An empty output folder that is a mount point (`docker run -v $PWD/out:/out ... --output /out`) refuses the
    rename with EBUSY: the job said another job wrote the output meanwhile and to use --overwrite (which fails too)."""
    new, out = tmp_path / "new", tmp_path / "out"
    new.mkdir()
    out.mkdir()  # empty: allowed without --overwrite
    real = os.replace

    def busy(src, dst):
        if os.fspath(dst) == os.fspath(out):
            raise OSError(errno.EBUSY, "Device or resource busy", os.fspath(src), None, os.fspath(dst))
        return real(src, dst)

    monkeypatch.setattr(output_dir.os, "replace", busy)
    with pytest.raises(OSError) as info:
        output_dir.replace_dir(new, out, overwrite=False)
    assert "another job" not in str(info.value)
    assert "Device or resource busy" in str(info.value) or "mount" in str(info.value)
