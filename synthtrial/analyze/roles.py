"""When a per-patient method is a test (role ``inferential``): the rules, computed from what the design says.

A method is inferential on a design only where it holds its size there (and its CI covers its estimand);
the size-and-coverage grid (``synthtrial power --grid``, docs/grid.md) checks every rule below on designs
it was not set on. The rules, stated once:

* ``gls_kinetics`` (GLS-AR(1) on the exposure curves) is inferential where the series is long enough
  *for its autocorrelation*: at least :data:`GLS_KINETICS_MIN_DAYS` days and at least
  :data:`GLS_KINETICS_MIN_EFFECTIVE_DAYS` effectively independent days, ``n (1 - phi) / (1 + phi)`` (the
  variance of a mean of n AR(1) days equals that of so many independent days, for large n). The REML
  estimate of phi is biased towards 0 and its uncertainty grows as phi nears 1, so the test over-rejects
  on series that are long in days but short in information: 100 days at phi 0.95 are 2.6 effective days
  and rejected 6.7% at alpha 0.05 (phi 0.8: 11 effective days, 6.4%); the anchor design's 140 days at phi
  0.6 are 35 (4.7-5.1%); the old rule (100 days, set on phi 0.6) is the case phi = 0.6 of this one. phi is
  the design's (a simulated trial's truth; every ``power`` replicate) where known, else the patient's own
  REML estimate, so ``analyze`` and ``power --design`` label a method by the same rule.
* ``period`` (OLS of period means on the arms and the mid-day) assumes the period means are independent
  and carry no other arm's effect. Carryover breaks the second where the order is fixed and a trend is
  fitted: the carried-over effect changes from period to period in step with the order, and the trend
  term takes part of it (on the anchor design with 7-day periods the estimate recovered 71% and 59% of
  the delivered effects). :func:`period_carryover_bias` computes that bias exactly, with no noise, from
  the patient's own schedule and the known kinetics: the period-level estimate of each arm's exposure
  curves against their delivered contrast. Where it exceeds :data:`PERIOD_MAX_CARRYOVER_BIAS` of the
  delivered contrast the method is descriptive on the design and says so. Randomised orders spread the
  carryover over both arms and are not flagged. The first assumption fails on short periods with strong
  autocorrelation (neighbouring means correlate, :func:`adjacent_period_correlation`): that makes the test
  conservative, not invalid (size 0.004 at phi 0.95 on 10-day periods), so it is a note, not a role.
* The pooled model is inferential with CR2 (``lmm``: bias-reduced linearisation with Satterthwaite-type df,
  the small-sample correction of Bell & McCaffrey 2002 and Pustejovsky & Tipton 2018). ``lmm_cr1`` (CR1, t on
  G - 1 df) shares the fit and is descriptive everywhere: with the 3-10 patients of an N-of-1 series it does
  not correct the downward bias of the sandwich with few clusters and over-rejects where the patients'
  designs differ (randomised orders, carryover: 0.070-0.076 against CR2's 0.058-0.062 in the small grid's
  cells that differ), so it is shown beside CR2 for comparison only (:data:`CR1_NOTE`).
* ``randomization`` is ``not available`` where it cannot reject (a fixed order, or a smallest attainable
  p above alpha); see :class:`synthtrial.analyze.estimators.Randomization`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from synthtrial.analyze import nof1
from synthtrial.analyze.mixed import CR1

INFERENTIAL, DESCRIPTIVE = "inferential", "descriptive"
#: ``gls_kinetics`` needs series at least this long (it rejected 6.4-6.6% on the quick design's 16 days).
GLS_KINETICS_MIN_DAYS = 100
#: ... and at least this many effectively independent days, ``n (1 - phi) / (1 + phi)``: 100 days at phi 0.6.
GLS_KINETICS_MIN_EFFECTIVE_DAYS = 25.0
#: The period-level test is descriptive where carryover biases its estimate by more than this share of the
#: delivered contrast (per unit effect, exactly computed from the design; :func:`period_carryover_bias`).
PERIOD_MAX_CARRYOVER_BIAS = 0.2
#: Neighbouring period means correlating more than this gets a note: the period-level test is conservative.
PERIOD_CORRELATION_NOTE = 0.2
#: The note of every ``lmm_cr1`` row (a descriptive comparison with CR2).
CR1_NOTE = ("descriptive: CR1 (t on G - 1 df) is shown beside CR2 for comparison; with few patients it over-rejects "
            "where their designs differ, so the test is lmm (CR2)")
_PHI_IN_NOTE = re.compile(r"phi=(-?\d+(?:\.\d+)?) \(REML\)")


def effective_days(n: int, phi: float) -> float:
    """Effectively independent days of an AR(1) series of ``n`` days: ``n (1 - phi) / (1 + phi)`` (phi <= 0: n)."""
    phi = max(float(phi), 0.0)
    return n * (1.0 - phi) / (1.0 + phi)


def pooled_role(method: str) -> str:
    """The pooled model's role by its inference: ``lmm`` (CR2) inferential, ``lmm_cr1`` (CR1) descriptive."""
    return DESCRIPTIVE if method == CR1 else INFERENTIAL


def phi_from_note(note: str) -> float | None:
    """The REML phi a ``gls_kinetics`` estimate's note reports (``phi=0.6123 (REML)``), or None."""
    found = _PHI_IN_NOTE.search(note or "")
    return float(found.group(1)) if found else None


