"""Serve the run browser on 127.0.0.1, or write it to a folder as a static site.

Choices: the standard library's ``ThreadingHTTPServer`` in a daemon thread (no web framework); only GET and
HEAD; a request is answered only when its path is a key of :meth:`synthtrial.view.data.RunView.site` (the URLs
known from the validated manifest), so nothing from the request becomes a file path; everything else is 404.
Answers are made on demand and cached (a patient's JSON, a type map) except the run's images, read per request.
Default port 8765, or a free one when that is taken; an explicit port that is taken is an error.
A static site is written to a scratch folder beside ``DIR`` and moved into place only when complete; an existing
``DIR`` is replaced only when it is empty or a previous ``synthtrial view --static`` site (its marker file).
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from synthtrial.util.atomic import temp_prefix
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.progress import ProgressCallback
from synthtrial.view.data import RunView

DEFAULT_PORT = 8765
HOST = "127.0.0.1"
#: The file that marks a folder as a site ``--static`` wrote (so a re-run may replace it).
MARKER = ".synthtrial-view"


class ViewError(SynthtrialError):
    """A browser that cannot be served or written."""


def resolve(site: dict[str, tuple[str, Callable[[], bytes]]], raw_path: str) -> str | None:
    """The site key a request path names (``/`` is ``index.html``), or None when it names nothing served.
    Only a lookup: the key must be in ``site`` exactly as the site lists it."""
    path = unquote(urlsplit(raw_path).path)
    key = "index.html" if path in ("", "/") else path.removeprefix("/")
    return key if key in site else None


class _Cache:
    """Bytes of each site key, made once (the run's own images are read each time: they are large)."""

    def __init__(self, site: dict[str, tuple[str, Callable[[], bytes]]]) -> None:
        self.site, self.made, self.lock = site, {}, threading.Lock()

    def get(self, key: str) -> tuple[str, bytes]:
        kind, make = self.site[key]
        if key.startswith("run/"):
            return kind, make()
        with self.lock:
            if key not in self.made:
                self.made[key] = make()
            return kind, self.made[key]


def make_handler(cache: _Cache) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "synthtrial-view"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self.answer(body=False)

        def answer(self, body: bool) -> None:
            key = resolve(cache.site, self.path)
            if key is None:
                self.send_error(HTTPStatus.NOT_FOUND, "not part of this run's browser")
                return
            try:
                kind, data = cache.get(key)
            except (SynthtrialError, OSError) as exc:
                self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc).splitlines()[0][:200])
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            pass  # quiet: the terminal shows the URL and errors only

    return Handler


def start(view: RunView, port: int | None = None) -> ThreadingHTTPServer:
    """A server for ``view`` on 127.0.0.1, already answering in a daemon thread; ``server.server_address``
    gives the port. ``port`` None: 8765, or any free port when 8765 is taken."""
    handler = make_handler(_Cache(view.site()))
    tries = [DEFAULT_PORT, 0] if port is None else [port]
    for k, candidate in enumerate(tries):
        try:
            server = ThreadingHTTPServer((HOST, candidate), handler)
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or k == len(tries) - 1:
                raise ViewError(f"port {candidate} on {HOST} cannot be used ({exc.strerror}) "
                                f"(option --port{'; leave it out to pick a free port' if port else ''})") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="synthtrial-view", daemon=True).start()
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://{HOST}:{server.server_address[1]}/"


def stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def write_static(view: RunView, out: str | Path, progress: ProgressCallback | None = None) -> Path:
    """Write the browser as a static site into ``out`` (every URL of the site as a file); returns ``out``.
    Serve it with any static file server (``python -m http.server -d OUT``): browsers do not let pages opened
    from ``file://`` read their JSON."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ViewError(f"{out}: is a file, not a folder (option --static)")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ViewError(f"{out}: holds other files; choose an empty or new folder (option --static)")
    out.parent.mkdir(parents=True, exist_ok=True)
    site = view.site()
    scratch = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        for k, (key, (_, make)) in enumerate(sorted(site.items()), start=1):
            target = scratch.joinpath(*key.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(make())
            if progress is not None:
                progress(k, len(site), "")
        (scratch / MARKER).write_text("written by synthtrial view --static\n", encoding="utf-8")
        scratch.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return out
