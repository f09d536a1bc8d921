"""Check a finished run against the run-directory contract that :mod:`synthtrial.run.rundir` owns.

:func:`verify` lists every problem it finds, one line each, instead of stopping at the first: every image and
mask against the manifest's sha256, no file missing or unlisted, no file that resolves outside the run, the
contact sheets present, the manifest's lesion counts (simulated and visible) against ``lesions.parquet``, each
lesion's ``visible`` flag against the visibility rule, ``config.json``'s required settings, and the manifest's
simulated columns (treatment, severity, date, block per patient, day and view) against ``protocol.csv`` and
``truth.json``. A table that cannot be read at all is the one problem listed. A run made with
``--counterfactual`` has each world under ``counterfactual/<arm>/`` checked the same way (its lines prefixed
with the folder), one image per factual image, and ``counterfactual/individual_effects.parquet`` against the
manifests it is computed from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.run import rundir
from synthtrial.run.remote import on_storage
from synthtrial.run.rundir import CONFIG, LESIONS, MANIFEST, PROTOCOL, TRUTH, RunError
from synthtrial.trial import scale
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.progress import ProgressCallback

#: protocol.csv stores severities rounded to 4 decimals; the manifest keeps the value rendered.
SEVERITY_TOLERANCE = 0.5e-4 + 1e-9
#: How each of config.json's required entries (``rundir.CONFIG_REQUIRED``) is checked: (what it is, check).
CONFIG_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "backend": ("a backend name", lambda v: isinstance(v, str) and bool(v)),
    "size": ("a whole number of pixels >= 1", lambda v: _whole(v) and v >= 1),
    "seed": ("a whole number >= 0", lambda v: _whole(v) and v >= 0),
    "rows": ("a whole number >= 1", lambda v: _whole(v) and v >= 1),
    "sha256": ("a sha256 in hex", rundir.is_sha256),
}
JPEG_MAGIC = b"\xff\xd8\xff"


@on_storage("run", write=False)
def verify(run: str | os.PathLike[str], *,
           progress: ProgressCallback | None = None) -> list[str]:
    """Check a finished run; return one line per problem found (empty when all holds).
    ``progress(done, total, status)`` is called as images are checked."""
    run = rundir.check_run_dir(run)
    try:
        config = rundir.read_config(run)
        manifest = rundir.read_manifest(run, rundir.MANIFEST_COLUMNS, images_must_exist=False)
        lesions = rundir.read_lesions(run, set(manifest["image"]))
    except RunError as exc:
        return [str(exc)]
    problems = check_config(config)
    settings = config.get("settings") if isinstance(config.get("settings"), dict) else {}
    recorded = config.get("protocol") if isinstance(config.get("protocol"), dict) else {}
    if "backend" in settings and set(manifest["backend"]) != {settings["backend"]}:
        problems.append(f"{MANIFEST}: column 'backend' says {sorted(set(manifest['backend']))} but {CONFIG} "
                        f"says '{settings['backend']}'")
    if _whole(recorded.get("rows")) and recorded["rows"] != len(manifest):
        problems.append(f"{MANIFEST}: has {len(manifest)} rows but {CONFIG} records a protocol of "
                        f"{recorded['rows']} rows")
    size = settings.get("size") if _whole(settings.get("size")) else None
    problems += check_files(run, manifest, size, progress)
    problems += check_counts(manifest, lesions)
    problems += check_protocol(run, manifest, recorded.get("sha256"))
    problems += check_truth(run, manifest)
    problems += check_grids(run, manifest)
    problems += check_counterfactual(run, manifest)
    return problems


def check_counterfactual(run: Path, manifest: pd.DataFrame) -> list[str]:
    """Each counterfactual world as a run of its own, paired image for image with the factual run, and the
    individual-effects table as its manifests make it (nothing for a run without worlds)."""
    from synthtrial.run.counterfactual import individual_effects

    worlds = rundir.counterfactual_worlds(run)
    problems = []
    keys = set(zip(manifest["patient_id"], manifest["day"], manifest["view"]))
    for arm, folder in worlds.items():
        prefix = f"{rundir.COUNTERFACTUAL}/{arm}/"
        try:
            own = verify(folder)
            pairs = set(zip(*(rundir.read_manifest(folder, ("day", "view"))[c] for c in ("patient_id", "day", "view"))))
        except RunError as exc:
            problems.append(f"{prefix}: {exc}; re-run the generate command to finish it")
            continue
        problems += [prefix + line for line in own]
        if pairs != keys:
            problems.append(f"{prefix}{MANIFEST}: its patients, days and views are not the factual run's "
                            f"({len(pairs ^ keys)} differ)")
    if worlds and not problems:
        try:
            stored = rundir.read_individual_effects(run)
            if stored is None:
                return [f"{rundir.INDIVIDUAL_EFFECTS}: missing; re-run the generate command to write it"]
            if not stored.equals(individual_effects(run, list(dict.fromkeys(stored["arm"])))):
                problems.append(f"{rundir.INDIVIDUAL_EFFECTS}: does not match the manifests of the run and its "
                                "counterfactual worlds")
        except RunError as exc:
            problems.append(str(exc))
    return problems


def check_config(config: dict[str, Any]) -> list[str]:
    """``config.json``'s required entries (``rundir.CONFIG_REQUIRED``), one line per one missing or wrong."""
    problems = []
    for section, keys in rundir.CONFIG_REQUIRED.items():
        entry = config.get(section)
        if not isinstance(entry, dict):
            problems.append(f"{CONFIG}: '{section}' is missing or not a JSON object (the settings `generate` "
                            "recorded); the run's config is damaged")
            continue
        for key in keys:
            what, ok = CONFIG_CHECKS[key]
            if key not in entry:
                problems.append(f"{CONFIG}: '{section}' has no '{key}' ({what})")
            elif not ok(entry[key]):
                problems.append(f"{CONFIG}: '{section}' -> '{key}' is {rundir.show(entry[key])}, not {what}")
    return problems


