"""Responder calls with Holm and BH adjustment, the family-wise error in `power`, tests that are not available
on a design, and missing days that keep their scheduled treatment in the exposure curves."""

import math

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from synthtrial.analyze import estimators as E
from synthtrial.analyze import nof1
from synthtrial.analyze import stats as S
from synthtrial.analyze.multiplicity import RESPONDER_COLUMNS, adjust_responders, adjusted_p, familywise
from synthtrial.analyze.pipeline import missing_day_schedule
from synthtrial.analyze.power import SUMMARY_KEYS, power_study, scenario_grid, summarize_power
from synthtrial.trial.simulate import PRESETS, SeverityModel, TrialDesign, design_schedule, simulate_trial

# ------------------------------------------------------------------------------------------- Holm and BH


def test_holm_and_bh_by_hand_on_four_p_values():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(adjusted_p(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    # BH: sorted times 4/rank -> 0.02, 0.02, 0.04, 0.04 -> running min from the top
    np.testing.assert_allclose(adjusted_p(p, "bh"), [0.02, 0.04, 0.04, 0.02])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holm_and_bh_equal_statsmodels_multipletests_and_leave_nan(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.1, 7), rng.uniform(0, 1, 5)])
    rng.shuffle(p)
    np.testing.assert_allclose(adjusted_p(p, "holm"), multipletests(p, method="holm")[1])
    np.testing.assert_allclose(adjusted_p(p, "bh"), multipletests(p, method="fdr_bh")[1])
    with_nan = np.insert(p, 3, np.nan)
    got = adjusted_p(with_nan, "holm")
    assert math.isnan(got[3])
    np.testing.assert_allclose(np.delete(got, 3), multipletests(p, method="holm")[1])


def _effects(rows):
    return pd.DataFrame(rows, columns=["outcome", "method", "scope", "arm", "estimate", "p"])


def test_responder_calls_adjust_within_outcome_method_and_arm_and_need_a_beneficial_estimate():
    p = [0.01, 0.04, 0.03, 0.005]
    rows = [("oracle", "period", f"P{i}", "Cream", -0.5, q) for i, q in enumerate(p)]
    rows += [("oracle", "period", "P9", "Cream", +0.5, 0.001)]                 # harmful: never a responder
    rows += [("oracle", "gls_kinetics", f"P{i}", "Cream", -0.5, q) for i, q in enumerate(p[:2])]
    rows += [("oracle", "lmm", "pooled", "Cream", -0.5, 0.001), ("oracle", "period", "P8", "Cream", -0.5, np.nan)]
    got = adjust_responders(_effects(rows), alpha=0.05)
    assert set(RESPONDER_COLUMNS) <= set(got.columns)
    period = got[(got["method"] == "period") & got["p"].notna()]
    np.testing.assert_allclose(period["p_holm"], multipletests(period["p"], method="holm")[1])
    np.testing.assert_allclose(period["p_bh"], multipletests(period["p"], method="fdr_bh")[1])
    assert period["responder"].tolist() == [True, True, True, True, False]
    assert period["responder_holm"].tolist() == [True, False, False, True, False]   # Holm 0.0375, 0.08, 0.08, 0.025
    assert period["responder_bh"].tolist() == [True, True, True, True, False]       # BH 0.0167 .. 0.04
    gls = got[got["method"] == "gls_kinetics"]                                       # its own family of two
    np.testing.assert_allclose(gls["p_holm"], [0.02, 0.04])
    pooled, absent = got[got["scope"] == "pooled"].iloc[0], got[got["scope"] == "P8"].iloc[0]
    assert math.isnan(pooled["p_holm"]) and pooled["responder"] is None and pooled["responder_holm"] is None
    assert math.isnan(absent["p_bh"]) and absent["responder_bh"] is None


# ------------------------------------------------------------------------------------------ family-wise error


