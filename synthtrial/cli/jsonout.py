"""``--json``: one JSON document on stdout, and nothing else there, for the commands a script reads.

Every command with ``--json`` declares the option with :func:`json_option` and prints with :func:`emit`; its
``--help`` lists the document's keys, which are stable (new keys may be added, none renamed or removed).
Progress bars and messages stay on stderr, as everywhere; errors keep their one line there and their exit
status. Numbers that are not finite (NaN, infinity) are written as ``null``, which every JSON reader takes.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated, Any

import typer


def json_option(what: str) -> Any:
    """The ``--json`` flag, saying what the document holds (its keys are listed in the command's help)."""
    return Annotated[bool, typer.Option("--json", help=f"Print {what} as one JSON document on stdout (its keys "
                                        "are listed above) instead of the table; nothing else goes to stdout.")]


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, paths and non-finite floats made JSON values (NaN -> null)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalars and arrays
        return plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)  # paths, timestamps


def emit(document: Any) -> None:
    """Write ``document`` to stdout as one JSON document (indented, UTF-8, a final newline)."""
    sys.stdout.write(json.dumps(plain(document), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    sys.stdout.flush()
