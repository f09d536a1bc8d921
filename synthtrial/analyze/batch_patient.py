"""The per-patient methods of :func:`synthtrial.analyze.stats.analyze_outcome` for many series of one schedule.

A :class:`PatientPlan` holds what one patient's schedule decides (its rows, periods, arms, design matrices,
role and the parts of every note that do not depend on the outcome); :func:`fit_series` fits each
per-patient method to a stack of outcomes on that schedule (S series x the plan's rows) and returns, per
method, arrays of estimates and the notes, the same numbers as :mod:`synthtrial.analyze.estimators` gives one
series at a time (the GLS fits through :mod:`synthtrial.analyze.batch_gls`). Where a series needs what the
batch does not do (no variation, a zero SE), its index is returned in ``fallback``: the caller redoes that
replicate with today's code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from synthtrial.analyze import nof1, roles
from synthtrial.analyze.batch_gls import AR1MomentsBatch, fit_phi_batch, satterthwaite_batch
from synthtrial.analyze.estimate import NAN, join_notes
from synthtrial.analyze.estimators import DESCRIPTIVE, INFERENTIAL, NOT_AVAILABLE

#: The per-patient methods this module fits.
PATIENT_METHODS = ("period", "randomization", "gls_kinetics", "welch", "gls_ar1", "hac")


@dataclass
class Fitted:
    """One method's results for S series over its arms A: arrays (S, A) and a note per series and arm."""

    arms: list[str]
    estimate: np.ndarray
    se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p: np.ndarray
    notes: list[list[str]]
    n: list[int]
    role: str
    role_notes: list[str] = field(default_factory=list)


