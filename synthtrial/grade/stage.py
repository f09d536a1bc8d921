"""The grading stage: every image of a run directory scored by the graders given.

:func:`grade_run` writes ``RUN/grades.parquet`` (``image`` + ``<grader>_<column>``) and ``RUN/grades.json``
(per grader: its fingerprint, columns, and the columns ``analyze`` takes as outcomes). Work is saved per chunk
of images (a chunk never splits a visit: the images of one patient-day) under
``RUN/.grades/<grader>-<fingerprint>/``, so an interrupted ``synthtrial grade`` resumes; a grader whose
weights change gets a new fingerprint and is scored again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from synthtrial.graders.base import Grader, GraderError, read_rgb
from synthtrial.run import rundir
from synthtrial.util.atomic import write_text_atomic

#: Images graded per saved chunk (resume granularity).
GRADE_CHUNK = 64
PARTS_DIR = ".grades"


def grade_run(run: str | os.PathLike[str], graders: Sequence[Grader], *, batch_size: int = GRADE_CHUNK,
              progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Score every image of ``run`` with ``graders``; write ``RUN/grades.parquet`` and return its path.

    Columns: ``image`` and ``<grader>_<column>`` for each grader's output columns. Columns of other graders
    already in the file are kept. Each chunk of ``batch_size`` images is saved under ``RUN/.grades/`` as it
    is done, so a re-run resumes. ``progress(done, total, status)`` is called after each chunk.
    """
    run_dir = Path(run)
    manifest = rundir.read_manifest(run_dir, ("image", "patient_id", "day", "view"))
    if not graders:
        raise GraderError("no graders given (option --graders)")
    names = [g.name for g in graders]
    if len(set(names)) != len(names):
        raise GraderError(f"grader listed twice: {', '.join(names)} (option --graders)")
    chunks = visit_chunks(manifest, batch_size)
    total, done = len(manifest) * len(graders), 0
    with rundir.locked(run_dir, what="grading"):
        columns: dict[str, pd.DataFrame] = {}
        for grader in graders:
            folder = run_dir / PARTS_DIR / f"{grader.name}-{grader.fingerprint()}"
            frames = []
            for k, chunk in enumerate(chunks):
                part = folder / f"{k:05d}.parquet"
                if part.is_file():
                    frame = rundir.read_parquet(part)
                else:
                    images = [read_rgb(run_dir / rel) for rel in chunk["image"]]
                    frame = grader.predict(images, chunk.reset_index(drop=True))
                    _check_output(grader, frame, len(chunk))
                    rundir.write_table(part, frame.reset_index(drop=True))
                frames.append(frame)
                done += len(chunk)
                if progress is not None:
                    progress(done, total, grader.name)
            out = pd.concat(frames, ignore_index=True)
            columns[grader.name] = out.add_prefix(f"{grader.name}_")
        grades = pd.concat([manifest[["image"]].reset_index(drop=True), *columns.values()], axis=1)
        old = rundir.read_grades(run_dir)
        if old is not None:
            keep = [c for c in old.columns if c != rundir.GRADES_KEY
                    and not any(c.startswith(f"{n}_") for n in names)]
            if keep:
                grades = grades.merge(old[[rundir.GRADES_KEY, *keep]], on=rundir.GRADES_KEY, how="left")
        index = rundir.read_grades_index(run_dir)
        for grader in graders:
            index[grader.name] = {"fingerprint": grader.fingerprint(),
                                  "columns": [c for c in columns[grader.name].columns],
                                  "outcomes": [f"{grader.name}_{c}" for c in grader.outcomes]}
        path = rundir.write_table(run_dir / rundir.GRADES, grades)
        write_text_atomic(run_dir / rundir.GRADES_INDEX, json.dumps({"graders": index}, indent=2, sort_keys=True)
                          + "\n")
    return path


def visit_chunks(manifest: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Consecutive runs of about ``size`` rows that never split a visit (the rows of one ``patient_id`` and
    ``day``), so a grader that fuses a visit's views (IGA) sees all of them in one call."""
    keys = list(zip(manifest["patient_id"].astype(str), manifest["day"].astype(str)))
    starts = [0]
    for i in range(1, len(keys)):
        if i - starts[-1] >= size and keys[i] != keys[i - 1]:
            starts.append(i)
    return [manifest.iloc[a:b] for a, b in zip(starts, [*starts[1:], len(keys)])]


def _check_output(grader: Grader, frame: Any, n: int) -> None:
    if not isinstance(frame, pd.DataFrame) or len(frame) != n:
        raise GraderError(f"grader '{grader.name}' returned {type(frame).__name__} of length "
                          f"{len(frame) if hasattr(frame, '__len__') else '?'} for {n} images")
    missing = [c for c in grader.outcomes if c not in frame.columns]
    if missing:
        raise GraderError(f"grader '{grader.name}' did not return its outcome columns {missing}")
