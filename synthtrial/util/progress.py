"""One progress bar for every long job (rendering, training, replicates), on stderr so stdout keeps results.

It is drawn only when stderr is a terminal: piped into a log (CI, ``2> file``) it stays silent, so errors keep
their one line.
"""

from __future__ import annotations

from collections.abc import Callable

#: The one progress-callback signature of the library's long jobs (generate, grade, verify, training loops,
#: grader training and evaluation, the autoencoder, power replicates, face banks): ``progress(done, total,
#: status)``, called as work is finished; ``status`` is a short text (a loss, a source, a detector head) or "".
#: A job of several stages takes one callback per stage. :class:`progress_bar` yields one, so a bar can be
#: handed to any of them as it is. ``tests/test_progress.py`` checks that every public ``progress`` parameter
#: is typed with it.
ProgressCallback = Callable[[int, int, str], None]


class progress_bar:
    """``with progress_bar("rendering", total, unit="images") as update: update(done, total, "status")``.

    ``update`` is a :data:`ProgressCallback`: the absolute count done, the total (which may differ from the
    one the bar opened with, when it is only known later) and a status text (a loss, say). With
    ``enabled=False`` nothing is drawn. ``sink`` (a :data:`ProgressCallback`, e.g. a library caller's
    ``on_progress`` or a test's recorder) hears every update too, drawn or not, its status prefixed with
    ``what`` (``"loading images"``, ``"statistics: lesion_count"``), so one sink follows a job of several
    phases.
    """

    def __init__(self, what: str, total: int, *, unit: str = "", enabled: bool = True,
                 sink: ProgressCallback | None = None) -> None:
        self._bar = None
        self._what, self._sink = what, sink
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

    def __enter__(self) -> ProgressCallback:
        sink, what = self._sink, self._what

        def update(done: int, total: int, status: str) -> None:
            if self._bar is not None:
                self._bar.update(self._task, completed=done, total=total, status=status)
            if sink is not None:
                sink(done, total, f"{what}: {status}" if status else what)

        if self._bar is not None:
            self._bar.__enter__()
        return update

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


class StageBars:
    """One bar per stage of a job that reports ``progress(done, total, stage)`` (``grade_run``: one grader's images
    at a time): a new stage closes the bar before and opens ``"{what} {stage}"``, so each count and ETA is that
    stage's own. ``with StageBars("grading", unit="images") as update: ...``; ``bar`` makes a bar
    (:class:`progress_bar`'s signature; a fake one in tests)."""

    def __init__(self, what: str, *, unit: str = "", enabled: bool = True,
                 bar: Callable[..., object] | None = None) -> None:
        self._what, self._unit, self._enabled, self._bar = what, unit, enabled, bar or progress_bar
        self._open: object = None
        self._update: ProgressCallback | None = None
        self._stage: str | None = None

    def __enter__(self) -> ProgressCallback:
        return self.update

    def update(self, done: int, total: int, stage: str) -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            self._open = self._bar(f"{self._what} {stage}", total, unit=self._unit, enabled=self._enabled)
            self._update = self._open.__enter__()
        if self._update is not None:
            self._update(done, total, "")

    def close(self, *exc: object) -> None:
        if self._open is not None:
            self._open.__exit__(*(exc or (None, None, None)))
        self._open = self._update = None

    def __exit__(self, *exc: object) -> None:
        self.close(*exc)
