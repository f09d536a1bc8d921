"""Power with readers: a simulated rater panel reads each power replicate's lesions (``synthtrial power --raters K``).

A power replicate simulates a trial's latent severities and renders nothing (:mod:`synthtrial.analyze.power`);
the raters need lesions, so each patient's lesions are simulated as ``generate`` simulates them
(:class:`synthtrial.lesions.course.LesionCourse`, seeded by the replicate's trial seed and the patient), and each
patient-day's lesions (type, diameter, intensity) are read by a panel drawn afresh for the replicate from the
panel's spreads (:func:`synthtrial.grade.raters.draw_raters`: a new set of readers per trial, so power counts
the readers' variation too), without rereads. The course's face only places the lesions, which the raters do
not read: one built-in face at 128 px serves every patient. No image is drawn, so no lesion has a visibility
flag (``respect_visibility`` has nothing to act on).

Outcome ``rated_count_k<K>``: the mean count of the panel's first K raters, per patient-day, for every K asked
(the K are nested: the 1-rater outcome is the first rater of the 5-rater panel). A rated count is a grader's
outcome: it has no truth on the severity scale, and its calibration slope (lesions per severity unit) says how
much of the effect the panel recovers. ``gls_kinetics`` is descriptive on it, as on a grader's outcome
(:data:`synthtrial.analyze.estimators.RATED_OUTCOME_PREFIX`: it over-rejected on one rater's counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from synthtrial.analyze.estimators import RATED_OUTCOME_PREFIX
from synthtrial.grade.raters import MAX_RATERS, Panel, draw_raters, read_arrays, reading_table
from synthtrial.util.errors import SynthtrialError

__all__ = ["RATED_PREFIX", "check_raters", "rated_outcome_names", "rated_outcomes", "trial_lesions"]

RATED_PREFIX = RATED_OUTCOME_PREFIX
_FACE: dict[str, object] = {}


def check_raters(raters: Sequence[int], panel: object = None) -> tuple[int, ...]:
    """The panel sizes, sorted and distinct, each 1 to MAX_RATERS (else one line naming ``--raters``)."""
    for k in raters:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_RATERS:
            raise SynthtrialError(f"--raters must be whole numbers from 1 to {MAX_RATERS}, got {k!r}")
    if panel is not None and not isinstance(panel, Panel):
        raise SynthtrialError(f"panel must be a Panel or None, not {type(panel).__name__}")
    return tuple(sorted({int(k) for k in raters}))


def rated_outcome_names(raters: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{RATED_PREFIX}{k}" for k in check_raters(raters))


def _face():
    if "face" not in _FACE:
        from synthtrial.face.faces import identity_for, load_base_faces, make_face

        bases = load_base_faces(None)
        _FACE["face"] = make_face(bases[0], identity_for(0, bases, seed=0), 128)
    return _FACE["face"]


def trial_lesions(protocol: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The patient-days of a simulated trial's protocol (``image`` = ``<patient>|<day>``, ``patient_id``, ``day``,
    ``calendar_day``: days since the trial's first date) and their lesions (``image``, ``type``, ``diameter_mm``,
    ``intensity``), simulated as ``generate`` does."""
    from synthtrial.lesions.course import LesionCourse

    days = protocol.drop_duplicates(["patient_id", "day"])[["patient_id", "day", "date", "severity"]]
    dates = pd.to_datetime(days["date"])
    images = pd.DataFrame({"image": days["patient_id"].astype(str) + "|" + days["day"].astype(str),
                           "patient_id": days["patient_id"].to_numpy(), "day": days["day"].to_numpy(),
                           "calendar_day": (dates - dates.min()).dt.days.to_numpy(dtype=float)})
    rows: dict[str, list] = {"image": [], "type": [], "diameter_mm": [], "intensity": []}
    for pid, group in days.groupby("patient_id", sort=False):
        course = LesionCourse(_face(), group["day"].to_numpy(), group["severity"].to_numpy(dtype=float), seed=seed,
                              patient_id=str(pid))
        for day in group["day"].tolist():
            for state in course.on(int(day)):
                rows["image"].append(f"{pid}|{day}")
                rows["type"].append(state.type)
                rows["diameter_mm"].append(state.diameter_mm)
                rows["intensity"].append(state.intensity)
    return images.reset_index(drop=True), pd.DataFrame(rows)


def rated_outcomes(protocol: pd.DataFrame, raters: Sequence[int], panel: Panel | None, seed: int) -> pd.DataFrame:
    """``patient_id``, ``day`` and ``rated_count_k<K>`` for every K of ``raters`` (module docstring)."""
    sizes = check_raters(raters, panel)
    panel = panel or Panel()
    images, lesions = trial_lesions(protocol, seed)
    people = draw_raters(panel, max(sizes), seed)
    reads = read_arrays(reading_table(images, lesions, panel), panel, people, seed, stream="power", rereads=False)
    counts = reads["count"].T.astype(float)  # images x raters, no table of readings built per replicate
    out = images[["patient_id", "day"]].copy()
    for k in sizes:
        out[f"{RATED_PREFIX}{k}"] = counts[:, :k].mean(axis=1)
    return out
