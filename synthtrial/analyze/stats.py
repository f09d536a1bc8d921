"""Treatment-effect estimates for N-of-1 trials, per patient and pooled, with the truth beside them.

Input is a tidy frame, one row per patient per day: ``patient_id``, ``day`` (whole days), ``treatment``
and numeric outcome columns. :func:`analyze_outcome` runs the chosen methods and returns one row per
(method, scope, arm) with its ``role``; :func:`attach_truth` adds the simulated truth
(``<stem>.truth.json``), bias and CI coverage; :func:`standardize` puts every outcome on one scale.
Every estimate is the difference *arm minus reference*.

Methods and what they may be used for (``role``), chosen by simulation (README.md has the table):

* inferential, per patient — ``period`` (period-level analysis), ``randomization`` (over the design's own
  randomisation scheme; none exists for a fixed order), ``gls_kinetics`` (GLS-AR(1) with the treatment
  entering through its exposure kinetics); see :mod:`synthtrial.analyze.nof1`.
* inferential, pooled — ``lmm`` (mixed model, CR2 cluster-robust SE, Satterthwaite df) and ``lmm_cr1``
  (CR1, G - 1 df); see :mod:`synthtrial.analyze.mixed`.
* descriptive, per patient — ``welch``, ``permutation`` (day-level), ``gls_ar1`` (treatment as a step) and
  ``hac`` (Newey-West): they read the autocorrelation, the wash-in ramp or a slow trend as effect or as
  noise and do not hold their size on the shipped designs; the anchors (Fu et al.; Schneider et al.) report
  the first three, so they stay, labelled.

Choices for the descriptive ones, stated once:

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
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.analyze import nof1
from synthtrial.analyze.estimate import (_NAN, Estimate, _arms_in, _check_alpha, _coef_name, _dropped_note,  # noqa: F401
                                         _join, _missing, _show, _term, _working_frame, t_quantile, t_two_sided_p)
from synthtrial.analyze.mixed import (CR1, CR2, _fit_mixed, _slopes_problem, mixed_model,  # noqa: F401
                                      mixed_model_both)
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.seeding import derive_seed

#: Methods :func:`analyze_outcome` knows, in its default order, and what each may be used for.
ROLES = {"period": "inferential", "randomization": "inferential", "gls_kinetics": "inferential",
         "lmm": "inferential", "lmm_cr1": "inferential", "welch": "descriptive", "permutation": "descriptive",
         "gls_ar1": "descriptive", "hac": "descriptive"}
METHODS = tuple(ROLES)
#: ``gls_kinetics`` is inferential on series at least this long: it held its size on the anchor design's
#: 140 days (4.7-5.1% at alpha 0.05 over 500 null trials) but rejected 6.4-6.6% on the quick design's 16.
GLS_KINETICS_MIN_DAYS = 100
#: Outcome columns read off the images by a grader are named ``grader_<grader>_<column>`` (``analyze``'s naming).
GRADER_OUTCOME_PREFIX = "grader_"
#: Methods that are only descriptive on a grader's outcome: a grader counts lesions that live for days to weeks,
#: a memory longer than AR(1). On the anchor design (4 patients, 48 rendered null trials, 192 tests per arm)
#: ``gls_kinetics`` rejected 14.6-16.1% of null tests on the counter's outcomes, while the period-level test
#: (5.2-6.8%) and the pooled model (0-4%) held, and on the autoencoder's ``ae_pca`` it held (3.1-3.6%).
DESCRIPTIVE_ON_GRADER_OUTCOMES = ("gls_kinetics",)
#: Methods fitted once over all patients (scope ``"pooled"``).
POOLED_METHODS = (CR2, CR1)
#: Columns of the frame :func:`analyze_outcome` returns.
RESULT_COLUMNS = ("outcome", "method", "role", "scope", "arm", "reference", "estimate", "se", "ci_low", "ci_high",
                  "p", "n", "note")
#: Columns :func:`attach_truth` adds.
TRUTH_COLUMNS = ("true_effect", "bias", "covered")
#: Columns :func:`standardize` adds.
STANDARD_COLUMNS = ("residual_sd", "std_estimate", "std_ci_low", "std_ci_high", "std_true_effect", "share",
                    "std_covered")
#: ``scope`` of pooled estimates.
POOLED = "pooled"
#: Bounds of the AR(1) coefficient in :func:`gls_ar1` (nlme's corAR1 allows (-1, 1)).
PHI_BOUND = nof1.PHI_BOUND

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
    return gls_ar1_arrays(work["day"].to_numpy(), work["treatment"].to_numpy(dtype=str),
                          work["y"].to_numpy(dtype=float), reference, arms, trend=trend, alpha=alpha,
                          note=_dropped_note(dropped, outcome))


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
        return {arm: _missing(_join("design is rank deficient (treatment confounded with the trend?)", note))
                for arm in arms}
    if n - p < 3:
        return {arm: _missing(_join(f"too few days ({n}) for {p} coefficients and phi", note)) for arm in arms}
    gaps = np.diff(days).astype(float)
    df = float(n - p)
    ols, *_ = np.linalg.lstsq(x, y, rcond=None)
    ssr = float(np.sum((y - x @ ols) ** 2))
    if ssr <= 1e-24 * max(1.0, float(np.sum(y ** 2))):  # no noise: any phi fits, the effects are exact
        exact = _join("no residual variation: phi undefined", note)
        return {arm: Estimate(float(ols[1 + i]), 0.0, float(ols[1 + i]), float(ols[1 + i]), _NAN, df, exact)
                for i, arm in enumerate(arms)}
    beta, cov, phi, _ = nof1.gls_fit(y, x, gaps)
    q = t_quantile(1.0 - alpha / 2.0, df)
    n_gaps = int(np.count_nonzero(gaps > 1))
    fit_note = _join(f"phi={phi:.4f} (REML)",
                     f"{n_gaps} gap(s) in days, AR(1) steps phi^gap" if n_gaps else "",
                     "phi at its bound" if abs(phi) >= PHI_BOUND - 1e-4 else "",
                     "trend-adjusted" if trend else "", note)
    out: dict[str, Estimate] = {}
    for i, arm in enumerate(arms):
        est, se = float(beta[1 + i]), float(math.sqrt(max(cov[1 + i, 1 + i], 0.0)))
        out[arm] = Estimate(est, se, est - q * se, est + q * se, t_two_sided_p(est / se, df) if se > 0 else _NAN,
                            df, fit_note)
    return out


# ---------------------------------------------------------------------------------------------------
# The whole analysis of one outcome, and the truth beside it
# ---------------------------------------------------------------------------------------------------

def _stream_seed(seed: int, *keys: str) -> int:
    """A seed per (patient, arm) that does not change when patients are added or reordered."""
    return derive_seed("permutation", seed, *keys, bits=32)


def analyze_outcome(data: pd.DataFrame, outcome: str, reference: str, *, exclude: Sequence[str] = (),
                    trend: bool = True, n_permutations: int = 2000, seed: int = 0, alpha: float = 0.05,
                    methods: Sequence[str] = METHODS, random_slopes: bool = True, design: Any = None,
                    kinetics: nof1.Kinetics | None = None) -> pd.DataFrame:
    """Every arm against ``reference`` on one outcome, by each method; one tidy row per (method, scope, arm).

    Rows whose treatment is in ``exclude`` (e.g. washout days) are left out of every estimate, but they
    still end a treatment period (so does a change of the optional ``block`` column) and count in the exposure kinetics; the AR(1) fits see them as gaps.
    Rows with a missing outcome are dropped first (the note says how many). Per-patient methods run for
    each patient that has both the arm and the reference; ``lmm``/``lmm_cr1`` run once over all patients
    (scope ``"pooled"``, one fit for both). ``trend`` adds a linear day term everywhere; ``random_slopes``
    gives the mixed model random treatment slopes. ``design`` (a :class:`~synthtrial.trial.simulate.TrialDesign`)
    gives ``randomization`` its scheme; ``kinetics`` gives ``gls_kinetics`` its half-lives (else they are
    profiled). ``n`` is the number of rows the estimate used (periods for ``period``/``randomization``).
    """
    _check_alpha(alpha)
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SynthtrialError(f"unknown method(s) {_show(unknown)}; choose from {', '.join(METHODS)}")
    nof1.check_kinetics(kinetics)
    work, _ = _working_frame(data, outcome, reference, ["patient_id", "day"])
    excluded = {str(e) for e in exclude}
    if str(reference) in excluded:
        raise SynthtrialError(f"reference '{reference}' is also in exclude")
    present = data["treatment"].astype(str).unique().tolist()
    arms = [t for t in present if t != str(reference) and t not in excluded]
    if not arms:
        raise SynthtrialError(f"no arm besides the reference '{reference}' to compare with it "
                              f"(treatments present: {_show(present)}; excluded: {_show(sorted(excluded)) or 'none'})")
    patient_of_row = data["patient_id"].astype(str).to_numpy(dtype=object)
    day_of_row = data["day"].to_numpy()
    patient_code, _ = pd.factorize(patient_of_row)
    repeated = pd.DataFrame({"patient": patient_code, "day": day_of_row}).duplicated().to_numpy()
    if repeated.any():
        i = int(np.flatnonzero(repeated)[0])
        raise SynthtrialError(f"expected one row per patient per day; patient '{patient_of_row[i]}' has day "
                              f"{day_of_row[i]} more than once (average repeated rows, e.g. views, first)")
    value = pd.to_numeric(data[outcome], errors="coerce").astype(float).to_numpy()
    all_treatments = data["treatment"].astype(str).to_numpy(dtype=str)
    missing = ~np.isfinite(value) & ~np.isin(all_treatments, list(excluded))
    dropped_by_patient = pd.Series(patient_of_row[missing]).value_counts()
    work = work[~work["treatment"].isin(excluded)].reset_index(drop=True)
    if not (work["treatment"] == str(reference)).any():
        raise SynthtrialError(f"no reference ('{reference}') row has a value of '{outcome}'")
    orders = nof1.design_orders(design) if design is not None else None

    rows: list[dict[str, Any]] = []

    def add(method: str, scope: str, arm: str, est: Estimate, n: int, extra: str = "") -> None:
        role = ROLES[method]
        if method == "gls_kinetics" and n < GLS_KINETICS_MIN_DAYS:
            role, extra = "descriptive", _join(extra, f"descriptive: {n} days is too short for the AR(1) fit to "
                                                      f"hold its size (needs {GLS_KINETICS_MIN_DAYS})")
        elif method in DESCRIPTIVE_ON_GRADER_OUTCOMES and str(outcome).startswith(GRADER_OUTCOME_PREFIX):
            role, extra = "descriptive", _join(extra, "descriptive on a grader's outcome: lesions persist longer "
                                                      "than AR(1) noise, and the test over-rejects (15% at 5%)")
        rows.append({"outcome": outcome, "method": method, "role": role, "scope": scope, "arm": arm,
                     "reference": str(reference), "estimate": est.estimate, "se": est.se, "ci_low": est.ci_low,
                     "ci_high": est.ci_high, "p": est.p, "n": int(n), "note": _join(est.note, extra)})

    def from_tuple(values: tuple) -> Estimate:
        est, se, low, high, p, df, note = values
        return Estimate(est, se, low, high, p, None if df != df else df, note)

    exposure_all = None
    if kinetics is not None and ({"gls_kinetics"} | set(POOLED_METHODS)) & set(methods):
        exposure_all = _exposures_by_row(patient_of_row, day_of_row, all_treatments, arms,
                                         kinetics)
    pooled_wanted = [m for m in methods if m in POOLED_METHODS]
    if pooled_wanted:
        present_arms = [arm for arm in arms if arm in set(work["treatment"])]
        if present_arms:
            pooled_frame, columns = work, None  # work's outcome column is "y", without missing values
            if exposure_all is not None:
                exposure = exposure_all[np.isfinite(value) & ~np.isin(all_treatments, list(excluded))]
                columns = {arm: f"_exposure_{i}" for i, arm in enumerate(arms)}
                pooled_frame = work.assign(**{columns[arm]: exposure[:, i] for i, arm in enumerate(arms)})
                columns = {arm: col for arm, col in columns.items() if arm in present_arms}
            both = mixed_model_both(pooled_frame, "y", reference, trend=trend, alpha=alpha,
                                    random_slopes=random_slopes, exposure_columns=columns)
            total_dropped = int(dropped_by_patient.sum())
            for method in pooled_wanted:
                for arm in present_arms:
                    add(method, POOLED, arm, both[method][arm], len(work), _dropped_note(total_dropped, outcome))

    days_all = pd.to_numeric(data["day"], errors="coerce").to_numpy(dtype=float)
    blocks_all = data["block"].to_numpy(dtype=object) if "block" in data.columns else None
    own_rows = work.groupby("patient_id", sort=True).indices
    w_treat = work["treatment"].to_numpy(dtype=str)
    w_y, w_day = work["y"].to_numpy(dtype=float), work["day"].to_numpy()
    for pid in sorted(own_rows):
        idx = own_rows[pid]
        own_t, own_y, own_d = w_treat[idx], w_y[idx], w_day[idx]
        ref_values = own_y[own_t == str(reference)]
        own_arms = [arm for arm in arms if (own_t == arm).any()]
        if ref_values.size == 0 or not own_arms:
            continue
        extra = _dropped_note(int(dropped_by_patient.get(pid, 0)), outcome)
        rows_all = patient_of_row == pid
        d_all, t_all, v_all = days_all[rows_all], all_treatments[rows_all], value[rows_all]
        table = None
        for method in methods:
            if method in POOLED_METHODS:
                continue
            if method in ("period", "randomization") and table is None:
                table = nof1.period_arrays(d_all, t_all, v_all, excluded,
                                           None if blocks_all is None else blocks_all[rows_all])
            if method == "gls_ar1":
                estimates = gls_ar1_arrays(own_d, own_t, own_y, str(reference), own_arms, trend=trend, alpha=alpha)
                for arm in own_arms:
                    add(method, pid, arm, estimates[arm], idx.size, extra)
            elif method == "period":
                for arm, values in nof1.period_level(table, str(reference), own_arms, trend=trend,
                                                     alpha=alpha).items():
                    add(method, pid, arm, from_tuple(values), len(table["mean"]), extra)
            elif method == "randomization":
                if orders is None:
                    why = ("no randomisation test: the design's order is fixed (not randomised)" if design is not None
                           else "no randomisation test: the design's randomisation scheme is not known")
                    fitted = nof1.period_level(table, str(reference), own_arms, trend=trend, alpha=alpha)
                    for arm in own_arms:
                        add(method, pid, arm, _missing(why, fitted[arm][0] if arm in fitted else _NAN), len(table["mean"]),
                            extra)
                    continue
                for arm, (est, p, note) in nof1.randomization_test(table, str(reference), own_arms, orders,
                                                                    trend=trend,
                                                                    seed=_stream_seed(seed, pid)).items():
                    add(method, pid, arm, Estimate(est, _NAN, _NAN, _NAN, p, None, note), len(table["mean"]), extra)
            elif method == "gls_kinetics":
                found = nof1.gls_kinetics(d_all, t_all, v_all, str(reference), own_arms, excluded, kinetics=kinetics,
                                          trend=trend, alpha=alpha,
                                          exposure=None if exposure_all is None else (arms, exposure_all[rows_all]))
                for arm, values in found.items():
                    add(method, pid, arm, from_tuple(values), idx.size, extra)
            elif method == "hac":
                found = nof1.hac(own_d, own_t, own_y,
                                 str(reference), own_arms, trend=trend, alpha=alpha)
                for arm, values in found.items():
                    add(method, pid, arm, from_tuple(values), idx.size, extra)
            else:
                for arm in own_arms:
                    arm_values = own_y[own_t == arm]
                    if method == "welch":
                        est = welch_t(arm_values, ref_values, alpha=alpha)
                    else:
                        pair = np.concatenate([arm_values, ref_values])
                        mask = np.arange(pair.size) < arm_values.size
                        est = permutation_test(pair, mask, n_permutations=n_permutations, alpha=alpha,
                                               seed=_stream_seed(seed, pid, arm))
                    add(method, pid, arm, est, arm_values.size + ref_values.size, extra)
    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda row: order[row["method"]])  # stable: within a method, the order rows were added
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS)).astype({"n": "int64"})


def _exposures_by_row(patients: np.ndarray, days: np.ndarray, treatments: np.ndarray, arms: Sequence[str],
                      kinetics: nof1.Kinetics) -> np.ndarray:
    """Each arm's exposure on every row, computed over each patient's own calendar."""
    out = np.zeros((patients.size, len(arms)))
    days = pd.to_numeric(pd.Series(days), errors="coerce").to_numpy(dtype=float)
    for rows in pd.Series(np.arange(patients.size)).groupby(patients, sort=False).indices.values():
        out[rows] = nof1.exposures(days[rows], treatments[rows], arms, kinetics)
    return out


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

    columns = [effects[c].astype(str).to_numpy(dtype=object) for c in ("outcome", "scope", "arm", "reference")]
    tables = {scope: delivered(scope) for scope in set(columns[1].tolist())}
    true_effect = []
    for outcome, scope, arm, reference in zip(*columns):
        table = tables[scope] if outcome in on_scale else None
        true_effect.append(_NAN if table is None else effect_of(table, arm) - effect_of(table, reference))
    true_effect = np.asarray(true_effect, dtype=float)
    return effects.assign(true_effect=true_effect, bias=effects["estimate"].to_numpy(dtype=float) - true_effect,
                          covered=_covered(true_effect, effects["ci_low"], effects["ci_high"], effects.index))


def _covered(truth: np.ndarray, low: Any, high: Any, index: pd.Index) -> pd.Series:
    """Whether each CI ``[low, high]`` holds the truth: True/False, or None where any of the three is NaN."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    return pd.Series([None if np.isnan(t) or np.isnan(lo) or np.isnan(hi) else bool(lo <= t <= hi)
                      for t, lo, hi in zip(truth, low, high)], index=index, dtype=object)