def check_files(run: Path, manifest: pd.DataFrame, size: int | None,
                progress: ProgressCallback | None) -> list[str]:
    """Every image and mask against its sha256, inside the run, sized as ``config.json`` says; no unlisted
    file under ``images/`` or ``masks/``."""
    problems: list[str] = []
    listed = set()
    for i, rec in enumerate(manifest.itertuples(index=False), start=1):
        for column, digest_column in (("image", "sha256"), ("mask", "mask_sha256")):
            try:
                rel = rundir.checked_image_path(run, getattr(rec, column), f"{MANIFEST}: row {i}, column '{column}'",
                                                must_exist=False)
            except RunError as exc:
                problems.append(str(exc))
                continue
            listed.add(rel)
            path = run / rel
            if not path.is_file():
                problems.append(f"{rel}: missing (manifest row {i})")
            elif rundir.sha256_file(path) != getattr(rec, digest_column):
                problems.append(f"{rel}: bytes differ from the manifest's {digest_column} (row {i}): changed or "
                                "truncated")
        if size is not None and (rec.width, rec.height) != (size, size):
            problems.append(f"{MANIFEST}: row {i}: {rec.width}x{rec.height} but {CONFIG} says --size {size}")
        if progress is not None:
            progress(i, len(manifest), "")
    for folder in (rundir.IMAGES, rundir.MASKS):
        for path in sorted((run / folder).rglob("*")) if (run / folder).is_dir() else []:
            if path.is_file() and path.relative_to(run).as_posix() not in listed:
                problems.append(f"{path.relative_to(run).as_posix()}: not listed in {MANIFEST}")
    return problems


