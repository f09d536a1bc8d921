"""Treatment-effect estimates for N-of-1 trials, per patient and pooled, with the truth beside them.

Input is a tidy frame, one row per patient per day: ``patient_id``, ``day`` (whole days), ``treatment``
and numeric outcome columns. :func:`analyze_outcome` fits each chosen estimator of
:data:`synthtrial.analyze.estimators.REGISTRY` (which says what each method is and what it may be used
for) and returns one row per (method, scope, arm) with its ``role``; :func:`attach_truth` adds the
simulated truth (``<stem>.truth.json``), bias and CI coverage; :func:`standardize` puts every outcome on
one scale. Every estimate is the difference *arm minus reference*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.analyze import nof1
from synthtrial.analyze.calibration import calibration_slope, standardized_interval
from synthtrial.analyze.estimands import PATIENT_DELIVERED, POPULATION_DELIVERED, TABLES, truth_tables
from synthtrial.analyze.estimate import NAN, check_alpha, join_notes, show_names
from synthtrial.analyze.estimators import METHODS, POOLED, FitOptions, choose, prepare
from synthtrial.util.errors import SynthtrialError

#: Columns of the frame :func:`analyze_outcome` returns.
RESULT_COLUMNS = ("outcome", "method", "role", "estimand", "scope", "arm", "reference", "estimate", "se", "ci_low", "ci_high",
                  "p", "n", "note")
#: Columns :func:`attach_truth` adds.
TRUTH_COLUMNS = ("true_effect", "bias", "covered", "true_steady_state", "true_carryover", "true_sample_mean")
#: Columns :func:`standardize` adds.
STANDARD_COLUMNS = ("residual_sd", "residual_df", "std_estimate", "std_ci_low", "std_ci_high", "std_true_effect",
                    "std_covered", "calibration_slope", "calibration_lo", "calibration_hi")

# ---------------------------------------------------------------------------------------------------
# The whole analysis of one outcome, and the truth beside it
# ---------------------------------------------------------------------------------------------------

def analyze_outcome(data: pd.DataFrame, outcome: str, reference: str, *, exclude: Sequence[str] = (),
                    trend: bool = True, n_permutations: int = 2000, seed: int = 0, alpha: float = 0.05,
                    methods: Sequence[str] = METHODS, random_slopes: bool = True, design: Any = None,
                    kinetics: nof1.Kinetics | None = None, schedule: pd.DataFrame | None = None,
                    ar_phi: float | None = None, on_method: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Every arm against ``reference`` on one outcome, by each method; one tidy row per (method, scope, arm).

    Rows whose treatment is in ``exclude`` (e.g. washout days) are left out of every estimate, but they
    still end a treatment period (so does a change of the optional ``block`` column) and count in the
    exposure kinetics; the AR(1) fits see them as gaps. Rows with a missing outcome are dropped first (the
    note says how many). Per-patient methods run for each patient that has both the arm and the reference;
    ``lmm``/``lmm_cr1`` run once over all patients (scope ``"pooled"``, one fit for both). ``trend`` adds a
    linear day term everywhere; ``random_slopes`` gives the mixed model random treatment slopes. ``design``
    (a :class:`~synthtrial.trial.simulate.TrialDesign`) gives ``randomization`` its scheme; ``kinetics`` gives
    ``gls_kinetics`` and the pooled model their half-lives (else ``gls_kinetics`` profiles them). ``n`` is the
    number of observations the estimate used (periods for ``period``/``randomization``). The methods are the
    estimators of :data:`synthtrial.analyze.estimators.REGISTRY`. ``schedule`` (``patient_id``, ``day``,
    ``treatment`` of every scheduled day, e.g. the simulated design's) gives a missing day its scheduled
    treatment in the exposure curves; without it a day that has no row continues the previous day's treatment.
    A role is ``not available`` where the design leaves the method no chance to reject (the randomisation
    test on a fixed order or with too few orders). ``ar_phi`` (the simulated design's AR(1) coefficient) enters
    the role rules (:mod:`synthtrial.analyze.roles`); without it ``gls_kinetics`` uses its REML estimate.
    ``on_method(name)`` is called as each method is done (a progress bar's step).
    """
    alpha = check_alpha(alpha)
    chosen = choose(methods)
    nof1.check_kinetics(kinetics)
    options = FitOptions(outcome=outcome, reference=str(reference), excluded=frozenset(str(e) for e in exclude),
                         trend=trend, alpha=alpha, n_permutations=n_permutations, seed=seed,
                         random_slopes=random_slopes, design_known=design is not None,
                         orders=None if design is None else nof1.design_orders(design), kinetics=kinetics,
                         ar_phi=ar_phi)
    pooled, patients = prepare(data, options, with_exposure=any(e.uses_exposure for e in chosen), schedule=schedule)
    rows: list[dict[str, Any]] = []
    for estimator in chosen:
        units = ([] if pooled is None else [pooled]) if estimator.pooled else patients
        for unit in units:
            scope = POOLED if estimator.pooled else unit.patient
            for arm, est in estimator.fit(unit).items():
                n = estimator.nobs(unit, arm)
                role, why = estimator.role_on(n, outcome, options, unit, est)
                rows.append({"outcome": outcome, "method": estimator.name, "role": role,
                             "estimand": estimator.estimand, "scope": scope, "arm": arm,
                             "reference": options.reference, "estimate": est.estimate, "se": est.se,
                             "ci_low": est.ci_low, "ci_high": est.ci_high, "p": est.p, "n": int(n),
                             "note": join_notes(est.note, unit.note, why)})
        if on_method is not None:
            on_method(estimator.name)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS)).astype({"n": "int64"})


