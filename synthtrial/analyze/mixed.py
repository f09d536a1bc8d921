"""Pooled effects: a REML linear mixed model (statsmodels ``mixedlm``) with cluster-robust inference.

``y ~ C(treatment) [+ day_centred]``, groups ``patient_id``; ``day_centred`` is the day minus the
patient's mean day, so the trend is a within-patient slope. Random intercept plus random treatment
slopes when asked. The model's weights give the estimate; its inference is not trusted, because a
patient's days are autocorrelated (AR(1) noise, slow kinetics) and model-based Wald tests reject about
15% of null trials on the anchor design. Standard errors are cluster-robust over patients
(:mod:`synthtrial.analyze.robust`), reported two ways:

* ``lmm`` — **CR2** (bias-reduced linearisation, R clubSandwich's default) with Satterthwaite-type df
  under the working model: the small-sample choice for trials of 3-10 patients;
* ``lmm_cr1`` — CR1 (factor G / (G - 1)) with t on G - 1 df, as before.

Fallbacks, each said in the note: the random-slopes fit is abandoned for a random intercept
(``random intercept only: <reason>``) when there are no more patients than random effects, when it
raises or does not converge, when the random-effects covariance is singular (smallest eigenvalue below
1e-6 of the largest variance or of the residual variance), when statsmodels finds the Hessian not
positive definite there, or when an arm's model SE is not finite. The random-intercept model is fitted
by :func:`random_intercept_reml` (exact REML from per-patient sums; equal to statsmodels' fit, and
about 10 times faster), which cannot fail: an optimum at intercept variance 0 is a ``boundary fit``
(then the model is OLS), as lme4 reports it, so a trial never drops out silently. Only a model that
cannot be fitted at all (no residual variation, collinear design) returns NaN with the reason. statsmodels' convergence warnings are caught and listed in the note instead of printed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize

from synthtrial.analyze.estimate import (Estimate, arms_in, check_alpha, dropped_note, join_notes, missing_estimate,
                                         working_frame, t_quantile, t_two_sided_p)
from synthtrial.analyze.robust import cluster_robust_low_rank

#: ``method`` names of the two pooled variants.
CR2, CR1 = "lmm", "lmm_cr1"


def mixed_model(frame: pd.DataFrame, outcome: str, reference: str, *, trend: bool = True,
                random_slopes: bool = True, alpha: float = 0.05, correction: str = "CR2",
                exposure_columns: dict[str, str] | None = None) -> dict[str, Estimate]:
    """Pooled effects from a REML linear mixed model over patients (see the module docstring).

    ``correction`` picks the cluster-robust inference: ``"CR2"`` (Satterthwaite df) or ``"CR1"`` (G - 1 df).
    """
    if correction not in ("CR1", "CR2"):
        raise ValueError(f"correction must be 'CR1' or 'CR2', got {correction!r}")
    both = mixed_model_both(frame, outcome, reference, trend=trend, random_slopes=random_slopes, alpha=alpha,
                            exposure_columns=exposure_columns)
    return both[CR2 if correction == "CR2" else CR1]


def mixed_model_both(frame: pd.DataFrame, outcome: str, reference: str, *, trend: bool = True,
                     random_slopes: bool = True, alpha: float = 0.05,
                     exposure_columns: dict[str, str] | None = None) -> dict[str, dict[str, Estimate]]:
    """One fit, both inferences: ``{"lmm": {arm: CR2 estimate}, "lmm_cr1": {arm: CR1 estimate}}``.

    Treatments enter as indicators (a step on the first day), or, with ``exposure_columns`` (arm -> column
    of ``frame`` holding that arm's exposure curve, see :func:`synthtrial.analyze.nof1.exposures`), through
    their exposure kinetics; then each arm's estimate is the delivered contrast (mean exposure on the arm's
    days minus on reference days, times the steady-state effects) averaged over patients.
    """
    check_alpha(alpha)
    extra = list((exposure_columns or {}).values())
    work, dropped = working_frame(frame, outcome, reference, ["patient_id", "day", *extra])
    arms = arms_in(work, reference)
    base_note = dropped_note(dropped, outcome)
    n_patients = work["patient_id"].nunique()

    def missing(note: str) -> dict[str, dict[str, Estimate]]:
        return {key: {arm: missing_estimate(note) for arm in arms} for key in (CR2, CR1)}

    if n_patients < 2:
        return missing(join_notes(f"a mixed model needs at least 2 patients, got {n_patients}", base_note))
    if exposure_columns is not None and any(arm not in exposure_columns for arm in arms):
        raise ValueError(f"exposure_columns must name a column for every arm ({', '.join(arms)})")
    y = work["y"].to_numpy(dtype=float)
    if float(np.sum((y - y.mean()) ** 2)) <= 1e-24 * max(1.0, float(y @ y)):
        return missing(join_notes("no variation in the outcome: effects and SEs undefined", base_note))
    patients = work["patient_id"].to_numpy()
    treatment = work["treatment"].to_numpy()
    if exposure_columns is None:
        effect_cols = np.column_stack([(treatment == arm).astype(float) for arm in arms])
    else:
        effect_cols = np.column_stack([work[exposure_columns[arm]].to_numpy(dtype=float) for arm in arms])
    cols = [np.ones(y.size), effect_cols]
    if trend:
        day = work["day"].to_numpy(dtype=float)
        cols.append((day - pd.Series(day).groupby(patients).transform("mean").to_numpy())[:, None])
    x = np.column_stack(cols)
    contrasts = pooled_contrasts(effect_cols, treatment, patients, reference, arms, x.shape[1])
    kinetics_note = "treatments through their exposure kinetics (delivered contrast)" if exposure_columns else ""
    trend_note = "trend-adjusted" if trend else ""
    n_random = 1 + len(arms)

    reason = ""
    if random_slopes:
        if n_patients <= n_random:
            reason = f"{n_patients} patients cannot identify {n_random} random effects"
        else:
            result, caught, error = fit_mixed(y, x, patients, x[:, :n_random])
            reason = slopes_problem(result, caught, error, len(arms))
            if not reason:
                note = join_notes("random intercept + treatment slopes", kinetics_note, trend_note,
                             _warning_note(caught), base_note)
                return _mixed_estimates(result, contrasts, arms, alpha, note)
    model_note = f"random intercept only: {reason}" if reason else "random intercept only"
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return missing(join_notes("the fixed effects are collinear", model_note, base_note))
    if y.size - x.shape[1] < 1:
        return missing(join_notes(f"{y.size} rows leave no df for {x.shape[1]} coefficients", model_note, base_note))
    fit = random_intercept_reml(x, y, patients)
    if not (math.isfinite(fit.scale) and fit.scale > 1e-14 * max(1.0, float(np.var(y)))):
        return missing(join_notes("no residual variation: SEs undefined", model_note, base_note))
    boundary = "boundary fit: intercept variance 0 (REML optimum at the bound, as lme4 reports it)" if fit.tau2 == 0 else ""
    note = join_notes(model_note, boundary, kinetics_note, trend_note, base_note)
    return _mixed_estimates(fit, contrasts, arms, alpha, note)


def pooled_contrasts(effect_cols: np.ndarray, treatment: np.ndarray, patients: np.ndarray, reference: str,
               arms: Sequence[str], n_coef: int) -> np.ndarray:
    """Rows: each arm's contrast over the coefficients, averaged over the patients who have the arm."""
    out = np.zeros((len(arms), n_coef))
    rows_of = pd.Series(np.arange(patients.size)).groupby(patients, sort=False).indices
    for i, arm in enumerate(arms):
        per_patient = []
        for rows in rows_of.values():
            own_t, own_cols = treatment[rows], effect_cols[rows]
            on, ref = own_t == arm, own_t == reference
            if on.any() and ref.any():
                per_patient.append(own_cols[on].mean(axis=0) - own_cols[ref].mean(axis=0))
        if per_patient:
            out[i, 1:1 + len(arms)] = np.mean(per_patient, axis=0)
        else:
            out[i, 1 + i] = 1.0
    return out


