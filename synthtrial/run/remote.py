"""Run directories on object storage (``--out s3://bucket/run``, ``gs://...``; any fsspec filesystem).

The run-directory contract (:mod:`synthtrial.run.rundir`) is the same wherever the run lies; this module keeps
it on a store that has no folders, no rename and no ``flock``. Choices, stated once:

* A stage works on a **local working copy**: :func:`working_copy` takes the run's lease (writers only:
  ``RUN/.lock`` as a lease object, :class:`synthtrial.util.storage.Lease`), copies the run's objects into a
  temporary folder (removing temp keys a killed writer left), lets the stage run there with every local
  guarantee, and then uploads each new or changed file atomically (temp key + copy inside the store) and
  deletes what the stage deleted. Finished work is uploaded also when the stage fails or is interrupted, so
  the same command resumes.
* Order keeps readers safe: files that mark a stage finished (:data:`FINISH_MARKERS`: the manifest, the lesion
  and grade tables) are deleted first and uploaded last, so a reader never finds a marker before what it lists.
* The whole run is copied down (a resume re-checks every image's bytes; grading and analysis read them), so a
  stage costs one download and one upload of what it changed. Messages name the URL, not the working copy.
* With ``--scheduler`` the Dask workers write into the working copy, so they must share this machine's
  filesystem (``--workers``, a local cluster); workers elsewhere need the run on a shared folder.
* ``file:///path`` is the local path ``/path``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from synthtrial.run.rundir import (GRADES, GRADES_INDEX, LESIONS, LOCK, MANIFEST, MANIFEST_CSV, RunError)
from synthtrial.util import storage
from synthtrial.util.errors import SynthtrialError, one_line

__all__ = ["FINISH_MARKERS", "on_storage", "working_copy"]

#: Files that mark a stage finished: deleted first and uploaded last.
FINISH_MARKERS = (MANIFEST, MANIFEST_CSV, LESIONS, GRADES, GRADES_INDEX)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _pull(fs: Any, root: str, local: Path, write: bool) -> dict[str, tuple[int, int]]:
    """Copy every object of the run into ``local``; the snapshot (size, mtime) of each file written."""
    snapshot = {}
    for key in sorted(fs.find(root)):
        rel = key[len(root):].lstrip("/")
        name = rel.rsplit("/", 1)[-1]
        if not rel or rel == LOCK:
            continue
        if _is_temp(name):
            if write:
                fs.rm_file(key)   # left by a writer that was killed (we hold the lease)
            continue
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(key))
        snapshot[rel] = _stat(target)
    return snapshot


def _push(fs: Any, root: str, local: Path, snapshot: dict[str, tuple[int, int]]) -> None:
    """Upload what the stage wrote or changed and delete what it deleted, markers deleted first, uploaded last."""
    now = {p.relative_to(local).as_posix(): p for p in local.rglob("*")
           if p.is_file() and not p.is_symlink() and p.name != LOCK and not _is_temp(p.name)}
    changed = [rel for rel, p in now.items() if snapshot.get(rel) != _stat(p)]
    gone = [rel for rel in snapshot if rel not in now]
    for rel in sorted(gone, key=lambda r: r not in FINISH_MARKERS):
        fs.rm_file(storage.join(root, rel))
    for rel in sorted(changed, key=lambda r: (r in FINISH_MARKERS, FINISH_MARKERS.index(r) if r in FINISH_MARKERS
                                              else 0, r)):
        storage.put_atomic(fs, storage.join(root, rel), now[rel].read_bytes())


@contextlib.contextmanager
def working_copy(location: str, *, write: bool = True, what: str = "writing",
                 option: str | None = None) -> Iterator[Path]:
    """A local working copy of the remote run ``location`` for the block (see the module docstring); a writer
    holds the run's lease throughout and uploads what changed when the block ends, however it ends."""
    fs, root = storage.filesystem(location)
    where = f"(option {option})" if option else "(the run directory given)"
    bucket = root.split("/", 1)[0]
    try:
        reachable = fs.exists(bucket)
    except (OSError, ValueError) as exc:
        raise RunError(f"{location}: cannot be reached ({one_line(exc)}) {where}") from None
    if not reachable:
        raise RunError(f"{location}: no such bucket or folder '{bucket}' {where}")
    lease = storage.Lease(fs, storage.join(root, LOCK)) if write else None
    if lease is not None:
        try:
            lease.acquire()
        except storage.LeaseHeld as exc:
            also = f" or choose another {option}" if option else ""
            raise RunError(f"{location}: another synthtrial process is {what} this run ({exc}); wait for it to "
                           f"finish{also}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="synthtrial-run-") as tmp:
            local = Path(tmp) / "run"
            local.mkdir()
            snapshot = _pull(fs, root, local, write)
            try:
                yield local
            except SynthtrialError as exc:   # name the URL, not the working copy
                exc.args = (str(exc).replace(str(local), location), *exc.args[1:])
                raise
            finally:
                if write:
                    _push(fs, root, local, snapshot)
    finally:
        if lease is not None:
            lease.release()


def _to_url(value: Any, local: Path, location: str) -> Any:
    """A result as the caller should see it: paths and messages inside the working copy under the URL."""
    if isinstance(value, Path) and value.is_relative_to(local):
        return storage.join(location, value.relative_to(local).as_posix()) if value != local else location
    if isinstance(value, str):
        return value.replace(str(local), location)
    if isinstance(value, list):
        return [_to_url(v, local, location) for v in value]
    return value


def on_storage(argument: str, *, write: bool = True, what: str = "writing",
               option: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a stage so that its run argument ``argument`` may be a URL: the stage then runs on a
    :func:`working_copy`, and returned paths (and messages) inside the copy name the URL. ``file://`` URLs
    become local paths; anything else is passed through unchanged."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            location = bound.arguments.get(argument)
            if isinstance(location, str) and location.lower().startswith("file://"):
                bound.arguments[argument] = storage.local_path(location)
            if not storage.is_remote(location):
                return func(*bound.args, **bound.kwargs)
            with working_copy(location, write=write, what=what, option=option) as local:
                bound.arguments[argument] = local
                return _to_url(func(*bound.args, **bound.kwargs), local, location)

        return wrapper

    return decorate
