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

Graders may write a table beside the grades (:data:`synthtrial.run.rundir.GRADE_TABLES`), keyed by image and
image_sha256 like the grades. A :class:`~synthtrial.graders.base.DetectingGrader` (the detector) keeps every
detection in ``RUN/detections.parquet``, saved per chunk beside the chunk's grades
(``<key>.detections.parquet``, written first: a chunk counts as done only with both). A
:class:`~synthtrial.graders.base.SequenceGrader` (the tracker) runs after the image graders on the detections
of the grader it ``needs``, which must be graded in the same call (its chunks are reused, so that costs
nothing when it is done); its grades and its table (``RUN/tracks.parquet``) are saved whole under a key that
hashes its fingerprint, the fingerprints of the graders it reads and every image's path, sha256, patient, day
and view. ``grades.json`` names each grader's tables and what it ``needs``; a grader's table is kept, like its
grades, only for unchanged images, and goes when its grades go; grades and tables of a grader that reads one
graded now are dropped unless it is graded now too (they were made from other detections).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from synthtrial.graders.base import DetectingGrader, Grader, GraderError, SequenceGrader, read_rgb
from synthtrial.graders.cards import BelowTargetsWarning, below_targets_line, grader_card
from synthtrial.run import rundir
from synthtrial.run.remote import on_storage
from synthtrial.run.rundir import DETECTIONS, GRADE_TABLES, GRADES_KEY, GRADES_SHA, RunError
from synthtrial.util.atomic import write_text_atomic
from synthtrial.util.cluster import MAX_WORKERS, client_for
from synthtrial.util.progress import ProgressCallback

#: Images graded per saved chunk (resume granularity).
GRADE_CHUNK = 64
PARTS_DIR = ".grades"
#: What a grader sees of each image besides its pixels; with the sha256, the content a chunk's key hashes.
META_COLUMNS = ("patient_id", "day", "view")


