"""Effect estimation: exact answers where they are known, recovery and calibration where they are not."""

import itertools
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats as sps
from statsmodels.regression.mixed_linear_model import MixedLM

from synthtrial.analyze import daylevel as D
from synthtrial.analyze import estimators as E
from synthtrial.analyze import mixed as M
from synthtrial.analyze import stats as S
from synthtrial.analyze.nof1 import Kinetics
from synthtrial.util.errors import SynthtrialError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent division by zero or overflow


def _phi(note: str) -> float:
    return float(re.search(r"phi=(-?[0-9.]+)", note).group(1))


def _simulate(n_patients: int, n_days: int, effect: float, rng: np.random.Generator, *, slope_sd: float = 0.0,
              intercept_sd: float = 0.5, noise_sd: float = 0.3, period: int = 10, trend: float = 0.0) -> pd.DataFrame:
    """ABAB periods (reference 'R' first, then 'T'), iid noise, random intercepts and slopes."""
    frames = []
    day = np.arange(1, n_days + 1)
    on = ((day - 1) // period) % 2 == 1
    for i in range(n_patients):
        own_effect = effect + slope_sd * rng.normal()
        y = rng.normal(0.0, intercept_sd) + own_effect * on + trend * day + rng.normal(0.0, noise_sd, n_days)
        frames.append(pd.DataFrame({"patient_id": f"P{i:02d}", "day": day, "treatment": np.where(on, "T", "R"),
                                    "y": y}))
    return pd.concat(frames, ignore_index=True)


# --- an effect every method must return exactly ---------------------------------------------------------

def _palindrome_trial(effect: float = 0.7, n_patients: int = 4) -> pd.DataFrame:
    """Palindromic schedules and time-antisymmetric noise: every estimator here is exactly ``effect``.

    Reversing time maps the design (intercept, treatment, AR(1) / random-effect covariances) onto itself and
    the noise onto minus itself, so the noise's contribution to any of these linear estimators cancels;
    the centred day is antisymmetric and orthogonal to the rest, so adding a trend term changes nothing.
    """
    half = ["R"] * 5 + ["T"] * 5 + ["R"] * 5 + ["T"] * 5
    schedule = np.array(half + half[::-1])
    rng = np.random.default_rng(7)
    frames = []
    for i in range(n_patients):
        first = rng.normal(0.0, 0.4, half.__len__())
        noise = np.concatenate([first, -first[::-1]])
        y = 1.0 + 0.5 * i + effect * (schedule == "T") + noise
        frames.append(pd.DataFrame({"patient_id": f"P{i}", "day": np.arange(1, schedule.size + 1),
                                    "treatment": schedule, "severity": y}))
    return pd.concat(frames, ignore_index=True)


def test_gls_kinetics_is_descriptive_on_a_graders_or_raters_outcome_only():
    rng = np.random.default_rng(3)
    schedule = np.repeat(["R", "T", "R", "T", "R"], 28)              # 140 days: long enough for gls_kinetics
    frames = [pd.DataFrame({"patient_id": f"P{i}", "day": np.arange(1, 141), "treatment": schedule,
                            "oracle": 1.0 - 0.5 * (schedule == "T") + rng.normal(0, 0.1, 140)}) for i in range(3)]
    data = pd.concat(frames, ignore_index=True)
    data[E.GRADER_OUTCOME_PREFIX + "counter_count"] = data["oracle"]
    data[E.RATED_OUTCOME_PREFIX + "1"] = data["oracle"]             # power --raters 1's outcome
    kinetics = Kinetics(0.0, 0.0)
    for outcome, role in (("oracle", "inferential"), (E.GRADER_OUTCOME_PREFIX + "counter_count", "descriptive"),
                          (E.RATED_OUTCOME_PREFIX + "1", "descriptive")):
        rows = S.analyze_outcome(data, outcome, "R", methods=("gls_kinetics", "period", "lmm"), kinetics=kinetics)
        own = rows[rows["method"] == "gls_kinetics"]
        assert len(own) == 3 and (own["role"] == role).all(), outcome
        assert own["note"].str.contains("grader's or rater's outcome").all() == (role == "descriptive")
        assert (rows.loc[rows["method"] != "gls_kinetics", "role"] == "inferential").all()
        np.testing.assert_allclose(own["estimate"], -0.5, atol=0.05)  # the estimate itself is the same


def test_known_effect_is_returned_exactly_by_every_method():
    data = _palindrome_trial()
    result = S.analyze_outcome(data, "severity", "R", n_permutations=500, kinetics=Kinetics(0.0, 0.0))
    assert set(result["method"]) == set(E.METHODS)
    assert len(result) == 7 * 4 + 2  # seven per-patient methods, two pooled variants
    short = result["method"] == "gls_kinetics"  # 40 days: too short for the AR(1) fit to be inferential
    assert (result.loc[~short, "role"] == result.loc[~short, "method"].map(E.ROLES)).all()
    assert (result.loc[short, "role"] == "descriptive").all() and result.loc[short, "note"].str.contains("too short").all()
    np.testing.assert_allclose(result["estimate"], 0.7, atol=1e-9)
    with_ci = result[result["method"] != "randomization"]  # a test without a design: estimate only
    assert ((with_ci["ci_low"] <= 0.7 + 1e-9) & (0.7 - 1e-9 <= with_ci["ci_high"])).all()
    assert result.loc[result["method"] == "randomization", "p"].isna().all()
    for pid, own in data.groupby("patient_id"):
        treated = own.loc[own["treatment"] == "T", "severity"].to_numpy()
        reference = own.loc[own["treatment"] == "R", "severity"].to_numpy()
        welch = result[(result["method"] == "welch") & (result["scope"] == pid)].iloc[0]
        assert welch["p"] == pytest.approx(sps.ttest_ind(treated, reference, equal_var=False).pvalue, rel=1e-12)
    for trend in (False, True):
        estimate = D.gls_ar1(data[data["patient_id"] == "P1"], "severity", "R", trend=trend)["T"]
        assert estimate.estimate == pytest.approx(0.7, abs=1e-9)
        assert estimate.df == 40 - 2 - trend
    for random_slopes in (False, True):
        estimate = M.mixed_model(data, "severity", "R", trend=False, random_slopes=random_slopes)["T"]
        assert estimate.estimate == pytest.approx(0.7, abs=1e-9)


# --- Welch -------------------------------------------------------------------------------------------------

def test_welch_matches_scipy_estimate_df_p_and_ci():
    rng = np.random.default_rng(3)
    treated, reference = rng.normal(1.0, 2.0, 9), rng.normal(0.0, 0.5, 23)
    estimate = D.welch_t(treated, reference, alpha=0.1)
    expected = sps.ttest_ind(treated, reference, equal_var=False)
    ci = expected.confidence_interval(0.9)
    assert estimate.estimate == pytest.approx(treated.mean() - reference.mean(), rel=1e-12)
    assert estimate.p == pytest.approx(expected.pvalue, rel=1e-12)
    assert estimate.df == pytest.approx(expected.df, rel=1e-12)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert estimate.se == pytest.approx(math.sqrt(treated.var(ddof=1) / 9 + reference.var(ddof=1) / 23))


def test_welch_degenerate_groups_say_why():
    assert math.isnan(D.welch_t(np.array([1.0]), np.array([0.0, 1.0])).se)
    flat = D.welch_t(np.array([2.0, 2.0]), np.array([1.0, 1.0]))
    assert (flat.estimate, flat.se, flat.ci_low, flat.ci_high) == (1.0, 0.0, 1.0, 1.0)
    assert "zero variance" in flat.note


# --- permutation --------------------------------------------------------------------------------------------

def _exact_p(values: np.ndarray, treated: np.ndarray) -> float:
    """Brute-force two-sided permutation p: every way to pick the treated days."""
    n, k = values.size, int(treated.sum())
    observed = values[treated].mean() - values[~treated].mean()
    hits = total = 0
    for chosen in itertools.combinations(range(n), k):
        mask = np.zeros(n, bool)
        mask[list(chosen)] = True
        hits += abs(values[mask].mean() - values[~mask].mean()) >= abs(observed) - 1e-12
        total += 1
    return hits / total


@pytest.mark.parametrize("values", [
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],      # the most extreme labelling, ties with its mirror
    [3.0, 1.0, 2.0, 2.0, 5.0, 1.0],      # many exact ties in |statistic|
    [0.31, -1.2, 0.05, 0.77, 0.4, -0.3],
])
def test_permutation_exact_matches_brute_force_enumeration(values):
    values = np.asarray(values)
    treated = np.array([True, True, True, False, False, False])
    result = D.permutation_test(values, treated)
    assert result.note == "exact"
    assert result.p == _exact_p(values, treated)
    assert result.estimate == pytest.approx(values[:3].mean() - values[3:].mean(), abs=1e-12)
    assert math.isnan(result.se)


