"""Errors a user can act on.

Every stage raises a subclass of :class:`SynthtrialError` for bad input; the CLI prints its one-line
message on stderr and exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class SynthtrialError(Exception):
    """Bad input or a refused action, described in one line the user can act on."""


class SynthtrialWarning(UserWarning):
    """Something the user should know that does not stop the work (a grader used below its targets); the CLI
    prints it as one line on stderr."""


class ProtocolError(SynthtrialError):
    """A protocol CSV that cannot be read; names the file, the spreadsheet row and the column."""

    def __init__(self, message: str, *, file: str | Path | None = None, row: int | None = None,
                 column: str | None = None) -> None:
        self.file = None if file is None else str(file)
        self.row = row
        self.column = column
        self.reason = " ".join(str(message).split())  # one line, whatever the value contained
        super().__init__(self._format())

    def _format(self) -> str:
        where = ", ".join(part for part in (
            None if self.row is None else f"row {self.row}",
            None if self.column is None else f"column '{self.column}'",
        ) if part)
        return ": ".join(part for part in (self.file, where, self.reason) if part)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its class name when it has none."""
    text = " ".join(str(exc).split())[:300]
    return text or type(exc).__name__