@on_storage("run", what="grading")
def grade_run(run: str | os.PathLike[str], graders: Sequence[Grader], *, batch_size: int = GRADE_CHUNK,
              progress: ProgressCallback | None = None, workers: int | None = None,
              scheduler: str | None = None) -> Path:
    """Score every image of ``run`` with ``graders``; write ``RUN/grades.parquet`` and return its path.

    Columns: ``image``, ``image_sha256`` and ``<grader>_<column>`` for each grader's output columns, one row per
    manifest row in manifest order. Columns of other graders already in the file are kept where their image is
    unchanged. Each chunk of about ``batch_size`` images is saved under ``RUN/.grades/`` as it is done, so a
    re-run resumes.

    With ``scheduler`` (a Dask scheduler's address) or ``workers`` (a local Dask cluster of that many processes)
    the chunks of the image graders are graded, and saved, by the cluster's workers, which must reach the run by
    the same path; this process assembles the tables. The result is the same bytes as graded here.
    ``progress(done, images, grader)`` counts one grader's images at a time: called with the
    images already saved (a resumed run) as each grader starts, then after each chunk it grades; ``images`` is
    the run's image count, so a bar per grader (its ``status``) shows an ETA at that grader's own rate.
    A grader whose model card does not meet its targets (:mod:`synthtrial.graders.cards`) is graded, with a
    :class:`~synthtrial.graders.cards.BelowTargetsWarning`, and ``grades.json`` records ``meets_targets``.
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
    per_image, series = _split(graders)
    chunks = visit_chunks(sorted_by_visit(manifest), batch_size)
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise GraderError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    cards = {g.name: grader_card(g) for g in graders}
    for status in cards.values():
        if status is not None and not status.meets_targets:
            warnings.warn(BelowTargetsWarning(below_targets_line(status.grader, status.reason)), stacklevel=2)
    # the cluster is reached before the first write: an unreachable --scheduler leaves nothing behind
    dask = workers is not None or scheduler is not None
    cluster = client_for(workers, scheduler) if dask else contextlib.nullcontext()
    with cluster as client, rundir.locked(run_dir, what="grading"):
        keys = manifest[[GRADES_KEY]].assign(**{GRADES_SHA: manifest["sha256"]})
        columns: dict[str, pd.DataFrame] = {}
        tables: dict[str, pd.DataFrame] = {}
        for grader in per_image:
            columns[grader.name], detections = _image_grades(run_dir, grader, chunks, keys, progress, client)
            if detections is not None:
                tables[DETECTIONS] = detections
        for grader in series:
            if progress is not None:
                progress(0, len(manifest), grader.name)
            graded, tables[grader.table] = _series_grades(run_dir, grader, manifest, tables[DETECTIONS],
                                                          [g for g in per_image if g.name in grader.needs], progress)
            columns[grader.name] = _aligned(keys, graded)
            if progress is not None:
                progress(len(manifest), len(manifest), grader.name)
        grades = pd.concat([keys, *columns.values()], axis=1)
        grades, index = _keep_other_graders(run_dir, grades, names)
        for grader in graders:
            index[grader.name] = {"fingerprint": grader.fingerprint(),
                                  "columns": list(columns[grader.name].columns),
                                  "outcomes": [f"{grader.name}_{c}" for c in grader.outcomes]}
            if cards[grader.name] is not None:
                index[grader.name]["meets_targets"] = cards[grader.name].meets_targets
                if not cards[grader.name].meets_targets:
                    index[grader.name]["below_targets"] = cards[grader.name].reason
            if isinstance(grader, DetectingGrader):
                index[grader.name]["tables"] = [DETECTIONS]
            if isinstance(grader, SequenceGrader):
                index[grader.name].update(tables=[grader.table], needs=list(grader.needs))
        _write_tables(run_dir, keys, tables, index)
        path = rundir.write_table(run_dir / rundir.GRADES, grades)
        write_text_atomic(run_dir / rundir.GRADES_INDEX, json.dumps({"graders": index}, indent=2, sort_keys=True)
                          + "\n")
    return path


def _image_grades(run_dir: Path, grader: Grader, chunks: list[pd.DataFrame], keys: pd.DataFrame,
                  progress: ProgressCallback | None, client: Any = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """An image grader's ``<grader>_<column>`` columns (in ``keys``' order) and, for a detecting grader, its
    detections: chunk by chunk (here, or on the Dask cluster of ``client``), saved chunks reused, the bar
    counting this grader's images."""
    fingerprint = grader.fingerprint()
    folder = rundir.run_file(run_dir, f"{PARTS_DIR}/{grader.name}-{fingerprint}")  # not linked out
    parts = [folder / f"{chunk_key(chunk, fingerprint)}.parquet" for chunk in chunks]
    saved = {k for k, part in enumerate(parts) if part.is_file()}   # resumed: counted done before the bar times
    total, done = len(keys), sum(len(chunks[k]) for k in saved)
    if progress is not None:
        progress(done, total, grader.name)

    def counted(k: int) -> None:
        nonlocal done
        if k not in saved:
            done += len(chunks[k])
            if progress is not None:
                progress(min(done, total), total, grader.name)

    graded = _grade_chunks(run_dir, grader, parts, chunks, client, counted)
    if progress is not None and done < total:   # a saved chunk that could not be read was graded again
        progress(total, total, grader.name)
    _remove_other_parts(folder, {name for part in parts for name in (part.name, _table_part(part, DETECTIONS).name)})
    return (_aligned(keys, pd.concat([g for g, _ in graded], ignore_index=True)),
            pd.concat([d for _, d in graded], ignore_index=True) if isinstance(grader, DetectingGrader) else None)


def _grade_chunks(run_dir: Path, grader: Grader, parts: list[Path], chunks: list[pd.DataFrame], client: Any,
                  counted: Any) -> list[tuple[pd.DataFrame, pd.DataFrame | None]]:
    """Every chunk's grades (and detections), in chunk order: graded here one after the other, or, given a Dask
    ``client``, by its workers (the grader sent to each once; a lost worker's chunk is graded again elsewhere:
    a chunk is saved atomically, so it is either whole or absent). ``counted(k)`` follows chunk ``k``."""
    if client is None:
        graded = []
        for k, (part, chunk) in enumerate(zip(parts, chunks, strict=True)):
            graded.append(_chunk_grades(run_dir, grader, part, chunk))
            counted(k)
        return graded
    from synthtrial.util.cluster import run_tasks

    where = run_dir.absolute()   # a worker's working folder is its own
    shared = client.scatter(grader, broadcast=True, hash=False)
    results: dict[int, tuple[pd.DataFrame, pd.DataFrame | None]] = {}

    def finished(k: int, result: tuple[pd.DataFrame, pd.DataFrame | None]) -> None:
        results[k] = result
        counted(k)

    run_tasks(client, _chunk_grades, ((k, (where, shared, where / part.relative_to(run_dir), chunk))
                                      for k, (part, chunk) in enumerate(zip(parts, chunks, strict=True))), finished,
              failed=lambda k, exc: f"grader '{grader.name}' failed on a Dask worker")
    rundir.remove_stale_temps(run_dir)   # a worker lost mid-write leaves its temp file: none survives the run
    return [results[k] for k in range(len(chunks))]


