"""Atomic writes: whole files or none, with the permissions an ordinary open() would give."""

import os
import stat

import pytest

from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic


def test_writes_whole_file_with_normal_permissions(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "b.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["b.bin"]
