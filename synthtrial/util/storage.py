"""Object storage behind one filesystem abstraction (fsspec): URLs such as ``s3://bucket/run`` or ``gs://...``.

Choices, stated once:

* A location is *remote* when it is a URL whose protocol is not ``file``; ``file:///path`` is the local path
  and gets the local guarantees (temp file + rename, ``flock``). Credentials and endpoints come from the
  environment as fsspec reads them (``AWS_*``, ``FSSPEC_S3_ENDPOINT_URL``, ``fsspec.config.conf``).
* Atomic write of an object (:func:`put_atomic`): the bytes go to a hidden temp key beside the target
  (``.<name>.<random>.tmp``), which is then copied to the target and deleted. A copy inside the store is
  atomic (readers see the old object or the new one, never part of one), and a write killed mid-way leaves
  only a temp key, which the next writer removes.
* The lock is a lease object (:class:`Lease`): created with a conditional put (``If-None-Match: *`` on S3, an
  exclusive create elsewhere), holding its owner and an expiry that a thread renews while held. A second writer
  is refused while the lease is live; a lease whose holder died (expired) is taken over with a conditional put
  on its ETag (``If-Match``), so two takers cannot both win. On a store without conditional writes fsspec's
  exclusive create is used as offered, a weaker guarantee.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from synthtrial.util.errors import SynthtrialError, one_line

__all__ = ["LEASE_SECONDS", "Lease", "LeaseHeld", "filesystem", "is_remote", "join", "local_path", "put_atomic",
           "temp_key"]

#: A lease not renewed for this long is taken to belong to a dead writer (renewed every third of it).
LEASE_SECONDS = 60.0


def is_remote(location: Any) -> bool:
    """Whether ``location`` is a URL of a non-local fsspec filesystem (``s3://``, ``gs://``, ...)."""
    if not isinstance(location, str) or "://" not in location:
        return False
    protocol = location.split("://", 1)[0].lower()
    return protocol not in ("", "file", "local") and protocol.replace("+", "").replace("-", "").isalnum()


def local_path(location: Any) -> Any:
    """``file:///path`` as ``/path``; anything else unchanged."""
    if isinstance(location, str) and location.lower().startswith("file://"):
        return location[len("file://"):]
    return location


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it (no trailing '/'), or a one-line error."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise SynthtrialError(f"{url}: no filesystem for this URL ({one_line(exc)})") from None
    return fs, path.rstrip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def temp_key(path: str) -> str:
    """A hidden temp key beside ``path`` (the same naming as local temp files, so one sweep finds both)."""
    folder, _, name = path.rpartition("/")
    return join(folder, f".{name[:32]}.{uuid.uuid4().hex[:12]}.tmp")


def put_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to object ``path`` via a temp key and a copy inside the store (see the module docstring)."""
    tmp = temp_key(path)
    try:
        fs.pipe_file(tmp, data)
        fs.copy(tmp, path)
    finally:
        try:
            fs.rm_file(tmp)
        except FileNotFoundError:
            pass


class LeaseHeld(SynthtrialError):
    """Another live writer holds the lease."""


class Lease:
    """The lock of a remote run directory: a lease object at ``path`` (see the module docstring)."""

    def __init__(self, fs: Any, path: str, seconds: float = LEASE_SECONDS) -> None:
        self.fs, self.path, self.seconds = fs, path, seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.seconds}).encode()

    def _create(self) -> bool:
        """The conditional create: True when this call made the object."""
        try:
            self.fs.pipe_file(self.path, self._body(), mode="create")
            return True
        except (FileExistsError, OSError):
            return False

    def _etag(self) -> str | None:
        try:
            return self.fs.info(self.path).get("ETag")
        except FileNotFoundError:
            return None

    def acquire(self) -> None:
        if self._create():
            self._start()
            return
        etag = self._etag()
        try:
            held = json.loads(self.fs.cat_file(self.path))
            expires = float(held["expires"])
        except FileNotFoundError:
            held, expires = {}, 0.0
        except (ValueError, KeyError, TypeError):
            held, expires = {}, 0.0    # unreadable: treated as expired
        if expires > time.time():
            until = time.strftime("%H:%M:%S", time.localtime(expires))
            raise LeaseHeld(f"held by {held.get('owner', '?')} until {until}")
        try:   # take over an expired lease: only if it is still the object we read
            if etag is None:
                taken = self._create()
            else:
                self.fs.pipe_file(self.path, self._body(), IfMatch=etag)
                taken = True
        except (FileExistsError, OSError, TypeError):
            taken = False
        if not taken:
            raise LeaseHeld("taken over by another writer just now")
        self._start()

    def _start(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.seconds / 3):
                try:
                    self.fs.pipe_file(self.path, self._body())
                except OSError:
                    pass   # the next renewal tries again

        self._thread = threading.Thread(target=renew, name="synthtrial-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = json.loads(self.fs.cat_file(self.path))
            if held.get("owner") == self.owner:
                self.fs.rm_file(self.path)
        except (FileNotFoundError, ValueError):
            pass
