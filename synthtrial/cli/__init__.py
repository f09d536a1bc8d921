"""The ``synthtrial`` command line: a thin layer over the library, one module per command group.

In: arguments and options. Out: the library's results, written where the user said; exit status 0, 1 or 2.
Owns: option names and their help (declared once in ``common``), and the one-line error convention.

Bad input ends with one line on stderr (``synthtrial: error: FILE: row N, column 'C': ...``) and exit
status 2; nothing is half-written. Every command is a library function first.
"""

from __future__ import annotations

from synthtrial.cli.common import EXIT_BAD_INPUT, app
from synthtrial.cli import (  # noqa: E402,F401  (each module registers its commands)
    scale, protocol, generate, atlas, data, export, verify, graders, graders_detection, analyze, power,
)
from synthtrial.cli import graders_image  # noqa: E402,F401  (graders train|eval iga|imageqx)
from synthtrial.cli import dataset  # noqa: E402,F401  (graders dataset)
from synthtrial.cli import graders_tracking  # noqa: E402,F401  (graders eval tracker)
from synthtrial.cli import view  # noqa: E402,F401  (view: the run browser)

__all__ = ["EXIT_BAD_INPUT", "app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
