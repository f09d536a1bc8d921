"""Treatment-effect estimates for N-of-1 trials, per patient and pooled, with the truth beside them.

The tests follow the multimodal N-of-1 analyses this package reproduces (Fu et al.; Schneider, Gärtner,
Konigorski; see ANCHORS.md): per patient a Welch t-test, a permutation test and a GLS regression with
AR(1) errors (``nlme::gls(Value ~ Intervention, correlation = corAR1(form = ~ day))``); pooled, a linear
mixed model with a random intercept and random treatment slopes per patient. Every estimate is the
difference *arm minus reference* on the outcome's own scale.

Input is a tidy frame, one row per patient per day: ``patient_id``, ``day`` (whole days), ``treatment``
and numeric outcome columns. :func:`analyze_outcome` runs the chosen methods and returns one row per
(method, scope, arm); :func:`attach_truth` adds the simulated truth (``<stem>.truth.json``), bias and
CI coverage.

Modelling choices, stated once:

* **Welch**: unequal-variance t; SE ``sqrt(v1/n1 + v0/n0)``, Welch-Satterthwaite df, t-quantile CI; the
  p-value is scipy's ``ttest_ind(equal_var=False)``. It treats days as independent, which AR(1) noise
  violates (SEs too small when ``phi > 0``); it is here because the anchors report it.
* **Permutation**: difference in means over relabelings of the patient's arm and reference days; exact
  over all ``C(n, k)`` relabelings when there are at most ``exact_limit``, otherwise Monte Carlo with
  ``p = (1 + #{|perm| >= |obs|}) / (1 + n_permutations)``. The CI inverts the test under the additive
  shift model (treated = reference + delta): with the permutations held fixed, each one's statistic is
  linear in delta, so the set ``{delta: p(delta) > alpha}`` is found exactly from the roots of one
  quadratic per permutation; the CI is its hull (infinite when even a far delta is not rejected, as
  with very few days). Relabeling assumes exchangeable days, which AR(1) noise also violates.
* **GLS AR(1)**: ``y ~ C(treatment) [+ day]`` with ``corr(e_i, e_j) = phi^|day_i - day_j|``, i.e.
  nlme's ``corAR1(form = ~ day)``. A missing day is a gap in the AR(1) chain, not a neighbour: the
  whitening uses ``phi^gap`` (the exact Markov step over the gap), so gaps cost information but no
  bias. ``phi`` is estimated by restricted maximum likelihood (REML, nlme's default) on
  ``[-0.99, 0.99]`` (grid, then Brent); coefficients, SEs and t-based CIs (df = n - p) come from
  statsmodels OLS on the whitened series, identical to ``statsmodels.GLS`` with the full covariance.
* **Mixed model**: statsmodels ``mixedlm`` by REML, ``y ~ C(treatment) [+ day_centred]`` with groups
  ``patient_id``; ``day_centred`` is the day minus the patient's mean day, so the trend is a
  within-patient slope. Random intercept plus random treatment slopes when asked; that fit is abandoned
  for a random-intercept model, said in the note as ``random intercept only: <reason>``, when there are
  no more patients than random effects, when it raises, does not converge, when the random-effects
  covariance is singular (smallest eigenvalue below 1e-6 of the largest variance or of the residual
  variance), when statsmodels finds the Hessian not positive definite there (the fixed-effect SEs come from
  its inverse), or when an arm's SE is not finite. Wald CIs and p-values use the normal distribution.
  statsmodels' convergence warnings are caught and listed in the note instead of printed.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import optimize, stats

from synthtrial.errors import SynthtrialError
from synthtrial.seeding import derive_seed

#: Methods :func:`analyze_outcome` knows, in its default order.
METHODS = ("welch", "permutation", "gls_ar1", "lmm")
#: Columns of the frame :func:`analyze_outcome` returns.
RESULT_COLUMNS = ("outcome", "method", "scope", "arm", "reference", "estimate", "se", "ci_low", "ci_high",
                  "p", "n", "note")
#: Columns :func:`attach_truth` adds.
TRUTH_COLUMNS = ("true_effect", "bias", "covered")
#: ``scope`` of pooled estimates.
POOLED = "pooled"
#: Bounds of the AR(1) coefficient in :func:`gls_ar1` (nlme's corAR1 allows (-1, 1)).
PHI_BOUND = 0.99

_NAN = float("nan")
_MAX_SHOWN = 12


@dataclass(frozen=True)
class Estimate:
    """One effect estimate (arm minus reference) with its uncertainty; ``note`` says how it was made."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p: float
    df: float | None = None
    note: str = ""