def test_permutation_monte_carlo_approximates_exact_and_counts_the_observed():
    rng = np.random.default_rng(11)
    values = rng.normal(size=12) + 0.8 * (np.arange(12) < 6)
    treated = np.arange(12) < 6
    exact = _exact_p(values, treated)
    assert D.permutation_test(values, treated).p == exact  # 924 relabelings: exact mode
    n = 5000
    monte_carlo = D.permutation_test(values, treated, n_permutations=n, exact_limit=0, seed=5)
    assert "monte carlo" in monte_carlo.note
    assert abs(monte_carlo.p - exact) <= 4 * math.sqrt(exact * (1 - exact) / n) + 1 / n
    assert monte_carlo.p * (n + 1) == pytest.approx(round(monte_carlo.p * (n + 1)))  # (1 + #) / (1 + n)
    again = D.permutation_test(values, treated, n_permutations=n, exact_limit=0, seed=5)
    assert again == monte_carlo


@pytest.mark.parametrize("exact_limit", [20000, 0])
@pytest.mark.parametrize("n_treated", [5, 6])  # 6 of 12: every relabeling has a mirror image
def test_permutation_ci_is_the_set_of_shifts_the_test_accepts(exact_limit, n_treated):
    rng = np.random.default_rng(2)
    values = rng.normal(size=11 + (n_treated == 6)) + 1.0 * (np.arange(11 + (n_treated == 6)) < n_treated)
    treated = np.arange(values.size) < n_treated

    def p_at(shift: float) -> float:
        return D.permutation_test(values - shift * treated, treated, n_permutations=999, exact_limit=exact_limit,
                                  seed=4).p

    result = D.permutation_test(values, treated, n_permutations=999, exact_limit=exact_limit, seed=4)
    assert result.ci_low < result.estimate < result.ci_high
    assert p_at(result.ci_low + 1e-7) > 0.05 and p_at(result.ci_high - 1e-7) > 0.05
    assert p_at(result.ci_low - 1e-7) <= 0.05 and p_at(result.ci_high + 1e-7) <= 0.05
    for shift in np.linspace(result.ci_low - 1.0, result.ci_high + 1.0, 41):
        if p_at(shift) > 0.05:
            assert result.ci_low <= shift <= result.ci_high