def gls_kinetics_role(n: int, phi: float | None, phi_source: str) -> tuple[str, str]:
    """The role of a ``gls_kinetics`` estimate from ``n`` days with AR(1) coefficient ``phi`` (None: unknown,
    the day count alone decides), and the note when it is descriptive."""
    if n < GLS_KINETICS_MIN_DAYS:
        return DESCRIPTIVE, (f"descriptive: {n} days is too short for the AR(1) fit to hold its size "
                             f"(needs {GLS_KINETICS_MIN_DAYS})")
    if phi is not None and effective_days(n, phi) < GLS_KINETICS_MIN_EFFECTIVE_DAYS:
        return DESCRIPTIVE, (f"descriptive: {n} days at AR(1) phi {phi:.2f} ({phi_source}) are "
                             f"{effective_days(n, phi):.1f} effectively independent days, n(1-phi)/(1+phi); the "
                             f"test holds its size from {GLS_KINETICS_MIN_EFFECTIVE_DAYS:g}")
    return INFERENTIAL, ""


def adjacent_period_correlation(phi: float, period_days: int) -> float:
    """Correlation of the means of two neighbouring ``period_days``-day blocks of a stationary AR(1) series:
    ``phi S^2 / sum_ij phi^|i-j|`` with ``S = sum_{k<L} phi^k``."""
    length = int(period_days)
    if length < 1 or phi <= 0:
        return 0.0
    lags = np.arange(length)
    within = length + 2.0 * float(np.sum((length - lags[1:]) * phi ** lags[1:]))
    return float(phi * np.sum(phi ** lags) ** 2 / within)


def period_correlation_note(phi: float | None, period_days: float) -> str:
    """The note of a period-level estimate whose neighbouring means correlate (a conservative test), or ''."""
    if phi is None or not np.isfinite(period_days) or period_days < 1:
        return ""
    r = adjacent_period_correlation(phi, int(round(period_days)))
    if r <= PERIOD_CORRELATION_NOTE:
        return ""
    return (f"assumes independent period means; at AR(1) phi {phi:.2f} neighbouring {period_days:.0f}-day "
            f"period means correlate {r:.2f}, so the test is conservative")


def period_carryover_bias(days: np.ndarray, treatments: np.ndarray, values: np.ndarray, excluded: set[str],
                          blocks: np.ndarray | None, reference: str, arms: Sequence[str], kinetics: nof1.Kinetics,
                          *, trend: bool, calendar: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """The period-level estimate's bias from carryover on one patient's schedule, as a share of the delivered
    contrast: the largest ``|M_ab - D_ab| / |D_aa|`` over arms a, b, where ``M_ab`` is the period-level
    estimate of arm a when the outcome is arm b's exposure curve (the severity a unit effect of b alone adds,
    without noise) and ``D_ab`` the delivered contrast of that curve (its mean on a's days minus the mean on
    the reference days; the truth the estimate is measured against). 0 where the schedule gives no contrast.

    ``days``, ``treatments``, ``values``, ``blocks``: every scheduled row (values NaN where missing, so the
    period means use the days the analysis uses); ``calendar``: the exposures' calendar (missing days).
    """
    arms = [a for a in arms if a != reference]
    treatments = np.asarray(treatments).astype(str)
    all_arms = sorted({t for t in treatments.tolist() if t != reference and t not in excluded})
    if not arms or not all_arms:
        return 0.0
    curves = nof1.exposures(days, treatments, all_arms, kinetics, calendar)
    present = np.isfinite(np.asarray(values, dtype=float)) & ~np.isin(treatments, list(excluded))
    on_reference = present & (treatments == reference)
    fits = []   # per arm b: the period-level estimates of every arm from b's curve, and its delivered contrasts
    for curve in curves.T:
        table = nof1.period_arrays(days, treatments, np.where(present, curve, np.nan), excluded, blocks)
        fitted = nof1.period_level(table, reference, arms, trend=trend)
        fits.append({a: (fitted[a].estimate if a in fitted else np.nan,
                         curve[present & (treatments == a)].mean() - curve[on_reference].mean())
                     for a in arms if (present & (treatments == a)).any()})
    worst = 0.0
    for a in arms:
        if a not in all_arms or a not in fits[all_arms.index(a)] or not on_reference.any():
            continue
        own = fits[all_arms.index(a)][a][1]
        if abs(own) < 1e-12:
            continue
        for fit in fits:
            estimate, delivered = fit.get(a, (np.nan, np.nan))
            if np.isfinite(estimate):
                worst = max(worst, abs(estimate - delivered) / abs(own))
    return worst


def period_role(bias: float, washout_half_life: float) -> tuple[str, str]:
    """The period-level method's role given its carryover bias on a fixed-order design, and the note."""
    if bias <= PERIOD_MAX_CARRYOVER_BIAS:
        return INFERENTIAL, ""
    return DESCRIPTIVE, (f"descriptive: with a fixed order, carryover (washout half-life {washout_half_life:g} d) "
                         f"and a trend term, the period-level estimate is off by up to {100 * bias:.0f}% of the "
                         f"delivered contrast (it assumes none; needs <= {100 * PERIOD_MAX_CARRYOVER_BIAS:.0f}%)")

