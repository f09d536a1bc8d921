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
positive definite there, or when an arm's model SE is not finite. When the random-intercept fit fails
too, the variance components sit at their boundary (zero), where the REML mixed model *is* OLS; that fit
is used (``boundary fit``), as lme4 returns a fit at the boundary, so a trial never drops out silently.
Only a model that cannot be fitted at all (no residual variation, collinear design) returns NaN with
the reason. statsmodels' convergence warnings are caught and listed in the note instead of printed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats

from synthtrial.analyze.estimate import (Estimate, _arms_in, _check_alpha, _coef_name, _dropped_note, _join,
                                         _missing, _term, _working_frame)
from synthtrial.analyze.robust import cluster_robust

#: ``method`` names of the two pooled variants.
CR2, CR1 = "lmm", "lmm_cr1"


def mixed_model(frame: pd.DataFrame, outcome: str, reference: str, *, trend: bool = True,
                random_slopes: bool = True, alpha: float = 0.05, correction: str = "CR2") -> dict[str, Estimate]:
    """Pooled effects from a REML linear mixed model over patients (see the module docstring).

    ``correction`` picks the cluster-robust inference: ``"CR2"`` (Satterthwaite df) or ``"CR1"`` (G - 1 df).
    """
    both = mixed_model_both(frame, outcome, reference, trend=trend, random_slopes=random_slopes, alpha=alpha)
    if correction not in ("CR1", "CR2"):
        raise ValueError(f"correction must be 'CR1' or 'CR2', got {correction!r}")
    return both[CR2 if correction == "CR2" else CR1]


def mixed_model_both(frame: pd.DataFrame, outcome: str, reference: str, *, trend: bool = True,
                     random_slopes: bool = True, alpha: float = 0.05) -> dict[str, dict[str, Estimate]]:
    """One fit, both inferences: ``{"lmm": {arm: CR2 estimate}, "lmm_cr1": {arm: CR1 estimate}}``."""
    _check_alpha(alpha)
    work, dropped = _working_frame(frame, outcome, reference, ["patient_id", "day"])
    arms = _arms_in(work, reference)
    base_note = _dropped_note(dropped, outcome)
    n_patients = work["patient_id"].nunique()

    def missing(note: str) -> dict[str, dict[str, Estimate]]:
        return {key: {arm: _missing(note) for arm in arms} for key in (CR2, CR1)}

    if n_patients < 2:
        return missing(_join(f"a mixed model needs at least 2 patients, got {n_patients}", base_note))
    work["day_centred"] = work["day"] - work.groupby("patient_id")["day"].transform("mean")
    formula = f"y ~ {_term(reference)}" + (" + day_centred" if trend else "")
    n_random = 1 + len(arms)
    trend_note = "trend-adjusted" if trend else ""
    y = work["y"].to_numpy(dtype=float)
    if float(np.sum((y - y.mean()) ** 2)) <= 1e-24 * max(1.0, float(y @ y)):
        return missing(_join("no variation in the outcome: effects and SEs undefined", base_note))

    reason = ""
    if random_slopes:
        if n_patients <= n_random:
            reason = f"{n_patients} patients cannot identify {n_random} random effects"
        else:
            result, caught, error = _fit_mixed(work, formula, f"~ {_term(reference)}")
            reason = _slopes_problem(result, caught, error, reference, arms)
            if not reason:
                note = _join("random intercept + treatment slopes", trend_note, _warning_note(caught), base_note)
                return _mixed_estimates(result, reference, arms, alpha, note)
    result, caught, error = _fit_mixed(work, formula, None)
    model_note = f"random intercept only: {reason}" if reason else "random intercept only"
    problem = _intercept_problem(result, error)
    if not problem:
        note = _join(model_note, trend_note, _warning_note(caught), base_note)
        return _mixed_estimates(result, reference, arms, alpha, note)
    boundary = _boundary_fit(work, formula)
    note = _join(f"boundary fit (variance components 0, OLS): {problem}", trend_note, base_note)
    if boundary is None:
        return missing(_join("the fixed effects are collinear", note))
    return _mixed_estimates(boundary, reference, arms, alpha, note)


