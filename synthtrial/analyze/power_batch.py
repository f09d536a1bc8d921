"""``power`` vectorised across replicates: a chunk of replicates simulated and analysed as arrays, in one process.

Today's path (:func:`synthtrial.analyze.power.run_replicate`) simulates one trial, builds its protocol frame
and runs :func:`~synthtrial.analyze.stats.analyze_outcome`, :func:`~synthtrial.analyze.stats.attach_truth`,
:func:`~synthtrial.analyze.stats.standardize` and :func:`~synthtrial.analyze.multiplicity.adjust_responders`
on frames, patient by patient; most of its time is frame overhead and many small fits. Here a chunk of
replicates of one scenario is simulated at once (:func:`synthtrial.trial.simulate_batch.simulate_batch`, the
same random numbers), each patient schedule's design work is done once (:class:`~synthtrial.analyze.
batch_patient.PatientPlan`), every per-patient method is fitted to all series of that schedule at once
(:mod:`synthtrial.analyze.batch_patient`, :mod:`synthtrial.analyze.batch_gls`), the pooled model is fitted
per outcome with :func:`~synthtrial.analyze.mixed.random_intercept_reml` (the same optimiser) and its
cluster-robust inference batched over the fits that share a design (:mod:`synthtrial.analyze.batch_mixed`),
and the truth, standardisation and responder columns are computed on the chunk's arrays. Each replicate's
frame is the one ``run_replicate`` returns: the same columns, dtypes, rows and order, the numbers equal to
rounding (``tests/test_power_batch.py``; ``benchmarks/power_vectorized.py`` checks it and times both).

Choices, stated once:

* Coverage (:func:`batch_applies`): no rendered replicates, no random slopes, known kinetics (not
  ``estimate_kinetics``), the methods ``period``, ``randomization``, ``gls_kinetics``, ``lmm``, ``lmm_cr1``,
  ``welch``, ``gls_ar1``, ``hac`` (not the day-level ``permutation``), the outcomes of
  ``power.POWER_OUTCOMES``, a design in which every order holds every arm, and
  every other :class:`~synthtrial.analyze.power.StudySettings` field at its default. Anything else runs
  today's path, replicate by replicate.
* ``SYNTHTRIAL_POWER_VECTORISED=0`` in the environment (inherited by Dask's local workers) makes every chunk
  run today's path: for benchmarks and comparisons (``benchmarks/power_vectorized.py``).
* A replicate that meets what the batch leaves to today's code (a series without variation or with a zero
  SE, a patient left without an arm by missing days, fewer than two patients, a randomisation distribution
  beyond the exact limit) is recomputed by ``run_replicate``; the others are not affected.
* The numbers that rounding would amplify (phi's REML grid search, the Satterthwaite second differences)
  are computed with the same floating-point operations as the one-series code (batched ``matmul``,
  Cholesky, ``math.log``), so they agree to the last bits; other sums may differ in the last bit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.analyze import batch_patient as bp
from synthtrial.analyze.batch_mixed import cluster_robust_ri_batch, random_intercept_reml_batch
from synthtrial.analyze.estimands import PATIENT_DELIVERED, POPULATION_DELIVERED
from synthtrial.analyze.estimate import join_notes
from synthtrial.analyze.estimators import POOLED, REGISTRY, FitOptions
from synthtrial.analyze.mixed import CR1, CR2, pooled_contrasts
from synthtrial.analyze.power_batch_rows import finish_rows
from synthtrial.analyze.nof1 import Kinetics, design_orders, exposures
from synthtrial.trial import scale
from synthtrial.trial.simulate_batch import TrialBatch, batch_covers, simulate_batch
from synthtrial.util.seeding import derive_seed

#: Methods the batched path fits (``permutation`` runs today's path).
BATCH_METHODS = (*bp.PATIENT_METHODS, CR2, CR1)
#: The environment variable that turns the vectorised path off ("0").
SWITCH = "SYNTHTRIAL_POWER_VECTORISED"
#: StudySettings fields the batched path reads; any other field must keep its default.
_READ = ("seed", "methods", "outcomes", "alpha", "trend", "random_slopes", "estimate_kinetics", "rendered")


def batch_applies(scenario: Any, settings: Any, outcomes: Sequence[str] = ("oracle", "lesion_severity")) -> bool:
    """Whether :func:`run_chunk_batched` covers this scenario and these settings (see the module docstring);
    ``outcomes``: the rendering-free outcomes (``power.POWER_OUTCOMES``)."""
    if os.environ.get(SWITCH, "1").strip() == "0":
        return False
    defaults = type(settings)()
    others = [f.name for f in dataclasses.fields(settings) if f.name not in _READ]
    return (settings.rendered is None and not settings.random_slopes and not settings.estimate_kinetics
            and all(m in BATCH_METHODS for m in settings.methods) and len(settings.methods) > 0
            and all(o in outcomes for o in settings.outcomes) and len(settings.outcomes) > 0
            and all(getattr(settings, name) == getattr(defaults, name) for name in others)
            and batch_covers(scenario.design))


def run_chunk_frame(scenario: Any, settings: Any, replicates: Sequence[int],
                    redo: Callable[[Any, Any, int], pd.DataFrame]) -> pd.DataFrame:
    """``pd.concat([redo(scenario, settings, r) for r in replicates], ignore_index=True)`` computed as arrays (the
    module docstring): the chunk's one frame, its replicates' rows in order. ``redo`` is today's path
    (``power.run_replicate``), called for the replicates the batch leaves to it."""
    design, model = scenario.design, scenario.model
    replicates = list(replicates)
    seeds = [derive_seed("power", settings.seed, r, bits=32) for r in replicates]
    batch = simulate_batch(design, model, seeds)
    chunk = _Chunk(scenario, settings, batch, replicates)
    made = chunk.frame()
    if made is not None and not chunk.fallback:
        return made[0]
    parts, start = [], 0          # runs of replicates the batch computed, and each replicate left to redo
    for k in range(len(replicates) + 1):
        if k == len(replicates) or k in chunk.fallback:
            if made is not None and k > start:
                parts.append(made[0].iloc[made[1][start]:made[1][k]])
            if k < len(replicates):
                parts.append(redo(scenario, settings, replicates[k]))
            start = k + 1
    return pd.concat(parts, ignore_index=True)


def run_chunk_batched(scenario: Any, settings: Any, replicates: Sequence[int],
                      redo: Callable[[Any, Any, int], pd.DataFrame]) -> list[pd.DataFrame]:
    """``[redo(scenario, settings, r) for r in replicates]`` computed as arrays: :func:`run_chunk_frame` split into
    each replicate's frame."""
    return [frame for _, frame in split_replicates(run_chunk_frame(scenario, settings, replicates, redo))]


