"""The estimator registry: every method of :func:`synthtrial.analyze.stats.analyze_outcome` as one object.

In the style of statsmodels (model -> fit -> results), an :class:`Estimator` has a ``name``, a ``role`` by
design with the rule that may demote it on a given outcome (:meth:`Estimator.role_on`), a scope (one fit
per patient, or one ``pooled`` fit over all patients) and ``fit(data) -> {arm: Estimate}``. ``data`` is one
patient's :class:`PatientSeries` or the trial's :class:`PooledSeries`; both carry the :class:`FitOptions`.
:data:`REGISTRY` holds them in the default order; :func:`prepare` validates a tidy frame into that data.

Methods and what they may be used for (``role``), chosen by simulation (README.md has the table):

* inferential, per patient — ``period`` (period-level analysis), ``randomization`` (over the design's own
  randomisation scheme; none exists for a fixed order), ``gls_kinetics`` (GLS-AR(1) with the treatment
  entering through its exposure kinetics); see :mod:`synthtrial.analyze.nof1`.
* inferential, pooled — ``lmm`` (mixed model, CR2 cluster-robust SE, Satterthwaite df); ``lmm_cr1`` (CR1,
  G - 1 df) shares its fit and is descriptive, shown for comparison (:data:`roles.CR1_NOTE`); see
  :mod:`synthtrial.analyze.mixed`.
* descriptive, per patient — ``welch``, ``permutation`` (day-level), ``gls_ar1`` (treatment as a step) and
  ``hac`` (Newey-West): they read the autocorrelation, the wash-in ramp or a slow trend as effect or as
  noise and do not hold their size on the shipped designs (:mod:`synthtrial.analyze.daylevel`, ``nof1.hac``).
* every per-patient method estimates the patient's delivered contrast, the pooled model the population's
  (``Estimator.estimand``; :mod:`synthtrial.analyze.estimands`).
* The role on a design is decided by what holds there (:mod:`synthtrial.analyze.roles` states the rules):
  ``gls_kinetics`` is descriptive on series too short for their autocorrelation (fewer than
  :data:`GLS_KINETICS_MIN_DAYS` days or :data:`GLS_KINETICS_MIN_EFFECTIVE_DAYS` effectively independent
  ones) and on a grader's or a simulated rater's outcome (:data:`DESCRIPTIVE_ON_GRADER_OUTCOMES`); ``period``
  is descriptive where carryover with a fixed order biases it; ``randomization`` is ``not available`` where it
  cannot reject.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from synthtrial.analyze import nof1, roles
from synthtrial.analyze.daylevel import gls_ar1_arrays, permutation_test, welch_t
from synthtrial.analyze.estimands import PATIENT_DELIVERED, POPULATION_DELIVERED
from synthtrial.analyze.estimate import (NAN, Estimate, dropped_note, join_notes, missing_estimate, show_names,
                                         working_frame)
from synthtrial.analyze.mixed import CR1, CR2, mixed_model_both
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.seeding import derive_seed

INFERENTIAL, DESCRIPTIVE = roles.INFERENTIAL, roles.DESCRIPTIVE
#: The role of a test that cannot reject on this design (a randomisation test with too few orders): its row
#: keeps the estimate (and the p, where there is one) but is neither a test nor a description to rely on.
NOT_AVAILABLE = "not available"
#: ``scope`` of pooled estimates (per-patient ones carry the patient id).
POOLED = "pooled"
#: ``gls_kinetics`` is inferential on series at least this long: it held its size on the anchor design's
#: 140 days (4.7-5.1% at alpha 0.05 over 500 null trials) but rejected 6.4-6.6% on the quick design's 16;
#: and with at least so many effectively independent days (:func:`synthtrial.analyze.roles.gls_kinetics_role`).
GLS_KINETICS_MIN_DAYS = roles.GLS_KINETICS_MIN_DAYS
GLS_KINETICS_MIN_EFFECTIVE_DAYS = roles.GLS_KINETICS_MIN_EFFECTIVE_DAYS
#: Outcome columns read off the images by a grader are named ``grader_<grader>_<column>`` (``analyze``'s naming).
GRADER_OUTCOME_PREFIX = "grader_"
#: Methods that are only descriptive on a grader's outcome: a grader counts lesions that live for days to weeks,
#: a memory longer than AR(1). On the anchor design (4 patients, 48 rendered null trials, 192 tests per arm)
#: ``gls_kinetics`` rejected 14.6-16.1% of null tests on the counter's outcomes, while the period-level test
#: (5.2-6.8%) and the pooled model (0-4%) held, and on the autoencoder's ``ae_pca`` it held (3.1-3.6%).
DESCRIPTIVE_ON_GRADER_OUTCOMES = ("gls_kinetics",)
#: ``power --raters K``'s outcomes, a simulated panel's mean count (:mod:`synthtrial.analyze.power_raters`). They are
#: read off the lesions as a grader reads them off the images, and the rule above holds for them too: on a
#: randomised pairs design (6 patients x 120 days, phi 0.6, 400 null trials, 2,400 tests; docs/raters.md)
#: ``gls_kinetics`` rejected 8.5% (MC SE 0.6%) on one rater's counts and 5.3% on five raters' mean, while the
#: period-level, randomisation and pooled tests held (2.7-5.5%).
RATED_OUTCOME_PREFIX = "rated_count_k"
#: Outcome name prefixes of counts and grades read by a grader or a rater (:data:`DESCRIPTIVE_ON_GRADER_OUTCOMES`).
READ_OUTCOME_PREFIXES = (GRADER_OUTCOME_PREFIX, RATED_OUTCOME_PREFIX)


@dataclass(frozen=True)
class FitOptions:
    """What every estimator of one outcome is fitted with."""

    outcome: str
    reference: str
    excluded: frozenset[str] = frozenset()
    trend: bool = True
    alpha: float = 0.05
    n_permutations: int = 2000
    seed: int = 0
    random_slopes: bool = True
    design_known: bool = False
    orders: tuple[tuple[str, ...], ...] | None = None   # the design's possible period orders (None: fixed/unknown)
    kinetics: nof1.Kinetics | None = None
    ar_phi: float | None = None   # the design's AR(1) coefficient (a simulated trial's), None where unknown


class Series:
    """What every series says in its estimates' notes: how many rows it dropped for a missing outcome."""

    dropped: int
    options: FitOptions

    @property
    def note(self) -> str:
        return dropped_note(self.dropped, self.options.outcome)


