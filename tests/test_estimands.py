"""The truth's estimands (synthtrial.trial.estimands), worked out by hand from the exposure kinetics.

With half-lives of 1 day an exposure halves every day: on a dosing day ``x <- 1 - (1 - x) / 2``, on any other
day ``x <- x / 2``; with a half-life of 0 it switches at once. Each test writes the exposure curves out as
fractions and derives every estimand from the definitions, not from the code.
"""

import json

import pytest

from synthtrial.trial.estimands import DEFINITIONS
from synthtrial.trial.simulate import (SeverityModel, TrialDesign, design_schedule, preset, simulate_severity,
                                      simulate_trial)


def _quiet(**kwargs) -> SeverityModel:
    base = dict(baseline_mean=2.0, baseline_sd=0.0, baseline_min=2.0, baseline_max=2.0)
    return SeverityModel(**{**base, **kwargs})


def test_three_arms_with_carryover_by_hand():
    # days 1-8: B B X X Y Y X X (B the reference), wash-in and washout half-lives 1 day
    design = TrialDesign(design="baseline-alternating", arms=("B", "X", "Y"), n_patients=1, blocks=4, period_days=2)
    model = _quiet(effects={"X": -0.9, "Y": -0.5}, washin_half_life=1.0, washout_half_life=1.0)
    truth = simulate_trial(design, model, seed=0).truth
    p = truth["patients"]["P01"]
    # x_X = 0, 0, 1/2, 3/4, 3/8, 3/16, 19/32, 51/64 and x_Y = 0, 0, 0, 0, 1/2, 3/4, 3/8, 3/16
    x_on_x = (1 / 2 + 3 / 4 + 19 / 32 + 51 / 64) / 4          # X's exposure on X's days (3, 4, 7, 8) = 169/256
    y_on_x = (0 + 0 + 3 / 8 + 3 / 16) / 4                    # Y washing out onto X's days 7, 8 = 9/64
    x_on_y = (3 / 8 + 3 / 16) / 2                            # X washing out onto Y's days 5, 6 = 9/32
    y_on_y = (1 / 2 + 3 / 4) / 2                             # = 5/8; reference days 1, 2 have no exposure
    assert p["own_exposure"] == pytest.approx({"X": 169 / 256, "Y": 5 / 8}, abs=1e-15)
    assert x_on_x == 169 / 256 and y_on_x == 9 / 64
    assert p["exposure_contrasts"]["X"] == pytest.approx({"X": x_on_x, "Y": y_on_x}, abs=1e-15)
    assert p["exposure_contrasts"]["Y"] == pytest.approx({"X": x_on_y, "Y": y_on_y}, abs=1e-15)
    assert p["effects"] == {"X": -0.9, "Y": -0.5}                                   # steady state
    assert p["direct_effects"] == pytest.approx({"X": -0.9 * x_on_x, "Y": -0.5 * y_on_y}, abs=1e-15)
    assert p["carryover_effects"] == pytest.approx({"X": -0.5 * y_on_x, "Y": -0.9 * x_on_y}, abs=1e-15)
    assert p["delivered_effects"] == pytest.approx({"X": -0.9 * x_on_x - 0.5 * y_on_x,
                                                    "Y": -0.5 * y_on_y - 0.9 * x_on_y}, abs=1e-15)
    for arm in ("X", "Y"):   # delivered = direct + carryover, exactly as stored
        assert p["direct_effects"][arm] + p["carryover_effects"][arm] == p["delivered_effects"][arm]
    # one patient without spread: the sample mean is the population value
    assert truth["population_delivered_effects"] == pytest.approx(p["delivered_effects"], abs=1e-15)
    assert truth["mean_carryover_effects"] == pytest.approx(p["carryover_effects"], abs=1e-15)
    assert truth["estimands"] == DEFINITIONS


def test_washout_onto_reference_days_is_carryover_too():
    # days 1-6: R R A A R R; wash-in instant, washout half-life 1 day: x_A = 0, 0, 1, 1, 1/2, 1/4
    design = TrialDesign(design="abab", arms=("R", "A"), n_patients=1, blocks=3, period_days=2)
    model = _quiet(effects={"A": -0.6}, washin_half_life=0.0, washout_half_life=1.0)
    p = simulate_trial(design, model, seed=0).truth["patients"]["P01"]
    on_reference = (0 + 0 + 1 / 2 + 1 / 4) / 4                # = 3/16
    assert p["direct_effects"]["A"] == -0.6                   # instant wash-in: direct = steady state
    assert p["carryover_effects"]["A"] == pytest.approx(0.6 * on_reference, abs=1e-15)   # +0.1125 shrinks it
    assert p["delivered_effects"]["A"] == pytest.approx(-0.6 * (1 - on_reference), abs=1e-15)