def split_replicates(frame: pd.DataFrame) -> list[tuple[int, pd.DataFrame]]:
    """(replicate, its frame) for each run of rows of one ``replicate`` in ``frame`` (a chunk's frame), in order."""
    reps = frame["replicate"].to_numpy()
    starts = np.flatnonzero(np.r_[True, reps[1:] != reps[:-1]]) if reps.size else np.array([], dtype=int)
    ends = np.r_[starts[1:], reps.size]
    return [(int(reps[a]), frame.iloc[a:b].reset_index(drop=True)) for a, b in zip(starts.tolist(), ends.tolist())]


class _Chunk:
    """One chunk's analysis: the series, their fits, and the rows of each replicate."""

    def __init__(self, scenario: Any, settings: Any, batch: TrialBatch, replicates: list[int]) -> None:
        self.scenario, self.settings, self.batch, self.replicates = scenario, settings, batch, replicates
        design, model = scenario.design, scenario.model
        self.outcomes = list(settings.outcomes)
        self.methods = list(dict.fromkeys(settings.methods))
        self.pids = design.patient_ids()
        self.fallback: set[int] = set()
        sev = batch.severity
        self.values = {"oracle": sev,
                       "lesion_severity": scale.severity_from_count(np.rint(scale.expected_lesion_count(sev)))}
        self.trial_arms = [[a for a in dict.fromkeys(t for order in orders for t in order) if a != design.reference]
                           for orders in batch.orders]
        kinetics = Kinetics(model.washin_half_life, model.washout_half_life)
        orders = design_orders(design)
        self.options = {o: FitOptions(outcome=o, reference=design.reference,
                                      excluded=frozenset({design.washout_label}), trend=settings.trend,
                                      alpha=settings.alpha, seed=0, random_slopes=False, design_known=True,
                                      orders=orders, kinetics=kinetics, ar_phi=model.ar_phi)
                        for o in self.outcomes}
        self.plans: dict[tuple, bp.PatientPlan] = {}
        self.keys = [[self._plan_key(r, i) for i in range(design.n_patients)] for r in range(len(replicates))]

    # ---------------------------------------------------------------- plans
    def _plan_key(self, r: int, i: int) -> tuple:
        b = self.batch
        key = (tuple(self.trial_arms[r]), b.orders[r][i], np.flatnonzero(~b.kept[r, i]).tobytes())
        if key not in self.plans:
            sched = b.schedules[b.orders[r][i]]
            rows = np.flatnonzero(b.kept[r, i])
            calendar = (b.days, sched.treatments) if rows.size < b.kept.shape[2] else None
            opts = next(iter(self.options.values()))
            self.plans[key] = bp.PatientPlan(rows, b.days[rows], sched.treatments[rows], sched.blocks[rows],
                                             self.trial_arms[r], opts, calendar)
        if not self.plans[key].complete:
            self.fallback.add(r)
        return key

    # ---------------------------------------------------------------- fits
    def _patient_fits(self) -> dict[str, list[tuple[np.ndarray, bp.Fitted]]]:
        """Per method: (series ids, fitted) per plan; a series id is (replicate, outcome, patient) flattened."""
        n_r, n_o, n_p = len(self.replicates), len(self.outcomes), self.scenario.design.n_patients
        groups: dict[tuple, list[int]] = {}
        for r in range(n_r):
            for i in range(n_p):
                groups.setdefault(self.keys[r][i], []).append(r * n_p + i)
        out: dict[str, list] = {m: [] for m in self.methods if m in bp.PATIENT_METHODS}
        for key, members in groups.items():
            plan = self.plans[key]
            if not plan.complete:
                continue
            members = np.asarray(members)
            series = (members[None, :] // n_p * n_o + np.arange(n_o)[:, None]) * n_p + members % n_p  # (O, M)
            y = np.concatenate([self.values[o][members // n_p, members % n_p][:, plan.rows] for o in self.outcomes])
            series = series.reshape(-1)
            replicate_of = series // (n_o * n_p)
            lost: set[int] = set()
            use = np.ascontiguousarray(y[:, plan.use])  # a strided stack changes the last bits of the GLS sums
            period = bp.fit_period(plan, plan.period_means(y), lost) if (
                "period" in out or "randomization" in out) else None
            for method in out:
                if method == "period":
                    fitted = period
                elif method == "randomization":
                    fitted = bp.fit_randomization(plan, plan.period_means(y), period, lost, np.arange(len(series)))
                else:
                    fit = {"welch": bp.fit_welch, "hac": bp.fit_hac, "gls_kinetics": bp.fit_gls_kinetics,
                           "gls_ar1": bp.fit_gls_ar1}[method]
                    fitted = fit(plan, use, lost, np.arange(len(series)))
                out[method].append((series, fitted))
            self.fallback.update(replicate_of[sorted(lost)].tolist())
        return out

    def _pooled_fits(self) -> dict[tuple[int, int], tuple[list[str], dict[str, list[tuple]], int]]:
        """Per (replicate, outcome): the pooled arms, per method the (estimate, se, low, high, p, note) of each
        arm, and the rows used."""
        design, n_p = self.scenario.design, self.scenario.design.n_patients
        results: dict[tuple[int, int], Any] = {}
        if not any(m in (CR2, CR1) for m in self.methods):
            return results
        designs: dict[tuple, list[int]] = {}
        for r in range(len(self.replicates)):
            if r not in self.fallback:
                designs.setdefault(tuple(self.keys[r]), []).append(r)
        for keys, members in designs.items():
            if n_p < 2:
                self.fallback.update(members)
                continue
            self._pooled_design(keys, members, results)
        return results

    def _pooled_design(self, keys: tuple, members: list[int], results: dict) -> None:
        o = self.settings
        plans = [self.plans[k] for k in keys]
        patients = np.concatenate([[pid] * plan.n for pid, plan in zip(self.pids, plans, strict=True)])
        treatment = np.concatenate([plan.use_t for plan in plans])
        day = np.concatenate([plan.use_days for plan in plans]).astype(float)
        arms = [a for a in dict.fromkeys(treatment.tolist()) if a != self.scenario.design.reference]
        kin = next(iter(self.options.values())).kinetics
        effect_cols = np.concatenate([exposures(plan.days, plan.treatments, arms, kin, plan.calendar)[plan.use]
                                      for plan in plans])
        cols = [np.ones(day.size), effect_cols]
        if o.trend:
            cols.append((day - pd.Series(day).groupby(patients).transform("mean").to_numpy())[:, None])
        x = np.column_stack(cols)
        contrasts = pooled_contrasts(effect_cols, treatment, patients, self.scenario.design.reference, arms, x.shape[1])
        if np.linalg.matrix_rank(x) < x.shape[1] or day.size - x.shape[1] < 1:
            self.fallback.update(members)
            return
        ys, at = [], []
        for r in members:
            for k, outcome in enumerate(self.outcomes):
                y = np.concatenate([self.values[outcome][r, i][plan.rows][plan.use] for i, plan in enumerate(plans)])
                if float(np.sum((y - y.mean()) ** 2)) <= 1e-24 * max(1.0, float(y @ y)):
                    self.fallback.add(r)
                    continue
                ys.append(y)
                at.append((r, k))
        if not ys:
            return
        fits = random_intercept_reml_batch(x, np.stack(ys), patients)
        for fit, (r, _), y in zip(fits, at, ys, strict=True):
            if not (np.isfinite(fit.scale) and fit.scale > 1e-14 * max(1.0, float(np.var(y)))):
                self.fallback.add(r)
        resid = np.stack([fit.y - fit.x @ fit.fe_params for fit in fits])
        robust = cluster_robust_ri_batch(x, resid, fits[0].clusters, np.array([f.scale for f in fits]),
                                         np.array([f.tau2 for f in fits]), contrasts)
        for fit, rob, (r, k) in zip(fits, robust, at, strict=True):
            results[(r, k)] = (arms, self._pooled_estimates(fit, rob, contrasts, arms, r), day.size)

    def _pooled_estimates(self, fit: Any, robust: Any, contrasts: np.ndarray, arms: list[str], r: int) -> dict:
        boundary = ("boundary fit: intercept variance 0 (REML optimum at the bound, as lme4 reports it)"
                    if fit.tau2 == 0 else "")
        note = join_notes("random intercept only", boundary,
                          "treatments through their exposure kinetics (delivered contrast)",
                          "trend-adjusted" if self.settings.trend else "")
        g = robust.clusters
        est = contrasts @ fit.fe_params
        out = {}
        for key, cov, dfs, how in ((CR2, robust.cr2, robust.df_cr2, "CR2 cluster-robust SE over {g} patients, "
                                    "Satterthwaite t on {df:.1f} df"),
                                   (CR1, robust.cr1, np.full(len(arms), g - 1.0), "CR1 cluster-robust SE over {g} "
                                    "patients, t on {df:.0f} df")):
            se = np.sqrt(np.maximum(np.einsum("ai,ij,aj->a", contrasts, cov, contrasts), 0.0))
            if not (np.isfinite(se) & (se > 1e-12 * np.maximum(1.0, np.abs(est))) & np.isfinite(dfs) & (dfs > 0)).all():
                self.fallback.add(r)
            low, high, p = bp.t_interval(est, se, dfs, self.settings.alpha)
            out[key] = [(float(est[i]), float(se[i]), float(low[i]), float(high[i]), float(p[i]),
                         join_notes(note, how.format(g=g, df=dfs[i]))) for i in range(len(arms))]
        return out

    # ---------------------------------------------------------------- rows
    def frame(self) -> tuple[pd.DataFrame, np.ndarray] | None:
        """The chunk's frame and each replicate's first row (:func:`finish_rows`); None where the batch fits nothing."""
        patient = self._patient_fits()
        pooled = self._pooled_fits()
        rows = self._rows(patient, pooled)
        return None if rows is None else finish_rows(self, rows)

    def _rows(self, patient: dict, pooled: dict) -> dict[str, np.ndarray] | None:
        """Every result row of the chunk as columns, sorted as analyze_outcome and run_replicate order them."""
        n_o, n_p = len(self.outcomes), self.scenario.design.n_patients
        parts: list[dict[str, Any]] = []
        for m_idx, method in enumerate(self.methods):
            if method in patient:
                for series, fitted in patient[method]:
                    s_count, a_count = fitted.estimate.shape
                    arm_pos = [self.batch.arms.index(a) for a in fitted.arms]
                    grid = np.repeat(series, a_count)
                    notes = ([note for row in fitted.notes for note in row] if not any(fitted.role_notes) else
                             [join_notes(fitted.notes[s][j], fitted.role_notes[j])
                              for s in range(s_count) for j in range(a_count)])
                    parts.append({"rep": grid // (n_o * n_p), "out": grid // n_p % n_o, "meth": np.full(grid.size, m_idx),
                                  "pat": grid % n_p, "arm_order": np.tile(np.arange(a_count), s_count),
                                  "arm_idx": np.tile(arm_pos, s_count), "method": method, "role": fitted.role,
                                  "estimand": PATIENT_DELIVERED, "note": notes,
                                  "n": np.tile(fitted.n, s_count),
                                  **{c: getattr(fitted, c).reshape(-1) for c in ("estimate", "se", "ci_low",
                                                                                 "ci_high", "p")}})
            elif method in (CR2, CR1):
                keys = sorted(pooled)
                role, why = REGISTRY[method].role_on(0, "")      # the pooled model's role depends on its inference
                for r, k in keys:
                    arms, fits, n_rows = pooled[(r, k)]
                    est = np.array([v[:5] for v in fits[method]])
                    parts.append({"rep": np.full(len(arms), r), "out": np.full(len(arms), k),
                                  "meth": np.full(len(arms), m_idx), "pat": np.full(len(arms), -1),
                                  "arm_order": np.arange(len(arms)),
                                  "arm_idx": np.array([self.batch.arms.index(a) for a in arms]), "method": method,
                                  "role": role, "estimand": POPULATION_DELIVERED,
                                  "note": [join_notes(v[5], why) for v in fits[method]], "n": np.full(len(arms), n_rows),
                                  **{c: est[:, j] for j, c in enumerate(("estimate", "se", "ci_low", "ci_high", "p"))}})
        kept = [part for part in parts if len(part["rep"])]
        if not kept:                     # nothing the batch fits (e.g. the pooled model of one patient)
            self.fallback.update(range(len(self.replicates)))
            return None
        parts = kept
        columns: dict[str, Any] = {}
        for name in ("rep", "out", "meth", "pat", "arm_order", "arm_idx", "estimate", "se", "ci_low", "ci_high", "p",
                     "n"):
            columns[name] = np.concatenate([np.asarray(part[name]) for part in parts])
        for name in ("method", "role", "estimand"):
            columns[name] = np.concatenate([np.full(len(part["rep"]), part[name], dtype=object) for part in parts])
        columns["note"] = np.concatenate([np.asarray(part["note"], dtype=object) for part in parts])
        order = np.lexsort((columns["arm_order"], columns["pat"], columns["meth"], columns["out"], columns["rep"]))
        return {name: values[order] for name, values in columns.items()}

