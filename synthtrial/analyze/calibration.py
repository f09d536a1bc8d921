"""An outcome's scale against the truth: calibration slope, and standardised effects with honest intervals.

Two questions that a single "share of the true effect" mixed up, kept apart:

* **Attenuation** — how much of the true effect an outcome shows, in its own units: the **calibration
  slope** (:func:`calibration_slope`), the per-patient estimates (outcome scale) regressed on the true effects
  they target (severity scale), per patient and arm, through the origin (a zero contrast on the severity scale
  is a zero contrast on any scale): ``b = sum(x y) / sum(x^2)``, SE ``s / sqrt(sum(x^2))`` with
  ``s^2 = sum((y - b x)^2) / (n - 1)``, t on ``n - 1`` df. On the severity scale 1 means nothing is lost
  (``1 - b`` is the attenuation); on another scale ``b`` is the outcome's units per severity unit. Noise in
  the estimates widens its interval but does not move it (the truth, the regressor, is exact), so an unbiased
  but noisier outcome keeps a slope of 1. The points of one patient's two arms are treated as independent.
* **Noise** — the outcome's within-patient residual SD (``residual_sd``), in its own units.

A standardised effect ``d = estimate / s`` divides by an *estimated* SD ``s`` (``nu`` residual df), so its
interval must carry that SD's uncertainty too: by the delta method, ``Var(d) = SE^2 / s^2 + d^2 / (2 nu)``
(the large-sample variance of a standardised mean difference, Hedges & Olkin 1985, ch. 5, with the SD's
df in place of ``n1 + n2``); the interval is ``d +- q sqrt(Var(d))`` with the row's own critical value ``q``
(its CI half-width over its SE; the normal quantile where the SE is 0). :func:`standardized_interval`.
"""

from __future__ import annotations

import math

import numpy as np

from synthtrial.analyze.estimate import NAN, t_quantile


def calibration_slope(estimates: np.ndarray, truths: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Slope of ``estimates`` on ``truths`` through the origin and its ``1 - alpha`` CI (see the module docstring).

    Pairs with a NaN on either side are left out. NaN slope without pairs or where every truth is 0; NaN CI with
    a single pair.
    """
    y, x = np.asarray(estimates, dtype=float), np.asarray(truths, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    sxx = float(x @ x)
    if x.size == 0 or sxx <= 0:
        return NAN, NAN, NAN
    slope = float(x @ y) / sxx
    if x.size < 2:
        return slope, NAN, NAN
    s2 = float(np.sum((y - slope * x) ** 2)) / (x.size - 1)
    half = t_quantile(1 - alpha / 2, x.size - 1) * math.sqrt(s2 / sxx)
    return slope, slope - half, slope + half


def standardized_interval(estimate: np.ndarray, se: np.ndarray, ci_low: np.ndarray, ci_high: np.ndarray,
                          sd: np.ndarray, df: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, ...]:
    """``(d, low, high)``: each effect divided by its outcome's estimated SD, with the delta-method interval
    that accounts for that SD's ``df`` (see the module docstring). Element-wise; NaN where the SD, its df or
    the row's CI is missing."""
    from scipy import stats

    estimate, se, ci_low, ci_high, sd, df = (np.asarray(v, dtype=float) for v in (estimate, se, ci_low, ci_high, sd,
                                                                                   df))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = estimate / sd
        q = np.where(se > 0, (ci_high - ci_low) / (2 * se), stats.norm.ppf(1 - alpha / 2))
        half = q * np.sqrt((se / sd) ** 2 + d ** 2 / (2 * df))
    missing = ~(np.isfinite(half) & np.isfinite(ci_low) & np.isfinite(ci_high) & (df > 0))
    return d, np.where(missing, NAN, d - half), np.where(missing, NAN, d + half)