def test_permutation_ci_is_unbounded_when_no_shift_can_be_rejected():
    result = D.permutation_test(np.array([1.0, 2.0, 3.0, 4.0]), np.array([True, True, False, False]))
    assert result.p == pytest.approx(2 / 6)
    assert (result.ci_low, result.ci_high) == (-math.inf, math.inf)


# --- GLS with AR(1) errors -------------------------------------------------------------------------------

def _ar1_series(n_days: int, phi: float, effect: float, rng: np.random.Generator, sd: float = 0.5) -> pd.DataFrame:
    noise = np.empty(n_days)
    noise[0] = rng.normal(0.0, sd)
    for i in range(1, n_days):
        noise[i] = phi * noise[i - 1] + math.sqrt(1 - phi ** 2) * sd * rng.normal()
    day = np.arange(n_days)
    on = (day // 30) % 2 == 1
    return pd.DataFrame({"day": day, "treatment": np.where(on, "T", "R"), "y": 2.0 + effect * on + noise})


def test_gls_ar1_recovers_effect_and_phi_with_and_without_gaps():
    rng = np.random.default_rng(0)
    series = _ar1_series(600, 0.6, -0.4, rng)
    full = D.gls_ar1(series, "y", "R")["T"]
    assert abs(full.estimate + 0.4) < 3 * full.se
    assert abs(_phi(full.note) - 0.6) < 0.15
    gapped = series.drop(index=rng.choice(600, 120, replace=False))
    estimate = D.gls_ar1(gapped, "y", "R", trend=True)["T"]
    assert abs(estimate.estimate + 0.4) < 3 * estimate.se
    assert abs(_phi(estimate.note) - 0.6) < 0.15
    assert "gap" in estimate.note and estimate.df == 480 - 3


def test_gls_ar1_phi_is_the_full_covariance_reml_optimum_over_gaps():
    """Gap-aware whitening must give the REML of corr = phi^|day_i - day_j| computed with full matrices."""
    rng = np.random.default_rng(1)
    series = _ar1_series(90, 0.5, 0.3, rng).drop(index=[3, 4, 5, 20, 41, 42, 70])
    result = D.gls_ar1(series, "y", "R")["T"]
    phi = _phi(result.note)
    days = series["day"].to_numpy()
    y = series["y"].to_numpy()
    x = np.column_stack([np.ones(y.size), (series["treatment"] == "T").to_numpy(float)])

    def reml(value: float) -> float:
        corr = value ** np.abs(days[:, None] - days[None, :])
        inv = np.linalg.inv(corr)
        xtx = x.T @ inv @ x
        beta = np.linalg.solve(xtx, x.T @ inv @ y)
        resid = y - x @ beta
        return -(np.linalg.slogdet(corr)[1] + np.linalg.slogdet(xtx)[1] + (y.size - 2) * np.log(resid @ inv @ resid))

    grid = np.arange(-0.9, 0.95, 0.005)
    assert abs(phi - grid[np.argmax([reml(v) for v in grid])]) <= 0.005
    gls = sm.GLS(y, x, sigma=phi ** np.abs(days[:, None] - days[None, :])).fit()
    assert result.estimate == pytest.approx(gls.params[1], abs=1e-3 * result.se)
    assert result.se == pytest.approx(gls.bse[1], rel=1e-3)


def test_gls_ar1_on_a_noise_free_series_is_exact():
    series = _ar1_series(40, 0.0, 0.0, np.random.default_rng(0), sd=0.0)
    series["y"] = 1.0 + 0.25 * (series["treatment"] == "T")
    estimate = D.gls_ar1(series, "y", "R")["T"]
    assert (estimate.estimate, estimate.se) == (pytest.approx(0.25, abs=1e-12), 0.0)
    assert "phi undefined" in estimate.note


def test_gls_ar1_needs_one_row_per_day_and_one_patient():
    series = _ar1_series(40, 0.3, 0.0, np.random.default_rng(2))
    with pytest.raises(SynthtrialError, match="one row per day"):
        D.gls_ar1(pd.concat([series, series.iloc[:1]]), "y", "R")
    two = pd.concat([series.assign(patient_id="A"), series.assign(patient_id="B")])
    with pytest.raises(SynthtrialError, match="one patient"):
        D.gls_ar1(two, "y", "R")


# --- mixed model -------------------------------------------------------------------------------------------

def test_mixed_model_recovers_population_effect_with_random_slopes():
    data = _simulate(12, 60, -0.5, np.random.default_rng(4), slope_sd=0.2)
    estimate = M.mixed_model(data, "y", "R", trend=False)["T"]
    assert estimate.note.startswith("random intercept + treatment slopes")
    assert abs(estimate.estimate + 0.5) < 3 * estimate.se
    assert estimate.ci_low < -0.5 < estimate.ci_high
    # cluster-robust SEs stay valid when the random-effects structure is wrong: an intercept-only model,
    # which ignores the patients' own effects, still gets an interval as wide and still covers
    intercept_only = M.mixed_model(data, "y", "R", trend=False, random_slopes=False)["T"]
    assert intercept_only.se == pytest.approx(estimate.se, rel=0.25)
    assert intercept_only.ci_low < -0.5 < intercept_only.ci_high
    assert "CR2 cluster-robust" in estimate.note and estimate.df == pytest.approx(11, abs=0.5)  # balanced: ~G - 1
    cr1 = M.mixed_model(data, "y", "R", trend=False, correction="CR1")["T"]
    assert "CR1 cluster-robust" in cr1.note and cr1.df == data["patient_id"].nunique() - 1
    assert cr1.estimate == estimate.estimate


def test_mixed_model_trend_adjustment_removes_period_order_bias():
    # R T R T in 15-day periods: treated days are 15 days later on average, so a trend of -0.02/day
    # shifts the unadjusted difference by -0.3
    data = _simulate(10, 60, -0.5, np.random.default_rng(5), slope_sd=0.1, period=15, trend=-0.02)
    adjusted = M.mixed_model(data, "y", "R", trend=True)["T"]
    naive = M.mixed_model(data, "y", "R", trend=False)["T"]
    assert abs(adjusted.estimate + 0.5) < 3 * adjusted.se
    assert adjusted.ci_low < -0.5 < adjusted.ci_high
    assert naive.estimate - adjusted.estimate == pytest.approx(-0.3, abs=0.08)
    assert naive.ci_high < -0.5  # visibly biased: its CI misses the truth


def test_mixed_model_falls_back_to_random_intercept_when_slopes_cannot_be_fitted(monkeypatch):
    rng = np.random.default_rng(6)
    two = _simulate(2, 40, -0.5, rng)
    estimate = M.mixed_model(two, "y", "R")["T"]
    assert estimate.note.startswith("random intercept only: 2 patients cannot identify 2 random effects")
    assert np.isfinite(estimate.se) and estimate.ci_low < estimate.estimate < estimate.ci_high

    original = MixedLM.fit

    def failing_fit(self, *args, **kwargs):
        if self.k_re > 1:
            raise np.linalg.LinAlgError("Singular matrix")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MixedLM, "fit", failing_fit)
    estimate = M.mixed_model(_simulate(8, 30, -0.5, rng), "y", "R")["T"]
    assert estimate.note.startswith("random intercept only: random-slopes fit failed (LinAlgError")
    assert np.isfinite(estimate.estimate) and np.isfinite(estimate.se)


