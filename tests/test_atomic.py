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


def full_disk_on(monkeypatch, predicate):
    """Make writes to files whose (temp) path satisfies ``predicate`` fail as on a full disk: the write raises
    ENOSPC with no file name, as the kernel reports it."""
    import errno

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        return Full(fh) if predicate(os.readlink(f"/proc/self/fd/{fd}")) else fh

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "c.bin"
    write_bytes_atomic(target, b"old")
    full_disk_on(monkeypatch, lambda path: ".c.bin." in path)
    with pytest.raises(OSError) as caught:
        write_bytes_atomic(target, b"new")
    assert caught.value.errno == 28 and caught.value.filename == str(target)
    assert str(target) in str(caught.value) and "No space left" in str(caught.value)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]

