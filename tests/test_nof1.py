"""Per-patient N-of-1 tests: known answers (exact effects, hand-computed Newey-West, enumerated randomisation)."""

import itertools
import math
from dataclasses import astuple

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from synthtrial.analyze import nof1
from synthtrial.trial.simulate import TrialDesign, exposure


def _schedule(arms, period, washout=0):
    days, treatments, day = [], [], 1
    for k, arm in enumerate(arms):
        if k and washout:
            days += list(range(day, day + washout))
            treatments += ["Washout"] * washout
            day += washout
        days += list(range(day, day + period))
        treatments += [arm] * period
        day += period
    return np.array(days, dtype=float), np.array(treatments)


def test_periods_split_on_treatment_changes_and_washout_and_skip_missing_values():
    days, treatments = _schedule(["R", "T", "T", "R"], 3, washout=2)
    values = np.arange(days.size, dtype=float)
    values[0] = np.nan
    table = nof1.periods(days, treatments, values, {"Washout"})
    assert table["treatment"].tolist() == ["R", "T", "T", "R"]  # the washout splits T from T
    assert table["n"].tolist() == [2, 3, 3, 3]
    assert table["mean"].iloc[0] == pytest.approx(1.5) and table["mid"].iloc[0] == pytest.approx(2.5)
    assert table["mean"].iloc[1] == pytest.approx(6.0)


def test_period_level_matches_ols_on_period_means_and_recovers_an_exact_effect():
    rng = np.random.default_rng(0)
    labels = ["R", "T"] * 4
    mids = np.arange(8) * 10.0 + 5
    means = 2.0 - 0.6 * (np.array(labels) == "T") - 0.003 * mids + rng.normal(0, 0.05, 8)
    table = pd.DataFrame({"treatment": labels, "mid": mids, "mean": means, "n": 10})
    est, se, low, high, p, df, note = astuple(nof1.period_level(table, "R", ["T"], trend=True)["T"])
    x = np.column_stack([np.ones(8), np.array(labels) == "T", mids - mids.mean()]).astype(float)
    ols = sm.OLS(means, x).fit()
    assert est == pytest.approx(ols.params[1], abs=1e-12) and se == pytest.approx(ols.bse[1], rel=1e-10)
    assert p == pytest.approx(ols.pvalues[1], rel=1e-8) and df == 5 and "8 periods" in note
    assert low < -0.6 < high
    exact = table.assign(mean=2.0 - 0.6 * (np.array(labels) == "T") - 0.003 * mids)
    assert nof1.period_level(exact, "R", ["T"])["T"].estimate == pytest.approx(-0.6, abs=1e-12)
    few = table.iloc[:3]
    assert "leave no df" in nof1.period_level(few, "R", ["T"])["T"].note


def test_design_orders_enumerate_each_randomisation_scheme():
    assert nof1.design_orders(TrialDesign(design="pairs", arms=("A", "B"), blocks=3, randomize=False)) is None
    pairs = nof1.design_orders(TrialDesign(design="pairs", arms=("A", "B"), blocks=3, randomize=True))
    assert len(pairs) == 8 and len(set(pairs)) == 8 and all(len(o) == 6 for o in pairs)
    assert ("A", "B", "B", "A", "A", "B") in pairs
    abab = nof1.design_orders(TrialDesign(design="abab", arms=("A", "B"), blocks=4, randomize=True))
    assert sorted(abab) == [("A", "B", "A", "B"), ("B", "A", "B", "A")]
    alt = nof1.design_orders(TrialDesign(design="baseline-alternating", arms=("R", "X", "Y"), blocks=5,
                                         randomize=True))
    assert sorted(alt) == [("R", "X", "Y", "X", "Y"), ("R", "Y", "X", "Y", "X")]