def _missing(note: str, estimate: float = _NAN) -> Estimate:
    return Estimate(estimate, _NAN, _NAN, _NAN, _NAN, None, note)


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def _show(names: Collection[Any]) -> str:
    shown = [str(name) for name in list(names)[:_MAX_SHOWN]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) < 1.0:
        raise SynthtrialError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


# ---------------------------------------------------------------------------------------------------
# Two-sample tests on plain arrays
# ---------------------------------------------------------------------------------------------------

def welch_t(treated: np.ndarray, reference: np.ndarray, alpha: float = 0.05) -> Estimate:
    """Difference in means ``treated - reference`` with Welch's SE, Welch-Satterthwaite df and a t CI.

    The p-value is the one ``scipy.stats.ttest_ind(..., equal_var=False)`` gives. Fewer than two values
    in a group leave SE, CI and p as NaN (the variance is unknown); zero variance in both groups gives
    SE 0, a point CI and p NaN (the t statistic is undefined), as scipy does.
    """
    _check_alpha(alpha)
    x = np.asarray(treated, dtype=float).ravel()
    y = np.asarray(reference, dtype=float).ravel()
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise SynthtrialError("welch_t: values must be finite (drop missing values first)")
    if x.size == 0 or y.size == 0:
        raise SynthtrialError(f"welch_t: both groups need values (treated {x.size}, reference {y.size})")
    estimate = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return _missing(f"needs at least 2 values per group (treated {x.size}, reference {y.size})", estimate)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return Estimate(estimate, 0.0, estimate, estimate, _NAN, None, "zero variance in both groups")
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    p = float(stats.ttest_ind(x, y, equal_var=False).pvalue)
    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
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
    _check_alpha(alpha)
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
    return Estimate(obs, _NAN, low, high, float(min(p, 1.0)), None, note)


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
        return _NAN, _NAN
    return float(accepted.min()), float(accepted.max())


# ---------------------------------------------------------------------------------------------------
# Model-based estimates on tidy frames
# ---------------------------------------------------------------------------------------------------

def _term(reference: str) -> str:
    return f"C(treatment, Treatment({str(reference)!r}))"


def _coef_name(reference: str, arm: str) -> str:
    return f"{_term(reference)}[T.{arm}]"


