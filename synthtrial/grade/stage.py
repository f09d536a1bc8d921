"""The grading stage: every image of a run directory scored by the graders given.

:func:`grade_run` writes ``RUN/grades.parquet`` (``image``, ``image_sha256``, ``<grader>_<column>``) and
``RUN/grades.json`` (per grader: its fingerprint, columns, and the columns ``analyze`` takes as outcomes).

Grades belong to the bytes that were graded. Each row carries its image's path and the sha256 the manifest
gives it, and an image is checked against that sha256 before it is graded (a damaged image is refused, not
scored). Work is saved per chunk of images under ``RUN/.grades/<grader>-<fingerprint>/<key>.parquet``, where
the key is a hash of what the grader sees: the fingerprint and, per image, path, sha256, patient, day and view.
So an interrupted ``synthtrial grade`` resumes; and another ``--batch-size``, reordered or dropped manifest
rows, or a re-rendered image give other keys and are graded afresh instead of borrowing grades by position.
A chunk file that cannot be read or does not hold its images' grades is graded again. Chunks are cut from
the manifest sorted by patient and day (so reordering rows keeps them) and never split a visit (the images
of one patient-day), so a grader that fuses a visit's views (IGA) sees all of them in one call. Grades other
graders left in ``grades.parquet`` are kept only for images whose sha256 is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from synthtrial.graders.base import Grader, GraderError, read_rgb
from synthtrial.run import rundir
from synthtrial.run.rundir import GRADES_KEY, GRADES_SHA, RunError
from synthtrial.util.atomic import write_text_atomic
from synthtrial.util.progress import ProgressCallback

#: Images graded per saved chunk (resume granularity).
GRADE_CHUNK = 64
PARTS_DIR = ".grades"
#: What a grader sees of each image besides its pixels; with the sha256, the content a chunk's key hashes.
META_COLUMNS = ("patient_id", "day", "view")


def grade_run(run: str | os.PathLike[str], graders: Sequence[Grader], *, batch_size: int = GRADE_CHUNK,
              progress: ProgressCallback | None = None) -> Path:
    """Score every image of ``run`` with ``graders``; write ``RUN/grades.parquet`` and return its path.

    Columns: ``image``, ``image_sha256`` and ``<grader>_<column>`` for each grader's output columns, one row per
    manifest row in manifest order. Columns of other graders already in the file are kept where their image is
    unchanged. Each chunk of about ``batch_size`` images is saved under ``RUN/.grades/`` as it is done, so a
    re-run resumes. ``progress(done, total, status)`` is called after each chunk.
    """
    run_dir = Path(run)
    manifest = rundir.read_manifest(run_dir, ("image", "sha256", *META_COLUMNS))
    for i, digest in enumerate(manifest["sha256"].tolist(), start=1):
        if not rundir.is_sha256(digest):
            raise RunError(f"{run_dir / rundir.MANIFEST}: row {i}, column 'sha256': {rundir.show(digest)} is not a "
                           "sha256; re-run `synthtrial generate` to heal the run")
    if not graders:
        raise GraderError("no graders given (option --graders)")
    names = [g.name for g in graders]
    if len(set(names)) != len(names):
        raise GraderError(f"grader listed twice: {', '.join(names)} (option --graders)")
    chunks = visit_chunks(sorted_by_visit(manifest), batch_size)
    total, done = len(manifest) * len(graders), 0
    with rundir.locked(run_dir, what="grading"):
        keys = manifest[[GRADES_KEY]].assign(**{GRADES_SHA: manifest["sha256"]})
        columns: dict[str, pd.DataFrame] = {}
        for grader in graders:
            fingerprint = grader.fingerprint()
            folder = rundir.run_file(run_dir, f"{PARTS_DIR}/{grader.name}-{fingerprint}")  # not linked out
            frames, kept = [], set()
            for chunk in chunks:
                part = folder / f"{chunk_key(chunk, fingerprint)}.parquet"
                frames.append(_chunk_grades(run_dir, grader, part, chunk))
                kept.add(part.name)
                done += len(chunk)
                if progress is not None:
                    progress(done, total, grader.name)
            _remove_other_parts(folder, kept)
            graded = pd.concat(frames, ignore_index=True)
            columns[grader.name] = keys.merge(graded, on=[GRADES_KEY, GRADES_SHA], how="left",
                                              validate="one_to_one").drop(columns=[GRADES_KEY, GRADES_SHA])
        grades = pd.concat([keys, *columns.values()], axis=1)
        grades, index = _keep_other_graders(run_dir, grades, names)
        for grader in graders:
            index[grader.name] = {"fingerprint": grader.fingerprint(),
                                  "columns": list(columns[grader.name].columns),
                                  "outcomes": [f"{grader.name}_{c}" for c in grader.outcomes]}
        path = rundir.write_table(run_dir / rundir.GRADES, grades)
        write_text_atomic(run_dir / rundir.GRADES_INDEX, json.dumps({"graders": index}, indent=2, sort_keys=True)
                          + "\n")
    return path


def sorted_by_visit(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's rows by patient and day (stable: a visit's views keep their order), index kept."""
    day = pd.to_numeric(manifest["day"], errors="coerce")
    order = pd.DataFrame({"patient_id": manifest["patient_id"].astype(str), "day": day}, index=manifest.index)
    return manifest.loc[order.sort_values(["patient_id", "day"], kind="stable").index]