def t_interval(est: np.ndarray, se: np.ndarray, df: Any, alpha: float) -> tuple[np.ndarray, ...]:
    """``(low, high, p)`` of t intervals and two-sided p-values (estimate.t_quantile / t_two_sided_p, vectorised)."""
    q = special.stdtrit(df, 1 - alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2.0 * special.stdtr(df, -np.abs(est / se))
    return est - q * se, est + q * se, p


def rounding_only(est: np.ndarray, se: np.ndarray) -> np.ndarray:
    """Series (rows of S x A) whose SE is 0 or rounding noise (an exact fit): today's code keeps the noise as an
    SE, so the intervals built on it are noise too; the batch leaves those series to it."""
    return ~(se > 1e-12 * np.maximum(1.0, np.abs(est))).all(axis=1)


def _missing(s_count: int, arms: list[str], note: str, estimate: np.ndarray | None = None) -> tuple:
    est = np.full((s_count, len(arms)), NAN) if estimate is None else estimate
    nan = np.full(est.shape, NAN)
    return est, nan, nan.copy(), nan.copy(), nan.copy(), [[note] * len(arms) for _ in range(s_count)]


class PatientPlan:
    """What one patient's schedule fixes for every per-patient method (see the module docstring)."""

    def __init__(self, rows: np.ndarray, days: np.ndarray, treatments: np.ndarray, blocks: np.ndarray,
                 trial_arms: list[str], options: Any, calendar: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.options = o = options
        self.rows = rows                # the patient's calendar days that have a row (not missing)
        self.days, self.treatments, self.blocks, self.calendar = days, treatments, blocks, calendar
        self.use = ~np.isin(treatments, list(o.excluded))
        self.use_days, self.use_t = days[self.use], treatments[self.use]
        self.n = int(self.use.sum())
        self.arms = [a for a in trial_arms if (self.use_t == a).any()]
        self.complete = bool((self.use_t == o.reference).any()) and bool(self.arms)
        self._periods()

    # ------------------------------------------------------------------ periods
    def _periods(self) -> None:
        o = self.options
        change = np.ones(self.days.size, dtype=bool)
        change[1:] = self.treatments[1:] != self.treatments[:-1]
        labels = np.asarray([str(b) for b in self.blocks])
        change[1:] |= labels[1:] != labels[:-1]
        starts = np.flatnonzero(change)
        counts = np.add.reduceat(np.ones(self.days.size, dtype=int), starts)
        day_sums = np.add.reduceat(self.days.astype(float), starts)
        names = self.treatments[starts]
        keep = (counts > 0) & ~np.isin(names, list(o.excluded))
        self.period_starts, self.period_counts, self.period_keep = starts, counts, keep
        self.labels = names[keep].tolist()
        self.mids = (day_sums / counts)[keep]
        self.period_n = counts[keep].astype(int)
        self.period_arms = [a for a in self.arms if a in self.labels]
        if o.reference not in self.labels or not self.period_arms:
            self.complete = False

    def period_means(self, y: np.ndarray) -> np.ndarray:
        return (np.add.reduceat(y, self.period_starts, axis=1) / self.period_counts)[:, self.period_keep]

    def period_design(self, labels: tuple[str, ...] | list[str]) -> np.ndarray:
        cols = [np.ones(len(labels))] + [np.asarray([lab == arm for lab in labels], dtype=float)
                                         for arm in self.period_arms]
        if self.options.trend:
            cols.append(self.mids - self.mids.mean())
        return np.column_stack(cols)

    def period_role(self) -> tuple[str, str]:
        o = self.options
        note = roles.period_correlation_note(o.ar_phi, float(np.median(self.period_n)) if self.period_n.size else NAN)
        kinetics = o.kinetics
        if o.design_known and o.orders is None and o.trend and kinetics is not None and kinetics.washout_half_life > 0:
            bias = roles.period_carryover_bias(self.days, self.treatments, np.zeros(self.days.size), set(o.excluded),
                                               self.blocks, o.reference, self.arms, kinetics, trend=o.trend,
                                               calendar=self.calendar)
            role, why = roles.period_role(bias, kinetics.washout_half_life)
            return role, join_notes(why, note)
        return INFERENTIAL, note


def fit_period(plan: PatientPlan, means: np.ndarray, fallback: set[int]) -> Fitted:
    """``period`` (nof1.period_level) on the period means (S, k)."""
    o, arms = plan.options, plan.period_arms
    s_count = means.shape[0]
    x = plan.period_design(plan.labels)
    k, p = x.shape
    role, why = plan.period_role()
    n = [len(plan.labels)] * len(arms)
    if k < p or np.linalg.matrix_rank(x) < p or k - p < 1:
        if k < p:
            parts = _missing(s_count, arms, f"{k} periods leave no df for {p} coefficients")
        elif np.linalg.matrix_rank(x) < p:
            parts = _missing(s_count, arms, "periods cannot separate the arms" + (" from the trend" if o.trend else ""))
        else:
            beta = means @ np.linalg.pinv(x).T
            parts = _missing(s_count, arms, f"{k} periods leave no df for {p} coefficients", beta[:, 1:1 + len(arms)])
        return Fitted(arms, *parts, n, role, [why] * len(arms))
    beta = means @ np.linalg.pinv(x).T
    df = k - p
    resid = means - beta @ x.T
    sigma2 = np.sum(resid * resid, axis=1) / df
    diag = np.diag(np.linalg.inv(x.T @ x))[1:1 + len(arms)]
    est = beta[:, 1:1 + len(arms)]
    se = np.sqrt(np.maximum(sigma2[:, None] * diag[None, :], 0.0))
    fallback.update(np.flatnonzero(rounding_only(est, se)).tolist())
    low, high, pval = t_interval(est, se, float(df), o.alpha)
    note = f"{k} periods, t on {df} df" + ("; trend-adjusted" if o.trend else "")
    return Fitted(arms, est, se, low, high, pval, [[note] * len(arms)] * s_count, n, role, [why] * len(arms))


def fit_randomization(plan: PatientPlan, means: np.ndarray, period: Fitted, fallback: set[int],
                      series: np.ndarray) -> Fitted:
    """``randomization`` (nof1.randomization_test over the design's orders; a fixed order: no test)."""
    o = plan.options
    s_count = means.shape[0]
    if o.orders is None:
        arms = plan.arms
        est = np.column_stack([period.estimate[:, period.arms.index(a)] if a in period.arms else np.full(s_count, NAN)
                               for a in arms])
        parts = _missing(s_count, arms, "no randomisation test: the design's order is fixed (not randomised)", est)
        return Fitted(arms, *parts, [len(plan.labels)] * len(arms), NOT_AVAILABLE,
                      ["not available: it cannot reject on a fixed-order design"] * len(arms))
    smallest = nof1.smallest_attainable_p(o.orders)
    role, why = INFERENTIAL, ""
    if smallest > o.alpha:
        role, why = NOT_AVAILABLE, (f"not available: {len(o.orders)} possible orders, smallest attainable p "
                                    f"{smallest:.4g} > alpha {o.alpha:g}")
    arms, labels = plan.period_arms, tuple(plan.labels)
    n = [len(labels)] * len(arms)
    matching = [order for order in o.orders if len(order) == len(labels)]
    if labels not in set(matching):
        parts = _missing(s_count, arms, "the patient's periods do not follow the design's scheme")
        return Fitted(arms, *parts, n, role, [why] * len(arms))
    if len(matching) > nof1.EXACT_LIMIT:
        fallback.update(series.tolist())
        return Fitted(arms, *_missing(s_count, arms, ""), n, role, [why] * len(arms))
    rows = []
    for order in [labels, *matching]:
        x = plan.period_design(order)
        rows.append(np.full((len(arms), x.shape[0]), NAN) if np.linalg.matrix_rank(x) < x.shape[1]
                    else np.linalg.pinv(x)[1:1 + len(arms)])
    stats = np.einsum("sk,oak->soa", means, np.stack(rows))
    observed, null = stats[:, 0], stats[:, 1:]
    finite = np.isfinite(null)
    scale = np.where(finite.any(axis=(1, 2)), np.nanmax(np.where(finite, np.abs(null), -np.inf), axis=(1, 2)), 1.0)
    tol = 1e-12 * np.maximum(1.0, scale)
    hits = (np.abs(null) >= np.abs(observed)[:, None, :] - tol[:, None, None]) & finite
    pval = hits.sum(axis=1) / finite.sum(axis=1)
    note = f"exact over {len(matching)} orders" + ("; trend-adjusted" if o.trend else "")
    nan = np.full(observed.shape, NAN)
    return Fitted(arms, observed, nan, nan, nan, pval, [[note] * len(arms)] * s_count, n, role, [why] * len(arms))


def fit_welch(plan: PatientPlan, y: np.ndarray, fallback: set[int], series: np.ndarray) -> Fitted:
    """``welch`` (daylevel.welch_t) of each arm's days against the reference days."""
    o, s_count = plan.options, y.shape[0]
    ref = y[:, plan.use_t == o.reference]
    out = [np.zeros((s_count, len(plan.arms))) for _ in range(5)]
    notes = [["" for _ in plan.arms] for _ in range(s_count)]
    n = []
    for j, arm in enumerate(plan.arms):
        x = y[:, plan.use_t == arm]
        n.append(x.shape[1] + ref.shape[1])
        est = x.mean(axis=1) - ref.mean(axis=1)
        if x.shape[1] < 2 or ref.shape[1] < 2:
            parts = _missing(s_count, [arm], f"needs at least 2 values per group (treated {x.shape[1]}, reference "
                                            f"{ref.shape[1]})", est[:, None])
            for k in range(5):
                out[k][:, j] = parts[k][:, 0]
            for row, note in zip(notes, parts[5], strict=True):
                row[j] = note[0]
            continue
        vx, vy = x.var(axis=1, ddof=1) / x.shape[1], ref.var(axis=1, ddof=1) / ref.shape[1]
        se = np.sqrt(vx + vy)
        fallback.update(series[rounding_only(est[:, None], se[:, None])].tolist())
        with np.errstate(divide="ignore", invalid="ignore"):
            df = (vx + vy) ** 2 / (vx ** 2 / (x.shape[1] - 1) + vy ** 2 / (ref.shape[1] - 1))
        low, high, pval = t_interval(est, se, df, o.alpha)
        for k, value in enumerate((est, se, low, high, pval)):
            out[k][:, j] = value
    return Fitted(plan.arms, *out, notes, n, DESCRIPTIVE, [""] * len(plan.arms))


def fit_hac(plan: PatientPlan, y: np.ndarray, fallback: set[int], series: np.ndarray) -> Fitted:
    """``hac`` (nof1.hac: OLS with Newey-West SEs, Bartlett kernel, small-sample correction)."""
    from statsmodels.tools.tools import pinv_extended

    o, s_count, d, t = plan.options, y.shape[0], plan.use_days.astype(float), plan.use_t
    arms = [a for a in plan.arms if (t == a).any()]
    cols = [np.ones(d.size)] + [(t == a).astype(float) for a in arms] + ([d - d.mean()] if o.trend else [])
    x = np.column_stack(cols)
    n, p = x.shape
    if n - p < 2 or np.linalg.matrix_rank(x) < p:
        parts = _missing(s_count, arms, "too few days or a rank-deficient design")
        return Fitted(arms, *parts, [plan.n] * len(arms), DESCRIPTIVE, [""] * len(arms))
    lags = int(math.floor(4 * (n / 100) ** (2 / 9)))
    pinv, _ = pinv_extended(x)
    params = y @ pinv.T
    xxi = pinv @ pinv.T
    xu = x[None] * (y - params @ x.T)[:, :, None]
    weights = 1 - np.arange(lags + 1) / (lags + 1)
    meat = weights[0] * np.matmul(xu.transpose(0, 2, 1), xu)
    for lag in range(1, lags + 1):
        s = np.matmul(xu[:, lag:].transpose(0, 2, 1), xu[:, :-lag])
        meat += weights[lag] * (s + s.transpose(0, 2, 1))
    cov = np.matmul(np.matmul(xxi[None], meat), xxi.T[None]) * (n / float(n - p))
    est = params[:, 1:1 + len(arms)]
    se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2)[:, 1:1 + len(arms)])
    fallback.update(series[rounding_only(est, se)].tolist())
    df = float(n - p)
    low, high, pval = t_interval(est, se, df, o.alpha)
    note = f"Newey-West, {lags} lags, t on {n - p} df" + ("; trend-adjusted" if o.trend else "")
    return Fitted(arms, est, se, low, high, pval, [[note] * len(arms)] * s_count, [plan.n] * len(arms), DESCRIPTIVE,
                  [""] * len(arms))


