import os

import pytest

from mixnet.errors import MixNetError
from mixnet.fileio import atomic_write


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_write(target) as f:
        f.write(b"first")
    with atomic_write(target, "w") as f:
        f.write("second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["out.bin"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("good")
    with pytest.raises(OSError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise OSError("disk full")
    assert target.read_text() == "good"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_an_output_path_that_is_a_folder_or_below_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep")
    for target, problem in ((tmp_path / "folder", "is a directory"),
                            (tmp_path / "file" / "out.json", "is a file, not a directory")):
        with pytest.raises(MixNetError, match=f"^output {target}: .*{problem}"):
            with atomic_write(target, "w") as f:
                f.write("x")
    assert (tmp_path / "file").read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["file", "folder"]