def check_counts(manifest: pd.DataFrame, lesions: pd.DataFrame) -> list[str]:
    """The manifest's ``lesion_count`` and ``n_<type>`` against the lesion table, and its visible counts
    (``visible_count``, ``n_visible_<type>``) against the lesions whose ``visible`` is true."""
    problems = check_visibility(lesions)
    groups = [("n_", "lesion_count", "active", lesions)]
    if "visible" in lesions.columns and pd.api.types.is_bool_dtype(lesions["visible"]):
        groups.append(("n_visible_", "visible_count", "visible active", lesions[lesions["visible"].to_numpy(bool)]))
    for prefix, total, what, subset in groups:
        active = subset[subset["type"].isin(scale.LESION_TYPES)].groupby("image").size()
        per_type = subset.groupby(["image", "type"]).size()
        for i, rec in enumerate(manifest.itertuples(index=False), start=1):
            n = int(active.get(rec.image, 0))
            if n != getattr(rec, total):
                problems.append(f"{MANIFEST}: row {i}, column '{total}': {getattr(rec, total)} but {LESIONS} has "
                                f"{n} {what} lesions on {rec.image}")
            for t in scale.ALL_LESION_TYPES:
                n_t = int(per_type.get((rec.image, t), 0))
                if n_t != getattr(rec, f"{prefix}{t}"):
                    problems.append(f"{MANIFEST}: row {i}, column '{prefix}{t}': {getattr(rec, f'{prefix}{t}')} but "
                                    f"{LESIONS} has {n_t}")
    return problems