def _working_frame(frame: pd.DataFrame, outcome: str, reference: str, need: Sequence[str]) -> tuple[pd.DataFrame, int]:
    """Validated copy with columns ``y``, ``treatment`` (str) and ``need``; rows without an outcome dropped."""
    if not isinstance(frame, pd.DataFrame):
        raise SynthtrialError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [col for col in (*need, "treatment", outcome) if col not in frame.columns]
    if missing:
        raise SynthtrialError(f"missing column(s) {_show([repr(m) for m in dict.fromkeys(missing)])} "
                              f"(columns present: {_show(list(frame.columns))})")
    values = frame[outcome]
    if not pd.api.types.is_numeric_dtype(values):
        raise SynthtrialError(f"outcome '{outcome}' is not numeric (dtype {values.dtype})")
    y = pd.to_numeric(values, errors="coerce").astype(float).to_numpy()
    keep = np.isfinite(y)
    work = pd.DataFrame({"y": y[keep], "treatment": frame["treatment"].astype(str).to_numpy()[keep]})
    for col in need:
        work[col] = frame[col].to_numpy()[keep]
    if "day" in need:
        day = pd.to_numeric(work["day"], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isfinite(day)) or np.any(day != np.round(day)):
            raise SynthtrialError("column 'day' must hold whole numbers")
        work["day"] = day.astype(np.int64)
    if "patient_id" in need:
        work["patient_id"] = work["patient_id"].astype(str)
    present = list(dict.fromkeys(frame["treatment"].astype(str)))
    if str(reference) not in present:
        raise SynthtrialError(f"reference '{reference}' is not a treatment in the data "
                              f"(treatments present: {_show(present)})")
    if not (work["treatment"] == str(reference)).any():
        raise SynthtrialError(f"no reference ('{reference}') row has a value of '{outcome}'")
    return work, int((~keep).sum())


def _arms_in(work: pd.DataFrame, reference: str) -> list[str]:
    arms = [arm for arm in dict.fromkeys(work["treatment"]) if arm != str(reference)]
    if not arms:
        raise SynthtrialError(f"no arm besides the reference '{reference}' to compare with it")
    return arms


def _dropped_note(dropped: int, outcome: str) -> str:
    return f"dropped {dropped} row(s) with missing '{outcome}'" if dropped else ""


