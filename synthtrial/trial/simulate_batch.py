"""Many simulated trials of one design at once, as arrays: the numbers :func:`simulate_trial` gives, without its frames.

A power study simulates thousands of trials of one :class:`~synthtrial.trial.simulate.TrialDesign`; building
each one's protocol frame and truth dictionary costs more than drawing it. :func:`simulate_batch` draws the
same random numbers in the same order as :func:`~synthtrial.trial.simulate.simulate_trial` (per patient the
streams of ``SeedSequence([seed, stream]).spawn``: 0 the order, 1 the baseline quantile then one effect per
active arm in first-appearance order, 2 the AR(1) innovations, 3 the missing days) and keeps the result as
arrays over (replicate, patient, calendar day), with the truth values the analysis compares against
(steady-state, delivered and carryover effects per patient; the trial's sample means and population values).

Choices, stated once:

* Every patient of a designed schedule has the same number of calendar days (``days_per_patient``, washout
  days included) starting on ``first_day``, so the calendar is one axis of the arrays; a patient's schedule is
  its order of period arms, and the exposure curves and estimands of each order are computed once (a cache).
* The AR(1) recursion runs over every patient of every replicate at once: the same operations, element by
  element, as the one-patient loop, so the same numbers.
* :func:`batch_covers` says which designs this covers: each possible order holds the reference and every
  active arm (otherwise an arm's truth is None for some patients, which the arrays do not hold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from synthtrial.trial import scale
from synthtrial.trial.estimands import mean_difference
from synthtrial.trial.simulate import SeverityModel, TrialDesign, exposure


def batch_covers(design: TrialDesign) -> bool:
    """Whether every order the design can draw holds every arm (then :func:`simulate_batch` applies)."""
    active = len(design.arms) - 1
    if design.design == "baseline-alternating":
        return design.blocks - 1 >= active
    return design.blocks >= 2 or design.design == "pairs"


@dataclass
class Schedule:
    """One patient order's calendar: treatment and block of each day, each active arm's exposure and estimands."""

    order: tuple[str, ...]
    treatments: np.ndarray          # (L,) str, washout days included
    blocks: np.ndarray              # (L,) object: the block number, None on washout days
    curves: dict[str, np.ndarray]   # active arm -> exposure on each calendar day
    own: dict[str, float]           # m(x_a, D_a)
    contrasts: dict[str, dict[str, float]]  # C[a][b] = m(x_b, D_a) - m(x_b, D_0)


@dataclass
class TrialBatch:
    """Simulated trials of one design: arrays over (replicate, patient, calendar day) and the truth values.

    Arm axes follow ``arms`` (the design's active arms); ``active`` is each replicate's first-appearance order.
    """

    design: TrialDesign
    model: SeverityModel
    seeds: list[int]
    arms: list[str]
    active: list[list[str]]
    orders: list[list[tuple[str, ...]]]      # per replicate, per patient
    severity: np.ndarray                      # (R, P, L), clipped to the scale
    kept: np.ndarray                          # (R, P, L) False on a missing day
    effects: np.ndarray                       # (R, P, A) steady state
    delivered: np.ndarray                     # (R, P, A)
    carryover: np.ndarray                     # (R, P, A)
    mean_delivered: np.ndarray                # (R, A)
    population_delivered: np.ndarray          # (R, A)
    population_carryover: np.ndarray          # (R, A)
    schedules: dict[tuple[str, ...], Schedule] = field(default_factory=dict)

    @property
    def days(self) -> np.ndarray:
        """The calendar days of every patient."""
        return self.design.first_day + np.arange(self.severity.shape[2])


def _schedule(design: TrialDesign, model: SeverityModel, order: tuple[str, ...]) -> Schedule:
    treatments, blocks = [], []
    numbers = [block for block, _ in design.period_arms(np.random.default_rng(0))]  # the same for every order
    for k, (block, arm) in enumerate(zip(numbers, order)):
        if k > 0 and design.washout_days:
            treatments += [design.washout_label] * design.washout_days
            blocks += [None] * design.washout_days
        treatments += [arm] * design.period_days
        blocks += [block] * design.period_days
    on_day = np.asarray(treatments, dtype=object)
    active = list(design.arms[1:])
    curves = {a: exposure(on_day == a, model.washin_half_life, model.washout_half_life) for a in active}
    ref = on_day == design.reference
    own = {a: float(curves[a][on_day == a].mean()) for a in active}
    contrasts = {a: {b: mean_difference(curves[b], on_day == a, ref) for b in active} for a in active}
    return Schedule(order, on_day.astype(str), np.asarray(blocks, dtype=object), curves, own, contrasts)


def _streams(seed: int, n: int, stream: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), stream]).spawn(n)]


def simulate_batch(design: TrialDesign, model: SeverityModel, seeds: list[int],
                   cache: dict[tuple[str, ...], Schedule] | None = None) -> TrialBatch:
    """The trials ``simulate_trial(design, model, seed)`` gives for each seed, as one :class:`TrialBatch`."""
    from scipy import stats

    schedules = {} if cache is None else cache
    n, arms = design.n_patients, list(design.arms[1:])
    fixed = [arm for _, arm in design.period_arms(np.random.default_rng(0))] if not design.randomize else None
    orders, active_orders, draws, noise_z, missing_u = [], [], [], [], []
    for seed in seeds:
        rows = ([tuple(arm for _, arm in design.period_arms(rng)) for rng in _streams(seed, n, 0)]
                if design.randomize else [tuple(fixed)] * n)
        orders.append(rows)
        seen = list(dict.fromkeys(a for order in rows for a in order))
        active = [a for a in seen if a != design.reference]
        active_orders.append(active)
        length = design.days_per_patient
        per_patient = []
        for rng in _streams(seed, n, 1):
            u = float(rng.random())
            per_patient.append((u, {a: float(rng.standard_normal()) for a in active}))
        draws.append(per_patient)
        noise_z.append([rng.standard_normal(length) for rng in _streams(seed, n, 2)])
        if model.missing_rate > 0:
            missing_u.append([rng.random(length) for rng in _streams(seed, n, 3)])
    for rows in orders:
        for order in rows:
            if order not in schedules:
                schedules[order] = _schedule(design, model, order)
    r_count, length = len(seeds), design.days_per_patient
    quantiles = np.array([[u for u, _ in per_patient] for per_patient in draws]).reshape(-1)
    if model.baseline_sd == 0:
        baselines = np.full(quantiles.size, float(model.baseline_mean))
    else:
        a, b = ((model.baseline_min - model.baseline_mean) / model.baseline_sd,
                (model.baseline_max - model.baseline_mean) / model.baseline_sd)
        baselines = np.atleast_1d(stats.truncnorm.ppf(quantiles, a, b, loc=model.baseline_mean,
                                                      scale=model.baseline_sd)).astype(float)
    baselines = baselines.reshape(r_count, n)
    effects = np.zeros((r_count, n, len(arms)))
    effect_part = np.zeros((r_count, n, length))
    for r, per_patient in enumerate(draws):
        for i, (_, z) in enumerate(per_patient):
            sched = schedules[orders[r][i]]
            part = np.zeros(length)
            for a in active_orders[r]:
                value = model.effects.get(a, 0.0) + model.effect_sd * z[a]
                effects[r, i, arms.index(a)] = value
                part += value * sched.curves[a]
            effect_part[r, i] = part
    grid = np.arange(length)
    mu = baselines[:, :, None] + model.trend_per_day * grid + effect_part
    z = np.asarray(noise_z, dtype=float)
    noise = np.empty_like(z)
    noise[:, :, 0] = model.noise_sd * z[:, :, 0]
    innovation = model.noise_sd * math.sqrt(1.0 - model.ar_phi * model.ar_phi)
    for t in range(1, length):
        noise[:, :, t] = model.ar_phi * noise[:, :, t - 1] + innovation * z[:, :, t]
    severity = np.clip(mu + noise, scale.SEVERITY_MIN, scale.SEVERITY_MAX) + 0.0
    kept = (np.asarray(missing_u) >= model.missing_rate) if model.missing_rate > 0 else np.ones(severity.shape, bool)
    return TrialBatch(design, model, list(seeds), arms, active_orders, orders, severity, kept, effects,
                       *_truth_arrays(design, model, orders, active_orders, schedules, effects, effect_part),
                       schedules)


def _truth_arrays(design: TrialDesign, model: SeverityModel, orders, active_orders, schedules, effects: np.ndarray,
                  effect_part: np.ndarray) -> tuple[np.ndarray, ...]:
    """delivered, carryover (R, P, A); the sample mean of delivered, population delivered and carryover (R, A).
    Sums run in each replicate's first-appearance order of the arms, as the truth file's do."""
    r_count, n, _ = effects.shape
    arms = list(design.arms[1:])
    delivered, carryover = np.zeros(effects.shape), np.zeros(effects.shape)
    pop_delivered, pop_carryover = np.zeros((r_count, len(arms))), np.zeros((r_count, len(arms)))
    population = {a: model.effects.get(a, 0.0) for a in arms}
    for r in range(r_count):
        for i in range(n):
            sched = schedules[orders[r][i]]
            ref = sched.treatments == design.reference
            for j, a in enumerate(arms):
                delivered[r, i, j] = mean_difference(effect_part[r, i], sched.treatments == a, ref)
                carryover[r, i, j] = float(delivered[r, i, j] - float(effects[r, i, j] * sched.own[a]))
        for j, a in enumerate(arms):
            rows = [schedules[order].contrasts[a] for order in orders[r]]
            pop_delivered[r, j] = float(sum(population[b] * np.mean([row[b] for row in rows])
                                            for b in active_orders[r]))
            own = float(np.mean([schedules[order].own[a] for order in orders[r]]))
            pop_carryover[r, j] = pop_delivered[r, j] - float(population[a] * own)
    mean_delivered = np.array([[float(np.mean(delivered[r, :, j].tolist())) for j in range(len(arms))]
                               for r in range(r_count)])
    return delivered, carryover, mean_delivered, pop_delivered, pop_carryover
