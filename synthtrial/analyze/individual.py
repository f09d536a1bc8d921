"""Each outcome's per-patient estimates against the patients' own effects, read off the counterfactual worlds.

A run made with ``generate --counterfactual`` holds every patient's individual treatment effect on every day
against each arm's world (``RUN/counterfactual/individual_effects.parquet``;
:mod:`synthtrial.trial.counterfactual` defines them). A per-patient method estimates the patient's contrast of
arm *A* against the reference *R*; its individual truth is the same contrast taken through the reference world,
``mean(ITE_R over the patient's A days) - mean(ITE_R over its R days)`` (``ITE_R`` is not zero on reference days
when an effect carries over). Unlike ``truth.json``'s delivered effect it exists in the outcome's own units:
severity for the outcomes on the severity scale (:data:`UNITS`: ``oracle``, ``lesion_severity``), lesions for
``lesion_count``; the other outcomes' units have no counterfactual value and are left out.

``individual_effects.csv`` (in ``RUN/analysis/``) has one row per outcome, method, patient and arm: the estimate,
the individual effect, their difference (``error``), the mean of the patients' individual effects
(``average_effect``) and the estimate's difference from it (``error_vs_average``). :func:`summary` gives, per
outcome, method and arm, the root mean squared error against each patient's own effect beside the one against
the average: a method that tracks the patients' differences has the first below the second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from synthtrial.run import rundir

INDIVIDUAL = "individual_effects.csv"
#: Which individual effect each outcome is compared with: the ITE column of the counterfactual table.
UNITS = {"oracle": "ite_severity", "lesion_severity": "ite_severity", "lesion_count": "ite_count"}
COLUMNS = ("outcome", "method", "role", "scope", "arm", "reference", "estimate", "individual_effect", "error",
           "average_effect", "error_vs_average")


def patient_contrasts(ite: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Each patient's individual contrast of every arm against ``reference`` (columns ``scope, arm`` and one per
    ITE column), through the reference arm's world; empty when the table has no such world."""
    world = ite[ite["arm"] == reference]
    rows = []
    for pid, days in world.groupby("patient_id", sort=False):
        on_ref = days["treatment"] == reference
        if not on_ref.any():
            continue
        for arm in days.loc[~on_ref, "treatment"].unique():
            on_arm = days["treatment"] == arm
            rows.append({"scope": pid, "arm": arm, **{c: float(days.loc[on_arm, c].mean() - days.loc[on_ref, c].mean())
                                                      for c in ("ite_severity", "ite_count")}})
    return pd.DataFrame(rows, columns=["scope", "arm", "ite_severity", "ite_count"])


def individual_errors(run_dir: Path, effects: pd.DataFrame, reference: str) -> pd.DataFrame | None:
    """The per-patient rows of ``effects`` beside each patient's individual effect (see the module docstring);
    None for a run without counterfactual worlds."""
    ite = rundir.read_individual_effects(run_dir)
    if ite is None:
        return None
    truth = patient_contrasts(ite, reference)
    rows = effects[(effects["scope"] != "pooled") & effects["outcome"].isin(list(UNITS))]
    both = rows.merge(truth, on=["scope", "arm"], how="inner")
    both["individual_effect"] = [r[UNITS[r["outcome"]]] for _, r in both.iterrows()] if len(both) else []
    both["error"] = both["estimate"] - both["individual_effect"]
    average = both.groupby(["outcome", "method", "arm"])["individual_effect"].transform("mean")
    both["average_effect"] = average
    both["error_vs_average"] = both["estimate"] - average
    return both[list(COLUMNS)].reset_index(drop=True)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per outcome, method and arm: patients, RMSE against the individual effects and against their average,
    and the individual effects' SD (the spread a method would have to find)."""
    def rmse(v: pd.Series) -> float:
        v = v.dropna()
        return float(np.sqrt(np.mean(np.square(v)))) if len(v) else np.nan

    return (table.groupby(["outcome", "method", "arm"], as_index=False, sort=False)
            .agg(patients=("scope", "nunique"), rmse_individual=("error", rmse),
                 rmse_average=("error_vs_average", rmse), sd_individual=("individual_effect", "std")))