def _mock_estimates():
    """Two methods x 4 trials x 3 patients with chosen p-values and estimates."""
    rows = []
    p_of = {("period", 0): [0.01, 0.5, 0.5], ("period", 1): [0.02, 0.03, 0.9], ("period", 2): [0.6, 0.7, 0.8],
            ("period", 3): [0.001, 0.5, 0.5], ("hac", 0): [0.04, 0.5, 0.5], ("hac", 1): [0.5, 0.5, 0.5],
            ("hac", 2): [0.01, 0.5, 0.5], ("hac", 3): [np.nan, np.nan, np.nan]}
    for (method, r), ps in p_of.items():
        for i, q in enumerate(ps):
            estimate = +0.3 if (method, r, i) == ("hac", 2, 0) else -0.3  # a significant harmful estimate
            rows.append({"scenario": "s", "design_name": "d", "period_days": 2, "effect_scale": 0.0,
                         "outcome": "oracle", "method": method, "role": "inferential", "arm": "Cream",
                         "scope": f"P{i}", "replicate": r, "estimate": estimate, "p": q})
    frame = pd.DataFrame(rows)
    return adjust_responders(frame, 0.05, within=["replicate"]).assign(level="per patient")


def test_familywise_error_counts_trials_with_at_least_one_call():
    got = familywise(_mock_estimates(), SUMMARY_KEYS).set_index("method")
    # period: trial 0 (0.01), 1 (0.02, 0.03), 3 (0.001) call someone; Holm over 3 patients: 0.03, 0.06/0.06, 0.003
    assert got.loc["period", "trials"] == 4
    assert got.loc["period", "familywise"] == pytest.approx(3 / 4)
    assert got.loc["period", "familywise_holm"] == pytest.approx(2 / 4)
    assert got.loc["period", "familywise_bh"] == pytest.approx(3 / 4)   # BH of trial 1: 0.045, 0.045
    # hac: trial 3 has no p (not a trial of the family); trial 2's only rejection is harmful
    assert got.loc["hac", "trials"] == 3
    assert got.loc["hac", "familywise"] == pytest.approx(1 / 3) and got.loc["hac", "familywise_holm"] == 0


def test_power_summary_carries_the_familywise_error_and_holm_holds_it_under_the_null():
    grid = scenario_grid([("quick", *PRESETS["quick"])], effect_scales=(0,))
    estimates, summary = power_study(grid, replicates=200, seed=11, methods=("period",), outcomes=("oracle",))
    row = summary.iloc[0]
    assert row["fw_trials"] == 200
    mine = familywise(estimates.assign(level="per patient"), SUMMARY_KEYS).iloc[0]
    assert row["familywise"] == mine["familywise"] and row["familywise_holm"] == mine["familywise_holm"]
    calls = estimates.assign(any=estimates["responder"].eq(True)).groupby("replicate")["any"].any().mean()
    assert row["familywise"] == pytest.approx(calls)
    assert row["familywise_holm"] <= row["familywise_bh"] <= row["familywise"]
    se = math.sqrt(0.05 * 0.95 / 200)
    assert row["familywise_holm"] <= 0.05 + 2 * se
    assert row["familywise"] > row["familywise_holm"]  # three patients, unadjusted: more trials flag someone


def test_summary_without_responder_columns_is_unchanged():
    estimates = _mock_estimates().drop(columns=list(RESPONDER_COLUMNS)).assign(
        population_effect=0.0, true_effect=np.nan, bias=np.nan, covered=None)
    assert "familywise" not in summarize_power(estimates).columns


# ---------------------------------------------------------------------------------- not available on a design


def _null_trial(design, seed=0):
    model = SeverityModel(effects={"Cream": 0.0}, effect_sd=0.0, ar_phi=0.2, noise_sd=0.1)
    trial = simulate_trial(design, model, seed=seed)
    return trial.protocol.assign(oracle=trial.protocol["severity"])


def test_smallest_attainable_p_counts_mirror_images():
    pairs = TrialDesign(design="pairs", arms=("A", "B"), n_patients=1, blocks=5, period_days=2, randomize=True)
    assert nof1.smallest_attainable_p(nof1.design_orders(pairs)) == pytest.approx(2 / 32)
    abab = TrialDesign(design="abab", arms=("A", "B"), n_patients=1, blocks=4, period_days=2, randomize=True)
    assert nof1.smallest_attainable_p(nof1.design_orders(abab)) == 1.0
    assert nof1.smallest_attainable_p([("A", "B", "C"), ("A", "C", "B")]) == pytest.approx(1 / 2)


