"""The severity scale: the one place where latent severity, lesion counts, ACNE04 levels and IGA meet.

These are modelling assumptions (see DESIGN.md), stated once here and used by every stage:

* Latent severity ``s`` is continuous on the ACNE04 scale 0-3 (0 mild, 1 moderate, 2 severe,
  3 very severe); it is the ``AcneSeverity`` column of the anchor protocol format.
* Expected lesion count on the imaged face is piecewise linear through the knots
  ``s = 0, 0.5, 1.5, 2.5, 3.0`` -> ``0, 5.5, 20.5, 50.5, 65`` lesions.
* ACNE04 / Hayashi level from a lesion count: <=5 -> 0, 6-20 -> 1, 21-50 -> 2, >50 -> 3. The count knots
  sit on the level boundaries, so the level of ``count(s)`` equals ``round(s)`` (capped at 3), as the
  anchor generator's ``min(round(s), 3)`` expects. At the exact half-integers Python's round-half-to-even
  breaks ties inconsistently (0.5 -> 0 but 1.5 -> 2); there this scale always rounds down.
* IGA 0-4 (clear, almost clear, mild, moderate, severe) from inflammatory lesions (papules, pustules,
  nodules): 0 -> 0; 1-2 -> 1; 3-10 -> 2; 11-30 -> 3; >30 -> 4; any nodule lifts the grade to at least 3.
  QuantifiCare's clinical grouping 0-1 / 2 / 3-4 is the 3-class view (:func:`iga_group`).
* The lesion-type mix shifts with severity (comedones dominate mild acne, nodules appear only from
  severe acne on); :func:`lesion_mix` gives the expected fractions, which the lesion model draws from and
  :func:`expected_iga` uses to carry a latent severity to an IGA grade.

All functions are vectorised: they take scalars, sequences, NumPy arrays or pandas Series and return
NumPy values of the same shape (a scalar in, a NumPy scalar out).
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

SEVERITY_MIN: Final = 0.0
SEVERITY_MAX: Final = 3.0

#: Knots of the piecewise-linear map from latent severity to expected lesion count.
COUNT_KNOTS_SEVERITY: Final = np.array([0.0, 0.5, 1.5, 2.5, 3.0])
COUNT_KNOTS_LESIONS: Final = np.array([0.0, 5.5, 20.5, 50.5, 65.0])

#: Upper lesion counts (inclusive) of ACNE04 levels 0, 1, 2; anything above is level 3.
ACNE04_LEVEL_MAX_COUNT: Final = (5, 20, 50)
ACNE04_LEVEL_NAMES: Final = ("mild", "moderate", "severe", "very severe")

#: Upper inflammatory-lesion counts (inclusive) of IGA 0, 1, 2, 3; anything above is IGA 4.
IGA_MAX_INFLAMMATORY: Final = (0, 2, 10, 30)
IGA_NAMES: Final = ("clear", "almost clear", "mild", "moderate", "severe")
IGA_GROUP_NAMES: Final = ("clear/almost clear", "mild", "moderate/severe")
#: A single nodule lifts the IGA grade to at least this.
IGA_NODULE_FLOOR: Final = 3

LESION_TYPES: Final = ("open_comedo", "closed_comedo", "papule", "pustule", "nodule")
#: What resolving lesions leave behind: post-inflammatory marks and atrophic scars (drawn, not counted).
RESIDUAL_TYPES: Final = ("mark", "scar")
ALL_LESION_TYPES: Final = (*LESION_TYPES, *RESIDUAL_TYPES)
INFLAMMATORY_TYPES: Final = ("papule", "pustule", "nodule")
#: Expected lesion-type fractions at severities 0, 1, 2, 3 (rows sum to 1; linear in between).
MIX_KNOTS_SEVERITY: Final = np.array([0.0, 1.0, 2.0, 3.0])
MIX_KNOTS_FRACTIONS: Final = {
    "open_comedo": np.array([0.35, 0.25, 0.15, 0.10]),
    "closed_comedo": np.array([0.45, 0.35, 0.25, 0.15]),
    "papule": np.array([0.15, 0.28, 0.35, 0.35]),
    "pustule": np.array([0.05, 0.12, 0.22, 0.28]),
    "nodule": np.array([0.00, 0.00, 0.03, 0.12]),
}


def _as_float(values: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _out(arr: NDArray, *like: ArrayLike):
    """Return a NumPy scalar when every input was a scalar, an array otherwise."""
    return arr[()] if all(np.ndim(x) == 0 for x in like) else arr


def clip_severity(severity: ArrayLike):
    """Clip to the scale's range [0, 3]; also turns the anchor's ``-0.0`` into ``0.0``."""
    s = _as_float(severity, "severity")
    return _out(np.clip(s, SEVERITY_MIN, SEVERITY_MAX) + 0.0, severity)


def expected_lesion_count(severity: ArrayLike):
    """Expected number of lesions on the imaged face at latent severity ``s`` (clipped to 0-3)."""
    s = _as_float(severity, "severity")
    return _out(np.interp(s, COUNT_KNOTS_SEVERITY, COUNT_KNOTS_LESIONS), severity)


def severity_from_count(count: ArrayLike):
    """Inverse of :func:`expected_lesion_count` (counts above 65 map to 3, below 0 to 0)."""
    c = _as_float(count, "count")
    return _out(np.interp(c, COUNT_KNOTS_LESIONS, COUNT_KNOTS_SEVERITY), count)


def acne04_level_from_count(count: ArrayLike):
    """ACNE04 / Hayashi level 0-3 from a lesion count (<=5, 6-20, 21-50, >50).

    Non-integer (expected) counts use the midpoints 5.5, 20.5 and 50.5 as boundaries, which agree with
    the integer rule on every integer.
    """
    c = _as_float(count, "count")
    if (c < 0).any():
        raise ValueError("lesion counts must be >= 0")
    bounds = np.array(ACNE04_LEVEL_MAX_COUNT, dtype=np.float64) + 0.5
    return _out(np.searchsorted(bounds, c, side="left").astype(np.int64), count)


def acne04_level(severity: ArrayLike):
    """ACNE04 level of latent severity ``s``: the level of its expected lesion count (= round(s), capped)."""
    return acne04_level_from_count(expected_lesion_count(severity))


def iga_from_counts(n_inflammatory: ArrayLike, n_nodule: ArrayLike = 0):
    """IGA 0-4 from the number of inflammatory lesions (papules + pustules + nodules) and of nodules.

    Non-integer (expected) counts use the midpoints 0.5, 2.5, 10.5 and 30.5 as boundaries, and an
    expected nodule count of 0.5 or more counts as "a nodule is present".
    """
    n = _as_float(n_inflammatory, "n_inflammatory")
    k = _as_float(n_nodule, "n_nodule")
    if (n < 0).any() or (k < 0).any():
        raise ValueError("lesion counts must be >= 0")
    if (k > n + 1e-9).any():
        raise ValueError("nodules are inflammatory lesions: n_nodule cannot exceed n_inflammatory")
    bounds = np.array(IGA_MAX_INFLAMMATORY, dtype=np.float64) + 0.5
    grade = np.searchsorted(bounds, n, side="left").astype(np.int64)
    grade = np.where(k >= 0.5, np.maximum(grade, IGA_NODULE_FLOOR), grade)
    return _out(np.asarray(grade, dtype=np.int64), n_inflammatory, n_nodule)


def iga_group(iga: ArrayLike):
    """QuantifiCare's 3-class clinical view: IGA 0-1 -> 0, 2 -> 1, 3-4 -> 2."""
    g = np.asarray(iga)
    if g.dtype.kind not in "iu":
        if not np.all(np.mod(_as_float(g, "iga"), 1) == 0):
            raise ValueError("IGA grades are integers 0-4")
        g = g.astype(np.int64)
    if ((g < 0) | (g > 4)).any():
        raise ValueError("IGA grades are integers 0-4")
    return _out(np.searchsorted(np.array([1, 2]), g, side="left").astype(np.int64), iga)


