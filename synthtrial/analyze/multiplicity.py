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


def familywise(estimates: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per ``keys`` (a summary's keys), over the simulated trials (``replicate``) whose family has at least one
    call: ``trials`` and the share with at least one responder call, unadjusted, Holm and BH (``familywise``,
    ``familywise_holm``, ``familywise_bh``; under the null, the family-wise error). Per-patient rows only."""
    rows = estimates[estimates["scope"].astype(str) != POOLED]
    columns = ["trials", "familywise", "familywise_holm", "familywise_bh"]
    if rows.empty:
        return pd.DataFrame(columns=[*keys, *columns])
    called = rows[["responder", "responder_holm", "responder_bh"]]
    frame = rows[list(keys) + ["replicate"]].assign(
        has=called["responder"].notna().to_numpy(),
        **{c: called[c].eq(True).to_numpy() for c in called.columns})
    per_trial = frame.groupby([*keys, "replicate"], sort=False, dropna=False)[
        ["has", "responder", "responder_holm", "responder_bh"]].any()
    per_trial = per_trial[per_trial["has"]]
    out = per_trial.groupby(list(keys), sort=False, dropna=False).agg(
        trials=("has", "size"), familywise=("responder", "mean"), familywise_holm=("responder_holm", "mean"),
        familywise_bh=("responder_bh", "mean"))
    return out.reset_index()
