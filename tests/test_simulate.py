"""Trial simulator: schedules as designed, analytic kinetics without noise, effects recovered, same bytes."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from synthtrial.trial.protocol import read_protocol
from synthtrial.trial.simulate import (PRESETS, DesignError, SeverityModel, TrialDesign, design_schedule, exposure,
                                 simulate_severity, simulate_trial, truth_path_for, treatment_calendar)


def quiet(**changes):
    """A noise-free model with a fixed baseline: severity is the deterministic kinetics alone."""
    base = dict(effects={}, effect_sd=0.0, baseline_mean=2.0, baseline_sd=0.0, baseline_min=0.0,
                baseline_max=3.0, trend_per_day=0.0, washin_half_life=0.0, washout_half_life=0.0,
                ar_phi=0.0, noise_sd=0.0, missing_rate=0.0)
    return SeverityModel(**{**base, **changes})


def test_anchor_preset_matches_the_anchor_layout():
    design, _ = PRESETS["anchor"]
    schedule = design_schedule(design, seed=0)
    assert len(schedule) == 10 * 140
    one = schedule[schedule["patient_id"] == "P01"]
    assert one["day"].tolist() == list(range(1, 141))
    assert one["date"].iloc[0] == pd.Timestamp("2018-01-01")
    assert one["date"].iloc[28] == pd.Timestamp("2018-01-29")
    periods = one.drop_duplicates("block")["treatment"].tolist()
    assert periods == ["Baseline", "Antibiotics", "Cream", "Antibiotics", "Cream"]
    assert one.groupby("block").size().tolist() == [28] * 5


def test_quick_preset_is_fu_two_off_two_on():
    design, _ = PRESETS["quick"]
    schedule = design_schedule(design, seed=0)
    assert schedule["patient_id"].nunique() == 3 and len(schedule) == 3 * 16
    one = schedule[schedule["patient_id"] == "P01"]
    assert one.groupby("block").size().tolist() == [4, 4, 4, 4]
    assert one["treatment"].tolist()[:8] == ["Control"] * 2 + ["Cream"] * 2 + ["Control"] * 2 + ["Cream"] * 2


def test_randomised_pairs_hold_both_arms_in_every_block():
    design = TrialDesign(design="pairs", arms=("A", "B"), n_patients=40, blocks=3, period_days=2,
                         randomize=True)
    schedule = design_schedule(design, seed=1)
    orders = set()
    for (_, block), rows in schedule.groupby(["patient_id", "block"]):
        arms = rows["treatment"].tolist()
        assert sorted(arms) == ["A", "A", "B", "B"]
        orders.add(arms[0])
    assert orders == {"A", "B"}  # both AB and BA occur


def test_abab_and_washout_rows():
    design = TrialDesign(design="abab", arms=("Off", "On"), n_patients=1, blocks=4, period_days=3,
                         washout_days=2, start_date=None, first_day=0)
    schedule = design_schedule(design)
    assert len(schedule) == design.days_per_patient == 4 * 3 + 3 * 2
    assert schedule["treatment"].tolist() == (["Off"] * 3 + ["Washout"] * 2 + ["On"] * 3 + ["Washout"] * 2
                                              + ["Off"] * 3 + ["Washout"] * 2 + ["On"] * 3)
    assert schedule.loc[schedule["treatment"] == "Washout", "block"].isna().all()
    assert schedule["date"].isna().all()


def test_exposure_kinetics_closed_form():
    given = np.array([True] * 6 + [False] * 6)
    x = exposure(given, washin_half_life=2.0, washout_half_life=3.0)
    on = 1 - 2.0 ** (-np.arange(1, 7) / 2.0)
    off = on[-1] * 2.0 ** (-np.arange(1, 7) / 3.0)
    np.testing.assert_allclose(x, np.concatenate([on, off]), rtol=1e-12)
    np.testing.assert_array_equal(exposure(given, 0, 0), given.astype(float))


def test_zero_noise_trajectory_equals_analytic_kinetics():
    design = TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=2, blocks=4, period_days=10)
    model = quiet(effects={"Cream": -0.8}, trend_per_day=-0.01, washin_half_life=2.0, washout_half_life=4.0)
    trial = simulate_trial(design, model, seed=5)
    for pid, rows in trial.protocol.groupby("patient_id"):
        t = np.arange(40)
        # closed form by period: Control 0-9, Cream 10-19, Control 20-29, Cream 30-39
        x = np.zeros(40)
        x[10:20] = 1 - 2.0 ** (-(t[10:20] - 9) / 2.0)
        x[20:30] = x[19] * 2.0 ** (-(t[20:30] - 19) / 4.0)
        x[30:40] = 1 - (1 - x[29]) * 2.0 ** (-(t[30:40] - 29) / 2.0)
        expected = 2.0 - 0.01 * t - 0.8 * x
        np.testing.assert_allclose(rows["severity"].to_numpy(), expected, atol=1e-12)
        assert trial.truth["patients"][pid]["effects"] == {"Cream": -0.8}
    delivered = trial.truth["patients"]["P01"]["delivered_effects"]["Cream"]
    assert delivered == pytest.approx(-0.8 * (x[10:20].mean() + x[30:40].mean()) / 2
                                      + 0.8 * (x[0:10].mean() + x[20:30].mean()) / 2)


def test_mean_difference_converges_to_the_configured_effect():
    design = TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=300, blocks=3, period_days=4,
                         randomize=True)
    model = SeverityModel(effects={"Cream": -0.45}, effect_sd=0.15, baseline_mean=1.8, baseline_sd=0.3,
                          baseline_min=1.2, baseline_max=2.4, ar_phi=0.5, noise_sd=0.2)
    protocol = simulate_trial(design, model, seed=11).protocol
    per_patient = protocol.groupby(["patient_id", "treatment"])["severity"].mean().unstack()
    diff = per_patient["Cream"] - per_patient["Control"]
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert abs(diff.mean() - (-0.45)) < 4 * se
    assert se < 0.02  # the check has teeth: an effect off by 0.08 would fail
    # and per-patient random effects have the configured spread
    truth = simulate_trial(design, model, seed=11).truth
    effects = np.array([p["effects"]["Cream"] for p in truth["patients"].values()])
    assert effects.std(ddof=1) == pytest.approx(0.15, rel=0.2)


def test_ar1_noise_has_the_configured_sd_and_autocorrelation():
    design = TrialDesign(design="abab", arms=("A", "B"), n_patients=50, blocks=2, period_days=200)
    model = quiet(ar_phi=0.7, noise_sd=0.1, baseline_mean=1.5)
    protocol = simulate_trial(design, model, seed=3).protocol
    resid = protocol["severity"].to_numpy().reshape(50, 400) - 1.5
    assert resid.std() == pytest.approx(0.1, rel=0.1)
    lag1 = np.mean([np.corrcoef(r[:-1], r[1:])[0, 1] for r in resid])
    assert lag1 == pytest.approx(0.7, abs=0.05)


def test_baselines_respect_truncation_and_severity_stays_on_scale():
    design = TrialDesign(n_patients=200, blocks=2, period_days=5)
    model = SeverityModel(effects={"Antibiotics": -3.0}, baseline_mean=1.5, baseline_sd=2.0,
                          baseline_min=1.0, baseline_max=2.0, noise_sd=0.5)
    trial = simulate_trial(design, model, seed=2)
    baselines = np.array([p["baseline"] for p in trial.truth["patients"].values()])
    assert baselines.min() >= 1.0 and baselines.max() <= 2.0
    assert trial.protocol["severity"].between(0, 3).all()
    assert trial.truth["clipped_days"] > 0


def test_missing_days_are_dropped_and_recorded():
    design = TrialDesign(design="abab", arms=("A", "B"), n_patients=20, blocks=2, period_days=50)
    trial = simulate_trial(design, quiet(missing_rate=0.2), seed=4)
    assert 0.15 < 1 - len(trial.protocol) / 2000 < 0.25
    for pid, rows in trial.protocol.groupby("patient_id"):
        missing = set(trial.truth["patients"][pid]["missing_days"])
        assert missing.isdisjoint(rows["day"]) and len(missing) + len(rows) == 100


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    design, model = PRESETS["anchor"]
    paths = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        csv_path, truth_path = simulate_trial(design, model, seed=seed).write(tmp_path / f"{name}.csv")
        paths.append((csv_path.read_bytes(), truth_path.read_bytes()))
    assert paths[0] == paths[1]
    assert paths[0][0] != paths[2][0]


def test_written_protocol_reads_back_and_truth_is_complete(tmp_path):
    design, model = PRESETS["anchor"]
    trial = simulate_trial(design, model, seed=0)
    for form in ("native", "anchor"):
        csv_path, truth_path = trial.write(tmp_path / f"trial_{form}.csv", form=form)
        assert truth_path == truth_path_for(csv_path) == tmp_path / f"trial_{form}.truth.json"
        back = read_protocol(csv_path)
        assert back.attrs["form"] == form
        np.testing.assert_allclose(back["severity"], trial.protocol["severity"], atol=5e-5)
        assert back["treatment"].tolist() == trial.protocol["treatment"].tolist()
    truth = json.loads(truth_path.read_text())
    assert truth["design"] == json.loads(json.dumps(dataclasses.asdict(design)))
    assert truth["population_effects"] == {"Antibiotics": -0.9, "Cream": -0.5}
    assert truth["reference"] == "Baseline" and truth["seed"] == 0
    assert set(truth["patients"]) == set(design.patient_ids())
    p = truth["patients"]["P01"]
    assert p["period_order"] == ["Baseline", "Antibiotics", "Cream", "Antibiotics", "Cream"]
    # slow wash-in makes the delivered effect smaller than the steady-state one
    assert abs(p["delivered_effects"]["Antibiotics"]) < abs(p["effects"]["Antibiotics"])


def test_patients_draws_do_not_depend_on_trial_size():
    _, model = PRESETS["anchor"]
    small = simulate_trial(TrialDesign(n_patients=3), model, seed=9).protocol
    large = simulate_trial(TrialDesign(n_patients=5), model, seed=9).protocol
    pd.testing.assert_frame_equal(small, large[large["patient_id"].isin(small["patient_id"])])


def test_fill_severity_of_a_user_schedule_with_views():
    schedule = pd.DataFrame({
        "patient_id": ["u1"] * 4, "day": [0, 0, 2, 3],
        "date": pd.to_datetime([None] * 4).astype("datetime64[ns]"), "block": pd.array([1] * 4, dtype="Int64"),
        "treatment": ["Control", "Control", "Cream", "Cream"], "severity": [np.nan] * 4,
        "view": ["frontal", "left", "frontal", "frontal"], "face": [None] * 4,
    })
    trial = simulate_severity(schedule, quiet(effects={"Cream": -0.5}), seed=0)
    s = trial.protocol["severity"].tolist()
    assert s[0] == s[1] == 2.0  # both views of a day share the day's severity
    assert s[2] == s[3] == 1.5
    assert trial.truth["reference"] == "Control"


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(design="crossover"), r"design \(--design\) must be one of"),
    (dict(design="abab", arms=("A", "B", "C")), r"arms \(--arms\).*exactly two"),
    (dict(arms=("A", "A")), "distinct"),
    (dict(blocks=0), r"blocks \(--blocks\) must be a whole number >= 1"),
    (dict(period_days=0), r"period_days \(--period-days\)"),
    (dict(start_date="01/01/2018"), r"start_date \(--start-date\) must be YYYY-MM-DD"),
    (dict(patient_prefix="../"), "safe patient ids"),
])
def test_bad_designs_name_the_option(kwargs, pattern):
    with pytest.raises(DesignError, match=pattern):
        TrialDesign(**kwargs)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(ar_phi=1.0), r"ar_phi \(--ar-phi\)"),
    (dict(noise_sd=-1), r"noise_sd \(--noise-sd\)"),
    (dict(missing_rate=1.0), r"missing_rate"),
    (dict(baseline_mean=2.9, baseline_max=2.5), r"baseline_mean"),
    (dict(baseline_min=-1.0), r"baseline_min"),
    (dict(effects={"Cream": 9}), r"--effect Cream"),
])
def test_bad_models_name_the_option(kwargs, pattern):
    with pytest.raises(DesignError, match=pattern):
        SeverityModel(**kwargs)


def test_effects_must_name_arms_and_not_the_reference():
    with pytest.raises(DesignError, match="--effect Gel"):
        simulate_trial(TrialDesign(), SeverityModel(effects={"Gel": -1}))
    with pytest.raises(DesignError, match="reference arm 'Baseline' has no effect"):
        simulate_trial(TrialDesign(), SeverityModel(effects={"Baseline": -1}))


def test_treatment_calendar_takes_a_days_first_row_and_continues_over_skipped_days():
    days = np.array([3, 1, 1, 2, 6])                           # unsorted, day 1 twice (two views), 4-5 skipped
    treatments = np.array(["B", "A", "X", "A", "A"])
    grid, on_day = treatment_calendar(days, treatments)
    assert grid.tolist() == [1, 2, 3, 4, 5, 6]
    assert on_day.tolist() == ["A", "A", "B", "B", "B", "A"]   # day 1: its first row's; 4-5 continue day 3


# ------------------------------------------------------------------------ limits (hostile sizes and values)

@pytest.mark.parametrize(("field", "value", "pattern"), [
    ("n_patients", 10**9, r"n_patients \(--patients\) must be a whole number >= 1 and <= 10000"),
    ("blocks", 10**7, r"blocks \(--blocks\) must be a whole number >= 1 and <= 500"),
    ("period_days", 10**8, r"period_days \(--period-days\) must be a whole number >= 1 and <= 365"),
    ("washout_days", 10**6, r"washout_days \(--washout-days\) must be a whole number >= 0 and <= 365"),
    ("first_day", 10**9, r"first_day \(--first-day\) must be a whole number >= 0 and <= 36500"),
    ("n_patients", 1e9, r"n_patients .* got 1000000000.0"),           # a JSON number with an exponent
])
def test_design_sizes_are_refused_before_any_work(field, value, pattern):
    import time

    start = time.perf_counter()
    with pytest.raises(DesignError, match=pattern):
        TrialDesign(**{field: value})
    assert time.perf_counter() - start < 0.5


def test_design_within_each_limit_but_too_long_or_too_big_is_refused():
    from synthtrial.trial import protocol

    # each field in range, but together 500 x 365 days: longer than a protocol may span
    with pytest.raises(DesignError, match=r"lasts 182500 days per patient.*spans at most 3661 days"):
        TrialDesign(blocks=500, period_days=365)
    with pytest.raises(DesignError, match=r"ends by day 36500"):
        TrialDesign(first_day=36_400)                                    # 140 days from day 36400
    with pytest.raises(DesignError, match=r"10000 patients x 140 days is 1400000 rows; a protocol holds at most"):
        TrialDesign(n_patients=10_000)
    with pytest.raises(DesignError, match=r"start_date .* between 1900-01-01 and 2200-12-31"):
        TrialDesign(start_date="2200-12-01")
    with pytest.raises(DesignError, match=r"start_date"):
        TrialDesign(start_date="1899-12-31")
    # the largest design accepted is one the protocol reader reads back
    design = TrialDesign(design="abab", arms=("A", "B"), n_patients=2, blocks=10, period_days=365, washout_days=1,
                         first_day=36_500 - 3_659)
    assert design.days_per_patient - 1 <= protocol.MAX_DAY_SPAN


@pytest.mark.parametrize(("field", "value"), [
    ("noise_sd", 1e308), ("trend_per_day", 1e308), ("trend_per_day", -1e308), ("effect_sd", 1e308),
    ("baseline_sd", float("inf")), ("washin_half_life", 1e308), ("washout_half_life", float("nan")),
    ("noise_sd", float("nan")), ("trend_per_day", 3.5), ("noise_sd", True), ("ar_phi", "0.5"),
    ("missing_rate", float("nan")), ("baseline_mean", float("nan")),
])
def test_models_refuse_non_finite_and_out_of_range_values(field, value):
    with pytest.raises(DesignError, match=field):
        SeverityModel(**{field: value})


def test_power_design_files_share_the_limits(tmp_path):
    """power --design reads a truth JSON into TrialDesign and SeverityModel: the same limits refuse a hostile
    file in one line before any replicate runs."""
    from synthtrial.analyze.power import design_from_file
    from synthtrial.util.errors import SynthtrialError

    truth = simulate_trial(*PRESETS["quick"], seed=0).truth
    for section, field, value in (("design", "n_patients", 10**9), ("design", "blocks", 10**7),
                                  ("design", "period_days", 10**8), ("design", "washout_days", 10**6),
                                  ("design", "first_day", 10**9), ("model", "noise_sd", 1e308),
                                  ("model", "trend_per_day", 1e308)):
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps({**truth, section: {**truth[section], field: value}}))
        with pytest.raises(SynthtrialError, match=field):
            design_from_file(path)
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(truth))
    assert design_from_file(path)[0] == PRESETS["quick"][0]