def test_singular_or_unconverged_random_effects_are_refused():
    names = {"Intercept": 0.2, "T": 0.1}
    fit = SimpleNamespace(converged=True, cov_re=np.array([[0.4, 0.2], [0.2, 0.1]]), scale=1.0,
                          bse_fe=pd.Series(names))
    assert "singular" in M.slopes_problem(fit, [], None, 1)
    fit.cov_re = np.array([[0.4, 0.05], [0.05, 0.1]])
    assert M.slopes_problem(fit, [], None, 1) == ""
    hessian = "The Hessian matrix at the estimated parameter values is not positive definite"
    assert "Hessian" in M.slopes_problem(fit, [hessian], None, 1)
    fit.converged = False
    assert "did not converge" in M.slopes_problem(fit, [], None, 1)


def test_mixed_model_with_one_patient_says_so():
    estimate = M.mixed_model(_simulate(1, 20, 0.0, np.random.default_rng(0)), "y", "R")["T"]
    assert math.isnan(estimate.estimate) and "at least 2 patients" in estimate.note


# --- calibration under the null ----------------------------------------------------------------------------

def test_null_rejection_rates_are_near_alpha():
    rng = np.random.default_rng(2024)
    n_sims = 150
    pooled = welch = 0
    for _ in range(n_sims):
        data = _simulate(5, 12, 0.0, rng, period=3)
        pooled += M.mixed_model(data, "y", "R", trend=False, random_slopes=False)["T"].p < 0.05
        own = data[data["patient_id"] == "P00"]
        welch += D.welch_t(own.loc[own["treatment"] == "T", "y"].to_numpy(),
                           own.loc[own["treatment"] == "R", "y"].to_numpy()).p < 0.05
    assert 0.01 <= pooled / n_sims <= 0.12
    assert 0.01 <= welch / n_sims <= 0.12


