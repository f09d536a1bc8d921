"""Design N-of-1 trial schedules and simulate each patient's latent acne severity, with the truth kept.

Two plain-data configs drive it:

* :class:`TrialDesign` lays out the schedule: which treatment each patient gets on each day
  (ABAB periods, randomised AB pairs, or a baseline period followed by alternating active arms,
  as in the synthetic_acne_images protocol), with optional washout days between periods.
* :class:`SeverityModel` says how severity responds. For patient *i* on day *d*::

      mu[i, d] = baseline[i] + trend * (d - first_day[i]) + sum_a effect[i, a] * exposure[i, a, d]
      s[i, d]  = clip(mu[i, d] + e[i, d], 0, 3)
      e[i, d]  = phi * e[i, d-1] + sqrt(1 - phi^2) * noise_sd * z[i, d]    (AR(1), stationary SD noise_sd)

  ``effect[i, a] = effects[a] + effect_sd * u[i, a]`` is the patient's own effect of arm *a* (the
  reference arm has none). ``exposure`` follows first-order kinetics in whole days: on a day arm *a*
  is given, ``x <- 1 - (1 - x) * 2**(-1 / washin_half_life)``; on any other day
  ``x <- x * 2**(-1 / washout_half_life)`` (a half-life of 0 switches instantly). Slow washout is what
  carries an effect over into the next period. Baselines are drawn from a normal distribution truncated
  to ``[baseline_min, baseline_max]``. Missing days are dropped completely at random after simulation.

:func:`simulate_trial` returns the protocol (the same normalised frame :mod:`synthtrial.trial.protocol`
reads) and ``truth``: every parameter, and every patient's baseline, true effects and the mean
effect the schedule actually delivered (kinetics included), split into its direct and carryover parts,
with sample means and population values (:mod:`synthtrial.trial.estimands` defines each).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.version import __version__
from synthtrial.trial import scale
from synthtrial.trial.estimands import mean_difference, patient_estimands, trial_estimands
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.atomic import write_text_atomic
from synthtrial.trial.protocol import (COLUMNS, DEFAULT_VIEW, MAX_DATE, MAX_DAY, MAX_DAY_SPAN, MAX_ROWS, MIN_DATE,
                                       PATIENT_ID_PATTERN, write_protocol)

DESIGNS = ("baseline-alternating", "abab", "pairs")
MODEL_EQUATIONS = (
    "mu[i,d] = baseline[i] + trend_per_day*(d - first_day[i]) + sum_a effect[i,a]*exposure[i,a,d]; "
    "s[i,d] = clip(mu[i,d] + e[i,d], 0, 3); e[i,d] = ar_phi*e[i,d-1] + sqrt(1-ar_phi^2)*noise_sd*z; "
    "effect[i,a] = effects[a] + effect_sd*u[i,a]; exposure on a dosing day: x = 1-(1-x)*2^(-1/washin_half_life), "
    "otherwise x = x*2^(-1/washout_half_life)"
)

#: Limits of a design, checked before any work so one command cannot exhaust the machine; a designed
#: protocol also stays within what the protocol reader accepts (synthtrial.trial.protocol: MAX_DAY, MAX_DAY_SPAN,
#: MAX_ROWS, MIN_DATE..MAX_DATE).
MAX_PATIENTS = 10_000
MAX_BLOCKS = 500
MAX_PERIOD_DAYS = 365
MAX_WASHOUT_DAYS = 365
#: Limits of a severity model: no spread, noise or daily trend larger than the whole 0-3 scale, and no
#: half-life longer than the longest protocol (beyond them nothing changes but the arithmetic overflows).
MAX_SD = scale.SEVERITY_MAX
MAX_TREND_PER_DAY = scale.SEVERITY_MAX
MAX_HALF_LIFE_DAYS = MAX_DAY
#: Fields whose command-line option has another name than ``--<field-name>``.
_OPTION_NAMES = {"n_patients": "--patients", "trend_per_day": "--trend"}


class DesignError(SynthtrialError):
    """A trial design or severity model that cannot be simulated; names the offending option."""


def _option(name: str) -> str:
    return f"{name} ({_OPTION_NAMES.get(name, '--' + name.replace('_', '-'))})"


@dataclass(frozen=True)
class TrialDesign:
    """The schedule of a trial: who gets which treatment on which day.

    ``arms[0]`` is the reference (control / baseline) arm. Designs:

    * ``baseline-alternating``: period 1 is the reference arm, then the active arms alternate
      (the anchor protocol: Baseline, Antibiotics, Cream, Antibiotics, Cream); ``blocks`` periods.
    * ``abab``: the two arms alternate, reference first; ``blocks`` periods.
    * ``pairs``: ``blocks`` pairs of periods, each pair holding both arms in AB or BA order.

    ``randomize`` draws the order per patient: which arm starts (abab), each pair's order (pairs), the
    order of the active arms' cycle (baseline-alternating). ``block`` in the protocol is the period number,
    or the pair number for ``pairs``. Washout days sit between consecutive periods with treatment
    ``washout_label`` and no block.
    """

    design: str = "baseline-alternating"
    arms: tuple[str, ...] = ("Baseline", "Antibiotics", "Cream")
    n_patients: int = 10
    blocks: int = 5
    period_days: int = 28
    washout_days: int = 0
    randomize: bool = False
    start_date: str | None = "2018-01-01"
    first_day: int = 1
    washout_label: str = "Washout"
    patient_prefix: str = "P"

    def __post_init__(self) -> None:
        object.__setattr__(self, "arms", tuple(self.arms))
        self.validate()

    @property
    def reference(self) -> str:
        return self.arms[0]

    def validate(self) -> None:
        if self.design not in DESIGNS:
            raise DesignError(f"{_option('design')} must be one of {', '.join(DESIGNS)}, got '{self.design}'")
        names = [a.strip() for a in self.arms]
        if any(not a for a in names) or len(set(names)) != len(names):
            raise DesignError(f"{_option('arms')} must be distinct, non-empty names, got {list(self.arms)}")
        if self.design == "baseline-alternating" and len(names) < 2:
            raise DesignError(f"{_option('arms')}: baseline-alternating needs the baseline arm and at least "
                              f"one active arm, got {list(self.arms)}")
        if self.design in ("abab", "pairs") and len(names) != 2:
            raise DesignError(f"{_option('arms')}: {self.design} needs exactly two arms (reference, active), "
                              f"got {list(self.arms)}")
        if self.washout_label in names:
            raise DesignError(f"{_option('washout_label')} '{self.washout_label}' is also an arm")
        self._check_sizes()
        if self.design == "baseline-alternating" and self.blocks < 2:
            raise DesignError(f"{_option('blocks')}: baseline-alternating needs at least 2 periods")
        if self.design == "abab" and self.blocks < 2:
            raise DesignError(f"{_option('blocks')}: abab needs at least 2 periods")
        self._check_dates()
        width = max(2, len(str(self.n_patients)))
        if not PATIENT_ID_PATTERN.fullmatch(f"{self.patient_prefix}{self.n_patients:0{width}d}"):
            raise DesignError(f"{_option('patient_prefix')} '{self.patient_prefix}' does not make safe patient "
                              "ids (letters, digits, '_', '.', '-'; starting with a letter or digit)")

    def _check_sizes(self) -> None:
        """Whole numbers within their limits, and a schedule the protocol reader accepts."""
        for name, low, high in (("n_patients", 1, MAX_PATIENTS), ("blocks", 1, MAX_BLOCKS),
                                ("period_days", 1, MAX_PERIOD_DAYS), ("washout_days", 0, MAX_WASHOUT_DAYS),
                                ("first_day", 0, MAX_DAY)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
                raise DesignError(f"{_option(name)} must be a whole number >= {low} and <= {high}, got {value!r}")
        days = self.days_per_patient
        if days - 1 > MAX_DAY_SPAN or self.first_day + days - 1 > MAX_DAY:
            raise DesignError(f"the design lasts {days} days per patient from day {self.first_day}; a protocol "
                              f"spans at most {MAX_DAY_SPAN + 1} days and ends by day {MAX_DAY} (options --blocks, "
                              "--period-days, --washout-days, --first-day)")
        if self.n_patients * days > MAX_ROWS:
            raise DesignError(f"{self.n_patients} patients x {days} days is {self.n_patients * days} rows; a "
                              f"protocol holds at most {MAX_ROWS} (options --patients, --blocks, --period-days)")

    def _check_dates(self) -> None:
        if self.start_date is None:
            return
        try:
            start = dt.date.fromisoformat(self.start_date)
        except (TypeError, ValueError):
            raise DesignError(f"{_option('start_date')} must be YYYY-MM-DD, got '{self.start_date}'") from None
        last = start + dt.timedelta(days=self.days_per_patient - 1) if start <= MAX_DATE else start
        if start < MIN_DATE or last > MAX_DATE:
            raise DesignError(f"{_option('start_date')} {self.start_date}: the trial's dates must lie between "
                              f"{MIN_DATE} and {MAX_DATE}")

    def patient_ids(self) -> list[str]:
        width = max(2, len(str(self.n_patients)))
        return [f"{self.patient_prefix}{i:0{width}d}" for i in range(1, self.n_patients + 1)]

    def period_arms(self, rng: np.random.Generator) -> list[tuple[int, str]]:
        """One patient's periods as (block number, arm), drawing the order when ``randomize`` is set."""
        ref, active = self.arms[0], list(self.arms[1:])
        if self.design == "baseline-alternating":
            if self.randomize:
                active = [active[i] for i in rng.permutation(len(active))]
            return [(1, ref)] + [(b + 2, active[b % len(active)]) for b in range(self.blocks - 1)]
        if self.design == "abab":
            first, second = (ref, active[0])
            if self.randomize and rng.random() < 0.5:
                first, second = second, first
            return [(b + 1, first if b % 2 == 0 else second) for b in range(self.blocks)]
        periods = []
        for b in range(self.blocks):
            pair = [ref, active[0]]
            if self.randomize and rng.random() < 0.5:
                pair.reverse()
            periods += [(b + 1, pair[0]), (b + 1, pair[1])]
        return periods

    @property
    def days_per_patient(self) -> int:
        periods = 2 * self.blocks if self.design == "pairs" else self.blocks
        return periods * self.period_days + (periods - 1) * self.washout_days