def _split(graders: Sequence[Grader]) -> tuple[list[Grader], list[Grader]]:
    """The image graders and the sequence graders, the latter checked: what each needs is graded in this call
    and keeps detections, and at most one grader keeps detections."""
    series = [g for g in graders if isinstance(g, SequenceGrader)]
    per_image = [g for g in graders if not isinstance(g, SequenceGrader)]
    detecting = [g.name for g in per_image if isinstance(g, DetectingGrader)]
    if len(detecting) > 1:
        raise GraderError(f"graders {detecting[0]} and {detecting[1]} both keep detections in {DETECTIONS}; grade "
                          "with one of them at a time (option --graders)")
    for grader in series:
        for need in grader.needs:
            if need not in detecting:
                raise GraderError(f"grader '{grader.name}' reads the detections of '{need}': grade both in one call "
                                  f"(synthtrial grade RUN --graders {need},{grader.name}); the finished chunks of "
                                  f"'{need}' are reused, not graded again")
        if grader.table not in GRADE_TABLES or grader.table == DETECTIONS:
            raise GraderError(f"grader '{grader.name}' writes an unknown table {grader.table!r}")
    return per_image, series


def _aligned(keys: pd.DataFrame, graded: pd.DataFrame) -> pd.DataFrame:
    """A grader's ``<grader>_<column>`` columns in the order of ``keys`` (manifest order), matched by image and
    sha256."""
    return keys.merge(graded, on=[GRADES_KEY, GRADES_SHA], how="left",
                      validate="one_to_one").drop(columns=[GRADES_KEY, GRADES_SHA])


def _table_part(part: Path, table: str) -> Path:
    """Where a chunk's rows of ``table`` are saved beside its grades: ``<key>.<table stem>.parquet``."""
    return part.with_name(f"{part.stem}.{Path(table).stem}.parquet")


def _series_grades(run_dir: Path, grader: Any, manifest: pd.DataFrame, detections: pd.DataFrame,
                   sources: list[Grader], progress: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A sequence grader's grades (``image``, ``image_sha256``, ``<grader>_<column>``) and table (``image``,
    ``image_sha256``, its columns): saved ones when their key matches, else graded now and saved."""
    wanted = manifest[["image", "sha256"]].rename(columns={"sha256": GRADES_SHA}).reset_index(drop=True)
    fingerprint = "+".join([grader.fingerprint(), *(g.fingerprint() for g in sources)])
    folder = rundir.run_file(run_dir, f"{PARTS_DIR}/{grader.name}-{grader.fingerprint()}")
    part = folder / f"{chunk_key(sorted_by_visit(manifest), fingerprint)}.parquet"
    table_part = _table_part(part, grader.table)
    if part.is_file() and table_part.is_file():
        try:
            saved, table = rundir.read_parquet(part), rundir.read_parquet(table_part)
        except RunError:
            saved = table = None  # damaged: graded again below
        if saved is not None and _holds(saved.sort_values(GRADES_KEY, ignore_index=True),
                                        wanted.sort_values(GRADES_KEY, ignore_index=True), grader):
            return saved, table
    rows = {rel: (i + 1, digest) for i, (rel, digest) in enumerate(zip(manifest["image"], manifest["sha256"]))}

    def read_image(rel: str) -> Any:
        row, digest = rows[rel]
        rundir.check_sha256(run_dir, rel, digest, row)
        return read_rgb(run_dir / rel)

    frame, table = grader.grade_series(manifest.reset_index(drop=True), detections, read_image, progress)
    _check_output(grader, frame, len(manifest))
    frame = pd.concat([wanted, frame.reset_index(drop=True).add_prefix(f"{grader.name}_")], axis=1)
    rundir.write_table(table_part, _keyed(table, manifest))
    rundir.write_table(part, frame)
    table = rundir.read_parquet(table_part)   # as a resumed run reads it, so both write the same bytes
    _remove_other_parts(folder, {part.name, table_part.name})
    return frame, table


def _keyed(table: pd.DataFrame, chunk: pd.DataFrame, index: str = "image") -> pd.DataFrame:
    """A grader's table keyed like the grades: ``image`` and ``image_sha256`` first (``index``: the column naming
    each row's image, a path or a position in ``chunk``)."""
    images = chunk["image"].reset_index(drop=True)
    digests = dict(zip(images, chunk["sha256"]))
    rel = images.iloc[table[index].to_numpy()].to_numpy() if index != "image" else table["image"].to_numpy()
    rest = table.drop(columns=[index])
    keyed = pd.concat([pd.DataFrame({GRADES_KEY: rel, GRADES_SHA: [digests[r] for r in rel]}),
                       rest.reset_index(drop=True)], axis=1)
    return keyed.astype({GRADES_KEY: "object", GRADES_SHA: "object"})


