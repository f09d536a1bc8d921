"""The role rules: gls_kinetics by series length and autocorrelation, the period-level test under carryover
with a fixed order, and the same rule in `analyze_outcome`, `power_study` and `synthtrial power --design`."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from synthtrial.analyze import nof1, roles
from synthtrial.analyze import stats as S
from synthtrial.analyze.power import power_study
from synthtrial.cli import app
from synthtrial.trial.simulate import PRESETS, SeverityModel, TrialDesign, design_schedule, simulate_trial

ANCHOR_DESIGN, ANCHOR_MODEL = PRESETS["anchor"]


def _trial(design, model, seed=0):
    trial = simulate_trial(design, model, seed=seed)
    return trial.protocol.assign(oracle=trial.protocol["severity"]), trial.truth


def _roles(frame, method):
    rows = frame[frame["method"] == method]
    assert len(rows), method
    return set(rows["role"]), " ".join(rows["note"])


def test_effective_days_and_the_gls_kinetics_rule():
    assert roles.effective_days(100, 0.6) == pytest.approx(25.0)      # the old 100-day rule is its phi 0.6 case
    assert roles.effective_days(100, 0.95) == pytest.approx(100 * 0.05 / 1.95)
    assert roles.effective_days(50, -0.3) == 50                        # negative phi: no more than n
    assert roles.gls_kinetics_role(100, 0.6, "the design's")[0] == "inferential"
    assert roles.gls_kinetics_role(140, 0.6, "the design's")[0] == "inferential"      # the anchor design
    role, note = roles.gls_kinetics_role(100, 0.8, "the design's")                      # measured size 0.064
    assert role == "descriptive" and "11.1 effectively independent days" in note
    assert roles.gls_kinetics_role(99, 0.0, "the design's")[0] == "descriptive"         # too short whatever phi
    assert roles.gls_kinetics_role(120, None, "REML estimate")[0] == "inferential"      # phi unknown: days decide
    assert roles.phi_from_note("phi=0.9123 (REML); half-lives in 3 d") == pytest.approx(0.9123)
    assert roles.phi_from_note("no variation") is None


@pytest.mark.parametrize("phi, expected", [(0.6, "inferential"), (0.95, "descriptive")])
def test_gls_kinetics_role_on_two_designs(phi, expected):
    """140 days at phi 0.6 (the anchor design, size 0.047-0.049) is a test; 100 days (5 randomised pairs of 10
    days) at phi 0.95, where it rejected 6.7% of null tests, is not."""
    if phi == 0.6:
        design, model = dataclasses.replace(ANCHOR_DESIGN, n_patients=2), ANCHOR_MODEL
    else:
        design = TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=2, blocks=5, period_days=10,
                             randomize=True)
        model = dataclasses.replace(PRESETS["quick"][1], ar_phi=0.95, noise_sd=0.12)
    data, _ = _trial(design, model)
    kinetics = nof1.Kinetics(model.washin_half_life, model.washout_half_life)
    rows = S.analyze_outcome(data, "oracle", design.reference, methods=("gls_kinetics",), design=design,
                             kinetics=kinetics, ar_phi=model.ar_phi)
    found, note = _roles(rows, "gls_kinetics")
    assert found == {expected}
    if expected == "descriptive":
        assert "100 days at AR(1) phi 0.95 (the design's) are 2.6 effectively independent days" in note


def test_without_the_design_phi_the_patients_reml_estimate_decides():
    design = TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=1, blocks=10, period_days=12)
    high = SeverityModel(effects={"Cream": 0.0}, ar_phi=0.97, noise_sd=0.1)
    rows = S.analyze_outcome(_trial(design, high)[0], "oracle", "Control", methods=("gls_kinetics",))
    found, note = _roles(rows, "gls_kinetics")
    phi = roles.phi_from_note(note)
    assert phi > 0.7 and found == {"descriptive"} and "(REML estimate)" in note
    low = dataclasses.replace(high, ar_phi=0.1)
    rows = S.analyze_outcome(_trial(design, low)[0], "oracle", "Control", methods=("gls_kinetics",))
    assert _roles(rows, "gls_kinetics")[0] == {"inferential"}


def test_adjacent_period_correlation_is_that_of_the_ar1_covariance_matrix():
    for phi, length in ((0.6, 7), (0.95, 10), (0.3, 2)):
        lags = np.abs(np.subtract.outer(np.arange(2 * length), np.arange(2 * length)))
        cov = phi ** lags
        first, second = np.r_[np.ones(length), np.zeros(length)], np.r_[np.zeros(length), np.ones(length)]
        expected = (first @ cov @ second) / (first @ cov @ first)
        assert roles.adjacent_period_correlation(phi, length) == pytest.approx(expected)
    assert roles.period_correlation_note(0.3, 28) == ""
    assert "correlate 0.72" in roles.period_correlation_note(0.95, 10)


def _carryover_bias(design, model, trend=True):
    schedule = design_schedule(dataclasses.replace(design, n_patients=1), 0)
    return roles.period_carryover_bias(schedule["day"].to_numpy(), schedule["treatment"].to_numpy(),
                                       np.zeros(len(schedule)), set(), schedule["block"].to_numpy(dtype=object),
                                       design.reference, design.arms[1:],
                                       nof1.Kinetics(model.washin_half_life, model.washout_half_life), trend=trend)


def test_carryover_bias_is_the_noise_free_period_estimate_against_the_delivered_truth():
    """With no noise, no spread and one arm's effect alone (a unit effect), the period-level estimate of each arm
    minus its delivered truth, over that arm's own delivered contrast, is what the rule computes."""
    design = dataclasses.replace(ANCHOR_DESIGN, n_patients=1, period_days=7)
    rows, own = {}, {}
    for effected in ("Antibiotics", "Cream"):
        model = dataclasses.replace(ANCHOR_MODEL, effects={a: (-1.0 if a == effected else 0.0) for a in ("Antibiotics",
                                    "Cream")}, effect_sd=0.0, baseline_sd=0.0, noise_sd=0.0, trend_per_day=0.0)
        data, truth = _trial(design, model)
        fitted = S.attach_truth(S.analyze_outcome(data, "oracle", "Baseline", methods=("period",)), truth,
                                outcomes_on_truth_scale=("oracle",)).set_index("arm")
        rows[effected] = fitted
        own[effected] = fitted.loc[effected, "true_effect"]
    worst = max(abs(rows[b].loc[a, "bias"]) / abs(own[a]) for a in own for b in rows)
    bias = _carryover_bias(design, ANCHOR_MODEL)
    assert bias == pytest.approx(worst, rel=1e-6) and bias > 0.5        # the issue: 71% and 59% recovered
    assert _carryover_bias(design, ANCHOR_MODEL, trend=False) == pytest.approx(0.0, abs=1e-9)
    assert _carryover_bias(dataclasses.replace(design, period_days=28), ANCHOR_MODEL) < 0.2