def fit_mixed(y: np.ndarray, x: np.ndarray, groups: np.ndarray,
               z: np.ndarray) -> tuple[Any, list[str], Exception | None]:
    """statsmodels ``MixedLM`` by REML, its warnings caught (returned as messages) instead of printed."""
    from statsmodels.regression.mixed_linear_model import MixedLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = MixedLM(y, x, groups, exog_re=z).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError, ZeroDivisionError, OverflowError) as error:
            return None, _messages(caught), error
    return result, _messages(caught), None


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, SingularMatrixWarning

    relevant = [w for w in caught if issubclass(w.category, (ConvergenceWarning, SingularMatrixWarning))]
    first_sentences = (" ".join(str(w.message).split()).split(". ")[0].rstrip(".") for w in relevant)
    return list(dict.fromkeys(first_sentences))


def _warning_note(messages: list[str]) -> str:
    return f"statsmodels warned: {' | '.join(messages)}" if messages else ""


def slopes_problem(result: Any, caught: list[str], error: Exception | None, n_arms: int) -> str:
    """Why a random-slopes fit cannot be used, or '' when it can."""
    if error is not None:
        return f"random-slopes fit failed ({type(error).__name__}: {' '.join(str(error).split())})"
    if not result.converged:
        return "random-slopes fit did not converge"
    if any("Hessian" in message and "not positive definite" in message for message in caught):
        return "random-slopes fit ended where the Hessian is not positive definite"
    cov = np.asarray(result.cov_re, dtype=float)
    if not np.all(np.isfinite(cov)):
        return "random-effects covariance is not finite"
    eigen = np.linalg.eigvalsh(cov)
    if eigen.min() <= 1e-6 * max(float(np.max(np.diag(cov))), float(result.scale)):
        return "random-effects covariance is singular"
    bse = np.asarray(result.bse_fe, dtype=float)[1:1 + n_arms]
    if bse.size < n_arms or not np.all(np.isfinite(bse) & (bse > 0)):
        return "no finite standard error for the treatment effect"
    return ""