# --- the tidy analysis -------------------------------------------------------------------------------------

def _three_arm_trial() -> pd.DataFrame:
    rng = np.random.default_rng(9)
    schedule = ["R"] * 6 + ["Washout"] * 2 + ["A"] * 6 + ["Washout"] * 2 + ["B"] * 6
    frames = []
    for pid in ("P1", "P2", "P3", "P4"):
        own = pd.DataFrame({"patient_id": pid, "day": np.arange(1, len(schedule) + 1), "treatment": schedule})
        own["pc 1"] = (2.0 - 0.8 * (own["treatment"] == "A") - 0.4 * (own["treatment"] == "B")
                       + rng.normal(0.0, 0.2, len(own)))
        own["other"] = rng.normal(size=len(own))
        frames.append(own)
    data = pd.concat(frames, ignore_index=True)
    data.loc[(data["patient_id"] == "P2") & (data["day"].isin([1, 2])), "pc 1"] = np.nan
    data.loc[(data["patient_id"] == "P2") & (data["day"] == 7), "pc 1"] = np.nan  # a washout day: not counted
    data = data[~((data["patient_id"] == "P3") & (data["treatment"] == "B"))]     # P3 never got B
    data = data[~((data["patient_id"] == "P4") & (data["treatment"] == "R"))]     # P4 has no reference
    return data.reset_index(drop=True)