@dataclass
class PatientSeries(Series):
    """One patient's series: the rows with a value (excluded treatments left out) and every scheduled row."""

    patient: str
    arms: list[str]                 # the arms this patient has a value on, in the trial's order
    days: np.ndarray                # rows with a value, excluded treatments left out
    treatments: np.ndarray
    values: np.ndarray
    scheduled_days: np.ndarray      # every scheduled row (excluded ones end a period; missing values are NaN)
    scheduled_treatments: np.ndarray
    scheduled_values: np.ndarray
    blocks: np.ndarray | None
    exposure: tuple[list[str], np.ndarray] | None   # every arm's exposure on the scheduled rows (known kinetics)
    dropped: int
    options: FitOptions
    calendar: tuple[np.ndarray, np.ndarray] | None = None  # rows + missing scheduled days (the exposures' calendar)

    @property
    def n(self) -> int:
        return int(self.days.size)

    @cached_property
    def periods(self) -> dict[str, Any]:
        return nof1.period_arrays(self.scheduled_days, self.scheduled_treatments, self.scheduled_values,
                                  set(self.options.excluded), self.blocks)

    def on(self, arm: str) -> np.ndarray:
        return self.values[self.treatments == arm]

    @cached_property
    def carryover_bias(self) -> float:
        """The period-level estimate's bias from carryover on this schedule, as a share of the delivered contrast
        (:func:`roles.period_carryover_bias`; 0 without known kinetics)."""
        o = self.options
        if o.kinetics is None:
            return 0.0
        return roles.period_carryover_bias(self.scheduled_days, self.scheduled_treatments, self.scheduled_values,
                                           set(o.excluded), self.blocks, o.reference, self.arms, o.kinetics,
                                           trend=o.trend, calendar=self.calendar)


