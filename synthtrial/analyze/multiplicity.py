"""Per-patient "responder" calls with family-wise (Holm) and false-discovery (Benjamini-Hochberg) adjustment.

Choices, stated once:

* A patient is a **responder** to an arm by a method when that method's per-patient test rejects at
  ``alpha`` *and* the estimate lies in the beneficial direction (below 0: every outcome here falls as the
  acne improves). The p-values are the methods' own two-sided ones, so a call's error rate is at most
  ``alpha`` (about ``alpha / 2`` under a symmetric null).
* The **family** is one outcome x method x arm across the trial's patients: ``p_holm`` and ``p_bh`` are the
  adjusted p-values of statsmodels' ``multipletests`` (``holm``, ``fdr_bh``) over the patients that have a
  p-value, and ``responder_holm`` / ``responder_bh`` the calls on them. Pooled rows, and rows without a p,
  get NaN and no call (None). Holm is computed here by its formula, the same numbers as ``multipletests``
  (tested), because statsmodels' ``holm`` branch runs ``gc.collect()`` on every call: 40 ms in a process
  that holds a power study, half the time of a simulated trial.
* :func:`familywise` summarises many simulated trials: the share of trials with at least one responder
  call in a family (under the null, the family-wise error), unadjusted, Holm and BH.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from synthtrial.analyze.estimate import check_alpha
from synthtrial.analyze.estimators import POOLED

#: Columns :func:`adjust_responders` adds.
RESPONDER_COLUMNS = ("p_holm", "p_bh", "responder", "responder_holm", "responder_bh")
#: The sign of a beneficial effect (an estimate below 0: the outcome falls).
BENEFICIAL_SIGN = -1.0
#: A responder family: one outcome x method x arm (across the patients of a trial).
FAMILY = ["outcome", "method", "arm"]
#: multipletests' names of the two adjustments, by column suffix.
ADJUSTMENTS = {"holm": "holm", "bh": "fdr_bh"}


def adjusted_p(p: Sequence[float], how: str) -> np.ndarray:
    """``p`` adjusted by ``how`` (``"holm"`` or ``"bh"``) with statsmodels' ``multipletests``; NaN stays NaN."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p, dtype=float)
    out = np.full(p.size, np.nan)
    has = np.isfinite(p)
    if has.any():
        out[has] = _holm(p[has]) if how == "holm" else multipletests(p[has], method=ADJUSTMENTS[how])[1]
    return out


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values: sorted p times (m - rank), running maximum, capped at 1."""
    order = np.argsort(p, kind="mergesort")
    adjusted = np.minimum(np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1)), 1.0)
    out = np.empty(p.size)
    out[order] = adjusted
    return out


def _calls(p: np.ndarray, estimate: np.ndarray, alpha: float) -> list[bool | None]:
    beneficial = np.sign(estimate) == BENEFICIAL_SIGN
    return [None if not np.isfinite(q) else bool(q < alpha and good) for q, good in zip(p, beneficial)]


def adjust_responders(effects: pd.DataFrame, alpha: float = 0.05, *, within: Sequence[str] = ()) -> pd.DataFrame:
    """``effects`` with :data:`RESPONDER_COLUMNS`: each per-patient row's Holm and BH p over its family's
    patients, and the unadjusted, Holm and BH responder calls. ``within`` adds keys that split families
    further (``replicate`` in a power study: one family per simulated trial)."""
    alpha = check_alpha(alpha)
    p = effects["p"].to_numpy(dtype=float)
    estimate = effects["estimate"].to_numpy(dtype=float)
    per_patient = (effects["scope"].astype(str) != POOLED).to_numpy()
    adjusted = {how: np.full(len(effects), np.nan) for how in ADJUSTMENTS}
    keys = [*within, *FAMILY]
    positions = np.flatnonzero(per_patient)
    if positions.size:
        groups = effects.iloc[positions].groupby(keys, sort=False, dropna=False).indices
        for rows in groups.values():
            at = positions[rows]
            for how in ADJUSTMENTS:
                adjusted[how][at] = adjusted_p(p[at], how)
    raw = np.where(per_patient, p, np.nan)
    return effects.assign(p_holm=adjusted["holm"], p_bh=adjusted["bh"],
                          responder=pd.Series(_calls(raw, estimate, alpha), index=effects.index, dtype=object),
                          responder_holm=pd.Series(_calls(adjusted["holm"], estimate, alpha), index=effects.index,
                                                   dtype=object),
                          responder_bh=pd.Series(_calls(adjusted["bh"], estimate, alpha), index=effects.index,
                                                 dtype=object))


def group_ids(frame: pd.DataFrame, keys: Sequence[str], *, dropna: bool = True) -> np.ndarray:
    """Each row's group of ``keys``, numbered as ``frame.groupby(keys, sort=False, dropna=dropna)`` numbers them (in
    order of first appearance); -1 for a row with a missing key where ``dropna`` (pandas leaves it out)."""
    ids = frame.groupby(list(keys), sort=False, dropna=dropna).ngroup()
    return ids.fillna(-1).to_numpy(dtype=np.int64)


def familywise(estimates: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per ``keys`` (a summary's keys), over the simulated trials (``replicate``) whose family has at least one
    call: ``trials`` and the share with at least one responder call, unadjusted, Holm and BH (``familywise``,
    ``familywise_holm``, ``familywise_bh``; under the null, the family-wise error). Per-patient rows only.

    Computed on group numbers (:func:`group_ids`) and counts, with the rows of a ``groupby`` over keys and trial
    (missing keys a group of their own), in the order of each group's first trial with a call."""
    per_patient = (estimates["scope"].astype(str) != POOLED).to_numpy()
    columns = ["trials", "familywise", "familywise_holm", "familywise_bh"]
    if not per_patient.any():
        return pd.DataFrame(columns=[*keys, *columns])
    group = group_ids(estimates, keys, dropna=False)[per_patient]
    _, replicate = np.unique(estimates["replicate"].to_numpy()[per_patient], return_inverse=True)
    _, first_row, trial = np.unique(group * (replicate.max() + 1) + replicate.reshape(-1),
                                    return_index=True, return_inverse=True)
    trial = trial.reshape(-1)

    def per_trial(flags: pd.Series) -> np.ndarray:          # any row of the trial's family
        return np.bincount(trial, weights=flags.to_numpy(dtype=float)[per_patient], minlength=first_row.size) > 0

    has = per_trial(estimates["responder"].notna())
    calls = {name: per_trial(estimates[column].eq(True)) for name, column in
             (("familywise", "responder"), ("familywise_holm", "responder_holm"), ("familywise_bh", "responder_bh"))}
    trial_group = group[first_row]                              # each trial's group
    trials = np.bincount(trial_group[has], minlength=group.max() + 1)
    starts = np.full(trials.size, first_row.max() + 1)
    np.minimum.at(starts, trial_group[has], first_row[has])     # where each group's first trial with a call starts
    kept = np.flatnonzero(trials)
    kept = kept[np.argsort(starts[kept], kind="stable")]
    rows = np.flatnonzero(per_patient)[starts[kept]]
    out = estimates[list(keys)].iloc[rows].reset_index(drop=True)
    out["trials"] = trials[kept].astype("int64")
    for name, hit in calls.items():
        out[name] = np.bincount(trial_group[has & hit], minlength=trials.size)[kept] / trials[kept]
    return out