def _whiten(values: np.ndarray, rho: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Prais-Winsten whitening over a possibly gapped AR(1) chain (rho = phi**gap between rows)."""
    columns = values.reshape(values.shape[0], -1)
    out = np.vstack([columns[:1], columns[1:] - rho[:, None] * columns[:-1]]) / scale[:, None]
    return out.reshape(values.shape)


def _ar1_factors(phi: float, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    rho = phi ** gaps
    innovation = 1.0 - rho ** 2
    scale = np.concatenate([[1.0], np.sqrt(innovation)])
    return rho, scale, float(np.log(innovation).sum())


def _ar1_reml_deviance(phi: float, y: np.ndarray, x: np.ndarray, gaps: np.ndarray) -> float:
    """-2 x REML log-likelihood (up to a constant) with sigma^2 profiled out."""
    rho, scale, logdet_r = _ar1_factors(phi, gaps)
    wy, wx = _whiten(y, rho, scale), _whiten(x, rho, scale)
    beta, *_ = np.linalg.lstsq(wx, wy, rcond=None)
    rss = float(np.sum((wy - wx @ beta) ** 2))
    sign, logdet_xx = np.linalg.slogdet(wx.T @ wx)
    if rss <= 0.0 or sign <= 0:
        return math.inf
    return logdet_r + logdet_xx + (y.size - x.shape[1]) * math.log(rss)


def _fit_phi(y: np.ndarray, x: np.ndarray, gaps: np.ndarray) -> float:
    grid = np.linspace(-PHI_BOUND, PHI_BOUND, 67)
    deviance = np.array([_ar1_reml_deviance(phi, y, x, gaps) for phi in grid])
    best = int(np.argmin(deviance))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    found = optimize.minimize_scalar(_ar1_reml_deviance, bounds=(lo, hi), args=(y, x, gaps), method="bounded",
                                     options={"xatol": 1e-7})
    return float(found.x) if found.fun <= deviance[best] else float(grid[best])


def gls_ar1(frame: pd.DataFrame, outcome: str, reference: str, *, trend: bool = False,
            alpha: float = 0.05) -> dict[str, Estimate]:
    """One patient's effects by GLS with AR(1) errors over the day index (nlme ``gls`` + ``corAR1``).

    Model ``y ~ C(treatment, Treatment(reference)) [+ day]``; ``phi`` by REML, gap-aware (a missing day
    is a step of ``phi^gap``, not ``phi``); the note reports ``phi``. Returns one :class:`Estimate` per
    arm present, with t-based CIs on ``n - p`` df. Needs one row per day.
    """
    _check_alpha(alpha)
    need = ["day"] + (["patient_id"] if isinstance(frame, pd.DataFrame) and "patient_id" in frame.columns else [])
    work, dropped = _working_frame(frame, outcome, reference, need)
    if "patient_id" in work and work["patient_id"].nunique() > 1:
        raise SynthtrialError(f"gls_ar1 fits one patient's series; got {work['patient_id'].nunique()} patients")
    if work["day"].duplicated().any():
        raise SynthtrialError("gls_ar1 needs one row per day; average repeated rows (e.g. views) first")
    arms = _arms_in(work, reference)
    work = work.sort_values("day", kind="stable").reset_index(drop=True)
    formula = f"y ~ {_term(reference)}" + (" + day" if trend else "")
    design = smf.ols(formula, work)
    y, x = np.asarray(design.endog, dtype=float), np.asarray(design.exog, dtype=float)
    names = list(design.exog_names)
    n, p = x.shape
    base_note = _dropped_note(dropped, outcome)
    if np.linalg.matrix_rank(x) < p:
        return {arm: _missing(_join("design is rank deficient (treatment confounded with the trend?)", base_note))
                for arm in arms}
    if n - p < 3:
        return {arm: _missing(_join(f"too few days ({n}) for {p} coefficients and phi", base_note)) for arm in arms}
    gaps = np.diff(work["day"].to_numpy()).astype(float)
    df = float(n - p)
    exact = sm.OLS(y, x).fit()
    if exact.ssr <= 1e-24 * max(1.0, float(np.sum(y ** 2))):  # no noise: any phi fits, the effects are exact
        note = _join("no residual variation: phi undefined", base_note)
        values = {arm: float(exact.params[names.index(_coef_name(reference, arm))]) for arm in arms}
        return {arm: Estimate(value, 0.0, value, value, _NAN, df, note) for arm, value in values.items()}
    phi = _fit_phi(y, x, gaps)
    rho, scale, _ = _ar1_factors(phi, gaps)
    fitted = sm.OLS(_whiten(y, rho, scale), _whiten(x, rho, scale)).fit()
    q = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    n_gaps = int(np.count_nonzero(gaps > 1))
    note = _join(f"phi={phi:.4f} (REML)",
                 f"{n_gaps} gap(s) in days, AR(1) steps phi^gap" if n_gaps else "",
                 "phi at its bound" if abs(phi) >= PHI_BOUND - 1e-4 else "",
                 "trend-adjusted" if trend else "", base_note)
    out: dict[str, Estimate] = {}
    for arm in arms:
        j = names.index(_coef_name(reference, arm))
        est, se = float(fitted.params[j]), float(fitted.bse[j])
        out[arm] = Estimate(est, se, est - q * se, est + q * se, float(fitted.pvalues[j]), df, note)
    return out


def mixed_model(frame: pd.DataFrame, outcome: str, reference: str, *, trend: bool = True,
                random_slopes: bool = True, alpha: float = 0.05) -> dict[str, Estimate]:
    """Pooled effects from a REML linear mixed model over patients (statsmodels ``mixedlm``).

    ``y ~ C(treatment, Treatment(reference)) [+ day_centred]``, groups ``patient_id``, random intercept
    and (``random_slopes``) random treatment slopes. When the random-slopes fit cannot be trusted it falls
    back to a random intercept and the note starts ``random intercept only: <reason>``. Standard errors
    are cluster-robust over patients with t on G - 1 df (see :func:`_mixed_estimates` for why).
    """
    _check_alpha(alpha)
    work, dropped = _working_frame(frame, outcome, reference, ["patient_id", "day"])
    arms = _arms_in(work, reference)
    base_note = _dropped_note(dropped, outcome)
    n_patients = work["patient_id"].nunique()
    if n_patients < 2:
        return {arm: _missing(_join(f"a mixed model needs at least 2 patients, got {n_patients}", base_note))
                for arm in arms}
    work["day_centred"] = work["day"] - work.groupby("patient_id")["day"].transform("mean")
    formula = f"y ~ {_term(reference)}" + (" + day_centred" if trend else "")
    n_random = 1 + len(arms)
    trend_note = "trend-adjusted" if trend else ""

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
    if error is not None:
        return {arm: _missing(_join(f"mixed model failed ({type(error).__name__}: {error})", model_note, base_note))
                for arm in arms}
    note = _join(model_note, trend_note, _warning_note(caught), base_note)
    return _mixed_estimates(result, reference, arms, alpha, note)


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


def _mixed_estimates(result: Any, reference: str, arms: Sequence[str], alpha: float, note: str) -> dict[str, Estimate]:
    """Fixed effects with cluster-robust (sandwich) standard errors over patients and t on G - 1 df.

    The model treats a patient's days as independent given the random effects; real daily outcomes are
    autocorrelated (AR(1) noise, slow kinetics) and the trend term shares that noise, so model-based Wald
    tests reject far too often (about 15% at alpha 0.05 on the anchor design under the null, measured with
    ``synthtrial power``). The sandwich keeps the model's weights but takes the variance from each
    patient's residuals, which is valid under any within-patient correlation; with few patients the CR1
    factor G / (G - 1) and t quantiles on G - 1 degrees of freedom keep the test near its level.
    """
    cov, n_groups = _robust_cov(result)
    names = list(result.fe_params.index)
    df = float(n_groups - 1)
    q = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    note = _join(note, f"cluster-robust SE over {n_groups} patients, t on {n_groups - 1} df")
    out: dict[str, Estimate] = {}
    for arm in arms:
        name = _coef_name(reference, arm)
        i = names.index(name)
        est, se = float(result.fe_params[name]), float(np.sqrt(max(cov[i, i], 0.0)))
        if not (np.isfinite(se) and se > 0):
            out[arm] = _missing(_join("no finite standard error", note), est)
            continue
        p = float(2.0 * stats.t.sf(abs(est / se), df))
        out[arm] = Estimate(est, se, est - q * se, est + q * se, p, df, note)
    return out


def _robust_cov(result: Any) -> tuple[np.ndarray, int]:
    """CR1 sandwich covariance of a MixedLM's fixed effects, clustered by its groups."""
    model = result.model
    x = np.asarray(model.exog, dtype=float)
    z = np.asarray(model.exog_re, dtype=float)
    resid = np.asarray(model.endog, dtype=float) - x @ np.asarray(result.fe_params, dtype=float)
    d = np.asarray(result.cov_re, dtype=float)
    scale = float(result.scale)
    k = x.shape[1]
    bread, meat = np.zeros((k, k)), np.zeros((k, k))
    for group in model.group_labels:
        idx = model.row_indices[group]
        zg = z[idx]
        v = zg @ d @ zg.T + scale * np.eye(len(idx))
        xtw = np.linalg.solve(v, x[idx]).T          # X_g' V_g^-1 (V symmetric)
        bread += xtw @ x[idx]
        u = xtw @ resid[idx]
        meat += np.outer(u, u)
    g = len(model.group_labels)
    inv = np.linalg.pinv(bread)
    return inv @ meat @ inv * (g / (g - 1)), g


# ---------------------------------------------------------------------------------------------------
# The whole analysis of one outcome, and the truth beside it
# ---------------------------------------------------------------------------------------------------

def _stream_seed(seed: int, *keys: str) -> int:
    """A seed per (patient, arm) that does not change when patients are added or reordered."""
    return derive_seed("permutation", seed, *keys, bits=32)


def analyze_outcome(data: pd.DataFrame, outcome: str, reference: str, *, exclude: Sequence[str] = (),
                    trend: bool = True, n_permutations: int = 2000, seed: int = 0, alpha: float = 0.05,
                    methods: Sequence[str] = METHODS, random_slopes: bool = True) -> pd.DataFrame:
    """Every arm against ``reference`` on one outcome, by each method; one tidy row per (method, scope, arm).

    Rows whose treatment is in ``exclude`` (e.g. washout days) are left out; the AR(1) fit sees them as
    gaps. Rows with a missing outcome are dropped first (the note says how many). Per-patient methods
    (``welch``, ``permutation``, ``gls_ar1``) run for each patient that has both the arm and the reference;
    ``lmm`` runs once over all patients (scope ``"pooled"``). ``trend`` adds a linear day term to
    ``gls_ar1`` and ``lmm``; ``random_slopes`` gives the ``lmm`` random treatment slopes (else a random
    intercept only); ``n`` is the number of rows the estimate used.
    """
    _check_alpha(alpha)
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SynthtrialError(f"unknown method(s) {_show(unknown)}; choose from {', '.join(METHODS)}")
    work, _ = _working_frame(data, outcome, reference, ["patient_id", "day"])
    excluded = {str(e) for e in exclude}
    if str(reference) in excluded:
        raise SynthtrialError(f"reference '{reference}' is also in exclude")
    present = list(dict.fromkeys(data["treatment"].astype(str)))
    arms = [t for t in present if t != str(reference) and t not in excluded]
    if not arms:
        raise SynthtrialError(f"no arm besides the reference '{reference}' to compare with it "
                              f"(treatments present: {_show(present)}; excluded: {_show(sorted(excluded)) or 'none'})")
    keys = pd.DataFrame({"patient_id": data["patient_id"].astype(str).to_numpy(), "day": data["day"].to_numpy()})
    if keys.duplicated().any():
        first = keys[keys.duplicated()].iloc[0]
        raise SynthtrialError(f"expected one row per patient per day; patient '{first['patient_id']}' has day "
                              f"{first['day']} more than once (average repeated rows, e.g. views, first)")
    value = pd.to_numeric(data[outcome], errors="coerce").astype(float).to_numpy()
    missing = ~np.isfinite(value) & ~data["treatment"].astype(str).isin(excluded).to_numpy()
    dropped_by_patient = keys.loc[missing, "patient_id"].value_counts()
    work = work[~work["treatment"].isin(excluded)].reset_index(drop=True)
    if not (work["treatment"] == str(reference)).any():
        raise SynthtrialError(f"no reference ('{reference}') row has a value of '{outcome}'")

    rows: list[dict[str, Any]] = []

    def add(method: str, scope: str, arm: str, est: Estimate, n: int, extra: str = "") -> None:
        rows.append({"outcome": outcome, "method": method, "scope": scope, "arm": arm, "reference": str(reference),
                     "estimate": est.estimate, "se": est.se, "ci_low": est.ci_low, "ci_high": est.ci_high,
                     "p": est.p, "n": int(n), "note": _join(est.note, extra)})

    patients = sorted(work["patient_id"].unique())
    for method in methods:
        if method == "lmm":
            if not any(arm in set(work["treatment"]) for arm in arms):
                continue
            present_arms = [arm for arm in arms if arm in set(work["treatment"])]
            estimates = mixed_model(work.rename(columns={"y": "_y"}), "_y", reference, trend=trend, alpha=alpha,
                                    random_slopes=random_slopes)
            total_dropped = int(dropped_by_patient.sum())
            for arm in present_arms:
                add(method, POOLED, arm, estimates[arm], len(work), _dropped_note(total_dropped, outcome))
            continue
        for pid in patients:
            own = work[work["patient_id"] == pid]
            ref_values = own.loc[own["treatment"] == str(reference), "y"].to_numpy()
            own_arms = [arm for arm in arms if (own["treatment"] == arm).any()]
            if ref_values.size == 0 or not own_arms:
                continue
            extra = _dropped_note(int(dropped_by_patient.get(pid, 0)), outcome)
            if method == "gls_ar1":
                estimates = gls_ar1(own.drop(columns="patient_id").rename(columns={"y": "_y"}), "_y", reference,
                                    trend=trend, alpha=alpha)
                for arm in own_arms:
                    add(method, pid, arm, estimates[arm], len(own), extra)
                continue
            for arm in own_arms:
                arm_values = own.loc[own["treatment"] == arm, "y"].to_numpy()
                if method == "welch":
                    est = welch_t(arm_values, ref_values, alpha=alpha)
                else:
                    pair = np.concatenate([arm_values, ref_values])
                    mask = np.arange(pair.size) < arm_values.size
                    est = permutation_test(pair, mask, n_permutations=n_permutations, alpha=alpha,
                                           seed=_stream_seed(seed, pid, arm))
                add(method, pid, arm, est, arm_values.size + ref_values.size, extra)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS)).astype({"n": "int64"})