def test_randomization_is_not_available_on_a_fixed_order_and_on_too_few_orders():
    quick = PRESETS["quick"][0]
    rows = S.analyze_outcome(_null_trial(quick), "oracle", "Control", methods=("randomization", "period"),
                             design=quick)
    test = rows[rows["method"] == "randomization"]
    assert (test["role"] == E.NOT_AVAILABLE).all() and test["note"].str.contains("fixed-order").all()
    assert test["p"].isna().all() and test["estimate"].notna().all()
    assert (rows.loc[rows["method"] == "period", "role"] == "inferential").all()
    few = TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=3, blocks=4, period_days=2, randomize=True)
    test = S.analyze_outcome(_null_trial(few), "oracle", "Control", methods=("randomization",), design=few)
    assert (test["role"] == E.NOT_AVAILABLE).all() and test["p"].notna().all()   # a p, but never below 0.125
    assert test["note"].str.contains("16 possible orders, smallest attainable p 0.125 > alpha 0.05").all()
    enough = TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=2, blocks=6, period_days=2,
                         randomize=True)
    test = S.analyze_outcome(_null_trial(enough), "oracle", "Control", methods=("randomization",), design=enough)
    assert (test["role"] == "inferential").all() and test["p"].notna().all()


def test_power_marks_the_randomisation_test_not_available_and_leaves_it_out_of_the_familywise_table():
    randomised = TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=3, blocks=4, period_days=2,
                             randomize=True)
    _, summary = power_study(randomised, PRESETS["quick"][1], 2, methods=("randomization", "period"),
                             outcomes=("oracle",))
    roles = summary.set_index("method")["role"]
    assert roles["randomization"] == E.NOT_AVAILABLE and roles["period"] == "inferential"


# ------------------------------------------------------------------------------- missing days in the exposures


def _tiny(drop_day=None):
    """One patient, days 1-6 on R R T T R R; an outcome that depends on nothing (the exposures are checked)."""
    frame = pd.DataFrame({"patient_id": "P1", "day": np.arange(1, 7), "treatment": list("RRTTRR"),
                          "y": [1.0, 1.1, 0.9, 0.8, 1.0, 1.05]})
    return frame if drop_day is None else frame[frame["day"] != drop_day].reset_index(drop=True)


def test_a_missing_first_day_of_a_period_keeps_its_scheduled_treatment_in_the_exposures():
    kinetics = nof1.Kinetics(1.0, 1.0)   # half a day's gap closes per day: 0, 0, .5, .75, .375, .1875
    options = E.FitOptions(outcome="y", reference="R", kinetics=kinetics)
    by_hand = np.array([0.0, 0.0, 0.5, 0.75, 0.375, 0.1875])
    _, [full] = E.prepare(_tiny(), options, with_exposure=True)
    np.testing.assert_allclose(full.exposure[1][:, 0], by_hand)
    schedule = _tiny()[["patient_id", "day", "treatment"]]
    pooled, [patient] = E.prepare(_tiny(drop_day=3), options, with_exposure=True, schedule=schedule)
    np.testing.assert_allclose(patient.exposure[1][:, 0], np.delete(by_hand, 2))
    np.testing.assert_allclose(pooled.frame[pooled.exposure_columns["T"]], np.delete(by_hand, 2))
    days, treatments = patient.calendar
    assert dict(zip(days.tolist(), treatments.tolist()))[3] == "T"
    # without the schedule the day continues the previous day's treatment (R): the curves start a day late
    _, [blind] = E.prepare(_tiny(drop_day=3), options, with_exposure=True)
    np.testing.assert_allclose(blind.exposure[1][:, 0], [0, 0, 0.5, 0.25, 0.125])
    # gls_kinetics' own exposures (half-lives profiled) run over the same calendar
    np.testing.assert_allclose(nof1.exposures(np.array([1, 2, 4, 5, 6]), np.array(list("RRTRR")), ["T"], kinetics,
                                              patient.calendar)[:, 0], np.delete(by_hand, 2))


def test_a_schedule_that_disagrees_with_the_rows_is_not_used():
    options = E.FitOptions(outcome="y", reference="R", kinetics=nof1.Kinetics(1.0, 1.0))
    wrong = _tiny()[["patient_id", "day", "treatment"]].assign(treatment=list("RRTRRR"))  # day 4: R, its row says T
    _, [patient] = E.prepare(_tiny(drop_day=3), options, with_exposure=True, schedule=wrong)
    assert patient.calendar is None