def test_randomization_test_is_the_exact_enumeration():
    design = TrialDesign(design="pairs", arms=("A", "B"), blocks=3, randomize=True)
    orders = nof1.design_orders(design)
    observed = ("A", "B", "B", "A", "A", "B")
    means = np.array([2.0, 1.1, 1.5, 2.2, 1.8, 1.4])
    table = pd.DataFrame({"treatment": observed, "mid": np.arange(6) * 4 + 2.5, "mean": means, "n": 4})
    found = nof1.randomization_test(table, "A", ["B"], orders, trend=False)["B"]
    stat, p, note = found.estimate, found.p, found.note

    def diff(order):
        order = np.array(order)
        return means[order == "B"].mean() - means[order == "A"].mean()

    brute = [diff(sum(o, ())) for o in itertools.product([("A", "B"), ("B", "A")], repeat=3)]
    assert stat == pytest.approx(diff(observed))
    assert p == pytest.approx(np.mean(np.abs(brute) >= abs(diff(observed)) - 1e-12))
    assert "exact over 8 orders" in note
    other = table.assign(treatment=["A", "A", "B", "B", "A", "B"])
    assert math.isnan(nof1.randomization_test(other, "A", ["B"], orders)["B"].p)


def _kinetic_series(effect=-0.8, trend=-0.002, half_life=(3.0, 4.0), phi=0.0, sd=0.0, seed=0):
    days, treatments = _schedule(["R", "A", "C", "A", "C"], 20)
    x_a = exposure(treatments == "A", *half_life)
    x_c = exposure(treatments == "C", *half_life)
    rng = np.random.default_rng(seed)
    noise = np.zeros(days.size)
    for t in range(days.size):
        noise[t] = (phi * noise[t - 1] if t else 0.0) + sd * rng.normal() * (math.sqrt(1 - phi ** 2) if t else 1.0)
    y = 2.0 + effect * x_a - 0.4 * x_c + trend * days + noise
    effect_part = effect * x_a - 0.4 * x_c
    delivered = {arm: effect_part[treatments == arm].mean() - effect_part[treatments == "R"].mean()
                 for arm in ("A", "C")}
    return days, treatments, y, delivered


def test_gls_kinetics_returns_the_delivered_effect_exactly_on_a_noise_free_series():
    days, treatments, y, delivered = _kinetic_series()
    found = nof1.gls_kinetics(days, treatments, y, "R", ["A", "C"], set(), kinetics=nof1.Kinetics(3.0, 4.0))
    for arm in ("A", "C"):
        assert found[arm].estimate == pytest.approx(delivered[arm], abs=1e-9)
    # unknown kinetics: the profile finds a half-life; a common 3-4 day half-life lies between grid points
    profiled = nof1.gls_kinetics(days, treatments, y, "R", ["A"], set())
    assert "profile ML" in profiled["A"].note and profiled["A"].estimate == pytest.approx(delivered["A"], abs=0.05)


def test_gls_kinetics_covers_and_finds_phi_where_the_step_model_does_not():
    days, treatments, y, delivered = _kinetic_series(phi=0.6, sd=0.1, seed=3)
    kin = nof1.gls_kinetics(days, treatments, y, "R", ["A"], set(), kinetics=nof1.Kinetics(3.0, 4.0))["A"]
    assert kin.ci_low < delivered["A"] < kin.ci_high
    phi = float(kin.note.split("phi=")[1].split(" ")[0])
    assert 0.35 < phi < 0.8