def _write_tables(run_dir: Path, keys: pd.DataFrame, written: dict[str, pd.DataFrame], index: dict[str, Any]) -> None:
    """Write the tables graded now; keep a carried-over grader's table for its unchanged images; delete a table
    whose grader's grades are gone."""
    owned = {t for entry in index.values() for t in entry.get("tables", [])}
    for name in GRADE_TABLES:
        path = run_dir / name
        if name in written:
            rundir.write_table(rundir.run_file(run_dir, name), written[name])
        elif name in owned:
            try:
                old = rundir.read_grade_table(run_dir, name)
            except RunError:
                old = None
            if old is None:
                continue
            mine = old[[GRADES_KEY, GRADES_SHA]].merge(keys, how="left", indicator=True)["_merge"] == "both"
            if not mine.all():
                rundir.write_table(rundir.run_file(run_dir, name), old[mine.to_numpy()].reset_index(drop=True))
        elif path.is_file() and not path.is_symlink():
            path.unlink()


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


def _chunk_grades(run_dir: Path, grader: Grader, part: Path,
                  chunk: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The chunk's grades (``image``, ``image_sha256``, ``<grader>_<column>``) and, for a detecting grader, its
    detections (``image``, ``image_sha256``, box, class, score, counted): from ``part`` (and the detections
    beside it) when they hold them, else graded now (each image checked against its sha256 first) and saved."""
    wanted = chunk[["image", "sha256"]].rename(columns={"sha256": GRADES_SHA}).reset_index(drop=True)
    detecting = isinstance(grader, DetectingGrader)
    found_part = _table_part(part, DETECTIONS)
    if part.is_file() and (found_part.is_file() or not detecting):
        try:
            saved = rundir.read_parquet(part)
            found = rundir.read_parquet(found_part) if detecting else None
        except RunError:
            saved = found = None  # damaged: graded again below
        if saved is not None and _holds(saved, wanted, grader) and (
                found is None or set(zip(found[GRADES_KEY], found[GRADES_SHA])) <= set(zip(wanted[GRADES_KEY],
                                                                                          wanted[GRADES_SHA]))):
            return saved, found
    for row, rel, digest in zip(chunk.index + 1, chunk["image"], chunk["sha256"]):
        rundir.check_sha256(run_dir, rel, digest, int(row))
    images = [read_rgb(run_dir / rel) for rel in chunk["image"]]
    meta = chunk.reset_index(drop=True)
    frame, found = grader.predict_detections(images, meta) if detecting else (grader.predict(images, meta), None)
    _check_output(grader, frame, len(chunk))
    frame = pd.concat([wanted, frame.reset_index(drop=True).add_prefix(f"{grader.name}_")], axis=1)
    if detecting:
        rundir.write_table(found_part, _keyed(found, chunk, index="index"))  # first: a chunk is done with its grades
        found = rundir.read_parquet(found_part)   # as a resumed run reads it, so both write the same bytes
    rundir.write_table(part, frame)
    return frame, found


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
    entries of those graders. An old file without ``image_sha256`` or that cannot be read is not carried over;
    nor are the grades of a grader that reads the output of one run now (they were made from other output)."""
    try:
        old, index = rundir.read_grades(run_dir), rundir.read_grades_index(run_dir)
    except RunError:
        return grades, {}
    if old is None or GRADES_SHA not in old.columns:
        return grades, {}
    mine = [GRADES_KEY, GRADES_SHA]
    others = {name: entry for name, entry in index.items() if name not in names and isinstance(entry, dict)
              and not set(entry.get("needs") or []) & set(names)}
    keep = [c for c in old.columns if c not in mine and not any(c.startswith(f"{n}_") for n in names)
            and not any(c in entry.get("columns", []) for n, entry in index.items() if n not in others)]
    others = {name: entry for name, entry in others.items() if all(c in keep for c in entry.get("columns", []))}
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