def no_variation(y: np.ndarray) -> np.ndarray:
    """Series whose values do not vary (the GLS fits' exact-fit branch, left to today's code)."""
    centred = y - y.mean(axis=1, keepdims=True)
    return np.sum(centred ** 2, axis=1) <= 1e-24 * np.maximum(1.0, np.sum(y * y, axis=1))


def fit_gls_kinetics(plan: PatientPlan, y: np.ndarray, fallback: set[int], series: np.ndarray) -> Fitted:
    """``gls_kinetics`` (nof1.gls_kinetics with known half-lives): GLS-AR(1) on the exposure curves."""
    o, s_count = plan.options, y.shape[0]
    d, t, arms = plan.use_days, plan.use_t, plan.arms
    all_arms = sorted({a for a in plan.treatments.tolist() if a != o.reference and a not in o.excluded})
    p = 1 + len(all_arms) + int(o.trend)
    role, why = roles.gls_kinetics_role(plan.n, o.ar_phi, "the design's")
    if d.size - p < 3:
        parts = _missing(s_count, arms, f"too few days ({d.size}) for {p} coefficients and phi")
        return Fitted(arms, *parts, [plan.n] * len(arms), role, [why] * len(arms))
    curves = nof1.exposures(plan.days, plan.treatments, all_arms, o.kinetics, plan.calendar)[plan.use]
    x = np.column_stack([np.ones(d.size), curves] + ([(d - d.mean())[:, None].astype(float)] if o.trend else []))
    if np.linalg.matrix_rank(x) < x.shape[1]:
        parts = _missing(s_count, arms, "exposures and trend are collinear")
        return Fitted(arms, *parts, [plan.n] * len(arms), role, [why] * len(arms))
    fallback.update(series[no_variation(y)].tolist())
    gaps = np.diff(d).astype(float)
    contrasts = np.zeros((len(arms), x.shape[1]))
    for j, arm in enumerate(arms):
        contrasts[j, 1:1 + len(all_arms)] = (x[t == arm, 1:1 + len(all_arms)].mean(axis=0)
                                             - x[t == o.reference, 1:1 + len(all_arms)].mean(axis=0))
    moments = AR1MomentsBatch(y, x, gaps)
    phi, _ = fit_phi_batch(moments)
    beta, xx_inv, rss = moments.solve(phi)
    sigma2 = rss / (d.size - x.shape[1])
    cov = sigma2[:, None, None] * xx_inv
    est = np.matmul(np.broadcast_to(contrasts, (s_count, *contrasts.shape)), beta[:, :, None])[:, :, 0]
    var = np.einsum("ai,sij,aj->sa", contrasts, cov, contrasts)
    se = np.sqrt(np.maximum(var, 0.0))
    fallback.update(series[rounding_only(est, se)].tolist())
    df = satterthwaite_batch(moments, phi, sigma2, contrasts)
    low, high, pval = t_interval(est, se, df, o.alpha)
    kin = f"half-lives in {o.kinetics.washin_half_life:g} d / out {o.kinetics.washout_half_life:g} d"
    tail = "; ".join([kin, "delivered contrast of steady-state effects"] + (["trend-adjusted"] if o.trend else []))
    notes = [[f"phi={phi[s]:.4f} (REML); {tail}; Satterthwaite t on {df[s, j]:.1f} df" for j in range(len(arms))]
             for s in range(s_count)]
    return Fitted(arms, est, se, low, high, pval, notes, [plan.n] * len(arms), role, [why] * len(arms))


