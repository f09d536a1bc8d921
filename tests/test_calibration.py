"""Calibration slope and standardised intervals (synthtrial.analyze.calibration), against known answers."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from synthtrial.analyze import stats as S
from synthtrial.analyze.calibration import calibration_slope, standardized_interval


def test_calibration_slope_by_hand():
    # truths -1, -0.5, -0.5 and estimates -0.8, -0.5, -0.3: sum(xy) = 1.2, sum(x^2) = 1.5, slope 0.8;
    # residuals 0, -0.1, 0.1 -> s^2 = 0.02 / 2, SE = sqrt(0.01 / 1.5), t(0.975, 2 df) = 4.302653
    slope, lo, hi = calibration_slope(np.array([-0.8, -0.5, -0.3]), np.array([-1.0, -0.5, -0.5]))
    half = 4.302652729749464 * math.sqrt(0.01 / 1.5)
    assert slope == pytest.approx(0.8, abs=1e-12)
    assert (lo, hi) == pytest.approx((0.8 - half, 0.8 + half), abs=1e-12)
    # NaN pairs are left out; one pair has no interval; zero truths have no slope
    assert calibration_slope(np.array([-0.4, np.nan]), np.array([-0.5, -1.0]))[0] == pytest.approx(0.8)
    assert np.isnan(calibration_slope(np.array([-0.4]), np.array([-0.5]))[1])
    assert all(np.isnan(calibration_slope(np.array([0.1, -0.1]), np.array([0.0, 0.0]))))


def test_calibration_slope_is_not_moved_by_noise():
    """An unbiased outcome keeps slope 1 however noisy (only the interval widens); an attenuated one does not."""
    rng = np.random.default_rng(0)
    truth = rng.uniform(-1.0, -0.3, 400)
    noisy = calibration_slope(truth + rng.normal(0, 0.5, truth.size), truth)
    halved = calibration_slope(0.5 * truth + rng.normal(0, 0.05, truth.size), truth)
    assert noisy[1] < 1 < noisy[2] and noisy[2] - noisy[1] > 0.1
    assert halved[2] < 0.6


def test_standardized_interval_matches_hedges_and_olkin():
    """With a z interval and the SD's df set to n1 + n2, the interval is Hedges & Olkin's large-sample one for a
    standardised mean difference: d +- z sqrt((n1 + n2) / (n1 n2) + d^2 / (2 (n1 + n2)))."""
    n1, n2, s, diff = 12, 9, 2.0, 2.6
    d = diff / s
    se = s * math.sqrt(1 / n1 + 1 / n2)
    z = stats.norm.ppf(0.975)
    out = standardized_interval(np.array([diff]), np.array([se]), np.array([diff - z * se]),
                                np.array([diff + z * se]), np.array([s]), np.array([n1 + n2]))
    half = z * math.sqrt((n1 + n2) / (n1 * n2) + d ** 2 / (2 * (n1 + n2)))
    np.testing.assert_allclose([v[0] for v in out], [d, d - half, d + half], rtol=1e-12)


def test_standardized_interval_covers_at_its_level_where_a_known_sd_interval_does_not():
    """Simulation: an estimate with known SE and an independent SD estimate on 10 df, true standardised effect
    3. Dividing the CI by the SD (treating it as known) covered 58%; the delta-method interval covers 95%."""
    rng = np.random.default_rng(1)
    reps, delta, se, nu = 20000, 3.0, 0.3, 10
    est = rng.normal(delta, se, reps)
    sd = np.sqrt(rng.chisquare(nu, reps) / nu)
    z = stats.norm.ppf(0.975)
    _, low, high = standardized_interval(est, np.full(reps, se), est - z * se, est + z * se, sd, np.full(reps, nu))
    covered = np.mean((low <= delta) & (delta <= high))
    known = np.mean(((est - z * se) / sd <= delta) & (delta <= (est + z * se) / sd))
    mc_se = math.sqrt(0.95 * 0.05 / reps)
    assert abs(covered - 0.95) < 3 * mc_se + 0.005
    assert known < 0.7


def test_standardized_interval_keeps_the_rows_own_critical_value_and_missing_values():
    # a t interval on 4 df: q = 2.776; the SD on 1e12 df adds nothing, so the interval is the CI over the SD
    q = stats.t.ppf(0.975, 4)
    d, low, high = standardized_interval(np.array([1.0, 1.0, 1.0]), np.array([0.5, np.nan, 0.0]),
                                         np.array([1 - q * 0.5, np.nan, 1.0]), np.array([1 + q * 0.5, np.nan, 1.0]),
                                         np.array([2.0, 2.0, 2.0]), np.array([1e12, 1e12, 8.0]))
    assert (low[0], high[0]) == pytest.approx(((1 - q * 0.5) / 2, (1 + q * 0.5) / 2), rel=1e-9)
    assert np.isnan(low[1]) and np.isnan(high[1]) and d[1] == 0.5
    # an SE of 0 (no spread at all) still carries the SD's uncertainty, at the normal quantile
    z = stats.norm.ppf(0.975)
    assert (low[2], high[2]) == pytest.approx((0.5 - z * 0.5 / 4, 0.5 + z * 0.5 / 4), rel=1e-9)


def test_standardize_calibrates_each_per_patient_method_over_patients_and_arms():
    rows = []
    truth = {"reference": "R", "mean_delivered_effects": {"A": -0.7, "B": -0.4},
             "population_delivered_effects": {"A": -0.7, "B": -0.4}, "patients": {}}
    for k, (a, b) in enumerate([(-1.0, -0.5), (-0.6, -0.4), (-0.5, -0.3)]):
        pid = f"P{k}"
        truth["patients"][pid] = {"delivered_effects": {"A": a, "B": b}}
        rows += [("y", "period", "patient_delivered", pid, "A", "R", 0.8 * a + 0.01 * k, 0.1),
                 ("y", "period", "patient_delivered", pid, "B", "R", 0.8 * b - 0.01 * k, 0.1),
                 ("y", "welch", "patient_delivered", pid, "A", "R", 0.5 * a, 0.1)]
    rows.append(("y", "lmm", "population_delivered", "pooled", "A", "R", -0.56, 0.05))
    effects = pd.DataFrame(rows, columns=["outcome", "method", "estimand", "scope", "arm", "reference", "estimate",
                                          "se"])
    effects = effects.assign(ci_low=effects["estimate"] - 2 * effects["se"],
                             ci_high=effects["estimate"] + 2 * effects["se"], p=0.01)
    rng = np.random.default_rng(0)
    data = pd.DataFrame({"patient_id": np.repeat(["P0", "P1", "P2"], 12), "day": np.tile(np.arange(12), 3),
                         "treatment": np.tile(["R"] * 4 + ["A"] * 4 + ["B"] * 4, 3), "y": rng.normal(size=36)})
    out = S.standardize(effects, data, truth, trend=False)
    period = out[out["method"] == "period"]
    expected = calibration_slope(period["estimate"].to_numpy(), np.array([-1.0, -0.5, -0.6, -0.4, -0.5, -0.3]))
    assert period["calibration_slope"].nunique() == 1
    assert (period.iloc[0]["calibration_slope"], period.iloc[0]["calibration_lo"],
            period.iloc[0]["calibration_hi"]) == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(0.8, abs=0.02)
    assert out.loc[out["method"] == "welch", "calibration_slope"].to_numpy() == pytest.approx(0.5, abs=1e-12)
    pooled = out[out["method"] == "lmm"].iloc[0]
    assert pooled["calibration_slope"] == pytest.approx(0.8)
    assert (pooled["calibration_lo"], pooled["calibration_hi"]) == pytest.approx((0.8 - 2 * 0.05 / 0.7,
                                                                                 0.8 + 2 * 0.05 / 0.7))
    assert out["residual_df"].iloc[0] == 36 - 3 - 2