@dataclass
class PooledSeries(Series):
    """Every patient's rows with a value (column ``y``), and the arms any of them has."""

    frame: pd.DataFrame
    arms: list[str]
    exposure_columns: dict[str, str] | None
    dropped: int
    options: FitOptions

    @property
    def n(self) -> int:
        return len(self.frame)

    @cached_property
    def mixed(self) -> dict[str, dict[str, Estimate]]:
        """One mixed-model fit, both inferences (``lmm`` and ``lmm_cr1`` share it)."""
        o = self.options
        return mixed_model_both(self.frame, "y", o.reference, trend=o.trend, alpha=o.alpha,
                                random_slopes=o.random_slopes, exposure_columns=self.exposure_columns)


def stream_seed(seed: int, *keys: str) -> int:
    """A seed per (patient, arm) that does not change when patients are added or reordered."""
    return derive_seed("permutation", seed, *keys, bits=32)


class Estimator(ABC):
    """One method: its name, its role rule, its scope and its fit."""

    name: str
    role: str
    pooled: ClassVar[bool] = False
    uses_exposure: ClassVar[bool] = False   # fitted on the exposure curves when the kinetics are known
    estimand: ClassVar[str] = PATIENT_DELIVERED  # what its estimate targets (:mod:`synthtrial.analyze.estimands`)

    def role_on(self, n: int, outcome: str, options: FitOptions | None = None, data: Any = None,
                estimate: Estimate | None = None) -> tuple[str, str]:
        """The role of an ``estimate`` from ``n`` observations of ``outcome`` (fitted with ``options`` on
        ``data``, the series it came from), and a note when it differs from the role by design or states an
        assumption the design strains."""
        return self.role, ""

    def nobs(self, data: Any, arm: str) -> int:
        """The number of observations an arm's estimate used (periods for the period-level methods)."""
        return data.n

    @abstractmethod
    def fit(self, data: Any) -> dict[str, Estimate]:
        """Each arm's estimate against the reference, from one patient's series or the pooled one."""


class Period(Estimator):
    name, role = "period", INFERENTIAL

    def nobs(self, data: PatientSeries, arm: str) -> int:
        return len(data.periods["mean"])

    def role_on(self, n: int, outcome: str, options: FitOptions | None = None, data: Any = None,
                estimate: Estimate | None = None) -> tuple[str, str]:
        """Descriptive where carryover with a fixed order biases the estimate (:func:`roles.period_role`); a
        note where neighbouring period means correlate (a conservative test)."""
        if options is None or not isinstance(data, PatientSeries):
            return self.role, ""
        lengths = np.asarray(data.periods["n"], dtype=float)
        note = roles.period_correlation_note(options.ar_phi, float(np.median(lengths)) if lengths.size else NAN)
        kinetics = options.kinetics
        if (options.design_known and options.orders is None and options.trend and kinetics is not None
                and kinetics.washout_half_life > 0):
            role, why = roles.period_role(data.carryover_bias, kinetics.washout_half_life)
            return role, join_notes(why, note)
        return self.role, note

    def fit(self, data: PatientSeries) -> dict[str, Estimate]:
        o = data.options
        return nof1.period_level(data.periods, o.reference, data.arms, trend=o.trend, alpha=o.alpha)