def test_analyze_outcome_rows_columns_arms_and_dropped_values():
    data = _three_arm_trial()
    result = S.analyze_outcome(data, "pc 1", "R", exclude=["Washout"], n_permutations=200, seed=3)
    assert list(result.columns) == list(S.RESULT_COLUMNS)
    assert set(result["arm"]) == {"A", "B"} and set(result["reference"]) == {"R"}
    assert (result["outcome"] == "pc 1").all()
    per_patient = result[result["method"] != "lmm"]
    counts = per_patient.groupby(["method", "scope"]).size().to_dict()
    for method in ("welch", "permutation", "gls_ar1"):
        assert counts[(method, "P1")] == 2 and counts[(method, "P2")] == 2 and counts[(method, "P3")] == 1
        assert (method, "P4") not in counts
    pooled = result[result["method"] == "lmm"]
    assert list(pooled["scope"]) == ["pooled", "pooled"] and list(pooled["arm"]) == ["A", "B"]
    assert pooled["n"].iloc[0] == 4 * 18 - 6 - 6 - 2
    p2 = result[(result["scope"] == "P2") & (result["method"] == "welch")].set_index("arm")
    assert p2.loc["A", "n"] == 6 + 4 and "dropped 2 row(s)" in p2.loc["A", "note"]
    assert pooled["note"].str.contains("dropped 2 row").all()
    # one period per treatment: no period-level df once a trend is fitted, and no randomisation scheme known
    assert result.loc[result["method"] == "period", "note"].str.contains("periods leave no df").all()
    a_rows = result[(result["arm"] == "A") & ~result["method"].isin(["period", "randomization"])]
    assert (a_rows["estimate"] < -0.5).all() and (a_rows["p"] < 0.05).all()
    again = S.analyze_outcome(data, "pc 1", "R", exclude=["Washout"], n_permutations=200, seed=3)
    pd.testing.assert_frame_equal(result, again)


def test_analyze_outcome_methods_subset_and_washout_as_an_arm_when_not_excluded():
    data = _three_arm_trial()
    result = S.analyze_outcome(data, "other", "R", methods=["welch"])
    assert set(result["method"]) == {"welch"}
    assert set(result["arm"]) == {"A", "B", "Washout"}


# --- truth ---------------------------------------------------------------------------------------------

def _old_truth() -> dict:
    """A small truth of the shape truth files had before the estimands (no carryover, no population values)."""
    return {
        "reference": "R",
        "population_effects": {"A": -0.9, "B": -0.5},
        "mean_delivered_effects": {"A": -0.85, "B": -0.55},
        "patients": {
            "P1": {"baseline": 2.0, "effects": {"A": -1.0, "B": -0.6},
                   "delivered_effects": {"A": -0.95, "B": -0.58}},
            "P2": {"baseline": 2.1, "effects": {"A": -0.8, "B": -0.4},
                   "delivered_effects": {"A": -0.75, "B": -0.52}},
        },
    }


def _truth() -> dict:
    """A small truth of the shape ``protocols/trial.truth.json`` has (with the estimands)."""
    truth = _old_truth()
    truth["population_delivered_effects"] = {"A": -0.85, "B": -0.54}
    truth["population_carryover_effects"] = {"A": -0.02, "B": -0.1}
    truth["patients"]["P1"]["carryover_effects"] = {"A": -0.01, "B": -0.2}
    truth["patients"]["P2"]["carryover_effects"] = {"A": -0.03, "B": -0.15}
    return truth


def test_attach_truth_bias_and_coverage():
    effects = pd.DataFrame([
        ("severity", "lmm", "pooled", "A", "R", -0.80, -0.90, -0.70),
        ("severity", "welch", "P1", "A", "R", -0.90, -0.93, -0.80),     # misses -0.95
        ("severity", "welch", "P2", "B", "R", -0.50, -0.60, -0.40),
        ("severity", "welch", "P2", "A", "B", -0.20, -0.30, -0.10),     # A vs B: -0.75 - (-0.52)
        ("severity", "permutation", "P1", "B", "R", -0.60, np.nan, np.nan),
        ("severity", "welch", "P9", "A", "R", -0.50, -0.60, -0.40),     # a patient the truth lacks
        ("pc 1", "welch", "P1", "A", "R", 1.00, 0.50, 1.50),            # not on the severity scale
    ], columns=["outcome", "method", "scope", "arm", "reference", "estimate", "ci_low", "ci_high"])
    out = S.attach_truth(effects, _truth(), outcomes_on_truth_scale=["severity"])
    np.testing.assert_allclose(out["true_effect"], [-0.85, -0.95, -0.52, -0.23, -0.58, np.nan, np.nan])
    np.testing.assert_allclose(out["bias"], [0.05, 0.05, 0.02, 0.03, -0.02, np.nan, np.nan], atol=1e-12)
    assert list(out["covered"]) == [True, False, True, True, None, None, None]
    assert list(effects.columns) == ["outcome", "method", "scope", "arm", "reference", "estimate", "ci_low",
                                     "ci_high"]  # the input is left alone