def _fit_mixed(work: pd.DataFrame, formula: str, re_formula: str | None) -> tuple[Any, list[str], Exception | None]:
    """Fit by REML with statsmodels' warnings caught (returned as messages) instead of printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = smf.mixedlm(formula, work, groups=work["patient_id"], re_formula=re_formula)
            result = model.fit(reml=True)
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


def _slopes_problem(result: Any, caught: list[str], error: Exception | None, reference: str,
                    arms: Sequence[str]) -> str:
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
    bse = result.bse_fe
    if not all(np.isfinite(bse[_coef_name(reference, arm)]) and bse[_coef_name(reference, arm)] > 0 for arm in arms):
        return "no finite standard error for the treatment effect"
    return ""


def _intercept_problem(result: Any, error: Exception | None) -> str:
    """Why a random-intercept fit cannot be used, or ''."""
    if error is not None:
        return f"random-intercept fit failed ({type(error).__name__}: {' '.join(str(error).split())})"
    values = [float(result.scale), *np.ravel(np.asarray(result.cov_re, dtype=float)),
              *np.asarray(result.fe_params, dtype=float)]
    if not all(math.isfinite(v) for v in values) or float(result.scale) <= 0:
        return "random-intercept fit gave no finite variance components"
    return ""


class _Boundary:
    """The REML mixed model with every variance component at 0: OLS, in the shape _mixed_estimates reads."""

    def __init__(self, model: Any, params: pd.Series, scale: float, groups: np.ndarray):
        self.model, self.fe_params, self.scale, self.groups = model, params, scale, groups


def _boundary_fit(work: pd.DataFrame, formula: str) -> _Boundary | None:
    fit = smf.ols(formula, work).fit()
    x = np.asarray(fit.model.exog, dtype=float)
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    return _Boundary(fit.model, fit.params, float(fit.scale), work["patient_id"].to_numpy())


def _design(result: Any) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Design, residuals, cluster rows and each cluster's working covariance V_g of a fit."""
    model = result.model
    x = np.asarray(model.exog, dtype=float)
    resid = np.asarray(model.endog, dtype=float) - x @ np.asarray(result.fe_params, dtype=float)
    scale = float(result.scale)
    if isinstance(result, _Boundary):
        codes = pd.factorize(result.groups)[0]
        clusters = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
        return x, resid, clusters, [np.eye(len(idx)) for idx in clusters]
    z = np.asarray(model.exog_re, dtype=float)
    d = np.asarray(result.cov_re, dtype=float)
    clusters = [np.asarray(model.row_indices[g]) for g in model.group_labels]
    working = [z[idx] @ d @ z[idx].T + scale * np.eye(len(idx)) for idx in clusters]
    return x, resid, clusters, working


def _mixed_estimates(result: Any, reference: str, arms: Sequence[str], alpha: float,
                     note: str) -> dict[str, dict[str, Estimate]]:
    """Fixed effects with CR2 (Satterthwaite df) and CR1 (G - 1 df) cluster-robust inference."""
    x, resid, clusters, working = _design(result)
    robust = cluster_robust(x, resid, clusters, working)
    names = list(result.fe_params.index)
    g = robust.clusters
    out: dict[str, dict[str, Estimate]] = {CR2: {}, CR1: {}}
    for arm in arms:
        i = names.index(_coef_name(reference, arm))
        est = float(result.fe_params.iloc[i])
        for key, cov, df, how in ((CR2, robust.cr2, robust.df_cr2[i], "CR2 cluster-robust SE over {g} patients, "
                                   "Satterthwaite t on {df:.1f} df"),
                                  (CR1, robust.cr1, g - 1.0, "CR1 cluster-robust SE over {g} patients, "
                                   "t on {df:.0f} df")):
            se = float(np.sqrt(max(cov[i, i], 0.0)))
            full = _join(note, how.format(g=g, df=df))
            if np.isfinite(se) and se <= 1e-12 * max(1.0, abs(est)):
                # every patient's score for this effect is 0 (e.g. identical, noise-free effects): no spread
                out[key][arm] = Estimate(est, 0.0, est, est, math.nan, float(df), _join(full, "robust SE is 0"))
                continue
            if not (np.isfinite(se) and se > 0 and np.isfinite(df) and df > 0):
                out[key][arm] = _missing(_join("no finite standard error", full), est)
                continue
            q = float(stats.t.ppf(1.0 - alpha / 2.0, df))
            p = float(2.0 * stats.t.sf(abs(est / se), df))
            out[key][arm] = Estimate(est, se, est - q * se, est + q * se, p, float(df), full)
    return out