class Randomization(Period):
    name = "randomization"

    def fit(self, data: PatientSeries) -> dict[str, Estimate]:
        o = data.options
        if o.orders is None:
            why = ("no randomisation test: the design's order is fixed (not randomised)" if o.design_known
                   else "no randomisation test: the design's randomisation scheme is not known")
            fitted = super().fit(data)
            return {arm: missing_estimate(why, fitted[arm].estimate if arm in fitted else NAN) for arm in data.arms}
        return nof1.randomization_test(data.periods, o.reference, data.arms, o.orders, trend=o.trend,
                                       seed=stream_seed(o.seed, data.patient))

    def role_on(self, n: int, outcome: str, options: FitOptions | None = None, data: Any = None,
                estimate: Estimate | None = None) -> tuple[str, str]:
        """Not available where the design is known and gives the test no chance to reject at alpha: a fixed
        order (no randomisation distribution), or too few orders (smallest attainable p above alpha)."""
        if options is None or not options.design_known:
            return self.role, ""
        if options.orders is None:
            return NOT_AVAILABLE, "not available: it cannot reject on a fixed-order design"
        smallest = nof1.smallest_attainable_p(options.orders)
        if smallest > options.alpha:
            return NOT_AVAILABLE, (f"not available: {len(options.orders)} possible orders, smallest attainable "
                                   f"p {smallest:.4g} > alpha {options.alpha:g}")
        return self.role, ""


class GLSKinetics(Estimator):
    name, role, uses_exposure = "gls_kinetics", INFERENTIAL, True

    def role_on(self, n: int, outcome: str, options: FitOptions | None = None, data: Any = None,
                estimate: Estimate | None = None) -> tuple[str, str]:
        """Descriptive on a series too short for its autocorrelation (:func:`roles.gls_kinetics_role`: the design's
        phi where known, else the patient's REML estimate) and on a grader's outcome."""
        if options is not None and options.ar_phi is not None:
            phi, source = options.ar_phi, "the design's"
        else:
            phi, source = roles.phi_from_note(estimate.note if estimate is not None else ""), "REML estimate"
        role, why = roles.gls_kinetics_role(n, phi, source)
        if role != self.role:
            return role, why
        if self.name in DESCRIPTIVE_ON_GRADER_OUTCOMES and str(outcome).startswith(READ_OUTCOME_PREFIXES):
            return DESCRIPTIVE, ("descriptive on a grader's or rater's outcome: lesions persist longer than AR(1) "
                                 "noise, and the test over-rejects (15% at 5% on a grader's counts, 8.5% on one "
                                 "rater's)")
        return self.role, ""

    def fit(self, data: PatientSeries) -> dict[str, Estimate]:
        o = data.options
        return nof1.gls_kinetics(data.scheduled_days, data.scheduled_treatments, data.scheduled_values, o.reference,
                                 data.arms, set(o.excluded), kinetics=o.kinetics, trend=o.trend, alpha=o.alpha,
                                 exposure=data.exposure, calendar=data.calendar)


class MixedModel(Estimator):
    pooled, uses_exposure = True, True
    estimand = POPULATION_DELIVERED

    def __init__(self, name: str) -> None:
        self.name = name
        self.role = roles.pooled_role(name)

    def role_on(self, n: int, outcome: str, options: FitOptions | None = None, data: Any = None,
                estimate: Estimate | None = None) -> tuple[str, str]:
        return self.role, roles.CR1_NOTE if self.role == DESCRIPTIVE else ""

    def fit(self, data: PooledSeries) -> dict[str, Estimate]:
        fitted = data.mixed[self.name]
        return {arm: fitted[arm] for arm in data.arms}


class Welch(Estimator):
    name, role = "welch", DESCRIPTIVE

    def nobs(self, data: PatientSeries, arm: str) -> int:
        return data.on(arm).size + data.on(data.options.reference).size

    def fit(self, data: PatientSeries) -> dict[str, Estimate]:
        reference = data.on(data.options.reference)
        return {arm: welch_t(data.on(arm), reference, alpha=data.options.alpha) for arm in data.arms}


class Permutation(Welch):
    name = "permutation"

    def fit(self, data: PatientSeries) -> dict[str, Estimate]:
        o = data.options
        reference = data.on(o.reference)
        out = {}
        for arm in data.arms:
            treated = data.on(arm)
            pair = np.concatenate([treated, reference])
            out[arm] = permutation_test(pair, np.arange(pair.size) < treated.size, n_permutations=o.n_permutations,
                                        alpha=o.alpha, seed=stream_seed(o.seed, data.patient, arm))
        return out


