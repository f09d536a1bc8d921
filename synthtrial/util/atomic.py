"""Atomic file writes: a temp file in the target's folder, then a rename, so no reader sees half a file.

A URL of object storage (``s3://bucket/key``, :mod:`synthtrial.util.storage`) is written the same way in the
store's terms: a temp key beside the target, then a copy inside the store and the temp key's deletion.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Characters of the target's name kept in its temp file's name (a long name must not make the temp name
#: longer than the file system allows).
TEMP_NAME_CHARS = 32


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path | str:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename (a URL of object
    storage: via a temp key and a copy, returned as given).

    A failed write (a full disk, a read-only folder) leaves ``path`` as it was and no temp file, and raises an
    ``OSError`` (of the same kind) whose ``filename`` is ``path``, never the hidden temp file or nothing.
    """
    from synthtrial.util import storage

    if storage.is_remote(path):
        fs, key = storage.filesystem(str(path))
        storage.put_atomic(fs, key, data)
        return str(path)
    path = Path(storage.local_path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the permissions open() would
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename != str(path):
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    return path


def temp_prefix(path: str | os.PathLike[str]) -> str:
    """The prefix of a temp file or folder beside ``path``: hidden, and short whatever the name's length."""
    return f".{Path(path).name[:TEMP_NAME_CHARS]}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path | str:
    """Write UTF-8 text atomically (newlines as given)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be written: its nearest existing folder must be a
    writable folder. Returns ``path`` as a Path."""
    from synthtrial.util.errors import SynthtrialError

    path = Path(path)
    probe = path.parent if not path.is_dir() else path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SynthtrialError(f"{path}: {probe} is not a folder (option {option})")
    try:  # really try (root passes every permission check, but not a read-only or pseudo file system)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise SynthtrialError(f"{path}: {probe} is not writable ({exc.strerror or exc}) (option {option})") from None
    return path
