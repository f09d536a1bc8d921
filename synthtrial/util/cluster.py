"""Dask (``distributed``) as the one engine that spreads work past this process: ``power``, and ``generate`` and
``grade`` with ``--scheduler`` (or ``grade --workers``).

Choices, stated once:

* ``--workers N`` starts a :func:`local_cluster` of N single-threaded processes; ``--scheduler ADDR``
  connects to a running cluster instead (``dask scheduler`` + ``dask worker``, or ``dask-cuda``'s
  ``dask cuda worker``: one worker per GPU, each seeing only its own device).
* Work is submitted with a bounded number of tasks in flight and collected as it finishes
  (:func:`run_tasks`); the caller assembles the result in its own order, so the bytes never depend on the
  number of workers or on the order tasks finish in.
* A lost worker's task is run again on another worker by the scheduler (up to distributed's
  ``allowed-failures``); tasks must therefore be idempotent: they write atomically and skip what is finished.
* Ctrl-C or SIGTERM in the client cancels every pending task and closes the client (and a local cluster,
  which stops its workers); the first task that fails ends the work with one line.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from synthtrial.util.errors import SynthtrialError, one_line

__all__ = ["MAX_WORKERS", "client_for", "local_cluster", "quiet_distributed", "run_tasks", "terminate_as_interrupt"]

#: Worker processes a local cluster may start (``--workers``) at most.
MAX_WORKERS = 64


def local_cluster(workers: int):
    """A Dask ``LocalCluster``: ``workers`` single-threaded processes, no dashboard.

    Its logs are silenced up to CRITICAL: a failing task is reported once, in one line, by the caller, not as a
    "Compute Failed" traceback per task from every worker. The workers start with Ctrl-C (SIGINT) ignored, a
    disposition a spawned process inherits: on Ctrl-C in a terminal, which signals every process of the group,
    this process alone stops and closes the cluster, instead of every worker printing its own
    KeyboardInterrupt traceback.
    """
    import logging

    from distributed import LocalCluster

    main = threading.current_thread() is threading.main_thread()  # signal handlers belong to the main thread
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        # no dashboard; its HTTP server (always started) takes any free port instead of insisting on 8787
        return LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True, dashboard_address=":0",
                            scheduler_kwargs={"dashboard": False}, silence_logs=logging.CRITICAL)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def quiet_distributed() -> Iterator[None]:
    """Silence ``distributed``'s loggers in this process for the block (its client and a local cluster's
    scheduler and nannies log task errors and shutdown noise that the one-line error replaces)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def client_for(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    """A Dask client for the block: connected to ``scheduler`` when given, else to a :func:`local_cluster` of
    ``workers`` processes started here (and closed after the block). An unreachable scheduler is a one-line
    error naming ``--scheduler``."""
    from distributed import Client

    with quiet_distributed():
        cluster = None
        if scheduler is not None:
            try:
                client = Client(scheduler, timeout="5s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise SynthtrialError(f"cannot reach the Dask scheduler at {scheduler} ({one_line(exc)}) "
                                      "(option --scheduler)") from None
        else:
            cluster = local_cluster(workers or 1)
            client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the work is cancelled (and the command ends) as for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """For the block, SIGTERM ends the main thread as Ctrl-C does (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_tasks(client: Any, func: Callable[..., Any], items: Iterable[tuple[Any, tuple]],
              finished: Callable[[Any, Any], None], *, ahead: int | None = None,
              failed: Callable[[Any, BaseException], str] | None = None) -> None:
    """Run ``func(*args)`` for each ``(tag, args)`` of ``items`` on the cluster, at most ``ahead`` in flight
    (default: four per worker), calling ``finished(tag, result)`` here as each is done, in any order.

    The first failure cancels the rest and raises: a :class:`SynthtrialError` as the task raised it, anything
    else as one line (``failed(tag, exc)`` words it). Ctrl-C or SIGTERM cancels every pending task.
    """
    from distributed import as_completed

    if ahead is None:
        ahead = 4 * max(1, len(client.scheduler_info().get("workers", {})))
    work = iter(items)
    pending: dict[Any, Any] = {}
    queue = as_completed()

    def submit(n: int) -> None:
        for tag, args in itertools.islice(work, n):
            future = client.submit(func, *args, pure=False)
            pending[future] = tag
            queue.add(future)

    with terminate_as_interrupt():
        try:
            submit(ahead)
            for future in queue:
                tag = pending.pop(future)
                try:
                    result = future.result()
                except SynthtrialError:
                    raise
                except Exception as exc:  # a worker's error arrives as the exception its task raised
                    what = failed(tag, exc) if failed is not None else "a task failed on a Dask worker"
                    raise SynthtrialError(f"{what} ({type(exc).__name__}: {one_line(exc)})") from None
                finished(tag, result)
                submit(1)
        except BaseException:
            if pending:
                client.cancel(list(pending))
            raise
