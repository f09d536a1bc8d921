"""Day-level two-sample tests and the step-model GLS: the descriptive per-patient methods.

They treat a patient's days as the units (Welch, day-level permutation) or the treatment as a step on
its first day (GLS AR(1)); on the shipped designs they read the autocorrelation, the wash-in ramp or a
slow trend as effect or as noise and do not hold their size, so :mod:`synthtrial.analyze.estimators`
labels them descriptive. The anchors (Fu et al.; Schneider et al.) report them, so they stay. Choices:

* **Welch**: unequal-variance t; SE ``sqrt(v1/n1 + v0/n0)``, Welch-Satterthwaite df, t-quantile CI; the
  p-value is scipy's ``ttest_ind(equal_var=False)``. It treats days as independent.
* **Permutation**: difference in means over relabelings of the patient's arm and reference days; exact
  over all ``C(n, k)`` relabelings when there are at most ``exact_limit``, otherwise Monte Carlo with
  ``p = (1 + #{|perm| >= |obs|}) / (1 + n_permutations)``. The CI inverts the test under the additive
  shift model (treated = reference + delta): with the permutations held fixed, each one's statistic is
  linear in delta, so the set ``{delta: p(delta) > alpha}`` is found exactly from the roots of one
  quadratic per permutation; the CI is its hull (infinite when even a far delta is not rejected).
  Relabeling days assumes they are exchangeable, which AR(1) noise violates.
* **GLS AR(1)**: ``y ~ C(treatment) [+ day]`` with ``corr(e_i, e_j) = phi^|day_i - day_j|``, i.e.
  nlme's ``corAR1(form = ~ day)``. A missing day is a gap in the AR(1) chain (``phi^gap``). ``phi`` by
  REML on ``[-0.99, 0.99]`` (grid, then Brent); t-based CIs on n - p df. With a wash-in ramp the step
  regressor misfits and phi absorbs the ramp (phi near 1), shrinking the effect.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from synthtrial.analyze import nof1
from synthtrial.analyze.estimate import (NAN, Estimate, arms_in, check_alpha, dropped_note, join_notes,
                                         missing_estimate, t_quantile, t_two_sided_p, working_frame)
from synthtrial.util.errors import SynthtrialError

# ---------------------------------------------------------------------------------------------------
# Two-sample tests on plain arrays
# ---------------------------------------------------------------------------------------------------

def welch_t(treated: np.ndarray, reference: np.ndarray, alpha: float = 0.05) -> Estimate:
    """Difference in means ``treated - reference`` with Welch's SE, Welch-Satterthwaite df and a t CI.

    The p-value is the one ``scipy.stats.ttest_ind(..., equal_var=False)`` gives. Fewer than two values
    in a group leave SE, CI and p as NaN (the variance is unknown); zero variance in both groups gives
    SE 0, a point CI and p NaN (the t statistic is undefined), as scipy does.
    """
    check_alpha(alpha)
    x = np.asarray(treated, dtype=float).ravel()
    y = np.asarray(reference, dtype=float).ravel()
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise SynthtrialError("welch_t: values must be finite (drop missing values first)")
    if x.size == 0 or y.size == 0:
        raise SynthtrialError(f"welch_t: both groups need values (treated {x.size}, reference {y.size})")
    estimate = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return missing_estimate(f"needs at least 2 values per group (treated {x.size}, reference {y.size})", estimate)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return Estimate(estimate, 0.0, estimate, estimate, NAN, None, "zero variance in both groups")
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    p = t_two_sided_p(estimate / se, df)  # = scipy's ttest_ind(equal_var=False), less overhead
    half = t_quantile(1.0 - alpha / 2.0, df) * se
    return Estimate(estimate, se, estimate - half, estimate + half, p, float(df))


def permutation_test(values: np.ndarray, treated: np.ndarray, *, n_permutations: int = 5000, seed: int = 0,
                     exact_limit: int = 20000, alpha: float = 0.05) -> Estimate:
    """Permutation test of the difference in means between ``values[treated]`` and the rest.

    Two-sided: exact proportion of all ``C(n, k)`` relabelings with ``|stat| >= |obs|`` when
    ``C(n, k) <= exact_limit`` (note ``"exact"``), else ``(1 + #) / (1 + n_permutations)`` over random
    relabelings drawn from ``seed``. Ties count with a tolerance of 1e-12 relative to the data's scale.
    ``se`` is NaN (a permutation test has none); the CI inverts the test under a constant additive
    effect, using the same relabelings for every shift, and is the hull of the accepted shifts.
    """
    check_alpha(alpha)
    y = np.asarray(values, dtype=float).ravel()
    t = np.asarray(treated).ravel()
    if t.dtype != bool:
        if not np.all(np.isin(t, (0, 1))):
            raise SynthtrialError("permutation_test: 'treated' must be a boolean mask")
        t = t.astype(bool)
    if t.size != y.size:
        raise SynthtrialError(f"permutation_test: {y.size} values but a mask of {t.size}")
    if not np.all(np.isfinite(y)):
        raise SynthtrialError("permutation_test: values must be finite (drop missing values first)")
    n, k = y.size, int(t.sum())
    if k == 0 or k == n:
        raise SynthtrialError(f"permutation_test: both groups need values (treated {k}, reference {n - k})")
    if int(n_permutations) < 1:
        raise SynthtrialError(f"permutation_test: n_permutations must be at least 1, got {n_permutations}")

    # stat = mean(treated) - mean(rest) = c * sum over the treated set of the centred values
    c = n / (k * (n - k))
    yc = y - y.mean()
    obs = c * float(yc[t].sum())
    n_total = math.comb(n, k)
    if n_total <= exact_limit:
        sets = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), k)),
                           dtype=np.intp, count=n_total * k).reshape(n_total, k)
        perm_stats = c * yc[sets].sum(axis=1)
        overlap = t[sets].sum(axis=1)
        offset, denominator, note = 0, n_total, "exact"
    else:
        rng = np.random.default_rng(seed)
        perm_stats = np.empty(int(n_permutations))
        overlap = np.empty(int(n_permutations), dtype=np.intp)
        chunk = max(1, 2_000_000 // n)
        for start in range(0, int(n_permutations), chunk):
            stop = min(start + chunk, int(n_permutations))
            masks = rng.permuted(np.tile(t, (stop - start, 1)), axis=1)
            perm_stats[start:stop] = c * (masks @ yc)
            overlap[start:stop] = masks @ t.astype(np.intp)
        offset, denominator, note = 1, int(n_permutations) + 1, f"monte carlo, {int(n_permutations)} permutations"
    tol = 1e-12 * max(1.0, float(np.abs(yc).max()))
    p = (offset + int(np.count_nonzero(np.abs(perm_stats) >= abs(obs) - tol))) / denominator
    # each relabeling's mean difference in the treated labels (1 for the observed labels)
    slope = overlap / k - (k - overlap) / (n - k)
    low, high = _invert_permutation(obs, perm_stats, slope, offset, denominator, alpha)
    return Estimate(obs, NAN, low, high, float(min(p, 1.0)), None, note)


def _invert_permutation(obs: float, a: np.ndarray, b: np.ndarray, offset: int, denominator: int,
                        alpha: float) -> tuple[float, float]:
    """Hull of ``{d: p(d) > alpha}``, where p(d) tests the shift d with the same relabelings.

    Shifting the treated values by ``-d`` turns relabeling j's statistic into ``a_j - d * b_j`` and the
    observed one into ``obs - d``; j counts when ``(a_j - d b_j)^2 >= (obs - d)^2``, a concave quadratic
    in d (``|b_j| <= 1``), so it counts on a closed interval between two roots (or never). Relabelings with
    ``|b_j| = 1`` (the observed labels, and their mirror when both groups are equally large) always count.
    """
    always = np.abs(np.abs(b) - 1.0) < 1e-9
    qa = b[~always] ** 2 - 1.0
    qb = 2.0 * (obs - a[~always] * b[~always])
    qc = a[~always] ** 2 - obs ** 2
    disc = qb ** 2 - 4.0 * qa * qc
    real = disc >= 0.0
    root = np.sqrt(disc[real])
    # qa < 0: the quadratic is >= 0 between its roots
    r1 = np.sort((-qb[real] + root) / (2.0 * qa[real]))
    r2 = np.sort((-qb[real] - root) / (2.0 * qa[real]))
    base = offset + int(np.count_nonzero(always))
    if base / denominator > alpha:
        return -math.inf, math.inf  # far shifts are never rejected
    points = np.concatenate([r1, r2])
    counts = base + np.searchsorted(r1, points, side="right") - np.searchsorted(r2, points, side="left")
    accepted = points[counts / denominator > alpha]
    if accepted.size == 0:  # cannot happen for the observed shift (p = 1) but keep the CI honest
        return NAN, NAN
    return float(accepted.min()), float(accepted.max())


# ---------------------------------------------------------------------------------------------------
# Model-based estimates on tidy frames
# ---------------------------------------------------------------------------------------------------

def gls_ar1(frame: pd.DataFrame, outcome: str, reference: str, *, trend: bool = False,
            alpha: float = 0.05) -> dict[str, Estimate]:
    """One patient's effects by GLS with AR(1) errors over the day index (nlme ``gls`` + ``corAR1``).

    Model ``y ~ C(treatment, Treatment(reference)) [+ day]``; ``phi`` by REML, gap-aware (a missing day
    is a step of ``phi^gap``, not ``phi``); the note reports ``phi``. Returns one :class:`Estimate` per
    arm present, with t-based CIs on ``n - p`` df. Needs one row per day.
    """
    check_alpha(alpha)
    need = ["day"] + (["patient_id"] if isinstance(frame, pd.DataFrame) and "patient_id" in frame.columns else [])
    work, dropped = working_frame(frame, outcome, reference, need)
    if "patient_id" in work and work["patient_id"].nunique() > 1:
        raise SynthtrialError(f"gls_ar1 fits one patient's series; got {work['patient_id'].nunique()} patients")
    if work["day"].duplicated().any():
        raise SynthtrialError("gls_ar1 needs one row per day; average repeated rows (e.g. views) first")
    arms = arms_in(work, reference)
    return gls_ar1_arrays(work["day"].to_numpy(), work["treatment"].to_numpy(dtype=str),
                          work["y"].to_numpy(dtype=float), reference, arms, trend=trend, alpha=alpha,
                          note=dropped_note(dropped, outcome))


def gls_ar1_arrays(days: np.ndarray, treatments: np.ndarray, y: np.ndarray, reference: str, arms: Sequence[str], *,
                   trend: bool = False, alpha: float = 0.05, note: str = "") -> dict[str, Estimate]:
    """:func:`gls_ar1` on one patient's arrays (one value per day, no missing values), without the checks;
    ``note`` is added to every estimate's note."""
    order = np.argsort(days, kind="stable")
    days, treatments, y = np.asarray(days)[order], np.asarray(treatments)[order], np.asarray(y, dtype=float)[order]
    cols = [np.ones(days.size)] + [(treatments == arm).astype(float) for arm in arms]
    x = np.column_stack(cols + ([days.astype(float)] if trend else []))
    n, p = x.shape
    if np.linalg.matrix_rank(x) < p:
        return {arm: missing_estimate(join_notes("design is rank deficient (treatment confounded with the trend?)", note))
                for arm in arms}
    if n - p < 3:
        return {arm: missing_estimate(join_notes(f"too few days ({n}) for {p} coefficients and phi", note)) for arm in arms}
    gaps = np.diff(days).astype(float)
    df = float(n - p)
    ols, *_ = np.linalg.lstsq(x, y, rcond=None)
    ssr = float(np.sum((y - x @ ols) ** 2))
    if ssr <= 1e-24 * max(1.0, float(np.sum(y ** 2))):  # no noise: any phi fits, the effects are exact
        exact = join_notes("no residual variation: phi undefined", note)
        return {arm: Estimate(float(ols[1 + i]), 0.0, float(ols[1 + i]), float(ols[1 + i]), NAN, df, exact)
                for i, arm in enumerate(arms)}
    beta, cov, phi, _ = nof1.gls_fit(y, x, gaps)
    q = t_quantile(1.0 - alpha / 2.0, df)
    n_gaps = int(np.count_nonzero(gaps > 1))
    fit_note = join_notes(f"phi={phi:.4f} (REML)",
                     f"{n_gaps} gap(s) in days, AR(1) steps phi^gap" if n_gaps else "",
                     "phi at its bound" if abs(phi) >= nof1.PHI_BOUND - 1e-4 else "",
                     "trend-adjusted" if trend else "", note)
    out: dict[str, Estimate] = {}
    for i, arm in enumerate(arms):
        est, se = float(beta[1 + i]), float(math.sqrt(max(cov[1 + i, 1 + i], 0.0)))
        out[arm] = Estimate(est, se, est - q * se, est + q * se, t_two_sided_p(est / se, df) if se > 0 else NAN,
                            df, fit_note)
    return out
