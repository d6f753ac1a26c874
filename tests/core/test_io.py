"""``atomic_write``: a write that fails leaves the old file as it was and no temporary file behind."""

import os

import pytest

from aptvit.core.io import atomic_write, atomic_write_many


class WriteFailed(Exception):
    pass


def half_write(text):
    """A write function that writes part of the new content, then fails (a full disk, a crash in a serializer)."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
        raise WriteFailed("disk full")

    return write


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old content")
    with pytest.raises(WriteFailed):
        atomic_write(path, half_write("new, half writ"))
    assert path.is_file(), "the old file is still there"
    assert path.read_text() == "old content"
    assert sorted(os.listdir(tmp_path)) == ["result.json"], "no temporary file is left behind"


def test_a_failed_write_creates_no_file(tmp_path):
    path = tmp_path / "sub" / "new.json"
    with pytest.raises(WriteFailed):
        atomic_write(path, half_write("partial"))
    assert not path.exists() and os.listdir(tmp_path / "sub") == []


def test_a_good_write_replaces_the_file_with_the_umask_mode(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old content")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("new content")

    assert atomic_write(path, write) == path
    assert path.read_text() == "new content"
    assert sorted(os.listdir(tmp_path)) == ["result.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_write_in_a_set_keeps_the_whole_old_set(tmp_path):
    a, b = tmp_path / "weights.safetensors", tmp_path / "state.pt"
    a.write_text("old weights")
    b.write_text("old state")

    def good(tmp):
        with open(tmp, "w") as f:
            f.write("new weights")

    with pytest.raises(WriteFailed):
        atomic_write_many([(a, good), (b, half_write("new st"))])
    assert a.read_text() == "old weights" and b.read_text() == "old state"
    assert sorted(os.listdir(tmp_path)) == ["state.pt", "weights.safetensors"]