class GLSAR1(Estimator):
    name, role = "gls_ar1", DESCRIPTIVE

    def fit(self, data: PatientSeries) -> dict[str, Estimate]:
        o = data.options
        return gls_ar1_arrays(data.days, data.treatments, data.values, o.reference, data.arms, trend=o.trend,
                              alpha=o.alpha)


class HAC(Estimator):
    name, role = "hac", DESCRIPTIVE

    def fit(self, data: PatientSeries) -> dict[str, Estimate]:
        o = data.options
        return nof1.hac(data.days, data.treatments, data.values, o.reference, data.arms, trend=o.trend,
                        alpha=o.alpha)


#: Every method, by name, in the default order of ``analyze_outcome``.
REGISTRY: dict[str, Estimator] = {e.name: e for e in (Period(), Randomization(), GLSKinetics(), MixedModel(CR2),
                                                      MixedModel(CR1), Welch(), Permutation(), GLSAR1(), HAC())}
METHODS = tuple(REGISTRY)
#: What each method may be used for by design (:meth:`Estimator.role_on` may demote it on an outcome).
ROLES = {name: e.role for name, e in REGISTRY.items()}
#: Methods fitted once over all patients (scope ``"pooled"``).
POOLED_METHODS = tuple(name for name, e in REGISTRY.items() if e.pooled)


def choose(methods: Sequence[str]) -> list[Estimator]:
    """The registered estimators named (each once, in the order given); a one-line error for an unknown name."""
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise SynthtrialError(f"unknown method(s) {show_names(unknown)}; choose from {', '.join(METHODS)}")
    return [REGISTRY[m] for m in dict.fromkeys(methods)]


def prepare(data: pd.DataFrame, options: FitOptions, *, with_exposure: bool = False,
            schedule: pd.DataFrame | None = None) -> tuple[PooledSeries | None, list[PatientSeries]]:
    """A tidy frame (one row per patient per day) validated into the pooled series and each patient's.

    Patients without a reference value or without any arm value are left out; the pooled series is None when
    no arm has a value. ``with_exposure`` computes each arm's exposure curves from ``options.kinetics``.
    ``schedule`` (``patient_id``, ``day``, ``treatment``: every scheduled day, e.g. the simulated design's)
    gives the exposure curves the treatment of the days that have no row (:func:`calendars`).
    """
    outcome, reference, excluded = options.outcome, options.reference, options.excluded
    work, _ = working_frame(data, outcome, reference, ["patient_id", "day"])
    if reference in excluded:
        raise SynthtrialError(f"reference '{reference}' is also in exclude")
    present = data["treatment"].astype(str).unique().tolist()
    arms = [t for t in present if t != reference and t not in excluded]
    if not arms:
        raise SynthtrialError(f"no arm besides the reference '{reference}' to compare with it (treatments present: "
                              f"{show_names(present)}; excluded: {show_names(sorted(excluded)) or 'none'})")
    patient_of_row = data["patient_id"].astype(str).to_numpy(dtype=object)
    day_of_row = data["day"].to_numpy()
    repeated = pd.DataFrame({"patient": pd.factorize(patient_of_row)[0], "day": day_of_row}).duplicated().to_numpy()
    if repeated.any():
        i = int(np.flatnonzero(repeated)[0])
        raise SynthtrialError(f"expected one row per patient per day; patient '{patient_of_row[i]}' has day "
                              f"{day_of_row[i]} more than once (average repeated rows, e.g. views, first)")
    value = pd.to_numeric(data[outcome], errors="coerce").astype(float).to_numpy()
    treatments = data["treatment"].astype(str).to_numpy(dtype=str)
    kept = ~np.isin(treatments, list(excluded))
    dropped_by_patient = pd.Series(patient_of_row[~np.isfinite(value) & kept]).value_counts()
    work = work[~work["treatment"].isin(excluded)].reset_index(drop=True)
    if not (work["treatment"] == reference).any():
        raise SynthtrialError(f"no reference ('{reference}') row has a value of '{outcome}'")
    calendar_of = calendars(patient_of_row, day_of_row, treatments, schedule)
    exposure = (_exposures_by_row(patient_of_row, day_of_row, treatments, arms, options.kinetics, calendar_of)
                if with_exposure and options.kinetics is not None else None)
    pooled = _pooled(work, arms, exposure, np.isfinite(value) & kept, int(dropped_by_patient.sum()), options)
    days = pd.to_numeric(data["day"], errors="coerce").to_numpy(dtype=float)
    blocks = data["block"].to_numpy(dtype=object) if "block" in data.columns else None
    w_treat, w_y, w_day = work["treatment"].to_numpy(dtype=str), work["y"].to_numpy(dtype=float), work["day"].to_numpy()
    patients = []
    for pid, idx in sorted(work.groupby("patient_id", sort=True).indices.items()):
        own_t = w_treat[idx]
        own_arms = [arm for arm in arms if (own_t == arm).any()]
        if not (own_t == reference).any() or not own_arms:
            continue
        rows = patient_of_row == pid
        patients.append(PatientSeries(
            pid, own_arms, w_day[idx], own_t, w_y[idx], days[rows], treatments[rows], value[rows],
            None if blocks is None else blocks[rows], None if exposure is None else (arms, exposure[rows]),
            int(dropped_by_patient.get(pid, 0)), options, calendar_of.get(pid)))
    return pooled, patients


