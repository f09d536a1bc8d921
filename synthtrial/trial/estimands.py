"""The estimands a simulated trial's truth holds: steady-state, delivered, direct and carryover effects.

For patient *i* and arm *a* (against the reference arm 0), with ``e[b]`` the patient's steady-state effect
of arm *b* (the simulation's parameter), ``x_b(d)`` its first-order exposure to arm *b* on calendar day *d*
(:func:`synthtrial.trial.simulate.exposure`: wash-in on the days *b* is given, washout on every other day),
``D_a`` the calendar days on arm *a* and ``m(x, D)`` the mean of ``x`` over the days ``D``:

* **steady state** ``e[a]``: the effect once the exposure has reached 1 and nothing else is active
  (``effects``; the population value is ``population_effects``, the model's fixed effect);
* **delivered** ``sum_b e[b] * C[a][b]`` with the exposure contrast ``C[a][b] = m(x_b, D_a) - m(x_b, D_0)``:
  the mean effect on the arm's days minus the mean on reference days, what a perfect outcome would show in
  this design (no trend, noise or clipping). It depends on the design (period length, order, kinetics);
* **direct** ``e[a] * m(x_a, D_a)``: the arm's own effect at the exposure its own days reach (wash-in
  included); equal to the steady-state effect when wash-in is instant;
* **carryover** ``sum_{b != a} e[b] * m(x_b, D_a) - sum_b e[b] * m(x_b, D_0)``: what exposure on days an arm
  is *not* given adds to the contrast: the other arms washing out onto the arm's days, minus every arm
  washing out onto the reference days. It is 0 when washout is instant, and delivered = direct + carryover
  (the file stores carryover as delivered - direct, so the identity holds exactly).

Trial summaries: ``mean_*`` are means over the trial's patients (the sample); ``population_*`` average the
same contrasts over the population of effects with this trial's schedules held fixed, i.e. the population
(fixed) effects through the patients' mean exposure contrasts: ``sum_b beta[b] * mean_i C_i[a][b]``
(direct: ``beta[a] * mean_i m_i(x_a, D_a)``). The population value is what a random-effects model's interval
for the mean effect covers; the sample mean is what an interval conditional on the patients would cover.
Every mean but the steady state's (all patients) runs over the patients that have both the arm and
the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: What each estimand key of a truth file means (written into the file under ``estimands``).
DEFINITIONS = {
    "effects": "steady-state effect e[a] of each arm (exposure 1, nothing else active); the simulation's parameter",
    "delivered_effects": "delivered contrast sum_b e[b]*(m(x_b, D_a) - m(x_b, D_0)): mean effect on the arm's "
                         "days minus on reference days, kinetics included (no trend, noise or clipping)",
    "direct_effects": "e[a]*m(x_a, D_a): the arm's own effect at the mean exposure its own days reach",
    "carryover_effects": "delivered - direct = sum_{b!=a} e[b]*m(x_b, D_a) - sum_b e[b]*m(x_b, D_0): other arms' "
                         "exposure on the arm's days minus every arm's exposure on reference days; 0 with instant "
                         "washout",
    "exposure_contrasts": "C[a][b] = m(x_b, D_a) - m(x_b, D_0): the design's mean exposure to arm b on arm a's days "
                          "minus on reference days (delivered = sum_b e[b]*C[a][b])",
    "own_exposure": "m(x_a, D_a): mean exposure to the arm on its own days (direct = e[a]*own_exposure)",
    "mean_*": "means over the trial's patients (the sample): those that have the arm and the reference, all of "
              "them for mean_effects",
    "population_*": "population (fixed) effects through the patients' mean exposure contrasts, schedules held "
                    "fixed: population_delivered[a] = sum_b beta[b]*mean_i C_i[a][b], population_direct[a] = "
                    "beta[a]*mean_i own_exposure_i[a], population_carryover = population_delivered - "
                    "population_direct",
}


def mean_difference(values: np.ndarray, on: np.ndarray, ref: np.ndarray) -> float | None:
    """``mean(values[on]) - mean(values[ref])``; None when either set of days is empty."""
    if not on.any() or not ref.any():
        return None
    return float(values[on].mean() - values[ref].mean())


def patient_estimands(effects: Mapping[str, float], delivered: Mapping[str, float | None],
                      curves: Mapping[str, np.ndarray], arm_on_day: np.ndarray, reference: str) -> dict[str, Any]:
    """One patient's direct and carryover effects, own exposure and exposure contrasts (see the module docstring).

    ``curves`` holds each active arm's exposure over the patient's calendar, ``arm_on_day`` the treatment of
    each calendar day; an arm without days of its own or of the reference gets None everywhere.
    """
    ref_days = arm_on_day == reference
    direct: dict[str, float | None] = {}
    carryover: dict[str, float | None] = {}
    own: dict[str, float | None] = {}
    contrasts: dict[str, dict[str, float | None] | None] = {}
    for a in effects:
        on = arm_on_day == a
        if delivered.get(a) is None or not on.any() or not ref_days.any():
            direct[a] = carryover[a] = own[a] = contrasts[a] = None
            continue
        own[a] = float(curves[a][on].mean())
        direct[a] = float(effects[a] * own[a])
        carryover[a] = float(delivered[a] - direct[a])
        contrasts[a] = {b: mean_difference(curves[b], on, ref_days) for b in effects}
    return {"direct_effects": direct, "carryover_effects": carryover, "own_exposure": own,
            "exposure_contrasts": contrasts}


def trial_estimands(population: Mapping[str, float], patients: Mapping[str, Mapping[str, Any]],
                    active: Sequence[str]) -> dict[str, Any]:
    """The trial's sample means and population values of every estimand (see the module docstring)."""
    def mean_of(key: str, a: str) -> float | None:
        values = [p[key][a] for p in patients.values() if p.get(key, {}).get(a) is not None]
        return float(np.mean(values)) if values else None

    pop_delivered: dict[str, float | None] = {}
    pop_direct: dict[str, float | None] = {}
    pop_carryover: dict[str, float | None] = {}
    for a in active:
        rows = [p["exposure_contrasts"][a] for p in patients.values() if p["exposure_contrasts"].get(a) is not None]
        if not rows:
            pop_delivered[a] = pop_direct[a] = pop_carryover[a] = None
            continue
        pop_delivered[a] = float(sum(population[b] * np.mean([row[b] for row in rows]) for b in active))
        pop_direct[a] = float(population[a] * mean_of("own_exposure", a))
        pop_carryover[a] = pop_delivered[a] - pop_direct[a]
    return {
        "mean_effects": {a: mean_of("effects", a) for a in active},
        "mean_direct_effects": {a: mean_of("direct_effects", a) for a in active},
        "mean_carryover_effects": {a: mean_of("carryover_effects", a) for a in active},
        "population_delivered_effects": pop_delivered,
        "population_direct_effects": pop_direct,
        "population_carryover_effects": pop_carryover,
        "estimands": DEFINITIONS,
    }