class RandomInterceptFit:
    """A REML random-intercept fit: ``y_g = X_g beta + u_g + e_g``, ``u_g ~ N(0, tau2)``, ``e ~ N(0, scale)``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, clusters: list[np.ndarray], beta: np.ndarray, scale: float,
                 tau2: float):
        self.x, self.y, self.clusters = x, y, clusters
        self.fe_params = np.asarray(beta, dtype=float)
        self.scale, self.tau2 = scale, tau2


def _ri_deviance(ratios: np.ndarray, parts: dict[str, np.ndarray], dof: int) -> tuple[np.ndarray, np.ndarray]:
    """-2 REML log-likelihood (sigma^2 profiled, constants dropped) at variance ratios tau2/sigma2, and beta."""
    n, sxx, sx, sxy, sy, yy = (parts[k] for k in ("n", "sxx", "sx", "sxy", "sy", "yy"))
    c = ratios[:, None] / (1.0 + ratios[:, None] * n[None, :])              # (L, G): V_g^-1 = (I - c 11') / s2
    a = sxx.sum(axis=0)[None] - np.einsum("lg,gi,gj->lij", c, sx, sx)
    b = sxy.sum(axis=0)[None] - np.einsum("lg,gi,g->li", c, sx, sy)
    yhy = yy.sum() - (c * sy[None, :] ** 2).sum(axis=1)
    beta = np.linalg.solve(a, b[:, :, None])[:, :, 0]
    rss = yhy - np.einsum("li,li->l", beta, b)
    sign, logdet = np.linalg.slogdet(a)
    dev = np.log1p(ratios[:, None] * n[None, :]).sum(axis=1) + logdet + dof * np.log(np.maximum(rss, 1e-300))
    return np.where((sign > 0) & (rss > 0) & np.isfinite(dev), dev, 1e300), beta  # finite: Brent needs numbers


def random_intercept_reml(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> RandomInterceptFit:
    """REML fit of a random-intercept model from per-cluster sufficient statistics (exact, fast).

    The likelihood is profiled over the variance ratio ``tau2 / sigma2 >= 0`` (a log-spaced grid from 1e-8 to
    1e6 plus 0, then Brent on log ratio); the optimum may sit at the bound 0, where the fit is OLS and is
    reported as a boundary fit, as lme4 does. It equals statsmodels' ``mixedlm(...).fit(reml=True)`` for a
    random intercept (checked in the tests) at about a tenth of the cost; statsmodels stays for random slopes.
    """
    codes, _ = pd.factorize(np.asarray(groups))
    clusters = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    parts = {"n": np.array([len(i) for i in clusters], dtype=float),
             "sxx": np.stack([x[i].T @ x[i] for i in clusters]), "sx": np.stack([x[i].sum(axis=0) for i in clusters]),
             "sxy": np.stack([x[i].T @ y[i] for i in clusters]), "sy": np.array([y[i].sum() for i in clusters]),
             "yy": np.array([y[i] @ y[i] for i in clusters])}
    dof = y.size - x.shape[1]
    grid = np.concatenate([[0.0], np.logspace(-8, 6, 57)])
    dev, _ = _ri_deviance(grid, parts, dof)
    best = int(np.argmin(dev))
    ratio = grid[best]
    if best > 0:
        lo, hi = np.log(grid[max(best - 1, 1)]), np.log(grid[min(best + 1, grid.size - 1)])
        found = optimize.minimize_scalar(lambda t: float(_ri_deviance(np.array([np.exp(t)]), parts, dof)[0][0]),
                                         bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
        if found.fun <= dev[best]:
            ratio = float(np.exp(found.x))
    if best == 1 and dev[0] <= _ri_deviance(np.array([ratio]), parts, dof)[0][0]:
        ratio = 0.0
    dev_at, beta = _ri_deviance(np.array([ratio]), parts, dof)
    beta = beta[0]
    c = ratio / (1.0 + ratio * parts["n"])
    yhy = parts["yy"].sum() - float((c * parts["sy"] ** 2).sum())
    b = parts["sxy"].sum(axis=0) - np.einsum("g,gi,g->i", c, parts["sx"], parts["sy"])
    scale = float(yhy - beta @ b) / dof
    return RandomInterceptFit(x, y, clusters, beta, scale, ratio * scale)


def _working_model(result: Any) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], float, np.ndarray, np.ndarray]:
    """Design, residuals, cluster rows and the working covariance ``V_g = scale I + Z_g G Z_g'`` of a fit."""
    if isinstance(result, RandomInterceptFit):
        resid = result.y - result.x @ result.fe_params
        return (result.x, resid, result.clusters, float(result.scale), np.ones((result.y.size, 1)),
                np.array([[result.tau2]]))
    model = result.model
    x = np.asarray(model.exog, dtype=float)
    resid = np.asarray(model.endog, dtype=float) - x @ np.asarray(result.fe_params, dtype=float)
    clusters = [np.asarray(model.row_indices[g]) for g in model.group_labels]
    return (x, resid, clusters, float(result.scale), np.asarray(model.exog_re, dtype=float),
            np.asarray(result.cov_re, dtype=float))


