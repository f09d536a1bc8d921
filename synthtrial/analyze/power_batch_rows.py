"""The columns run_replicate adds to the estimates, for a chunk of replicates at once: truth, standardised effects,
calibration and responder calls (:mod:`synthtrial.analyze.power_batch` states the choices).

Each function is the array form of one step of today's path, with the same formulas:
:func:`synthtrial.analyze.stats.attach_truth`, :func:`~synthtrial.analyze.stats.standardize` (with
:func:`~synthtrial.analyze.stats.residual_sd_df` and :func:`~synthtrial.analyze.calibration.calibration_slope`)
and :func:`synthtrial.analyze.multiplicity.adjust_responders` (Holm and Benjamini-Hochberg within each
replicate's family of patients).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import special

from synthtrial.analyze.calibration import standardized_interval
from synthtrial.analyze.estimate import NAN
from synthtrial.analyze.estimators import POOLED
from synthtrial.analyze.multiplicity import BENEFICIAL_SIGN


def finish_rows(chunk: Any, rows: dict[str, np.ndarray]) -> tuple[pd.DataFrame, np.ndarray]:
    """The chunk's frame, each replicate's rows as run_replicate returns them, from the chunk's sorted result rows;
    and where each replicate's rows start (``bounds[k]:bounds[k + 1]``: the rows of the k-th replicate)."""
    batch, settings, scenario = chunk.batch, chunk.settings, chunk.scenario
    design, model = scenario.design, scenario.model
    rep, out, pat, arm = rows["rep"], rows["out"], rows["pat"], rows["arm_idx"]
    pooled = pat < 0
    pp = np.maximum(pat, 0)
    estimate = rows["estimate"]
    population = np.array([float(model.effects.get(a, 0.0)) for a in batch.arms])
    truth = np.where(pooled, batch.population_delivered[rep, arm], batch.delivered[rep, pp, arm])
    columns: dict[str, Any] = {
        "outcome": np.asarray(chunk.outcomes, dtype=object)[out], "method": rows["method"], "role": rows["role"],
        "estimand": rows["estimand"],
        "scope": np.where(pooled, POOLED, np.asarray(chunk.pids, dtype=object)[pp]).astype(object),
        "arm": np.asarray(batch.arms, dtype=object)[arm], "reference": np.full(rep.size, design.reference, dtype=object),
        "estimate": estimate, "se": rows["se"], "ci_low": rows["ci_low"], "ci_high": rows["ci_high"], "p": rows["p"],
        "n": rows["n"].astype("int64"), "note": rows["note"],
        "true_effect": truth, "bias": estimate - truth, "covered": covered(truth, rows["ci_low"], rows["ci_high"]),
        "true_steady_state": np.where(pooled, population[arm], batch.effects[rep, pp, arm]),
        "true_carryover": np.where(pooled, batch.population_carryover[rep, arm], batch.carryover[rep, pp, arm]),
        "true_sample_mean": np.where(pooled, batch.mean_delivered[rep, arm], NAN),
    }
    sds, dfs, truth_sd = residual_sds(chunk)
    sd, df = sds[rep, out], dfs[rep, out]
    std, low, high = standardized_interval(estimate, rows["se"], rows["ci_low"], rows["ci_high"], sd, df,
                                           settings.alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        std_truth = np.where(np.isfinite(truth_sd[rep]), truth / truth_sd[rep], NAN)
    columns.update(residual_sd=sd, residual_df=df, std_estimate=std, std_ci_low=low, std_ci_high=high,
                   std_true_effect=std_truth, std_covered=covered(std_truth, low, high))
    columns.update(calibration(rows, truth, pooled, settings.alpha))
    columns.update(responders(rows, pooled, settings.alpha))
    columns["population_effect"] = population[arm]
    lead = {"scenario": np.full(rep.size, scenario.name, dtype=object),
            "design_name": np.full(rep.size, scenario.design_name, dtype=object),
            "period_days": np.full(rep.size, design.period_days, dtype="int64"),
            "effect_scale": np.full(rep.size, float(scenario.effect_scale)),
            "replicate": np.asarray(chunk.replicates, dtype="int64")[rep]}
    frame = pd.DataFrame({**lead, **columns})
    return frame, np.searchsorted(rep, np.arange(len(chunk.replicates) + 1))


def covered(truth: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """True/False where the interval holds the truth, None where any of the three is NaN (stats' rule)."""
    out = np.empty(truth.size, dtype=object)
    missing = np.isnan(truth) | np.isnan(low) | np.isnan(high)
    inside = (low <= truth) & (truth <= high)
    out[:] = [None if m else bool(v) for m, v in zip(missing.tolist(), inside.tolist())]
    return out


def residual_sds(chunk: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each replicate's within-patient residual SD and df per outcome (R, O), and the oracle's SD (R,)."""
    n_r, n_o = len(chunk.replicates), len(chunk.outcomes)
    sds, dfs, truth_sd = np.full((n_r, n_o), NAN), np.full((n_r, n_o), NAN), np.full(n_r, NAN)
    names = [*chunk.outcomes, *(["oracle"] if "oracle" not in chunk.outcomes else [])]
    groups: dict[tuple, list[int]] = {}
    for r in range(n_r):
        groups.setdefault(tuple(chunk.keys[r]), []).append(r)
    for keys, members in groups.items():
        plans = [chunk.plans[k] for k in keys]
        patient = np.concatenate([np.full(plan.n, i) for i, plan in enumerate(plans)])
        treatment = np.concatenate([plan.use_t for plan in plans])
        day = np.concatenate([plan.use_days for plan in plans]).astype(float)
        if day.size < 3:
            continue
        _, arm = np.unique(treatment, return_inverse=True)
        cols = [np.eye(patient.max() + 1)[patient], np.eye(arm.max() + 1)[arm][:, 1:]]
        if chunk.settings.trend:
            cols.append((day - (np.bincount(patient, day) / np.bincount(patient))[patient])[:, None])
        x = np.column_stack(cols)
        rank = np.linalg.matrix_rank(x)
        if day.size - rank < 1:
            continue
        y = np.stack([np.concatenate([chunk.values[name][r, i][plan.rows][plan.use] for i, plan in enumerate(plans)])
                      for r in members for name in names])
        beta = np.linalg.lstsq(x, y.T, rcond=None)[0]
        rss = np.sum((y - (x @ beta).T) ** 2, axis=1)
        ok = rss > 1e-20 * np.maximum(1.0, np.sum(y * y, axis=1))
        sd = np.where(ok, np.sqrt(rss / (day.size - rank)), NAN).reshape(len(members), len(names))
        df = np.where(ok, float(day.size - rank), NAN).reshape(len(members), len(names))
        sds[members], dfs[members] = sd[:, :n_o], df[:, :n_o]
        truth_sd[members] = sd[:, names.index("oracle")]
    return sds, dfs, truth_sd


def calibration(rows: dict[str, np.ndarray], truth: np.ndarray, pooled: np.ndarray, alpha: float) -> dict:
    """calibration_slope/_lo/_hi: per (replicate, outcome, method) over the per-patient rows, the slope of the
    estimates on their truths through the origin; pooled rows the estimate and CI over the truth."""
    size = truth.size
    slope, lo, hi = np.full(size, NAN), np.full(size, NAN), np.full(size, NAN)
    estimate = rows["estimate"]
    idx = np.flatnonzero(~pooled)
    if idx.size:
        key = np.stack([rows["rep"][idx], rows["out"][idx], rows["meth"][idx]])
        starts = np.flatnonzero(np.r_[True, (np.diff(key, axis=1) != 0).any(axis=0)])
        x, y = truth[idx], estimate[idx]
        keep = np.isfinite(x) & np.isfinite(y)
        x0, y0 = np.where(keep, x, 0.0), np.where(keep, y, 0.0)
        count = np.add.reduceat(keep.astype(int), starts)
        sxx, sxy = np.add.reduceat(x0 * x0, starts), np.add.reduceat(x0 * y0, starts)
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where((count > 0) & (sxx > 0), sxy / sxx, NAN)
            group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, idx.size]))
            resid = np.where(keep, y0 - b[group] * x0, 0.0)
            s2 = np.add.reduceat(resid ** 2, starts) / (count - 1)
            half = special.stdtrit(np.maximum(count - 1, 1), 1 - alpha / 2) * np.sqrt(s2 / sxx)
        half = np.where(count >= 2, half, NAN)
        slope[idx], lo[idx], hi[idx] = b[group], (b - half)[group], (b + half)[group]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(pooled & (truth != 0), truth, NAN)
        bounds = np.sort(np.column_stack([rows["ci_low"] / t, rows["ci_high"] / t]), axis=1)
        slope[pooled] = (estimate / t)[pooled]
    lo[pooled], hi[pooled] = bounds[pooled, 0], bounds[pooled, 1]
    return {"calibration_slope": slope, "calibration_lo": lo, "calibration_hi": hi}


def responders(rows: dict[str, np.ndarray], pooled: np.ndarray, alpha: float) -> dict:
    """p_holm, p_bh and the three responder calls (multiplicity.adjust_responders, one family per replicate,
    outcome, method and arm over the patients)."""
    size = pooled.size
    p, estimate = rows["p"], rows["estimate"]
    holm, bh = np.full(size, NAN), np.full(size, NAN)
    idx = np.flatnonzero(~pooled & np.isfinite(p))
    if idx.size:
        family = np.stack([rows["rep"][idx], rows["out"][idx], rows["meth"][idx], rows["arm_idx"][idx]])
        _, fam = np.unique(family, axis=1, return_inverse=True)
        fam = fam.reshape(-1)
        order = np.lexsort((p[idx], fam))              # by family, then p (ties in row order: a stable sort)
        fam_sorted, p_sorted = fam[order], p[idx][order]
        starts = np.flatnonzero(np.r_[True, np.diff(fam_sorted) != 0])
        m = np.diff(np.r_[starts, idx.size])
        rank = np.arange(idx.size) - np.repeat(starts, m)
        size_of = np.repeat(m, m)
        holm_sorted = p_sorted * (size_of - rank)
        bh_sorted = p_sorted / ((rank + 1) / size_of.astype(float))
        for s, length in zip(starts.tolist(), m.tolist()):
            holm_sorted[s:s + length] = np.minimum(np.maximum.accumulate(holm_sorted[s:s + length]), 1.0)
            part = np.minimum.accumulate(bh_sorted[s:s + length][::-1])[::-1]
            bh_sorted[s:s + length] = np.where(part > 1, 1.0, part)
        holm[idx[order]], bh[idx[order]] = holm_sorted, bh_sorted
    raw = np.where(pooled, NAN, p)
    return {"p_holm": holm, "p_bh": bh, "responder": calls(raw, estimate, alpha),
            "responder_holm": calls(holm, estimate, alpha), "responder_bh": calls(bh, estimate, alpha)}


def calls(p: np.ndarray, estimate: np.ndarray, alpha: float) -> np.ndarray:
    """None where p is missing, else whether p < alpha with a beneficial estimate (multiplicity's rule)."""
    good = np.sign(estimate) == BENEFICIAL_SIGN
    out = np.empty(p.size, dtype=object)
    out[:] = [None if not np.isfinite(q) else bool(q < alpha and g) for q, g in zip(p.tolist(), good.tolist())]
    return out