def test_missing_day_schedule_is_the_designs_when_days_are_missing():
    design = TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=3, blocks=4, period_days=5)
    model = SeverityModel(effects={"Cream": -0.5}, missing_rate=0.2)
    trial = simulate_trial(design, model, seed=4)
    assert any(p["missing_days"] for p in trial.truth["patients"].values())
    schedule = missing_day_schedule(trial.truth, design, 4)
    pd.testing.assert_frame_equal(schedule, design_schedule(design, 4))
    complete = simulate_trial(design, SeverityModel(effects={"Cream": -0.5}), seed=4)
    assert missing_day_schedule(complete.truth, design, 4) is None
    assert missing_day_schedule(trial.truth, None, 4) is None      # neither the design nor the rows
    # the analysis of the trial with missing days uses the design's treatment on each missing day
    data = trial.protocol.assign(oracle=trial.protocol["severity"])
    options = E.FitOptions(outcome="oracle", reference="Control", kinetics=nof1.Kinetics(2.0, 2.0))
    _, patients = E.prepare(data, options, with_exposure=True, schedule=schedule)
    full = design_schedule(design, 4)
    for patient in patients:
        mine = full[full["patient_id"] == patient.patient]
        days, treatments = patient.calendar
        assert sorted(days.tolist()) == mine["day"].tolist()
        assert dict(zip(days.tolist(), treatments.tolist())) == dict(zip(mine["day"], mine["treatment"]))


def test_gls_kinetics_is_exact_on_a_noise_free_series_missing_its_periods_first_days():
    from synthtrial.trial.simulate import exposure

    treatments = np.repeat(["R", "A", "R", "A", "R"], 20)
    days = np.arange(1, treatments.size + 1)
    x_a = exposure(treatments == "A", 3.0, 4.0)
    y = 2.0 - 0.8 * x_a - 0.002 * days
    full = pd.DataFrame({"patient_id": "P1", "day": days, "treatment": treatments, "oracle": y})
    kept = ~np.isin(days, [21, 61])                              # the first day of each A period is missing
    data = full[kept].reset_index(drop=True)
    delivered = (-0.8 * x_a)[kept & (treatments == "A")].mean() - (-0.8 * x_a)[kept & (treatments == "R")].mean()
    kinetics = nof1.Kinetics(3.0, 4.0)
    fit = S.analyze_outcome(data, "oracle", "R", methods=("gls_kinetics",), kinetics=kinetics,
                            schedule=full[["patient_id", "day", "treatment"]])
    assert fit["estimate"].item() == pytest.approx(delivered, abs=1e-9)
    blind = S.analyze_outcome(data, "oracle", "R", methods=("gls_kinetics",), kinetics=kinetics)
    assert abs(blind["estimate"].item() - delivered) > 1e-3   # the previous-day rule misplaces the wash-in


def test_without_a_design_a_missing_day_joins_the_period_it_belongs_to():
    # R R T T R R without day 3 (the T period's first day): the R period before is complete -> T
    got = nof1.missing_day_treatments(np.array([1, 2, 4, 5, 6]), np.array(list("RRTRR")), [3])
    assert got.tolist() == ["T"]
    # R R R T T T R R R without day 3 (the first R period's last day): that period spans 2 of 3 days -> R
    got = nof1.missing_day_treatments(np.array([1, 2, 4, 5, 6, 7, 8, 9]), np.array(list("RRTTTRRR")), [3])
    assert got.tolist() == ["R"]
    # inside a period, and before the first row: the period's treatment, the first row's
    got = nof1.missing_day_treatments(np.array([2, 3, 5, 6]), np.array(list("RRRT")), [1, 4])
    assert got.tolist() == ["R", "R"]


def test_a_user_protocols_missing_days_take_the_rule_when_the_truth_has_no_design():
    design = TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=2, blocks=4, period_days=4)
    schedule = design_schedule(design, 0)
    dropped = {"P01": [5], "P02": [4]}          # P01 lacks its Cream period's first day, P02 its Control's last
    keep = ~pd.Series([d in dropped.get(p, []) for p, d in zip(schedule["patient_id"], schedule["day"])])
    data = schedule[keep.to_numpy()]
    truth = {"patients": {pid: {"missing_days": days} for pid, days in dropped.items()}}
    got = missing_day_schedule(truth, None, None, data)
    merged = got.merge(schedule[["patient_id", "day", "treatment"]], on=["patient_id", "day"], suffixes=("", "_plan"))
    assert len(merged) == len(schedule) and (merged["treatment"] == merged["treatment_plan"]).all()