def visit_chunks(manifest: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Consecutive runs of about ``size`` rows that never split a visit (the rows of one ``patient_id`` and
    ``day``), so a grader that fuses a visit's views (IGA) sees all of them in one call."""
    keys = list(zip(manifest["patient_id"].astype(str), manifest["day"].astype(str)))
    starts = [0]
    for i in range(1, len(keys)):
        if i - starts[-1] >= size and keys[i] != keys[i - 1]:
            starts.append(i)
    return [manifest.iloc[a:b] for a, b in zip(starts, [*starts[1:], len(keys)])]


def chunk_key(chunk: pd.DataFrame, fingerprint: str) -> str:
    """The name of a chunk's saved grades: a hash of the grader's fingerprint and, per image in order, its path,
    sha256, patient, day and view (everything the grader is given)."""
    rows = [[str(v) for v in row] for row in chunk[["image", "sha256", *META_COLUMNS]].itertuples(index=False)]
    text = json.dumps({"fingerprint": fingerprint, "images": rows}, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _chunk_grades(run_dir: Path, grader: Grader, part: Path, chunk: pd.DataFrame) -> pd.DataFrame:
    """The chunk's grades (``image``, ``image_sha256``, ``<grader>_<column>``): from ``part`` when it holds
    them, else graded now (each image checked against its sha256 first) and saved to ``part``."""
    wanted = chunk[["image", "sha256"]].rename(columns={"sha256": GRADES_SHA}).reset_index(drop=True)
    if part.is_file():
        try:
            saved = rundir.read_parquet(part)
        except RunError:
            saved = None  # damaged: graded again below
        if saved is not None and _holds(saved, wanted, grader):
            return saved
    for row, rel, digest in zip(chunk.index + 1, chunk["image"], chunk["sha256"]):
        rundir.check_sha256(run_dir, rel, digest, int(row))
    images = [read_rgb(run_dir / rel) for rel in chunk["image"]]
    frame = grader.predict(images, chunk.reset_index(drop=True))
    _check_output(grader, frame, len(chunk))
    frame = pd.concat([wanted, frame.reset_index(drop=True).add_prefix(f"{grader.name}_")], axis=1)
    rundir.write_table(part, frame)
    return frame


def _holds(saved: pd.DataFrame, wanted: pd.DataFrame, grader: Grader) -> bool:
    """Whether a saved chunk holds exactly the grades of ``wanted``'s images, with the grader's outcomes."""
    needed = [GRADES_KEY, GRADES_SHA, *(f"{grader.name}_{c}" for c in grader.outcomes)]
    return (len(saved) == len(wanted) and all(c in saved.columns for c in needed)
            and saved[GRADES_KEY].tolist() == wanted[GRADES_KEY].tolist()
            and saved[GRADES_SHA].tolist() == wanted[GRADES_SHA].tolist())


def _remove_other_parts(folder: Path, kept: set[str]) -> None:
    """Drop the saved chunks no longer part of this run's grading (other batch sizes, images since changed)."""
    for path in folder.glob("*.parquet"):
        if path.name not in kept and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


def _keep_other_graders(run_dir: Path, grades: pd.DataFrame,
                        names: list[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``grades`` with the columns of graders not run now from the old ``grades.parquet``, on rows whose image
    and sha256 are unchanged (a changed image's old grades are dropped, not carried over), and the index
    entries of those graders. An old file without ``image_sha256`` or that cannot be read is not carried over."""
    try:
        old, index = rundir.read_grades(run_dir), rundir.read_grades_index(run_dir)
    except RunError:
        return grades, {}
    if old is None or GRADES_SHA not in old.columns:
        return grades, {}
    mine = [GRADES_KEY, GRADES_SHA]
    keep = [c for c in old.columns if c not in mine and not any(c.startswith(f"{n}_") for n in names)]
    others = {name: entry for name, entry in index.items() if name not in names and isinstance(entry, dict)
              and all(c in keep for c in entry.get("columns", []))}
    if keep:
        old = old.drop_duplicates(mine)
        grades = grades.merge(old[[*mine, *keep]], on=mine, how="left", validate="one_to_one")
    return grades, others


def _check_output(grader: Grader, frame: Any, n: int) -> None:
    if not isinstance(frame, pd.DataFrame) or len(frame) != n:
        raise GraderError(f"grader '{grader.name}' returned {type(frame).__name__} of length "
                          f"{len(frame) if hasattr(frame, '__len__') else '?'} for {n} images")
    missing = [c for c in grader.outcomes if c not in frame.columns]
    if missing:
        raise GraderError(f"grader '{grader.name}' did not return its outcome columns {missing}")
