"""The run directory: the one contract every stage after ``generate`` reads (DESIGN.md, "Run directory").

This module owns it: the file names, the column schemas of ``manifest``, ``lesions`` and ``grades``,
validated readers (one-line errors naming the file, row and column; a file that resolves outside the run, e.g.
through a symbolic link, is refused), atomic table writes, and the lock that keeps a second writer out.
:mod:`synthtrial.run.verify` checks a finished run against this contract.

::

    RUN/protocol.csv       the normalised protocol actually used (severities filled in)
    RUN/config.json        every setting, the seed and package versions
    RUN/truth.json         the simulation truth, when known
    RUN/manifest.parquet   one row per image (also manifest.csv)
    RUN/lesions.parquet    one row per lesion per image
    RUN/grades.parquet     one row per image: image, image_sha256, <grader>_<name> (``synthtrial grade``)
    RUN/grades.json        per grader: fingerprint, columns, outcome columns, the tables it wrote
    RUN/detections.parquet one row per detection: image, image_sha256, box, class, score, counted (the detector)
    RUN/tracks.parquet     one row per tracked detection: image, image_sha256, track_id, box, class, score,
                           face position (the tracker)
    RUN/.grades/<grader>-<fingerprint>/<content key>[.<table>].parquet   one graded chunk (resume)
    RUN/images/<patient>/<patient>_<YYYYMMDD|dNNN>_<view>.png
    RUN/masks/<patient>/<same stem>.png     16-bit instance map: lesion_id + 1, 0 = no lesion
    RUN/grids/<patient>.jpg                  contact sheet of the series
    RUN/grids/<patient>_views.jpg            day-by-day views, for patients photographed from several views
    RUN/.parts/<patient>/<same stem>.json    one record per finished image (resume)
    RUN/.lock                                held by the process writing the run
    RUN/counterfactual/<arm>/                each arm's counterfactual world (``generate --counterfactual``):
                                             a run directory of this same layout, paired with the run
    RUN/counterfactual/individual_effects.parquet   factual minus counterfactual severity and lesion count per
                                             patient, day and arm (also .csv)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.trial import scale
from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.errors import SynthtrialError, one_line
from synthtrial.trial.protocol import PATIENT_ID_PATTERN

PROTOCOL = "protocol.csv"
CONFIG = "config.json"
TRUTH = "truth.json"
MANIFEST = "manifest.parquet"
MANIFEST_CSV = "manifest.csv"
LESIONS = "lesions.parquet"
GRADES = "grades.parquet"
GRADES_INDEX = "grades.json"
DETECTIONS = "detections.parquet"
TRACKS = "tracks.parquet"
IMAGES = "images"
MASKS = "masks"
GRIDS = "grids"
PARTS = ".parts"
LOCK = ".lock"
COUNTERFACTUAL = "counterfactual"
INDIVIDUAL_EFFECTS = f"{COUNTERFACTUAL}/individual_effects.parquet"
INDIVIDUAL_EFFECTS_CSV = f"{COUNTERFACTUAL}/individual_effects.csv"
#: The individual-effects table's columns: the factual value, the world's (``_cf``) and their difference.
INDIVIDUAL_EFFECT_COLUMNS = ("patient_id", "day", "arm", "treatment", "severity", "severity_cf", "ite_severity",
                             "lesion_count", "lesion_count_cf", "ite_count")
#: Files that make a finished run.
RUN_FILES = (MANIFEST, LESIONS, CONFIG)
#: What ``config.json`` must record, per section (``generate`` writes more): checked by ``synthtrial verify``.
CONFIG_REQUIRED = {"settings": ("backend", "size", "seed"), "protocol": ("rows", "sha256")}

#: Lesion counts per type in the manifest, in the scale's type order.
COUNT_COLUMNS = tuple(f"n_{t}" for t in scale.ALL_LESION_TYPES)
#: Visible lesions per type in the manifest (``synthtrial.render.visibility``: lesions whose ``visible`` is true).
VISIBLE_COUNT_COLUMNS = tuple(f"n_visible_{t}" for t in scale.ALL_LESION_TYPES)
#: The manifest's columns, in the order ``generate`` writes them. ``visible_count`` counts the visible active
#: lesions (``lesion_count``'s types: no marks or scars).
MANIFEST_COLUMNS = ("image", "mask", "patient_id", "day", "date", "block", "treatment", "view", "severity",
                    "lesion_count", "target_count", *COUNT_COLUMNS, "visible_count", *VISIBLE_COUNT_COLUMNS,
                    "acne04_level", "iga", "identity",
                    "face_source", "seed", "backend", "sha256", "mask_sha256", "width", "height", "mm_per_px",
                    "quality_acceptable", "quality_p", "quality_reason", "render_attempt")
#: The lesion table's columns, in the order ``generate`` writes them.
LESION_COLUMNS = ("image", "patient_id", "day", "view", "lesion_id", "type", "x0", "y0", "x1", "y1", "cx", "cy",
                  "radius_px", "mask_area", "stage", "age_days", "intensity", "diameter_mm", "area_px", "contrast",
                  "signal", "visible")
#: The grade table's key; its columns are the two keys, then ``<grader>_<name>``.
GRADES_KEY = "image"
#: The grade table's second key: the image's sha256 from the manifest when it was graded.
GRADES_SHA = "image_sha256"
#: The tables graders write beside the grades (``synthtrial grade``), each keyed by image and image_sha256 like
#: the grades, and their columns. A detection is ``counted`` when it is part of the detector's lesion count (an
#: active class at or above its count threshold); ``face_x``/``face_y`` place a tracked detection in face
#: coordinates (interocular distances, :func:`synthtrial.face.mesh.mesh_coordinates`).
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
GRADE_TABLES = {
    DETECTIONS: ("image", "image_sha256", *BOX_COLUMNS, "class", "score", "counted"),
    TRACKS: ("image", "image_sha256", "track_id", *BOX_COLUMNS, "class", "score", "face_x", "face_y"),
}

_MAX_SHOWN = 120


class RunError(SynthtrialError):
    """A run directory that cannot be read, written or resumed."""


def show(value: Any) -> str:
    """A value as it should appear in a one-line error (repr, cut to a readable length)."""
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ reading

def check_run_dir(run: str | os.PathLike[str], need: tuple[str, ...] = RUN_FILES) -> Path:
    """``run`` as a Path after checking it is a run directory holding ``need``; else a one-line error."""
    run = Path(run)
    if not run.exists():
        raise RunError(f"{run}: no such run directory; run `synthtrial generate` first")
    if not run.is_dir():
        raise RunError(f"{run}: is not a run directory (it is a file); run `synthtrial generate` first")
    for name in need:
        if not (run / name).is_file():
            raise RunError(f"{run} is not a complete run directory: {name} is missing; "
                           "run `synthtrial generate` first (or again, to finish it)")
    return run


def run_file(run: str | os.PathLike[str], name: str) -> Path:
    """``RUN/name`` after checking that it resolves inside the run (a file linked from elsewhere is refused:
    the run's checks would vouch for bytes the run does not hold)."""
    run = Path(run)
    path = run.joinpath(*PurePosixPath(name).parts)
    if not path.resolve().is_relative_to(run.resolve()):
        raise RunError(f"{path}: resolves outside the run directory {run} (to {path.resolve()}); a run's files "
                       "must lie inside it")
    return path


def grid_names(manifest: pd.DataFrame) -> list[str]:
    """The contact sheets ``generate`` writes for ``manifest``: ``grids/<patient>.jpg`` per patient, and
    ``grids/<patient>_views.jpg`` for a patient photographed from more than one view."""
    names = []
    for pid, rows in manifest.groupby("patient_id", sort=False):
        names.append(f"{GRIDS}/{pid}.jpg")
        if rows["view"].nunique() > 1:
            names.append(f"{GRIDS}/{pid}_views.jpg")
    return names


def read_json(path: Path, *, what: str = "a JSON object") -> dict[str, Any]:
    """A JSON object from ``path`` (UTF-8), or a one-line error naming the file."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise RunError(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise RunError(f"{path}: cannot be read ({one_line(exc)})") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RunError(f"{path}: is not UTF-8 text") from None
    except ValueError as exc:
        raise RunError(f"{path}: is not valid JSON ({one_line(exc)})") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: must hold {what}, not a JSON {type(value).__name__}")
    return value


def read_config(run: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(run_file(run, CONFIG))


def read_truth(run: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's simulation truth, or None when the run has none."""
    path = Path(run) / TRUTH
    if not (path.exists() or path.is_symlink()):
        return None
    return read_json(run_file(run, TRUTH), what="the simulation truth (a JSON object)")


def counterfactual_dir(run: str | os.PathLike[str], arm: str) -> Path:
    """The run directory of ``arm``'s counterfactual world."""
    return Path(run) / COUNTERFACTUAL / arm


def counterfactual_worlds(run: str | os.PathLike[str]) -> dict[str, Path]:
    """The counterfactual worlds a run has (arm -> folder), in name order; empty without ``--counterfactual``."""
    folder = Path(run) / COUNTERFACTUAL
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()} if folder.is_dir() else {}


