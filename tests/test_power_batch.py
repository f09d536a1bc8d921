"""`power` vectorised across replicates: the same frames as today's path on a fixed seed, and its parts exact."""

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from synthtrial.analyze import nof1
from synthtrial.analyze.batch_gls import AR1MomentsBatch, fit_phi_batch, satterthwaite_batch
from synthtrial.analyze.batch_mixed import bounded_brent, cluster_robust_ri_batch, random_intercept_reml_batch
from synthtrial.analyze.mixed import random_intercept_reml
from synthtrial.analyze.power import StudySettings, power_study, run_replicate, scenario_grid
from synthtrial.analyze.power_batch import SWITCH, batch_applies, run_chunk_batched
from synthtrial.analyze.robust import cluster_robust_low_rank
from synthtrial.trial.simulate import PRESETS, TrialDesign, simulate_trial
from synthtrial.trial.simulate_batch import batch_covers, simulate_batch

ANCHOR_SHORT = (dataclasses.replace(PRESETS["anchor"][0], n_patients=4, period_days=7), PRESETS["anchor"][1])
RANDOMISED_MISSING = (
    TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=4, blocks=3, period_days=3, randomize=True,
                washout_days=1),
    dataclasses.replace(PRESETS["quick"][1], missing_rate=0.1, washout_half_life=2.0))
DESIGNS = {"quick": PRESETS["quick"], "anchor-7d": ANCHOR_SHORT, "randomised-missing": RANDOMISED_MISSING}


def assert_same_frames(today: pd.DataFrame, batched: pd.DataFrame) -> None:
    assert list(today.columns) == list(batched.columns)
    assert len(today) == len(batched)
    for col in today.columns:
        assert today[col].dtype == batched[col].dtype, col
        if today[col].dtype.kind == "f":
            np.testing.assert_allclose(batched[col].to_numpy(), today[col].to_numpy(), rtol=1e-9, atol=1e-12,
                                       err_msg=col)
        else:
            assert today[col].astype(object).tolist() == batched[col].astype(object).tolist(), col