def attach_truth(effects: pd.DataFrame, truth: Mapping[str, Any], *,
                 outcomes_on_truth_scale: Collection[str] = ("severity",)) -> pd.DataFrame:
    """Add the columns of :data:`TRUTH_COLUMNS` from a simulation truth (``<stem>.truth.json``).

    Each row is set against the estimand it targets (its ``estimand`` column; without one, pooled rows target
    the population and per-patient rows the patient, :mod:`synthtrial.analyze.estimands`): ``true_effect`` is
    that estimand's value, ``bias`` and ``covered`` are measured against it; ``true_steady_state`` is the
    steady-state effect of the same scope (patient's, or the population's), ``true_carryover`` the carryover
    part of ``true_effect`` and ``true_sample_mean`` (pooled rows) the mean of the trial's patients' delivered
    contrasts, the estimand of an interval conditional on these patients. A contrast against another reference
    than the truth's is the difference of the two arms' values. Only outcomes in ``outcomes_on_truth_scale``
    (the 0-3 severity scale) have a truth; other rows, arms or patients the truth does not know, and values an
    older truth file lacks get NaN, and ``covered`` None (also when the CI is NaN).
    """
    if not isinstance(effects, pd.DataFrame):
        raise SynthtrialError(f"expected a pandas DataFrame of effects, got {type(effects).__name__}")
    need = ("outcome", "scope", "arm", "reference", "estimate", "ci_low", "ci_high")
    missing = [col for col in need if col not in effects.columns]
    if missing:
        raise SynthtrialError(f"effects lack column(s) {show_names(missing)}")
    for key in ("reference", "mean_delivered_effects", "patients"):
        if key not in truth:
            raise SynthtrialError(f"truth lacks key '{key}' (expected the shape of <stem>.truth.json)")
    truth_reference = str(truth["reference"])
    on_scale = {str(name) for name in outcomes_on_truth_scale}

    def effect_of(table: Mapping[str, Any] | None, arm: str) -> float:
        if not isinstance(table, Mapping):
            return NAN
        if arm == truth_reference:
            return 0.0
        value = table.get(arm)
        return NAN if value is None else float(value)

    columns = [effects[c].astype(str).to_numpy(dtype=object) for c in ("outcome", "scope", "arm", "reference")]
    if "estimand" in effects.columns:
        estimands = effects["estimand"].astype(str).to_numpy(dtype=object)
    else:
        estimands = np.where(columns[1] == POOLED, POPULATION_DELIVERED, PATIENT_DELIVERED)
    cache: dict[tuple[str, str], dict[str, Any]] = {}
    values = {key: np.full(len(effects), NAN) for key in TABLES}
    for i, (outcome, scope, arm, reference, estimand) in enumerate(zip(*columns, estimands)):
        if outcome not in on_scale:
            continue
        if (scope, estimand) not in cache:
            cache[scope, estimand] = truth_tables(truth, scope, estimand)
        for key, table in cache[scope, estimand].items():
            values[key][i] = effect_of(table, arm) - effect_of(table, reference)
    true_effect = values["truth"]
    return effects.assign(true_effect=true_effect, bias=effects["estimate"].to_numpy(dtype=float) - true_effect,
                          covered=_covered(true_effect, effects["ci_low"], effects["ci_high"], effects.index),
                          true_steady_state=values["steady_state"], true_carryover=values["carryover"],
                          true_sample_mean=values["sample_mean"])