def test_attach_truth_sets_each_row_against_its_estimand():
    truth = _truth()
    truth["population_delivered_effects"]["A"] = -0.78          # the population value differs from the sample mean
    effects = pd.DataFrame([
        ("severity", "lmm", "population_delivered", "pooled", "A", "R", -0.80, -0.90, -0.79),
        ("severity", "period", "patient_delivered", "P1", "B", "R", -0.50, -0.60, -0.40),
        ("severity", "period", "patient_delivered", "P2", "A", "B", -0.20, -0.30, -0.10),
    ], columns=["outcome", "method", "estimand", "scope", "arm", "reference", "estimate", "ci_low", "ci_high"])
    out = S.attach_truth(effects, truth, outcomes_on_truth_scale=["severity"])
    np.testing.assert_allclose(out["true_effect"], [-0.78, -0.58, -0.75 + 0.52])
    assert list(out["covered"]) == [False, True, True]     # against the population, not the sample mean -0.85
    np.testing.assert_allclose(out["true_sample_mean"], [-0.85, np.nan, np.nan])
    np.testing.assert_allclose(out["true_steady_state"], [-0.9, -0.6, -0.8 + 0.4])
    np.testing.assert_allclose(out["true_carryover"], [-0.02, -0.2, -0.03 + 0.15])


def test_attach_truth_reads_a_truth_written_before_the_estimands():
    """An older truth.json (no population values, no carryover) is still read: what it has is used, the rest
    is NaN, and the pooled row gets no truth rather than the sample mean its interval is not for."""
    effects = pd.DataFrame([
        ("severity", "lmm", "pooled", "A", "R", -0.80, -0.90, -0.70),
        ("severity", "welch", "P1", "A", "R", -0.90, -0.93, -0.80),
    ], columns=["outcome", "method", "scope", "arm", "reference", "estimate", "ci_low", "ci_high"])
    out = S.attach_truth(effects, _old_truth(), outcomes_on_truth_scale=["severity"])
    np.testing.assert_allclose(out["true_effect"], [np.nan, -0.95])
    np.testing.assert_allclose(out["true_sample_mean"], [-0.85, np.nan])
    np.testing.assert_allclose(out["true_steady_state"], [-0.9, -1.0])
    assert out["true_carryover"].isna().all()
    assert list(out["covered"]) == [None, False]


def test_attach_truth_on_the_shipped_trial():
    truth = json.loads((REPO / "protocols" / "trial.truth.json").read_text())
    data = pd.read_csv(REPO / "protocols" / "trial.csv")
    effects = S.analyze_outcome(data, "severity", truth["reference"], methods=["welch"])
    out = S.attach_truth(effects, truth)
    assert len(out) == 20 and out["true_effect"].notna().all()
    row = out[(out["scope"] == "P01") & (out["arm"] == "Cream")].iloc[0]
    assert row["true_effect"] == truth["patients"]["P01"]["delivered_effects"]["Cream"]
    assert out["covered"].map(type).eq(bool).all()


# --- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, kwargs, message", [
    (lambda d: d.drop(columns="day"), {}, r"missing column\(s\) 'day'"),
    (lambda d: d, {"reference": "Placebo"}, r"reference 'Placebo' is not a treatment.*R, T"),
    (lambda d: d.assign(y=d["y"].astype(str)), {}, "outcome 'y' is not numeric"),
    (lambda d: d[d["treatment"] == "R"], {}, "no arm besides the reference 'R'"),
    (lambda d: d.assign(treatment=d["treatment"].replace("T", "Washout")), {"exclude": ["Washout"]},
     "no arm besides the reference"),
    (lambda d: pd.concat([d, d.iloc[:1]]), {}, "one row per patient per day"),
    (lambda d: d, {"methods": ["ttest"]}, "unknown method"),
    (lambda d: d, {"exclude": ["R"]}, "also in exclude"),
])
def test_bad_input_raises_one_line(mutate, kwargs, message):
    data = mutate(_simulate(2, 20, 0.0, np.random.default_rng(0)))
    kwargs = {"reference": "R", **kwargs}
    with pytest.raises(SynthtrialError, match=message) as error:
        S.analyze_outcome(data, "y", methods=kwargs.pop("methods", ["welch"]), **kwargs)
    assert "\n" not in str(error.value)