@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_batched_frames_equal_todays_on_a_fixed_seed(name):
    scenario = scenario_grid([(name, *DESIGNS[name])])[0]
    settings = StudySettings(seed=5)
    assert batch_applies(scenario, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batched = run_chunk_batched(scenario, settings, [0, 1, 2], run_replicate)
        for r, frame in enumerate(batched):
            assert_same_frames(run_replicate(scenario, settings, r), frame)
    roles = set(batched[0]["role"])
    assert "inferential" in roles and "descriptive" in roles   # the role rules ran, not only the fits


def test_the_designs_reach_carryover_missing_days_and_randomised_orders():
    # what the equality test above covers: a carryover role note, missing days, orders that differ by patient
    scenario = scenario_grid([("anchor-7d", *ANCHOR_SHORT)])[0]
    frame = run_chunk_batched(scenario, StudySettings(), [0], run_replicate)[0]
    assert frame.loc[frame["method"] == "period", "note"].str.contains("carryover").any()
    batch = simulate_batch(*RANDOMISED_MISSING, seeds=[1, 2, 3])
    assert (~batch.kept).any() and len({order for orders in batch.orders for order in orders}) > 1


def test_simulate_batch_draws_simulate_trials_numbers():
    design, model = RANDOMISED_MISSING
    batch = simulate_batch(design, model, [7, 8])
    for r, seed in enumerate((7, 8)):
        trial = simulate_trial(design, model, seed=seed)
        for i, pid in enumerate(design.patient_ids()):
            rows = trial.protocol[trial.protocol["patient_id"] == pid]
            at = rows["day"].to_numpy() - design.first_day
            assert np.array_equal(np.flatnonzero(batch.kept[r, i]), at)
            assert np.array_equal(batch.severity[r, i, at], rows["severity"].to_numpy())
            truth = trial.truth["patients"][pid]
            assert batch.delivered[r, i, 0] == truth["delivered_effects"]["Cream"]
            assert batch.carryover[r, i, 0] == truth["carryover_effects"]["Cream"]
        assert batch.population_delivered[r, 0] == trial.truth["population_delivered_effects"]["Cream"]


def test_batched_gls_is_the_one_series_fit_to_the_last_bit():
    rng = np.random.default_rng(0)
    days = np.delete(np.arange(60.0), [7, 30, 31])
    x = np.column_stack([np.ones(days.size), (days % 20 < 10).astype(float), days - days.mean()])
    noise = np.zeros((6, days.size))
    for t in range(1, days.size):
        noise[:, t] = 0.6 * noise[:, t - 1] + rng.standard_normal(6)
    y = x @ [2.0, 0.3, -0.01] + 0.1 * noise
    gaps = np.diff(days)
    contrast = np.array([[0.0, 1.0, 0.0]])
    moments = AR1MomentsBatch(y[:, ::-1][:, ::-1], x, gaps)      # a strided stack, as the chunk's slices are
    phi, dev = fit_phi_batch(moments)
    beta, xx_inv, rss = moments.solve(phi)
    df = satterthwaite_batch(moments, phi, rss / (days.size - 3), contrast)
    for s in range(6):
        one = nof1.AR1Moments(y[s], x, gaps)
        assert (phi[s], dev[s]) == nof1.fit_phi(y[s], x, gaps, moments=one)
        b, inv, r = one.solve(phi[s])
        assert np.array_equal(beta[s], b) and rss[s] == r
        assert df[s, 0] == nof1.satterthwaite_df(y[s], x, gaps, phi[s], r / (days.size - 3), contrast[0],
                                                 moments=one)


def test_batched_reml_and_cluster_robust_equal_the_one_fit_functions():
    rng = np.random.default_rng(1)
    groups = np.repeat([f"P{i}" for i in range(5)], 30)
    day = np.tile(np.arange(30.0), 5)
    x = np.column_stack([np.ones(day.size), (day % 10 < 5).astype(float), day - 14.5])
    spread = np.array([0.0, 0.05, 0.3])[:, None]     # the first: an intercept variance at the bound 0
    y = x @ [1.5, -0.2, 0.0] + spread * rng.standard_normal((3, 5))[:, np.repeat(np.arange(5), 30)] \
        + 0.1 * rng.standard_normal((3, day.size))
    fits = random_intercept_reml_batch(x, y, groups)
    contrasts = np.array([[0.0, 1.0, 0.0]])
    robust = cluster_robust_ri_batch(x, np.stack([f.y - f.x @ f.fe_params for f in fits]), fits[0].clusters,
                                     np.array([f.scale for f in fits]), np.array([f.tau2 for f in fits]), contrasts)
    for f, fit in enumerate(fits):
        one = random_intercept_reml(x, y[f], groups)
        assert np.array_equal(one.fe_params, fit.fe_params) and (one.scale, one.tau2) == (fit.scale, fit.tau2)
        want = cluster_robust_low_rank(x, one.y - one.x @ one.fe_params, one.clusters, one.scale,
                                       np.ones((day.size, 1)), np.array([[one.tau2]]), contrasts=contrasts)
        for name in ("cr1", "cr2", "df_cr2"):
            np.testing.assert_allclose(getattr(robust[f], name), getattr(want, name), rtol=1e-11, err_msg=name)
    assert fits[0].tau2 == 0.0 and fits[2].tau2 > 0


def test_bounded_brent_takes_scipys_steps():
    centres = np.array([0.3, -1.2, 2.0, 0.0])
    x, f = bounded_brent(lambda t: (t - centres) ** 2 + np.cos(3 * t), np.full(4, -3.0), np.full(4, 3.0))
    for k, centre in enumerate(centres):
        found = optimize.minimize_scalar(lambda t: (t - centre) ** 2 + np.cos(3 * t), bounds=(-3.0, 3.0),
                                         method="bounded", options={"xatol": 1e-9})
        assert (x[k], f[k]) == (found.x, found.fun)


def test_settings_it_does_not_cover_run_todays_path(monkeypatch):
    scenario = scenario_grid([("quick", *PRESETS["quick"])])[0]
    assert not batch_applies(scenario, StudySettings(methods=("period", "permutation")))
    assert not batch_applies(scenario, StudySettings(random_slopes=True))
    assert not batch_applies(scenario, StudySettings(estimate_kinetics=True))
    # a baseline-alternating design too short for every arm: some patients lack an arm
    assert not batch_covers(TrialDesign(design="baseline-alternating", arms=("A", "B", "C"), n_patients=2, blocks=2,
                                        period_days=3))
    monkeypatch.setenv(SWITCH, "0")
    assert not batch_applies(scenario, StudySettings())


def test_power_study_gives_todays_numbers_and_redoes_what_the_batch_leaves(monkeypatch):
    # one patient: no pooled model, which the batch leaves to today's code for the whole replicate
    grid = scenario_grid([("quick", *PRESETS["quick"])], n_patients=1) + scenario_grid([("quick", *PRESETS["quick"])])
    settings = StudySettings(seed=2, methods=("period", "lmm", "gls_ar1"))
    batched, summary = power_study(grid, replicates=3, settings=settings)
    monkeypatch.setenv(SWITCH, "0")
    today, today_summary = power_study(grid, replicates=3, settings=settings)
    assert_same_frames(today, batched)
    assert_same_frames(today_summary, summary)