def test_instant_washout_has_no_carryover_and_instant_kinetics_deliver_the_steady_state():
    design = TrialDesign(design="baseline-alternating", arms=("B", "X", "Y"), n_patients=3, blocks=5, period_days=3)
    slow_in = simulate_trial(design, _quiet(effects={"X": -0.9, "Y": -0.5}, effect_sd=0.2, washin_half_life=2.0),
                             seed=1).truth
    instant = simulate_trial(design, _quiet(effects={"X": -0.9, "Y": -0.5}, effect_sd=0.2), seed=1).truth
    for p in slow_in["patients"].values():
        assert p["carryover_effects"] == pytest.approx({"X": 0.0, "Y": 0.0}, abs=1e-15)  # delivered - direct, rounding
        assert abs(p["direct_effects"]["X"]) < abs(p["effects"]["X"])
    for p in instant["patients"].values():
        assert p["delivered_effects"] == pytest.approx(p["effects"], abs=1e-15)
        assert p["direct_effects"] == pytest.approx(p["effects"], abs=1e-15)


def test_population_and_sample_means_by_hand():
    # two patients on the same fixed schedule (R R A A R R), effects drawn around -0.6 with SD 0.3
    design = TrialDesign(design="abab", arms=("R", "A"), n_patients=2, blocks=3, period_days=2)
    model = _quiet(effects={"A": -0.6}, effect_sd=0.3, washin_half_life=0.0, washout_half_life=1.0)
    truth = simulate_trial(design, model, seed=4).truth
    share = 1 - 3 / 16                                        # exposure contrast of A (see the test above)
    drawn = [p["effects"]["A"] for p in truth["patients"].values()]
    assert drawn[0] != drawn[1]
    assert truth["mean_effects"]["A"] == pytest.approx(sum(drawn) / 2, abs=1e-15)
    assert truth["mean_delivered_effects"]["A"] == pytest.approx(share * sum(drawn) / 2, abs=1e-15)
    assert truth["population_delivered_effects"]["A"] == pytest.approx(-0.6 * share, abs=1e-15)
    assert truth["population_direct_effects"]["A"] == -0.6
    assert truth["population_carryover_effects"]["A"] == pytest.approx(0.6 * 3 / 16, abs=1e-15)
    assert truth["mean_delivered_effects"]["A"] != pytest.approx(truth["population_delivered_effects"]["A"])


def test_the_anchor_design_carries_antibiotics_into_cream():
    """The issue's figure: 0.168 of Antibiotics washes onto Cream days (28% of Cream's delivered -0.60)."""
    design, model = preset("anchor")
    truth = simulate_trial(design, model, seed=0).truth
    assert truth["population_carryover_effects"]["Cream"] == pytest.approx(-0.168, abs=5e-4)
    assert truth["population_delivered_effects"]["Cream"] == pytest.approx(-0.600, abs=5e-4)
    estimands = {k: v for k, v in truth.items() if k.startswith(("mean_", "population_"))}
    assert json.loads(json.dumps(estimands)) == estimands    # plain JSON: numbers and None only


def test_a_patient_without_an_arm_has_none_and_the_means_skip_it():
    design = TrialDesign(design="baseline-alternating", arms=("B", "X", "Y"), n_patients=2, blocks=3, period_days=2)
    schedule = design_schedule(design)                        # B B X X Y Y for both; P02 gets X instead of Y
    schedule.loc[(schedule["patient_id"] == "P02") & (schedule["treatment"] == "Y"), "treatment"] = "X"
    model = _quiet(effects={"X": -0.9, "Y": -0.5}, washout_half_life=1.0)
    truth = simulate_severity(schedule, model, reference="B").truth
    p1, p2 = truth["patients"]["P01"], truth["patients"]["P02"]
    assert p2["delivered_effects"]["Y"] is None and p2["direct_effects"]["Y"] is None
    assert p2["carryover_effects"]["Y"] is None and p2["exposure_contrasts"]["Y"] is None
    assert truth["population_delivered_effects"]["Y"] == pytest.approx(p1["delivered_effects"]["Y"], abs=1e-15)
    assert truth["mean_carryover_effects"]["Y"] == pytest.approx(p1["carryover_effects"]["Y"], abs=1e-15)
    # P02 is on X for four days without washout, so X's mean exposure contrast averages 1 and 1
    assert p2["delivered_effects"]["X"] == -0.9 and p1["delivered_effects"]["X"] == -0.9