def check_visibility(lesions: pd.DataFrame) -> list[str]:
    """``lesions.parquet``'s ``visible`` flags against the stated rule on its ``contrast``, ``area_px`` and
    ``signal`` (:func:`synthtrial.render.visibility.is_visible`; a run made before the signal was measured has no
    ``signal`` column, and its rule stands on the other two), the first 20 that break it; a missing column is the
    one problem listed."""
    from synthtrial.render.visibility import is_visible

    missing = [c for c in ("area_px", "contrast", "visible") if c not in lesions.columns]
    if missing:
        return [f"{LESIONS}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                "(the visibility measurement); re-run `synthtrial generate` to add it"]
    flags = lesions["visible"]
    if not pd.api.types.is_bool_dtype(flags):
        return [f"{LESIONS}: column 'visible' holds {flags.dtype} values, not true/false"]
    contrast = pd.to_numeric(lesions["contrast"], errors="coerce").to_numpy(dtype=float)
    area = pd.to_numeric(lesions["area_px"], errors="coerce").to_numpy(dtype=float)
    has_signal = "signal" in lesions.columns
    signal = pd.to_numeric(lesions["signal"], errors="coerce").to_numpy(dtype=float) if has_signal else None
    wrong = np.flatnonzero(is_visible(contrast, area, signal) != flags.to_numpy(dtype=bool))

    def because(j: int) -> str:
        shown = (f"contrast {rundir.show(lesions['contrast'].iloc[j])}, "
                 f"area_px {rundir.show(lesions['area_px'].iloc[j])}")
        return shown + (f" and signal {rundir.show(lesions['signal'].iloc[j])}" if has_signal else "")

    return [f"{LESIONS}: row {int(lesions['_row'].iloc[j])}, column 'visible': {bool(flags.iloc[j])} but "
            f"{because(j)} make it {not bool(flags.iloc[j])}" for j in wrong[:20]]


def check_protocol(run: Path, manifest: pd.DataFrame, recorded_sha: Any) -> list[str]:
    """``protocol.csv`` against ``config.json``'s sha256, and the manifest's treatment, severity, date and block
    against the protocol row of the same patient, day and view (each protocol row has exactly one image)."""
    from synthtrial.trial.protocol import read_protocol

    path = run / PROTOCOL
    if not (path.exists() or path.is_symlink()):
        return [f"{PROTOCOL}: missing"]
    try:
        path = rundir.run_file(run, PROTOCOL)
        if isinstance(recorded_sha, str) and rundir.sha256_file(path) != recorded_sha:
            return [f"{PROTOCOL}: does not match the protocol sha256 recorded in {CONFIG}"]
        protocol = read_protocol(path)
    except (SynthtrialError, OSError) as exc:
        return [str(exc) if isinstance(exc, SynthtrialError) else f"{PROTOCOL}: cannot be read ({exc})"]
    rows = {(r.patient_id, int(r.day), r.view): (j, r) for j, r in enumerate(protocol.itertuples(index=False), 1)}
    problems, seen = [], set()
    for i, rec in enumerate(manifest.itertuples(index=False), start=1):
        key = (rec.patient_id, int(float(rec.day)) if _whole_like(rec.day) else rec.day, rec.view)
        if key not in rows:
            problems.append(f"{MANIFEST}: row {i}: patient {rundir.show(rec.patient_id)}, day {rundir.show(rec.day)}, "
                            f"view {rundir.show(rec.view)} is not a row of {PROTOCOL}")
            continue
        j, row = rows[key]
        seen.add(key)
        for column, stated, expected in (("treatment", rec.treatment, row.treatment),
                                         ("severity", rec.severity, row.severity),
                                         ("date", rec.date, row.date), ("block", rec.block, row.block)):
            if not _same(stated, expected, column):
                problems.append(f"{MANIFEST}: row {i}, column '{column}': {rundir.show(stated)} but {PROTOCOL} row "
                                f"{j} says {rundir.show(expected)}")
    for key, (j, _) in rows.items():
        if key not in seen:
            problems.append(f"{PROTOCOL}: row {j} (patient {key[0]!r}, day {key[1]}, view {key[2]!r}) has no image "
                            f"in {MANIFEST}")
    return problems


def check_truth(run: Path, manifest: pd.DataFrame) -> list[str]:
    """The manifest against ``truth.json`` (when the run has one): each simulated patient's days inside its
    simulated span and not among its missing days; treatments among the simulated ones."""
    try:
        truth = rundir.read_truth(run)
    except RunError as exc:
        return [str(exc)]
    if truth is None:
        return []
    patients = truth.get("patients")
    if not isinstance(patients, dict):
        return [f"{TRUTH}: 'patients' is missing or not a JSON object"]
    problems = []
    treatments = truth.get("treatments")
    for pid, rows in manifest.groupby("patient_id", sort=False):
        entry = patients.get(pid)
        if entry is None:
            continue  # a patient whose severities the protocol gave: not simulated
        entry = entry if isinstance(entry, dict) else {}
        first, last = entry.get("first_day"), entry.get("last_day")
        if not (_whole(first) and _whole(last)):
            problems.append(f"{TRUTH}: patient {pid!r} has no whole 'first_day' and 'last_day'")
            continue
        missing = set(entry.get("missing_days") or [])
        for i, day, treatment in zip(rows.index + 1, rows["day"], rows["treatment"]):
            if not _whole_like(day) or not first <= day <= last or day in missing:
                problems.append(f"{MANIFEST}: row {i}, column 'day': {rundir.show(day)} is not a simulated day of "
                                f"patient {pid!r} in {TRUTH} (days {first}..{last}"
                                f"{', missing ' + str(sorted(missing)) if missing else ''})")
            if isinstance(treatments, list) and treatment not in treatments:
                problems.append(f"{MANIFEST}: row {i}, column 'treatment': {rundir.show(treatment)} is not a "
                                f"treatment of {TRUTH} ({', '.join(map(str, treatments))})")
    return problems


def check_grids(run: Path, manifest: pd.DataFrame) -> list[str]:
    """The contact sheets ``generate`` draws last (a full disk can leave them out)."""
    problems = []
    for name in rundir.grid_names(manifest):
        path = run / name
        if not path.is_file():
            problems.append(f"{name}: missing; re-run the generate command to draw it")
            continue
        try:
            rundir.run_file(run, name)
        except RunError as exc:
            problems.append(str(exc))
            continue
        with open(path, "rb") as fh:
            if fh.read(len(JPEG_MAGIC)) != JPEG_MAGIC:
                problems.append(f"{name}: is not a JPEG image; re-run the generate command to draw it again")
    return problems


# ------------------------------------------------------------------------------------------- helpers

def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole_like(value: Any) -> bool:
    try:
        return not rundir.is_missing(value) and float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _same(stated: Any, expected: Any, column: str) -> bool:
    """A manifest value against the protocol's (missing equals missing; severities within the CSV's rounding)."""
    if rundir.is_missing(stated) or rundir.is_missing(expected):
        return rundir.is_missing(stated) and rundir.is_missing(expected)
    if column == "severity":
        try:
            return math.isfinite(float(stated)) and abs(float(stated) - float(expected)) <= SEVERITY_TOLERANCE
        except (TypeError, ValueError):
            return False
    if column == "date":
        try:
            return pd.Timestamp(stated) == pd.Timestamp(expected)
        except (TypeError, ValueError):
            return False
    if column == "block":
        return _whole_like(stated) and int(float(stated)) == int(expected)
    return stated == expected