def calendars(patients: np.ndarray, days: np.ndarray, treatments: np.ndarray, schedule: pd.DataFrame | None,
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each patient's exposure calendar: its rows plus the days ``schedule`` lists that it has no row for (a
    missing day takes its scheduled treatment, not the previous day's). A patient whose rows disagree with the
    schedule on a day, or whom the schedule does not list, keeps its rows alone (the previous-day rule)."""
    if schedule is None:
        return {}
    by_patient = schedule.groupby(schedule["patient_id"].astype(str), sort=False)
    own_days = pd.to_numeric(pd.Series(days), errors="coerce").to_numpy(dtype=float)
    out = {}
    for pid, rows in pd.Series(np.arange(patients.size)).groupby(patients, sort=False).indices.items():
        if pid not in by_patient.groups or not np.isfinite(own_days[rows]).all():
            continue
        planned = by_patient.get_group(pid)
        planned_on = dict(zip(planned["day"].astype(np.int64), planned["treatment"].astype(str)))
        mine = own_days[rows].astype(np.int64)
        if any(planned_on.get(int(d), t) != t for d, t in zip(mine, treatments[rows])):
            continue
        out[pid] = nof1.patient_calendar(mine, treatments[rows], planned["day"].to_numpy(),
                                         planned["treatment"].to_numpy())
    return out


def _pooled(work: pd.DataFrame, arms: list[str], exposure: np.ndarray | None, used: np.ndarray, dropped: int,
            options: FitOptions) -> PooledSeries | None:
    present_arms = [arm for arm in arms if arm in set(work["treatment"])]
    if not present_arms:
        return None
    frame, columns = work, None  # work's outcome column is "y", without missing values
    if exposure is not None:
        columns = {arm: f"_exposure_{i}" for i, arm in enumerate(arms)}
        frame = work.assign(**{columns[arm]: exposure[used][:, i] for i, arm in enumerate(arms)})
        columns = {arm: col for arm, col in columns.items() if arm in present_arms}
    return PooledSeries(frame, present_arms, columns, dropped, options)


def _exposures_by_row(patients: np.ndarray, days: np.ndarray, treatments: np.ndarray, arms: Sequence[str],
                      kinetics: nof1.Kinetics, calendar_of: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each arm's exposure on every row, computed over each patient's own calendar (:func:`calendars`)."""
    out = np.zeros((patients.size, len(arms)))
    days = pd.to_numeric(pd.Series(days), errors="coerce").to_numpy(dtype=float)
    for pid, rows in pd.Series(np.arange(patients.size)).groupby(patients, sort=False).indices.items():
        out[rows] = nof1.exposures(days[rows], treatments[rows], arms, kinetics, calendar_of.get(pid))
    return out