def read_individual_effects(run: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The individual treatment effects of a run made with ``--counterfactual`` (None without them)."""
    path = Path(run) / INDIVIDUAL_EFFECTS
    if not (path.exists() or path.is_symlink()):
        return None
    table = read_parquet(run_file(run, INDIVIDUAL_EFFECTS))
    require_columns(table, INDIVIDUAL_EFFECT_COLUMNS, path)
    return table


def read_parquet(path: Path) -> pd.DataFrame:
    """A parquet table, or a one-line error for a missing, empty, truncated or foreign file."""
    if not path.is_file():
        raise RunError(f"{path}: no such file")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # a corrupt or truncated file; a missing engine is a bug, not input
        raise RunError(f"{path}: cannot be read as a parquet table ({one_line(exc)})") from None


def require_columns(frame: pd.DataFrame, columns: tuple[str, ...] | list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RunError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(repr(c) for c in missing)}")


def checked_image_path(run: Path, value: Any, where: str, *, must_exist: bool = True) -> str:
    """The manifest's path ``value`` as a clean relative POSIX path inside ``run``, or a one-line error."""
    if not isinstance(value, str) or not value.strip():
        raise RunError(f"{where}: {show(value)} is not a path")
    if "\\" in value or any(ord(ch) < 32 for ch in value):
        raise RunError(f"{where}: {show(value)} must be a '/'-separated path without control characters")
    pure = PurePosixPath(value)
    if pure.is_absolute() or PureWindowsPath(value).drive:
        raise RunError(f"{where}: {show(value)} is absolute; image paths are relative to the run directory")
    if ".." in pure.parts:
        raise RunError(f"{where}: {show(value)} leaves the run directory ('..')")
    if not pure.parts or pure.name in ("", ".", ".."):
        raise RunError(f"{where}: {show(value)} does not name a file")
    full = run.joinpath(*pure.parts)
    if not full.resolve().is_relative_to(run.resolve()):
        raise RunError(f"{where}: {show(value)} leaves the run directory")
    if must_exist and not full.is_file():
        raise RunError(f"{where}: {show(value)}: no such file in {run}")
    return pure.as_posix()


def read_manifest(run: str | os.PathLike[str], columns: tuple[str, ...] | list[str] = ("image", "patient_id"), *,
                  images_must_exist: bool = True) -> pd.DataFrame:
    """The manifest, validated: ``columns`` present, at least one row, image paths inside the run and unique,
    valid patient ids. Row order is kept; ``image`` holds clean relative POSIX paths."""
    run = check_run_dir(run)
    path = run_file(run, MANIFEST)
    manifest = read_parquet(path)
    require_columns(manifest, tuple(dict.fromkeys(("image", "patient_id", *columns))), path)
    if manifest.empty:
        raise RunError(f"{path}: has no rows (no images)")
    images: list[str] = []
    seen: dict[str, int] = {}
    for i, value in enumerate(manifest["image"].tolist()):
        rel = checked_image_path(run, value, f"{path}: row {i + 1}, column 'image'", must_exist=images_must_exist)
        if rel in seen:
            raise RunError(f"{path}: row {i + 1}, column 'image': {show(rel)} is listed twice (also row {seen[rel]})")
        seen[rel] = i + 1
        images.append(rel)
    for i, value in enumerate(manifest["patient_id"].tolist()):
        if not isinstance(value, str) or not PATIENT_ID_PATTERN.fullmatch(value) or ".." in value:
            raise RunError(f"{path}: row {i + 1}, column 'patient_id': {show(value)} is not a valid patient id "
                           "(letters, digits, '_', '.', '-'; no '..')")
    return manifest.assign(image=images).reset_index(drop=True)


def read_lesions(run: str | os.PathLike[str], images: set[str] | None = None) -> pd.DataFrame:
    """The lesion table, validated: known types, whole lesion ids that fit a 16-bit mask, finite boxes with
    ``x0 <= x1`` and ``y0 <= y1``, each lesion once per image, and (given ``images``) only images of the
    manifest. Adds ``_row`` (the 1-based row in the file)."""
    run = check_run_dir(run)
    path = run_file(run, LESIONS)
    lesions = read_parquet(path).reset_index(drop=True)
    require_columns(lesions, ("image", "lesion_id", "type", "x0", "y0", "x1", "y1"), path)
    canonical = []
    for i, value in enumerate(lesions["image"].tolist()):
        rel = PurePosixPath(value).as_posix() if isinstance(value, str) and value else None
        if images is not None and rel not in images:
            raise RunError(f"{path}: row {i + 1}, column 'image': {show(value)} is not an image of {MANIFEST}")
        canonical.append(rel)
    for i, value in enumerate(lesions["type"].tolist()):
        if value not in scale.ALL_LESION_TYPES:
            raise RunError(f"{path}: row {i + 1}, column 'type': {show(value)} is not a lesion type "
                           f"({', '.join(scale.ALL_LESION_TYPES)})")
    ids = [as_int(v, path, i + 1, "lesion_id") for i, v in enumerate(lesions["lesion_id"].tolist())]
    for i, lesion_id in enumerate(ids):
        if not 0 <= lesion_id < 65535:
            raise RunError(f"{path}: row {i + 1}, column 'lesion_id': {lesion_id} is outside 0..65534 "
                           "(masks store lesion_id + 1 in 16 bits)")
    coords = {}
    for column in ("x0", "y0", "x1", "y1"):
        values = pd.to_numeric(lesions[column], errors="coerce").astype("float64").to_numpy()
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise RunError(f"{path}: row {bad[0] + 1}, column '{column}': "
                           f"{show(lesions[column].iloc[bad[0]])} is not a finite number")
        coords[column] = values
    for lo, hi in (("x0", "x1"), ("y0", "y1")):
        bad = np.flatnonzero(coords[hi] < coords[lo])
        if bad.size:
            i = int(bad[0])
            raise RunError(f"{path}: row {i + 1}, column '{hi}': {float(coords[hi][i])!r} is less than "
                           f"{lo} {float(coords[lo][i])!r}")
    clean = lesions.assign(image=canonical, lesion_id=np.asarray(ids, dtype=np.int64), **coords,
                           _row=np.arange(1, len(lesions) + 1))
    duplicated = clean.duplicated(["image", "lesion_id"])
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise RunError(f"{path}: row {i + 1}, column 'lesion_id': lesion {ids[i]} appears twice on "
                       f"{show(canonical[i])}")
    return clean


def read_run(run: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The validated manifest and lesion tables of a finished run."""
    manifest = read_manifest(run, MANIFEST_COLUMNS[:9])
    return manifest, read_lesions(run, set(manifest["image"])).drop(columns="_row")


def read_grades(run: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``RUN/grades.parquet`` (one row per image, ``image`` + ``<grader>_<name>`` columns), or None."""
    path = Path(run) / GRADES
    if not path.exists():
        return None
    grades = read_parquet(path)
    require_columns(grades, (GRADES_KEY,), path)
    if grades[GRADES_KEY].duplicated().any():
        dup = grades[GRADES_KEY][grades[GRADES_KEY].duplicated()].iloc[0]
        raise RunError(f"{path}: column '{GRADES_KEY}': {show(dup)} is listed twice")
    return grades


def read_grade_table(run: str | os.PathLike[str], name: str) -> pd.DataFrame | None:
    """A table a grader wrote beside the grades (:data:`GRADE_TABLES`: ``detections.parquet``,
    ``tracks.parquet``), validated: its columns present, image paths as text, finite boxes with ``x0 <= x1`` and
    ``y0 <= y1``; None when the run has none."""
    if name not in GRADE_TABLES:
        raise ValueError(f"unknown grade table {name!r}; choose from {', '.join(GRADE_TABLES)}")
    path = Path(run) / name
    if not (path.exists() or path.is_symlink()):
        return None
    table = read_parquet(run_file(run, name))
    require_columns(table, GRADE_TABLES[name], path)
    bad = [i for i, v in enumerate(table["image"].tolist()) if not isinstance(v, str) or not v]
    if bad:
        raise RunError(f"{path}: row {bad[0] + 1}, column 'image': {show(table['image'].iloc[bad[0]])} is not a path")
    boxes = {c: pd.to_numeric(table[c], errors="coerce").to_numpy(dtype=np.float64) for c in BOX_COLUMNS}
    for column, values in boxes.items():
        wrong = np.flatnonzero(~np.isfinite(values))
        if wrong.size:
            raise RunError(f"{path}: row {wrong[0] + 1}, column '{column}': {show(table[column].iloc[wrong[0]])} is "
                           "not a finite number")
    for lo, hi in (("x0", "x1"), ("y0", "y1")):
        wrong = np.flatnonzero(boxes[hi] < boxes[lo])
        if wrong.size:
            raise RunError(f"{path}: row {wrong[0] + 1}, column '{hi}': less than {lo}")
    return table.assign(**boxes).reset_index(drop=True)


def read_grades_index(run: str | os.PathLike[str]) -> dict[str, Any]:
    """``RUN/grades.json``'s per-grader entries (``fingerprint``, ``columns``, ``outcomes``); {} when absent.

    Every entry must be a JSON object whose ``outcomes`` (when given) is a list of distinct column names other
    than ``image``; anything else is a one-line error naming the file and the grader.
    """
    path = Path(run) / GRADES_INDEX
    if not path.exists():
        return {}
    graders = read_json(path).get("graders", {})
    if not isinstance(graders, dict):
        raise RunError(f"{path}: 'graders' must be a JSON object")
    for name, entry in graders.items():
        if not isinstance(entry, dict):
            raise RunError(f"{path}: grader {show(name)}: its entry must be a JSON object, not {show(entry)}")
        outcomes = entry.get("outcomes", [])
        if not isinstance(outcomes, list) or not all(isinstance(c, str) and c for c in outcomes):
            raise RunError(f"{path}: grader {show(name)}: 'outcomes' must be a list of column names")
        if GRADES_KEY in outcomes:
            raise RunError(f"{path}: grader {show(name)}: '{GRADES_KEY}' is the key column, not an outcome")
    return graders


#: Largest magnitude of a grade that ``analyze`` reads: far beyond any count or score, and small enough that
#: sums of squares over a trial stay finite.
MAX_GRADE = 1e12


def grade_outcomes(run: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``image`` + the grade columns that are outcomes (as ``grades.json`` names them), or None when ungraded.

    Each outcome is named once (over all graders), is a numeric column, and holds finite values of at most
    :data:`MAX_GRADE` in magnitude or NaN (an image a grader could not score); else a one-line error.
    """
    grades = read_grades(run)
    if grades is None:
        return None
    path = Path(run) / GRADES
    index = read_grades_index(run)
    wanted = [c for entry in index.values() for c in entry.get("outcomes", [])] if index else \
        [c for c in grades.columns if c != GRADES_KEY and pd.api.types.is_numeric_dtype(grades[c])]
    twice = sorted({c for c in wanted if wanted.count(c) > 1})
    if twice:
        raise RunError(f"{Path(run) / GRADES_INDEX}: outcome column {show(twice[0])} is named twice")
    missing = [c for c in wanted if c not in grades.columns]
    if missing:
        raise RunError(f"{path}: missing the outcome column(s) {missing} named in {GRADES_INDEX}; "
                       "run `synthtrial grade` again")
    for column in wanted:
        values = grades[column]
        if not pd.api.types.is_numeric_dtype(values):
            raise RunError(f"{path}: outcome column {show(column)} holds {values.dtype} values, not numbers")
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isnan(numbers) & ~(np.abs(numbers) <= MAX_GRADE)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RunError(f"{path}: outcome column {show(column)}, image {show(grades[GRADES_KEY].iloc[row])}: "
                           f"{show(numbers[row])} is not a finite grade of at most {MAX_GRADE:g} in magnitude")
    return grades[[GRADES_KEY, *wanted]]


def is_sha256(value: Any) -> bool:
    """A sha256 as the manifest stores it: 64 lower-case hex digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def check_sha256(run: Path, rel: str, digest: Any, row: int, column: str = "sha256") -> None:
    """Refuse (one line) a file of the run whose bytes no longer match the manifest's ``column`` at ``row``."""
    where = f"{run / MANIFEST}: row {row}, column '{column}'"
    if not is_sha256(digest):
        raise RunError(f"{where}: {show(digest)} is not a sha256")
    path = run / rel
    if not path.is_file():
        raise RunError(f"{where}: {rel} is missing; run `synthtrial verify` and re-run `synthtrial generate` to "
                       "heal the run")
    if sha256_file(path) != digest:
        raise RunError(f"{where}: {rel} no longer matches its checksum (changed or truncated); run `synthtrial "
                       "verify` and re-run `synthtrial generate` to heal the run")


def mask_path_for(image: str) -> str:
    """The instance mask of an image: ``images/P/x.png`` -> ``masks/P/x.png``."""
    parts = PurePosixPath(image).parts
    return PurePosixPath(MASKS, *parts[1:]).as_posix() if parts and parts[0] == IMAGES else \
        PurePosixPath(MASKS, *parts).as_posix()


# ------------------------------------------------------------------------------------------ writing

def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def write_table(path: Path, frame: pd.DataFrame) -> Path:
    """Write a parquet table atomically (temp file + rename)."""
    return write_bytes_atomic(path, parquet_bytes(frame))


def write_manifest(run: Path, manifest: pd.DataFrame, lesions: pd.DataFrame) -> None:
    """The manifest (parquet and CSV) and the lesion table, each written atomically."""
    write_table(run / LESIONS, lesions)
    write_table(run / MANIFEST, manifest)
    csv = manifest.copy()
    csv["date"] = csv["date"].dt.strftime("%Y-%m-%d")
    write_text_atomic(run / MANIFEST_CSV, csv.to_csv(index=False, lineterminator="\n"))


@contextlib.contextmanager
def locked(run: Path, *, what: str = "writing", option: str | None = None) -> Iterator[None]:
    """Hold ``RUN/.lock`` (an advisory ``flock``) for the block; a second holder is refused with a one-line
    error. The lock covers the very first write of a new run directory: the folder is created here.
    ``option`` names the option that chose ``run`` (``generate``'s ``--out``); None, the default, when the run
    was given as an argument, as to ``grade`` and ``analyze``."""
    import fcntl

    where = f"(option {option})" if option else "(the run directory given)"
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunError(f"{run}: cannot be written ({one_line(exc)}) {where}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                also = f" or choose another {option}" if option else ""
                raise RunError(f"{run}: another synthtrial process is {what} this run; wait for it to "
                               f"finish{also}") from None
            raise
        yield
    finally:
        os.close(fd)


def remove_stale_temps(run: Path) -> int:
    """Delete the temp files an atomic write left behind when its process was killed (call under the lock)."""
    removed = 0
    for path in run.rglob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def is_empty_dir(path: Path) -> bool:
    """A folder holding nothing but (possibly) our lock file."""
    return path.is_dir() and all(p.name == LOCK for p in path.iterdir())


# ------------------------------------------------------------------------------------------- helpers

def is_missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def as_int(value: Any, path: Path, row: int, column: str) -> int:
    if not is_missing(value) and not isinstance(value, (bool, np.bool_)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isfinite(number) and number == int(number):
            return int(number)
    raise RunError(f"{path}: row {row}, column '{column}': {show(value)} is not a whole number")


def as_float(value: Any, path: Path, row: int, column: str) -> float | None:
    if is_missing(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise RunError(f"{path}: row {row}, column '{column}': {show(value)} is not a number")
    return number + 0.0