def attach_truth(effects: pd.DataFrame, truth: Mapping[str, Any], *,
                 outcomes_on_truth_scale: Collection[str] = ("severity",)) -> pd.DataFrame:
    """Add ``true_effect``, ``bias`` and ``covered`` from a simulation truth (``<stem>.truth.json``).

    Pooled rows get ``mean_delivered_effects[arm]``, patient rows that patient's
    ``delivered_effects[arm]``: the difference a perfect outcome would show (kinetics included). A
    contrast against another reference than the truth's is the difference of the two delivered effects.
    Only outcomes in ``outcomes_on_truth_scale`` (the 0-3 severity scale) have a truth; other rows, and
    arms or patients the truth does not know, get NaN and ``covered`` None (also when the CI is NaN).
    """
    if not isinstance(effects, pd.DataFrame):
        raise SynthtrialError(f"expected a pandas DataFrame of effects, got {type(effects).__name__}")
    need = ("outcome", "scope", "arm", "reference", "estimate", "ci_low", "ci_high")
    missing = [col for col in need if col not in effects.columns]
    if missing:
        raise SynthtrialError(f"effects lack column(s) {_show(missing)}")
    for key in ("reference", "mean_delivered_effects", "patients"):
        if key not in truth:
            raise SynthtrialError(f"truth lacks key '{key}' (expected the shape of <stem>.truth.json)")
    truth_reference = str(truth["reference"])
    on_scale = {str(name) for name in outcomes_on_truth_scale}
    patients = truth["patients"] or {}

    def delivered(scope: str) -> Mapping[str, Any] | None:
        if scope == POOLED:
            return truth["mean_delivered_effects"]
        entry = patients.get(scope) if isinstance(patients, Mapping) else None
        return None if entry is None else entry.get("delivered_effects")

    def effect_of(table: Mapping[str, Any], arm: str) -> float:
        if arm == truth_reference:
            return 0.0
        value = table.get(arm)
        return _NAN if value is None else float(value)

    true_effect = []
    for outcome, scope, arm, reference in effects[["outcome", "scope", "arm", "reference"]].itertuples(index=False):
        table = delivered(str(scope)) if str(outcome) in on_scale else None
        true_effect.append(_NAN if table is None else effect_of(table, str(arm)) - effect_of(table, str(reference)))
    out = effects.copy()
    out["true_effect"] = np.asarray(true_effect, dtype=float)
    out["bias"] = out["estimate"].astype(float) - out["true_effect"]
    low, high = out["ci_low"].astype(float).to_numpy(), out["ci_high"].astype(float).to_numpy()
    covered = [None if np.isnan(t) or np.isnan(lo) or np.isnan(hi) else bool(lo <= t <= hi)
               for t, lo, hi in zip(out["true_effect"].to_numpy(), low, high)]
    out["covered"] = pd.Series(covered, index=out.index, dtype=object)
    return out