def fit_gls_ar1(plan: PatientPlan, y: np.ndarray, fallback: set[int], series: np.ndarray) -> Fitted:
    """``gls_ar1`` (daylevel.gls_ar1_arrays): GLS-AR(1) with the treatment as a step."""
    o, s_count, d, t, arms = plan.options, y.shape[0], plan.use_days, plan.use_t, plan.arms
    cols = [np.ones(d.size)] + [(t == arm).astype(float) for arm in arms]
    x = np.column_stack(cols + ([d.astype(float)] if o.trend else []))
    n, p = x.shape
    if np.linalg.matrix_rank(x) < p or n - p < 3:
        note = ("design is rank deficient (treatment confounded with the trend?)" if np.linalg.matrix_rank(x) < p
                else f"too few days ({n}) for {p} coefficients and phi")
        return Fitted(arms, *_missing(s_count, arms, note), [plan.n] * len(arms), DESCRIPTIVE, [""] * len(arms))
    ols = y @ np.linalg.pinv(x).T
    ssr = np.sum((y - ols @ x.T) ** 2, axis=1)
    fallback.update(series[ssr <= 1e-24 * np.maximum(1.0, np.sum(y ** 2, axis=1))].tolist())
    gaps = np.diff(d).astype(float)
    moments = AR1MomentsBatch(y, x, gaps)
    phi, _ = fit_phi_batch(moments)
    beta, xx_inv, rss = moments.solve(phi)
    cov = (rss / (n - p))[:, None, None] * xx_inv
    est = beta[:, 1:1 + len(arms)]
    se = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2)[:, 1:1 + len(arms)], 0.0))
    fallback.update(series[rounding_only(est, se)].tolist())
    low, high, pval = t_interval(est, se, float(n - p), o.alpha)
    pval = np.where(se > 0, pval, NAN)
    n_gaps = int(np.count_nonzero(gaps > 1))
    notes = []
    for s in range(s_count):
        note = join_notes(f"phi={phi[s]:.4f} (REML)", f"{n_gaps} gap(s) in days, AR(1) steps phi^gap" if n_gaps else "",
                          "phi at its bound" if abs(phi[s]) >= nof1.PHI_BOUND - 1e-4 else "",
                          "trend-adjusted" if o.trend else "")
        notes.append([note] * len(arms))
    return Fitted(arms, est, se, low, high, pval, notes, [plan.n] * len(arms), DESCRIPTIVE, [""] * len(arms))