@dataclass(frozen=True)
class SeverityModel:
    """How latent severity responds to the schedule (see the module docstring for the equations).

    ``effects`` maps an arm to its population (fixed) effect in severity units; negative improves.
    Arms without an entry (the reference, washout days) have no effect.
    """

    effects: Mapping[str, float] = field(default_factory=dict)
    effect_sd: float = 0.0
    baseline_mean: float = 2.0
    baseline_sd: float = 0.4
    baseline_min: float = 1.0
    baseline_max: float = 3.0
    trend_per_day: float = 0.0
    washin_half_life: float = 0.0
    washout_half_life: float = 0.0
    ar_phi: float = 0.0
    noise_sd: float = 0.0
    missing_rate: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "effects", {str(k): float(v) for k, v in dict(self.effects).items()})
        self.validate()

    def validate(self) -> None:
        for name, low, high in (("effect_sd", 0, MAX_SD), ("baseline_sd", 0, MAX_SD), ("noise_sd", 0, MAX_SD),
                                ("washin_half_life", 0, MAX_HALF_LIFE_DAYS),
                                ("washout_half_life", 0, MAX_HALF_LIFE_DAYS),
                                ("trend_per_day", -MAX_TREND_PER_DAY, MAX_TREND_PER_DAY)):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and low <= value <= high):
                raise DesignError(f"{_option(name)} must be a finite number from {low:g} to {high:g}, got {value!r}")
        for name in ("baseline_mean", "baseline_min", "baseline_max"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value)):
                raise DesignError(f"{_option(name)} must be a finite number, got {value!r}")
        for arm, value in self.effects.items():
            if not math.isfinite(value) or abs(value) > scale.SEVERITY_MAX:
                raise DesignError(f"effect (--effect {arm}=...) must be a finite number between -3 and 3, "
                                  f"got {value!r}")
        if not scale.SEVERITY_MIN <= self.baseline_min <= self.baseline_max <= scale.SEVERITY_MAX:
            raise DesignError(f"{_option('baseline_min')} and {_option('baseline_max')} must satisfy "
                              f"0 <= min <= max <= 3, got {self.baseline_min} and {self.baseline_max}")
        if not self.baseline_min <= self.baseline_mean <= self.baseline_max:
            raise DesignError(f"{_option('baseline_mean')} {self.baseline_mean} lies outside "
                              f"[{self.baseline_min}, {self.baseline_max}]")
        if not (_is_number(self.ar_phi) and -1 < self.ar_phi < 1):
            raise DesignError(f"{_option('ar_phi')} must lie strictly between -1 and 1, got {self.ar_phi!r}")
        if not (_is_number(self.missing_rate) and 0 <= self.missing_rate < 1):
            raise DesignError(f"{_option('missing_rate')} must lie in [0, 1), got {self.missing_rate}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class SimulatedTrial:
    """A simulated protocol and the truth behind it."""

    protocol: pd.DataFrame
    truth: dict[str, Any]
    #: ``counterfactual=True``: patient_id, day, arm, severity per row and arm (synthtrial.trial.counterfactual)
    counterfactual: pd.DataFrame | None = None

    def write(self, path: str | os.PathLike[str], form: str = "native") -> tuple[Path, Path]:
        """Write the protocol CSV and its truth file (``<stem>.truth.json`` beside it)."""
        path = Path(path)
        truth_path = truth_path_for(path)
        text = json.dumps(self.truth, indent=2) + "\n"
        write_protocol(self.protocol, path, form=form)
        write_text_atomic(truth_path, text)
        return path, truth_path


def truth_path_for(protocol_path: str | os.PathLike[str]) -> Path:
    """Where the truth of a simulated protocol lives: ``trial.csv`` -> ``trial.truth.json``."""
    path = Path(protocol_path)
    return path.with_name(f"{path.stem}.truth.json")


# ------------------------------------------------------------------------------------------ schedules

def design_schedule(design: TrialDesign, seed: int = 0) -> pd.DataFrame:
    """The schedule of ``design`` as a protocol frame (no severities yet); deterministic in ``seed``."""
    rngs = _patient_rngs(seed, design.n_patients, stream=0)
    pids: list[str] = []
    days: list[np.ndarray] = []
    blocks: list[int | None] = []
    arms: list[str] = []
    for pid, rng in zip(design.patient_ids(), rngs, strict=True):
        day = design.first_day
        for k, (block, arm) in enumerate(design.period_arms(rng)):
            if k > 0 and design.washout_days:
                days.append(np.arange(day, day + design.washout_days))
                pids += [pid] * design.washout_days
                blocks += [None] * design.washout_days
                arms += [design.washout_label] * design.washout_days
                day += design.washout_days
            days.append(np.arange(day, day + design.period_days))
            pids += [pid] * design.period_days
            blocks += [block] * design.period_days
            arms += [arm] * design.period_days
            day += design.period_days
    day_array = np.concatenate(days).astype("int64") if days else np.zeros(0, dtype="int64")
    if design.start_date:
        start = np.datetime64(dt.date.fromisoformat(design.start_date), "D")
        dates = (start + (day_array - design.first_day).astype("timedelta64[D]")).astype("datetime64[ns]")
    else:
        dates = np.full(day_array.size, np.datetime64("NaT"), dtype="datetime64[ns]")
    frame = pd.DataFrame({
        "patient_id": pids, "day": day_array, "date": dates, "block": pd.array(blocks, dtype="Int64"),
        "treatment": arms, "severity": np.full(day_array.size, math.nan), "view": [DEFAULT_VIEW] * day_array.size,
        "face": pd.Series([None] * day_array.size, dtype=object)}, columns=list(COLUMNS))
    frame.attrs.update(source="<design>", form="native")
    return frame


def _patient_rngs(seed: int, n: int, stream: int) -> list[np.random.Generator]:
    """Independent generators per patient: patient i's draws do not depend on how many patients follow."""
    root = np.random.SeedSequence([int(seed), stream])
    return [np.random.default_rng(s) for s in root.spawn(n)]


# ------------------------------------------------------------------------------------------ kinetics

def treatment_calendar(days: np.ndarray, treatments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One patient's calendar: every day from the first to the last, and the treatment on each.

    A scheduled day's treatment is that of its first row (views share a day); a day the schedule skips
    continues the previous day's treatment. The simulator and the exposure regressors of the analysis
    (:func:`synthtrial.analyze.nof1.exposures`) both read the kinetics off this calendar.
    """
    days = np.asarray(days).astype(np.int64)
    seen, first = np.unique(days, return_index=True)
    grid = np.arange(seen[0], seen[-1] + 1)
    return grid, np.asarray(treatments, dtype=object)[first][np.searchsorted(seen, grid, side="right") - 1]


def exposure(given: np.ndarray, washin_half_life: float, washout_half_life: float) -> np.ndarray:
    """First-order exposure (0-1) to one arm over consecutive days; ``given[d]`` is True on dosing days."""
    keep_in = 0.0 if washin_half_life == 0 else 2.0 ** (-1.0 / washin_half_life)
    keep_out = 0.0 if washout_half_life == 0 else 2.0 ** (-1.0 / washout_half_life)
    x = np.empty(len(given))
    level = 0.0
    for d, on in enumerate(np.asarray(given, dtype=bool)):
        level = 1.0 - (1.0 - level) * keep_in if on else level * keep_out
        x[d] = level
    return x


# ---------------------------------------------------------------------------------------- simulation

def simulate_severity(schedule: pd.DataFrame, model: SeverityModel, seed: int = 0,
                      reference: str | None = None, no_effect: Sequence[str] = (),
                      counterfactual: bool = False) -> SimulatedTrial:
    """Fill the ``severity`` column of a schedule by simulation and return it with the truth.

    Works on any normalised protocol frame (a designed schedule or a user's file without severities).
    The kinetics run over every calendar day from a patient's first to last day; on days the schedule
    skips, the previous day's treatment is assumed to continue. ``reference`` (default: the first
    row's treatment) is the arm every effect is measured against; treatments named in ``no_effect``
    (washout days) are neither reference nor arms. Every other treatment is an arm, with effect 0 unless
    ``model.effects`` gives one. ``counterfactual`` also gives every row's severity under each arm given on
    every day, from the same draws (``SimulatedTrial.counterfactual``).
    """
    if schedule.empty:
        raise DesignError("the schedule has no rows")
    treatments = schedule["treatment"].unique().tolist()
    reference = reference if reference is not None else str(schedule["treatment"].iloc[0])
    if reference not in treatments:
        raise DesignError(f"{_option('reference')} '{reference}' is not a treatment of this protocol "
                          f"({', '.join(treatments)})")
    unknown = [a for a in model.effects if a not in treatments]
    if unknown:
        raise DesignError(f"effect (--effect {unknown[0]}=...) names no treatment of this protocol "
                          f"({', '.join(treatments)})")
    if model.effects.get(reference, 0.0) != 0.0:
        raise DesignError(f"effect (--effect {reference}=...): the reference arm '{reference}' has no effect "
                          "by definition; give the other arms' effects relative to it")
    active = [a for a in treatments if a != reference and a not in no_effect]

    patient_of_row = schedule["patient_id"].astype(str).to_numpy(dtype=object)
    pids = list(dict.fromkeys(patient_of_row))
    day_of_row = schedule["day"].to_numpy(dtype="int64")
    treatment_of_row = schedule["treatment"].astype(str).to_numpy(dtype=object)
    rows_of = pd.Series(np.arange(len(schedule))).groupby(patient_of_row, sort=False).indices
    effect_rngs = _patient_rngs(seed, len(pids), stream=1)
    noise_rngs = _patient_rngs(seed, len(pids), stream=2)
    missing_rngs = _patient_rngs(seed, len(pids), stream=3)
    out = schedule.copy()
    severity = np.full(len(out), np.nan)
    keep = np.ones(len(out), dtype=bool)
    patients: dict[str, Any] = {}
    arms = [reference, *active] if counterfactual else []
    worlds = {arm: np.full(len(out), np.nan) for arm in arms}
    # each patient's first effect draw is its baseline's quantile (the truncated normal, all patients at once)
    baselines = _truncated_normal([float(rng.random()) for rng in effect_rngs], model.baseline_mean,
                                  model.baseline_sd, model.baseline_min, model.baseline_max)
    for pid, baseline, effect_rng, noise_rng, missing_rng in zip(pids, baselines, effect_rngs, noise_rngs,
                                                                 missing_rngs, strict=True):
        idx = np.asarray(rows_of[pid])
        severity[idx], keep[idx], patients[pid], paths = _simulate_patient(
            day_of_row[idx], treatment_of_row[idx], model, baseline, reference, active,
            (effect_rng, noise_rng, missing_rng), arms)
        for arm, path in paths.items():
            worlds[arm][idx] = path

    out["severity"] = severity
    cf = None if not counterfactual else pd.DataFrame({
        "patient_id": np.tile(patient_of_row[keep], len(arms)), "day": np.tile(day_of_row[keep], len(arms)),
        "arm": np.repeat(np.asarray(arms, dtype=object), int(keep.sum())),
        "severity": np.concatenate([worlds[a][keep] for a in arms])})
    out = out.loc[keep].reset_index(drop=True)
    out.attrs.update(schedule.attrs)
    return SimulatedTrial(out, _truth(model, seed, reference, active, treatments, patients), cf)


def _simulate_patient(row_days: np.ndarray, row_treatments: np.ndarray, model: SeverityModel, baseline: float,
                      reference: str, active: list[str], rngs: tuple[np.random.Generator, ...],
                      always: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, Any]]:
    """One patient's severity on each of its rows, which rows are kept (not missing), its truth, and its
    severity on each row were each arm of ``always`` given on every day (all draws the same)."""
    effect_rng, noise_rng, missing_rng = rngs
    # one value per day (its first row's treatment), shared by every view of that day
    days_seen, first_row = np.unique(row_days, return_index=True)
    grid, arm_on_day = treatment_calendar(row_days, row_treatments)
    first, last = int(grid[0]), int(grid[-1])

    effects = {a: model.effects.get(a, 0.0) + model.effect_sd * float(effect_rng.standard_normal()) for a in active}
    effect_part = np.zeros(len(grid))
    curves = {}
    for a in active:
        curves[a] = exposure(arm_on_day == a, model.washin_half_life, model.washout_half_life)
        effect_part += effects[a] * curves[a]
    mu = baseline + model.trend_per_day * (grid - first) + effect_part
    noise = _ar1(noise_rng, len(grid), model.ar_phi, model.noise_sd)
    raw = mu + noise
    s = np.clip(raw, scale.SEVERITY_MIN, scale.SEVERITY_MAX) + 0.0
    clipped_days = int(((raw < scale.SEVERITY_MIN) | (raw > scale.SEVERITY_MAX)).sum())

    missing_days: list[int] = []
    keep = np.ones(len(row_days), dtype=bool)
    if model.missing_rate > 0:
        dropped = missing_rng.random(len(grid)) < model.missing_rate
        scheduled = set(days_seen.tolist())
        missing_days = [int(d) for d in grid[dropped] if d in scheduled]
        keep = ~np.isin(row_days, missing_days)

    ref_days = arm_on_day == reference
    delivered = {a: mean_difference(effect_part, arm_on_day == a, ref_days) for a in active}
    in_row_order = row_treatments[np.sort(first_row)].tolist()
    truth = {
        "baseline": baseline,
        "effects": effects,
        "delivered_effects": delivered,
        **patient_estimands(effects, delivered, curves, arm_on_day, reference),
        "period_order": [t for i, t in enumerate(in_row_order) if i == 0 or t != in_row_order[i - 1]],
        "first_day": first,
        "last_day": last,
        "missing_days": missing_days,
        "clipped_days": clipped_days,
    }
    paths = {}
    for arm in always:  # the same arithmetic on a calendar of one arm: equal bits until the calendars differ
        part = np.zeros(len(grid))
        for a in active:
            part += effects[a] * exposure(np.full(len(grid), a == arm), model.washin_half_life, model.washout_half_life)
        raw_arm = baseline + model.trend_per_day * (grid - first) + part + noise
        paths[arm] = (np.clip(raw_arm, scale.SEVERITY_MIN, scale.SEVERITY_MAX) + 0.0)[row_days - first]
    return s[row_days - first], keep, truth, paths


def _truth(model: SeverityModel, seed: int, reference: str, active: list[str], treatments: list[str],
           patients: dict[str, Any]) -> dict[str, Any]:
    """The truth file's content: every parameter and every patient's truth, with the arms' summaries and
    estimands (:mod:`synthtrial.trial.estimands`)."""
    population = {a: model.effects.get(a, 0.0) for a in active}
    return {
        "synthtrial_version": __version__,
        "seed": int(seed),
        "reference": reference,
        "arms": [reference, *active],
        "treatments": treatments,
        "model": dataclasses.asdict(model),
        "equations": MODEL_EQUATIONS,
        "population_effects": population,
        "mean_delivered_effects": {a: _mean([p["delivered_effects"][a] for p in patients.values()])
                                   for a in active},
        **trial_estimands(population, patients, active),
        "clipped_days": sum(p["clipped_days"] for p in patients.values()),
        "patients": patients,
        "notes": ("effects are in severity units (0-3 scale), negative improves, relative to the reference arm. "
                  "'effects' are each patient's steady-state effects; 'delivered_effects' are the mean effect "
                  "on that arm's days minus the mean effect on reference days, with wash-in, washout and "
                  "carryover applied (no trend, no noise, no clipping): the difference a perfect outcome would "
                  "show; it splits into 'direct_effects' (the arm's own effect at the exposure its days reach) "
                  "and 'carryover_effects' (exposure on days an arm is not given), defined under 'estimands'. "
                  "'mean_*' average over the trial's patients, 'population_*' hold the population effects through "
                  "the patients' mean exposure contrasts. 'clipped_days' counts days whose severity was clipped "
                  "to the 0-3 scale."),
    }


def simulate_trial(design: TrialDesign, model: SeverityModel, seed: int = 0,
                   counterfactual: bool = False) -> SimulatedTrial:
    """Design a schedule and simulate it: the protocol CSV and truth.json of a synthetic trial (and, with
    ``counterfactual``, each arm's severities as :func:`simulate_severity` gives them)."""
    unknown = [a for a in model.effects if a not in design.arms]
    if unknown:
        raise DesignError(f"effect (--effect {unknown[0]}=...) names no arm of the design "
                          f"({', '.join(design.arms)})")
    schedule = design_schedule(design, seed)
    trial = simulate_severity(schedule, model, seed, reference=design.reference,
                              no_effect=(design.washout_label,), counterfactual=counterfactual)
    trial.truth = {"design": dataclasses.asdict(design), **trial.truth}
    return trial


def _truncated_normal(quantiles: Sequence[float], mean: float, sd: float, low: float, high: float) -> list[float]:
    """The truncated normal's values at the given quantiles (inverse CDF)."""
    from scipy import stats

    if sd == 0:
        return [float(mean)] * len(quantiles)
    a, b = (low - mean) / sd, (high - mean) / sd
    return [float(v) for v in np.atleast_1d(stats.truncnorm.ppf(np.asarray(quantiles, dtype=float), a, b, loc=mean,
                                                                 scale=sd))]


def _ar1(rng: np.random.Generator, n: int, phi: float, sd: float) -> np.ndarray:
    z = rng.standard_normal(n)
    e = np.empty(n)
    if n == 0:
        return e
    e[0] = sd * z[0]
    innovation = sd * math.sqrt(1.0 - phi * phi)
    for t in range(1, n):
        e[t] = phi * e[t - 1] + innovation * z[t]
    return e


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


# ------------------------------------------------------------------------------------------- presets

#: Ready-made designs: the anchor protocol's layout and Fu et al.'s short trial.
PRESETS: dict[str, tuple[TrialDesign, SeverityModel]] = {
    "anchor": (
        TrialDesign(design="baseline-alternating", arms=("Baseline", "Antibiotics", "Cream"), n_patients=10,
                    blocks=5, period_days=28, washout_days=0, randomize=False, start_date="2018-01-01",
                    first_day=1),
        SeverityModel(effects={"Antibiotics": -0.9, "Cream": -0.5}, effect_sd=0.2, baseline_mean=2.2,
                      baseline_sd=0.35, baseline_min=1.6, baseline_max=2.7, trend_per_day=-0.001,
                      washin_half_life=3.0, washout_half_life=4.0, ar_phi=0.6, noise_sd=0.12,
                      missing_rate=0.0),
    ),
    "quick": (
        TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=3, blocks=4, period_days=2,
                    washout_days=0, randomize=False, start_date="2018-01-01", first_day=1),
        SeverityModel(effects={"Cream": -0.6}, effect_sd=0.1, baseline_mean=1.8, baseline_sd=0.3,
                      baseline_min=1.0, baseline_max=2.6, trend_per_day=0.0, washin_half_life=0.5,
                      washout_half_life=0.5, ar_phi=0.2, noise_sd=0.08, missing_rate=0.0),
    ),
}
PRESET_HELP = {
    "anchor": "10 patients x 140 days: Baseline, Antibiotics, Cream, Antibiotics, Cream in 28-day periods "
              "(the synthetic_acne_images protocol), with real effects",
    "quick": "3 patients x 16 days: Fu et al.'s 4 blocks of 2 days off + 2 days on (Control / Cream)",
}


def preset(name: str) -> tuple[TrialDesign, SeverityModel]:
    try:
        return PRESETS[name]
    except KeyError:
        raise DesignError(f"unknown preset '{name}'; presets are {', '.join(PRESETS)}") from None


def parse_effects(values: Sequence[str]) -> dict[str, float]:
    """``["Cream=-0.5", ...]`` (the ``--effect`` option) as ``{"Cream": -0.5, ...}``."""
    effects: dict[str, float] = {}
    for item in values:
        arm, sep, number = item.partition("=")
        arm = arm.strip()
        if not sep or not arm:
            raise DesignError(f"--effect '{item}' must look like ARM=NUMBER, e.g. --effect Cream=-0.5")
        try:
            effects[arm] = float(number)
        except ValueError:
            raise DesignError(f"--effect '{item}': '{number}' is not a number") from None
    return effects


def design_with_overrides(name: str, design_changes: dict[str, Any] | None = None,
                          model_changes: dict[str, Any] | None = None) -> tuple[TrialDesign, SeverityModel]:
    """A preset with some fields replaced (``None`` values are ignored), as ``protocol design`` builds it.

    When the arms change and the effects do not, the preset's effects are kept for the arms that remain.
    Naming the ``pairs`` design draws each pair's order per patient unless ``randomize`` is given (False: the
    fixed order); a preset used as it is keeps its own order (both presets are fixed-order).
    """
    base_design, base_model = preset(name)
    design_changes = {k: v for k, v in (design_changes or {}).items() if v is not None}
    model_changes = {k: v for k, v in (model_changes or {}).items() if v is not None}
    if design_changes.get("design") == "pairs":
        design_changes.setdefault("randomize", True)
    if "arms" in design_changes and "effects" not in model_changes:
        model_changes["effects"] = {a: v for a, v in base_model.effects.items() if a in design_changes["arms"]}
    return dataclasses.replace(base_design, **design_changes), dataclasses.replace(base_model, **model_changes)