def test_attach_truth_refuses_a_truth_of_another_shape():
    effects = S.analyze_outcome(_simulate(2, 20, 0.0, np.random.default_rng(0)), "y", "R", methods=["welch"])
    with pytest.raises(SynthtrialError, match="mean_delivered_effects"):
        S.attach_truth(effects, {"reference": "R", "patients": {}})


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("value", [0.0, 3.0])
def test_constant_or_noise_free_outcomes_give_estimates_or_nan_with_notes(value):
    data = pd.DataFrame({"patient_id": np.repeat(["P1", "P2"], 6), "day": np.tile(np.arange(1, 7), 2),
                         "treatment": np.tile(["R", "R", "T", "T", "R", "T"], 2), "y": value})
    result = S.analyze_outcome(data, "y", "R", n_permutations=200, kinetics=Kinetics(0.0, 0.0))
    assert set(result["method"]) == set(E.METHODS)
    assert result["note"].str.len().gt(0).all() or result["se"].notna().any()
    pooled = result[result["scope"] == "pooled"]
    assert pooled["note"].str.contains("no variation").all()
    one_day = data[~((data["treatment"] == "T") & (data["day"] != 3))].assign(y=lambda d: 1.0 + (d["treatment"] == "T"))
    result = S.analyze_outcome(one_day, "y", "R", n_permutations=200)
    assert (result.loc[result["estimate"].notna(), "estimate"].round(9) == 1.0).all()
    standardized = S.standardize(result, one_day, None)
    assert standardized["std_estimate"].isna().all()  # no residual variation: no scale


def test_standardize_puts_outcomes_on_one_scale_and_reports_the_calibration():
    rng = np.random.default_rng(11)
    data = _simulate(6, 40, -0.6, rng, noise_sd=0.3)
    data["oracle"] = data["y"]
    data["rescaled"] = 3.0 * data["y"] + 7.0           # the same information on another scale
    data["noisier"] = data["y"] + rng.normal(0, 0.6, len(data))
    truth = {"reference": "R", "mean_delivered_effects": {"T": -0.6}, "population_delivered_effects": {"T": -0.6},
             "patients": {pid: {"delivered_effects": {"T": -0.6}} for pid in data["patient_id"].unique()}}
    frames = [S.analyze_outcome(data, o, "R", methods=["lmm"], trend=False) for o in ("oracle", "rescaled", "noisier")]
    effects = S.attach_truth(pd.concat(frames, ignore_index=True), truth, outcomes_on_truth_scale=("oracle",))
    out = S.standardize(effects, data, truth, trend=False).set_index("outcome")
    assert out.loc["oracle", "residual_sd"] == pytest.approx(0.3, rel=0.1)
    assert out.loc["rescaled", "std_estimate"] == pytest.approx(out.loc["oracle", "std_estimate"], rel=1e-9)
    # the calibration slope is in the outcome's own units per severity unit: 3 times the oracle's on the x3 scale
    assert out.loc["rescaled", "calibration_slope"] == pytest.approx(3 * out.loc["oracle", "calibration_slope"],
                                                                     rel=1e-9)
    assert out.loc["oracle", "calibration_slope"] == pytest.approx(out.loc["oracle", "estimate"] / -0.6, rel=1e-9)
    assert out.loc["oracle", "calibration_lo"] == pytest.approx(out.loc["oracle", "ci_high"] / -0.6, rel=1e-9)
    assert out["std_true_effect"].nunique() == 1
    # noise is not attenuation: the noisier outcome dilutes the standardised effect (the old "share" fell below
    # 0.7) but its calibration slope stays near 1, only with a wider interval that still holds 1
    assert out.loc["noisier", "std_estimate"] > 0.7 * out.loc["oracle", "std_estimate"]  # both negative: smaller
    noisier = out.loc["noisier"]
    assert noisier["calibration_lo"] < 1 < noisier["calibration_hi"]
    assert (noisier["calibration_hi"] - noisier["calibration_lo"]
            > out.loc["oracle", "calibration_hi"] - out.loc["oracle", "calibration_lo"])
    assert out.loc["noisier", "residual_sd"] > 1.5 * out.loc["oracle", "residual_sd"]   # the noise figure