def _mixed_estimates(result: Any, contrasts: np.ndarray, arms: Sequence[str], alpha: float,
                     note: str) -> dict[str, dict[str, Estimate]]:
    """Each arm's contrast with CR2 (Satterthwaite df) and CR1 (G - 1 df) cluster-robust inference."""
    x, resid, clusters, scale, z, g_re = _working_model(result)
    robust = cluster_robust_low_rank(x, resid, clusters, scale, z, g_re, contrasts=contrasts)
    beta = np.asarray(result.fe_params, dtype=float)
    g = robust.clusters
    out: dict[str, dict[str, Estimate]] = {CR2: {}, CR1: {}}
    for i, arm in enumerate(arms):
        c = contrasts[i]
        est = float(c @ beta)
        for key, cov, df, how in ((CR2, robust.cr2, robust.df_cr2[i], "CR2 cluster-robust SE over {g} patients, "
                                   "Satterthwaite t on {df:.1f} df"),
                                  (CR1, robust.cr1, g - 1.0, "CR1 cluster-robust SE over {g} patients, "
                                   "t on {df:.0f} df")):
            se = float(np.sqrt(max(float(c @ cov @ c), 0.0)))
            full = join_notes(note, how.format(g=g, df=df))
            if np.isfinite(se) and se <= 1e-12 * max(1.0, abs(est)):
                # every patient's score for this effect is 0 (e.g. identical, noise-free effects): no spread
                out[key][arm] = Estimate(est, 0.0, est, est, math.nan, float(df), join_notes(full, "robust SE is 0"))
                continue
            if not (np.isfinite(se) and se > 0 and np.isfinite(df) and df > 0):
                out[key][arm] = missing_estimate(join_notes("no finite standard error", full), est)
                continue
            q = t_quantile(1.0 - alpha / 2.0, df)
            p = t_two_sided_p(est / se, df)
            out[key][arm] = Estimate(est, se, est - q * se, est + q * se, p, float(df), full)
    return out