def test_hac_equals_a_hand_computed_newey_west():
    rng = np.random.default_rng(1)
    days = np.arange(1, 41, dtype=float)
    treatments = np.where(((days - 1) // 5) % 2 == 1, "T", "R")
    y = 1.0 - 0.5 * (treatments == "T") + rng.normal(0, 0.3, 40)
    est, se, low, high, p, df, note = astuple(nof1.hac(days, treatments, y, "R", ["T"], trend=True)["T"])
    x = np.column_stack([np.ones(40), treatments == "T", days - days.mean()]).astype(float)
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    e = y - x @ beta
    lags = int(math.floor(4 * (40 / 100) ** (2 / 9)))
    u = x * e[:, None]
    s = u.T @ u
    for lag in range(1, lags + 1):
        gamma = u[lag:].T @ u[:-lag]
        s += (1 - lag / (lags + 1)) * (gamma + gamma.T)
    bread = np.linalg.inv(x.T @ x)
    cov = bread @ s @ bread * 40 / (40 - 3)
    assert est == pytest.approx(beta[1], abs=1e-12)
    assert se == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-10)
    assert df == 37 and f"{lags} lags" in note


def _gapped_series(seed=0, n=60):
    rng = np.random.default_rng(seed)
    days = np.sort(rng.choice(np.arange(n + 12), n, replace=False)).astype(float)  # gaps of 1, 2, 3, ...
    x = np.column_stack([np.ones(n), (days % 10 < 5).astype(float), days - days.mean()])
    e = np.zeros(n)
    for t in range(1, n):
        e[t] = 0.6 ** (days[t] - days[t - 1]) * e[t - 1] + rng.standard_normal()
    return days, x, 3.0 + 0.4 * x[:, 1] + e


def _dense_reml_deviance(phi, days, x, y):
    """-2 REML log-likelihood (constants dropped, sigma^2 profiled) from the full correlation matrix."""
    r = phi ** np.abs(days[:, None] - days[None, :])
    r_inv = np.linalg.inv(r)
    xx = x.T @ r_inv @ x
    beta = np.linalg.solve(xx, x.T @ r_inv @ y)
    resid = y - x @ beta
    n, p = x.shape
    return (np.linalg.slogdet(r)[1] + (n - p) * math.log(resid @ r_inv @ resid) + np.linalg.slogdet(xx)[1])


def test_ar1_moments_give_the_whitened_gram_and_the_dense_likelihood():
    days, x, y = _gapped_series()
    gaps = np.diff(days)
    assert len(np.unique(gaps)) >= 3
    moments = nof1.AR1Moments(y, x, gaps)
    data = np.column_stack([x, y])
    for phi in (-0.7, 0.0, 0.35, 0.9, 0.99):
        white = nof1.ar1_whiten(data, phi, gaps)
        np.testing.assert_allclose(moments.gram(phi)[0], white.T @ white, rtol=1e-10, atol=1e-8)
    phis = np.array([-0.5, 0.2, 0.6, 0.95])
    ours = moments.deviance(phis)
    dense = np.array([_dense_reml_deviance(p, days, x, y) for p in phis])
    np.testing.assert_allclose(ours - ours[0], dense - dense[0], rtol=1e-9, atol=1e-8)


def test_fit_phi_finds_the_maximum_of_the_dense_likelihood():
    days, x, y = _gapped_series(seed=3)
    phi, dev = nof1.fit_phi(y, x, np.diff(days))
    grid = np.linspace(phi - 2e-3, phi + 2e-3, 41)
    dense = np.array([_dense_reml_deviance(p, days, x, y) for p in grid])
    assert abs(grid[np.argmin(dense)] - phi) <= 1e-4          # the dense optimum within a grid step
    assert _dense_reml_deviance(phi, days, x, y) <= dense.min() + 1e-9
    assert 0.3 < phi < 0.85                                    # simulated 0.6


def test_period_arrays_match_the_frame_and_skip_empty_periods():
    days, treatments = _schedule(["R", "T", "R"], 4, washout=1)
    values = np.arange(days.size, dtype=float)
    values[5:9] = np.nan                                          # T's period has no value at all
    arrays = nof1.period_arrays(days, treatments, values, {"Washout"})
    frame = nof1.periods(days, treatments, values, {"Washout"})
    assert arrays["treatment"] == frame["treatment"].tolist() == ["R", "R"]
    np.testing.assert_allclose(arrays["mean"], [1.5, 11.5])
    np.testing.assert_allclose(arrays["mid"], frame["mid"].to_numpy())


def test_exposures_continue_the_last_treatment_over_skipped_days():
    days = np.array([0, 1, 2, 5, 6], dtype=float)                 # days 3 and 4 are not scheduled
    treatments = np.array(["R", "A", "A", "R", "R"])
    got = nof1.exposures(days, treatments, ["A"], nof1.Kinetics(1.0, 1.0))[:, 0]
    full = exposure(np.array([0, 1, 1, 1, 1, 0, 0], dtype=bool), 1.0, 1.0)
    np.testing.assert_allclose(got, full[[0, 1, 2, 5, 6]])
