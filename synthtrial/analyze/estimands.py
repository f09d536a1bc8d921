"""Which estimand each effect row targets, and that estimand's value in a simulation truth.

The estimands are defined in :mod:`synthtrial.trial.estimands` (docs/analysis.md states them in ICH E9(R1)
terms). Every method reports a *delivered* contrast (arm minus reference, wash-in, washout and carryover
included); what differs is whose:

* :data:`PATIENT_DELIVERED` — the patient's own delivered contrast (``patients[id].delivered_effects``): every
  per-patient method (``period``, ``randomization``, ``gls_kinetics``, which fits the steady-state effects
  through the exposure kinetics and reports their delivered contrast, and the descriptive ones);
* :data:`POPULATION_DELIVERED` — the population mean effects delivered through the trial's schedules
  (``population_delivered_effects``): the pooled mixed model, whose cluster-robust interval is for the fixed
  effects of the population the patients were drawn from, not for these patients' mean. The sample mean
  over the trial's patients (``mean_delivered_effects``) is kept beside it (``true_sample_mean``).

:func:`truth_tables` gives, for a row's scope and estimand, the arm -> value tables of its truth, its
steady-state effect, the carryover part of its truth and (pooled rows) the sample mean. A truth file written
before these estimands existed lacks ``population_*`` and ``carryover_effects``: those values are None
(NaN in the table), everything else is read as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PATIENT_DELIVERED = "patient_delivered"
POPULATION_DELIVERED = "population_delivered"
#: What each estimand is, in one line (the report and the docs use it).
DESCRIPTIONS = {
    PATIENT_DELIVERED: "the patient's delivered contrast: mean effect on the arm's days minus on reference days, "
                       "kinetics and carryover included",
    POPULATION_DELIVERED: "the population mean effects delivered through this trial's schedules (the interval "
                          "is for the population; the sample mean of the patients' contrasts is kept beside it)",
}
#: Keys of the tables :func:`truth_tables` returns: the row's truth, its steady-state effect, the carryover part
#: of its truth and the sample mean (pooled rows only).
TABLES = ("truth", "steady_state", "carryover", "sample_mean")


def truth_tables(truth: Mapping[str, Any], scope: str, estimand: str) -> dict[str, Mapping[str, Any] | None]:
    """The arm -> value tables of one row's truth (keys :data:`TABLES`); None where the truth has no such table
    (a patient it does not know, an older truth file)."""
    if estimand == POPULATION_DELIVERED:
        return {"truth": truth.get("population_delivered_effects"), "steady_state": truth.get("population_effects"),
                "carryover": truth.get("population_carryover_effects"),
                "sample_mean": truth.get("mean_delivered_effects")}
    patients = truth.get("patients")
    entry = patients.get(scope) if isinstance(patients, Mapping) else None
    if not isinstance(entry, Mapping):
        return dict.fromkeys(TABLES)
    return {"truth": entry.get("delivered_effects"), "steady_state": entry.get("effects"),
            "carryover": entry.get("carryover_effects"), "sample_mean": None}