def lesion_mix(severity: ArrayLike) -> dict[str, np.ndarray]:
    """Expected fraction of each lesion type at latent severity ``s`` (fractions sum to 1)."""
    s = _as_float(severity, "severity")
    return {t: _out(np.interp(s, MIX_KNOTS_SEVERITY, MIX_KNOTS_FRACTIONS[t]), severity)
            for t in LESION_TYPES}


def inflammatory_fraction(severity: ArrayLike):
    """Expected fraction of lesions that are inflammatory (papules, pustules, nodules) at ``s``."""
    mix = lesion_mix(severity)
    return sum(mix[t] for t in INFLAMMATORY_TYPES)


def expected_iga(severity: ArrayLike):
    """IGA grade of the expected lesion counts at latent severity ``s``."""
    count = expected_lesion_count(severity)
    mix = lesion_mix(severity)
    n_inflammatory = count * sum(mix[t] for t in INFLAMMATORY_TYPES)
    return iga_from_counts(n_inflammatory, count * mix["nodule"])


def scale_table(severities: ArrayLike | None = None):
    """The scale as a tidy table (one row per severity), for documentation and ``synthtrial scale``."""
    import pandas as pd

    s = np.round(np.arange(0.0, 3.0001, 0.25), 2) if severities is None else _as_float(severities, "severity")
    s = np.atleast_1d(s)
    count = expected_lesion_count(s)
    mix = lesion_mix(s)
    level = acne04_level(s)
    iga = expected_iga(s)
    table = pd.DataFrame({
        "severity": s,
        "expected_lesions": np.round(count, 2),
        "acne04_level": level,
        "acne04_name": [ACNE04_LEVEL_NAMES[i] for i in level],
        "inflammatory_fraction": np.round(sum(mix[t] for t in INFLAMMATORY_TYPES), 3),
        "iga": iga,
        "iga_name": [IGA_NAMES[i] for i in iga],
        "iga_group": iga_group(iga),
    })
    return table