def residual_sd(data: pd.DataFrame, outcome: str, *, exclude: Sequence[str] = (), trend: bool = True) -> float:
    """An outcome's within-patient residual SD: OLS ``y ~ patient + treatment [+ day within patient]``.

    ``sqrt(RSS / (n - p))`` over the rows with a value (rows in ``exclude`` left out); NaN when the model
    leaves no degrees of freedom or no variation.
    """
    treatment = data["treatment"].astype(str).to_numpy(dtype=object)
    y = pd.to_numeric(data[outcome], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(y) & ~np.isin(treatment, [str(e) for e in exclude])
    if keep.sum() < 3:
        return _NAN
    y = y[keep]
    _, patient = np.unique(data["patient_id"].astype(str).to_numpy(dtype=object)[keep], return_inverse=True)
    _, arm = np.unique(treatment[keep], return_inverse=True)
    cols = [np.eye(patient.max() + 1)[patient], np.eye(arm.max() + 1)[arm][:, 1:]]
    if trend:
        day = data["day"].to_numpy(dtype=float)[keep]
        cols.append((day - (np.bincount(patient, day) / np.bincount(patient))[patient])[:, None])
    x = np.column_stack(cols)
    rank = np.linalg.matrix_rank(x)
    if y.size - rank < 1:
        return _NAN
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    rss = float(np.sum((y - x @ beta) ** 2))
    noise_free = rss <= 1e-20 * max(1.0, float(y @ y))  # rounding, not variation
    return _NAN if noise_free else math.sqrt(rss / (y.size - rank))


def standardize(effects: pd.DataFrame, data: pd.DataFrame, truth: Mapping[str, Any] | None = None, *,
                exclude: Sequence[str] = (), trend: bool = True, truth_outcome: str = "oracle") -> pd.DataFrame:
    """Every outcome's effects on one scale: divided by that outcome's within-patient residual SD.

    Adds ``residual_sd``, ``std_estimate``, ``std_ci_low``, ``std_ci_high`` (the CI divided by the same SD,
    which is treated as known), ``std_true_effect`` (the delivered truth divided by the residual SD of
    ``truth_outcome``, the oracle severity: the standardised effect a perfect grader would show, the same for
    every outcome), ``share`` (``std_estimate / std_true_effect``: the share of the true effect the outcome
    recovers) and ``std_covered``. Without a truth or the oracle column the truth columns are NaN.
    """
    sds = {o: (residual_sd(data, o, exclude=exclude, trend=trend) if o in data.columns else _NAN)
           for o in effects["outcome"].unique()}
    sd = effects["outcome"].map(sds).to_numpy(dtype=float)
    columns: dict[str, Any] = {"residual_sd": sd}
    with np.errstate(divide="ignore", invalid="ignore"):
        for col in ("estimate", "ci_low", "ci_high"):
            columns[f"std_{col}"] = effects[col].to_numpy(dtype=float) / sd
    truth_sd = _NAN
    if truth is not None and truth_outcome in data.columns:
        truth_sd = sds[truth_outcome] if truth_outcome in sds else residual_sd(data, truth_outcome, exclude=exclude,
                                                                              trend=trend)
    if truth is not None and math.isfinite(truth_sd):
        on_truth = attach_truth(effects[["outcome", "scope", "arm", "reference", "estimate", "ci_low", "ci_high"]],
                                truth, outcomes_on_truth_scale=list(sds))
        std_truth = on_truth["true_effect"].to_numpy(dtype=float) / truth_sd
    else:
        std_truth = np.full(len(effects), _NAN)
    columns["std_true_effect"] = std_truth
    with np.errstate(divide="ignore", invalid="ignore"):
        columns["share"] = columns["std_estimate"] / np.where(std_truth != 0, std_truth, _NAN)
    columns["std_covered"] = _covered(std_truth, columns["std_ci_low"], columns["std_ci_high"], effects.index)
    return effects.assign(**columns)
