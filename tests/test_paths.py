"""mmoe_rec.paths: the files of an input folder, and the first file an input list names twice."""
from __future__ import annotations

import os

from mmoe_rec.paths import first_repeated_file, folder_files


def test_a_file_named_twice_is_found_by_real_path_earlier_spelling_first(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"")
    os.symlink(tmp_path / "a.parquet", tmp_path / "link.parquet")
    monkeypatch.chdir(tmp_path)
    assert first_repeated_file(["a.parquet", "b.parquet"]) is None
    assert first_repeated_file(["a.parquet", "b.parquet", str(tmp_path / "a.parquet")]) == \
        ("a.parquet", str(tmp_path / "a.parquet"))
    assert first_repeated_file(["link.parquet", "b.parquet", "a.parquet"]) == ("link.parquet", "a.parquet")


def test_a_folders_files_are_sorted_recursive_and_pass_over_hidden_names_and_a_link_back_up(tmp_path):
    for name in ["z.parquet", "day=2/b.parquet", "day=1/a.parquet", "_tmp/x.parquet", ".hidden/y.parquet",
                 "_SUCCESS", ".a.crc"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    os.symlink(tmp_path, tmp_path / "day=1" / "up")  # a link back up the tree: walked once, not forever
    files = folder_files(str(tmp_path))
    assert files == [str(tmp_path / n) for n in ["day=1/a.parquet", "day=2/b.parquet", "z.parquet"]]


def test_a_hard_link_to_a_file_named_too_is_the_same_file(tmp_path):
    """A hard link (a `cp -al` / `rsync --link-dest` snapshot beside the data) is the file itself under another
    name: read once as each name, its rows are scored twice, and the row-count check counts them as expected."""
    (tmp_path / "a.parquet").write_bytes(b"x")
    os.link(tmp_path / "a.parquet", tmp_path / "b.parquet")
    assert first_repeated_file([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]) == \
        (str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"))