def test_period_test_is_flagged_where_carryover_with_a_fixed_order_biases_it():
    model = dataclasses.replace(ANCHOR_MODEL, effects={"Antibiotics": 0.0, "Cream": 0.0}, effect_sd=0.0)
    kinetics = nof1.Kinetics(model.washin_half_life, model.washout_half_life)

    def period_role(design, **kw):
        data, _ = _trial(design, model)
        rows = S.analyze_outcome(data, "oracle", "Baseline", methods=("period",), design=design, kinetics=kinetics,
                                 ar_phi=model.ar_phi, **kw)
        return _roles(rows, "period")

    fixed7 = dataclasses.replace(ANCHOR_DESIGN, n_patients=2, period_days=7)
    found, note = period_role(fixed7)
    assert found == {"descriptive"} and "fixed order, carryover (washout half-life 4 d)" in note
    assert "off by up to 65%" in note
    assert period_role(fixed7, trend=False)[0] == {"inferential"}                          # no trend: no bias
    assert period_role(dataclasses.replace(fixed7, randomize=True))[0] == {"inferential"}  # randomised order
    assert period_role(dataclasses.replace(fixed7, period_days=28))[0] == {"inferential"}  # 16% < 20%
    rows = S.analyze_outcome(_trial(fixed7, model)[0], "oracle", "Baseline", methods=("period",), design=fixed7,
                             kinetics=nof1.Kinetics(3.0, 0.0))
    assert _roles(rows, "period")[0] == {"inferential"}                                    # no washout: none


def _design_file(path, design, model):
    path.write_text(json.dumps({"design": dataclasses.asdict(design), "model": dataclasses.asdict(model)}))
    return path


def test_power_design_outside_the_grid_labels_each_method_by_the_same_rule(tmp_path):
    """`synthtrial power --design` on two designs no grid cell has: 100 days at phi 0.95 (gls_kinetics
    descriptive, the period test noted conservative) and 120 days at phi 0.3 (gls_kinetics a test); the rule's
    roles match `analyze_outcome` on a trial of the same design."""
    quick_model = PRESETS["quick"][1]
    high = (TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=2, blocks=5, period_days=10,
                        randomize=True), dataclasses.replace(quick_model, ar_phi=0.95, noise_sd=0.12))
    low = (TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=2, blocks=8, period_days=15),
           dataclasses.replace(quick_model, ar_phi=0.3))
    out = tmp_path / "power.csv"
    result = CliRunner().invoke(app, ["power", "--design", str(_design_file(tmp_path / "high.truth.json", *high)),
                                      "--design", str(_design_file(tmp_path / "low.truth.json", *low)),
                                      "--replicates", "1", "--method", "gls_kinetics", "--method", "period",
                                      "--outcome", "oracle", "--workers", "1", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out).set_index(["design_name", "method"])["role"]
    assert summary[("high", "gls_kinetics")] == "descriptive" and summary[("low", "gls_kinetics")] == "inferential"
    assert summary[("high", "period")] == "inferential" and summary[("low", "period")] == "inferential"
    notes = pd.read_csv(tmp_path / "power.estimates.csv").groupby(["design_name", "method"])["note"].first()
    assert "2.6 effectively independent days" in notes[("high", "gls_kinetics")]
    assert "conservative" in notes[("high", "period")] and "conservative" not in notes[("low", "period")]
    _, by_library = power_study(high[0], high[1], 1, methods=("gls_kinetics",), outcomes=("oracle",))
    assert by_library["role"].item() == "descriptive"


def test_the_pooled_test_is_cr2_and_cr1_is_a_comparison():
    from synthtrial.analyze.estimators import REGISTRY

    assert roles.pooled_role("lmm") == "inferential" and roles.pooled_role("lmm_cr1") == "descriptive"
    assert REGISTRY["lmm"].role_on(40, "oracle") == ("inferential", "")
    assert REGISTRY["lmm_cr1"].role_on(40, "oracle") == ("descriptive", roles.CR1_NOTE)
