"""One progress bar for every long job (rendering, training, replicates), on stderr so stdout keeps results.

It is drawn only when stderr is a terminal: piped into a log (CI, ``2> file``) it stays silent, so errors keep
their one line.
"""

from __future__ import annotations

from collections.abc import Callable

#: The one progress-callback signature of the library's long jobs (generate, grade, verify, finetune, faces,
#: export): ``on_progress(done, total, status)``, called as work is finished. The CLI feeds it to a bar.
ProgressCallback = Callable[[int, int, str], None]


class progress_bar:
    """``with progress_bar("rendering", total, unit="images") as update: update(done, status="...")``.

    ``update`` takes the absolute count done, an optional status text (a loss, say) and, when the total is
    only known later, the ``total``. With ``enabled=False`` nothing is drawn and ``update`` does nothing.
    """

    def __init__(self, what: str, total: int, *, unit: str = "", enabled: bool = True) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console

            console = Console(stderr=True)
            enabled = console.is_terminal
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                 console=console)
            self._task = self._bar.add_task(what, total=total, status="")

    def __enter__(self) -> Callable[..., None]:
        if self._bar is None:
            return lambda done, status="", total=None: None
        self._bar.__enter__()
        return lambda done, status="", total=None: self._bar.update(
            self._task, completed=done, status=status, **({} if total is None else {"total": total}))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