def _covered(truth: np.ndarray, low: Any, high: Any, index: pd.Index) -> pd.Series:
    """Whether each CI ``[low, high]`` holds the truth: True/False, or None where any of the three is NaN."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    return pd.Series([None if np.isnan(t) or np.isnan(lo) or np.isnan(hi) else bool(lo <= t <= hi)
                      for t, lo, hi in zip(truth, low, high)], index=index, dtype=object)


def residual_sd(data: pd.DataFrame, outcome: str, *, exclude: Sequence[str] = (), trend: bool = True) -> float:
    """An outcome's within-patient residual SD: OLS ``y ~ patient + treatment [+ day within patient]``.

    ``sqrt(RSS / (n - p))`` over the rows with a value (rows in ``exclude`` left out); NaN when the model
    leaves no degrees of freedom or no variation. :func:`residual_sd_df` also gives its df ``n - p``.
    """
    return residual_sd_df(data, outcome, exclude=exclude, trend=trend)[0]


def residual_sd_df(data: pd.DataFrame, outcome: str, *, exclude: Sequence[str] = (),
                   trend: bool = True) -> tuple[float, float]:
    """:func:`residual_sd` and its residual degrees of freedom ``n - p`` (NaN, NaN where it is NaN)."""
    treatment = data["treatment"].astype(str).to_numpy(dtype=object)
    y = pd.to_numeric(data[outcome], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(y) & ~np.isin(treatment, [str(e) for e in exclude])
    if keep.sum() < 3:
        return NAN, NAN
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
        return NAN, NAN
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    rss = float(np.sum((y - x @ beta) ** 2))
    if rss <= 1e-20 * max(1.0, float(y @ y)):  # rounding, not variation
        return NAN, NAN
    return math.sqrt(rss / (y.size - rank)), float(y.size - rank)


def standardize(effects: pd.DataFrame, data: pd.DataFrame, truth: Mapping[str, Any] | None = None, *,
                exclude: Sequence[str] = (), trend: bool = True, truth_outcome: str = "oracle",
                alpha: float = 0.05) -> pd.DataFrame:
    """Every outcome's effects on one scale, and each outcome's calibration against the truth.

    Adds (:data:`STANDARD_COLUMNS`; :mod:`synthtrial.analyze.calibration` states the formulas):

    * ``residual_sd`` and ``residual_df``: the outcome's within-patient residual SD (:func:`residual_sd_df`),
      its noise figure;
    * ``std_estimate``, ``std_ci_low``, ``std_ci_high``: the effect divided by that SD, with a delta-method
      interval that carries the SD's own uncertainty (``residual_df``);
    * ``std_true_effect``: the truth of the row's estimand on the severity scale divided by the residual SD of
      ``truth_outcome`` (the oracle severity): the standardised effect a perfect grader would show, the same
      for every outcome; ``std_covered`` whether the standardised interval holds it;
    * ``calibration_slope``, ``calibration_lo``, ``calibration_hi`` (level ``1 - alpha``): the attenuation
      figure. Per-patient rows: the outcome's per-patient estimates of one method regressed on their true
      effects (severity scale) over the trial's patients and arms, through the origin, the same on each of the
      method's rows; pooled rows: the estimate and its CI over the row's true effect.

    Without a truth (or without the oracle column, for the standardised truth) those columns are NaN.
    """
    sds = {o: (residual_sd_df(data, o, exclude=exclude, trend=trend) if o in data.columns else (NAN, NAN))
           for o in effects["outcome"].unique()}
    sd = effects["outcome"].map({o: v[0] for o, v in sds.items()}).to_numpy(dtype=float)
    df = effects["outcome"].map({o: v[1] for o, v in sds.items()}).to_numpy(dtype=float)
    std, low, high = standardized_interval(*(effects[c] for c in ("estimate", "se", "ci_low", "ci_high")), sd, df,
                                           alpha)
    severity_truth = np.full(len(effects), NAN)
    if truth is not None:
        keep = [c for c in ("outcome", "estimand", "scope", "arm", "reference", "estimate", "ci_low", "ci_high")
                if c in effects.columns]
        severity_truth = attach_truth(effects[keep], truth, outcomes_on_truth_scale=list(sds))["true_effect"]
        severity_truth = severity_truth.to_numpy(dtype=float)
    truth_sd = NAN
    if truth is not None and truth_outcome in data.columns:
        truth_sd = sds[truth_outcome][0] if truth_outcome in sds else residual_sd(data, truth_outcome,
                                                                                 exclude=exclude, trend=trend)
    std_truth = severity_truth / truth_sd if math.isfinite(truth_sd) else np.full(len(effects), NAN)
    return effects.assign(residual_sd=sd, residual_df=df, std_estimate=std, std_ci_low=low, std_ci_high=high,
                          std_true_effect=std_truth, std_covered=_covered(std_truth, low, high, effects.index),
                          **_calibration(effects, severity_truth, alpha))


def _calibration(effects: pd.DataFrame, severity_truth: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """The calibration columns of :func:`standardize`."""
    out = {name: np.full(len(effects), NAN) for name in ("calibration_slope", "calibration_lo", "calibration_hi")}
    estimate = effects["estimate"].to_numpy(dtype=float)
    pooled = (effects["scope"] == POOLED).to_numpy()
    for rows in effects[~pooled].groupby(["outcome", "method"], sort=False).indices.values():
        index = np.flatnonzero(~pooled)[rows]
        slope, lo, hi = calibration_slope(estimate[index], severity_truth[index], alpha)
        out["calibration_slope"][index], out["calibration_lo"][index], out["calibration_hi"][index] = slope, lo, hi
    with np.errstate(divide="ignore", invalid="ignore"):
        truth = np.where(pooled & (severity_truth != 0), severity_truth, NAN)
        bounds = np.sort(np.column_stack([effects["ci_low"].to_numpy(dtype=float) / truth,
                                          effects["ci_high"].to_numpy(dtype=float) / truth]), axis=1)
        out["calibration_slope"][pooled] = (estimate / truth)[pooled]
    out["calibration_lo"][pooled], out["calibration_hi"][pooled] = bounds[pooled, 0], bounds[pooled, 1]
    return out
