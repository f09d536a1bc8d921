"""`power`: scenario grids, calibration under the null, Dask workers and resuming that change no number."""

import json

import numpy as np
import pandas as pd
import pytest

from synthtrial.analyze.power import (StudySettings, design_from_file, power_study, replicate_outcomes, scenario_grid,
                                      summarize_power, with_effects)
from synthtrial.util.errors import SynthtrialError
from synthtrial.trial.simulate import PRESETS, SeverityModel, TrialDesign, simulate_trial

SMALL = TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=5, blocks=4, period_days=5)
NOISY = SeverityModel(effects={"Cream": -0.3}, effect_sd=0.0, baseline_mean=1.8, baseline_sd=0.3, baseline_min=1.0,
                      baseline_max=2.6, ar_phi=0.0, noise_sd=0.3)
FAST = ("period", "randomization", "lmm", "welch")


def test_null_rejection_rate_is_near_alpha():
    null = with_effects(NOISY, null=True)
    _, summary = power_study(SMALL, null, 80, seed=3, methods=("period", "lmm"), outcomes=("oracle",))
    rows = summary.set_index(["method", "level"])
    assert (rows["quantity"] == "type I error").all()
    for key in (("lmm", "pooled"), ("period", "per patient")):
        rate, se = rows.loc[key, "rejection_rate"], rows.loc[key, "mc_se"]
        assert abs(rate - 0.05) < max(3 * se, 0.04), (key, rate)


def test_power_grows_with_the_effect_scale_and_the_null_is_scale_zero():
    grid = scenario_grid([("small", SMALL, with_effects(NOISY, {"Cream": -0.6}))], effect_scales=(0.0, 0.2, 1.0))
    assert [s.model.effects["Cream"] for s in grid] == [0.0, pytest.approx(-0.12), -0.6]
    _, summary = power_study(grid, replicates=15, seed=1, methods=("lmm",), outcomes=("oracle",))
    rate = summary.set_index("effect_scale")["rejection_rate"]
    assert rate[1.0] == 1.0 and rate[0.2] < 0.9 and rate[0.0] < 0.3
    strong = summary[summary["effect_scale"] == 1.0].iloc[0]
    assert strong["quantity"] == "power" and abs(strong["bias"]) < 0.05 and strong["coverage"] > 0.8
    assert strong["calibration"] == pytest.approx(1.0, abs=0.1)  # the oracle recovers its own truth


def test_grid_covers_designs_block_lengths_and_scales():
    grid = scenario_grid([("quick", *PRESETS["quick"]), ("small", SMALL, NOISY)], period_days=(2, 4),
                         effect_scales=(0, 1), n_patients=2)
    assert len(grid) == 8 and len({s.name for s in grid}) == 8
    assert {s.design.period_days for s in grid} == {2, 4} and {s.design.n_patients for s in grid} == {2}
    with pytest.raises(SynthtrialError, match="--effect-scale"):
        scenario_grid([("small", SMALL, NOISY)], effect_scales=(-1,))


def test_rows_without_a_p_value_are_counted_not_dropped():
    fixed = scenario_grid([("quick", *PRESETS["quick"])])
    estimates, summary = power_study(fixed, replicates=2, methods=FAST, outcomes=("oracle",))
    row = summary.set_index("method").loc["randomization"]
    assert row["tests"] == 0 and row["no_p"] == 6 and np.isnan(row["rejection_rate"])
    assert estimates.loc[estimates["method"] == "randomization", "note"].str.contains("order is fixed").all()
    randomised = TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=3, blocks=4, period_days=2,
                             randomize=True)
    _, summary = power_study(randomised, PRESETS["quick"][1], 2, methods=("randomization",), outcomes=("oracle",))
    assert summary["tests"].item() == 6 and summary["no_p"].item() == 0
    one = scenario_grid([("quick", *PRESETS["quick"])], n_patients=1)
    estimates, summary = power_study(one, replicates=1, methods=("lmm",), outcomes=("oracle",))
    assert summary["no_p"].item() == 1 and "at least 2 patients" in estimates["note"].item()


def test_same_numbers_with_one_and_two_dask_workers_and_after_resuming(tmp_path):
    grid = scenario_grid([("quick", *PRESETS["quick"])], effect_scales=(0.0, 1.0))
    settings = StudySettings(seed=5, methods=FAST)
    inline, _ = power_study(grid, replicates=3, settings=settings)
    one, _ = power_study(grid, replicates=3, settings=settings, workers=1, chunk=1)
    two, summary = power_study(grid, replicates=3, settings=settings, workers=2, chunk=2, cache=tmp_path / "cache")
    pd.testing.assert_frame_equal(inline, one)
    pd.testing.assert_frame_equal(inline, two)
    files = sorted((tmp_path / "cache").rglob("*.parquet"))
    assert len(files) == 6
    files[0].unlink()
    files[1].write_bytes(b"not parquet")  # a damaged replicate is recomputed
    calls = []
    resumed, _ = power_study(grid, replicates=3, settings=settings, cache=tmp_path / "cache",
                             progress=lambda done, total, status: calls.append(done))
    pd.testing.assert_frame_equal(inline, resumed)
    assert calls[0] == 4 and calls[-1] == 6  # four read back, two recomputed
    other, _ = power_study(grid, replicates=3, settings=StudySettings(seed=6, methods=FAST))
    assert not np.allclose(inline["estimate"], other["estimate"], equal_nan=True)
    pd.testing.assert_frame_equal(summarize_power(two), summary)


def test_replicate_outcomes_are_the_lesion_model_counts():
    trial = simulate_trial(*PRESETS["quick"], seed=0)
    data = replicate_outcomes(trial.protocol)
    from synthtrial.trial import scale

    counts = np.rint(scale.expected_lesion_count(data["oracle"].to_numpy()))
    np.testing.assert_allclose(scale.expected_lesion_count(data["lesion_severity"].to_numpy()), counts, atol=1e-9)


def test_design_from_truth_file(tmp_path):
    _, truth_path = simulate_trial(*PRESETS["quick"], seed=0).write(tmp_path / "q.csv")
    design, model = design_from_file(truth_path)
    assert design == PRESETS["quick"][0] and model.effects == PRESETS["quick"][1].effects
    (tmp_path / "bad.json").write_text(json.dumps({"design": {}}))
    with pytest.raises(SynthtrialError, match="needs 'design' and 'model'"):
        design_from_file(tmp_path / "bad.json")
    limits = json.loads(truth_path.read_text())
    limits["design"]["blocks"] = 10 ** 7                   # a DesignError of TrialDesign's limits
    (tmp_path / "long.json").write_text(json.dumps(limits))
    with pytest.raises(SynthtrialError, match=r"^.*long\.json: blocks \(--blocks\) must be .*\(option --design\)$"):
        design_from_file(tmp_path / "long.json")
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(SynthtrialError, match="not JSON"):
        design_from_file(tmp_path / "notjson.json")


def test_bad_settings_are_one_line_errors():
    with pytest.raises(SynthtrialError, match="unknown method 'magic'"):
        power_study(SMALL, NOISY, 1, methods=("magic",))
    with pytest.raises(SynthtrialError, match="unknown outcome"):
        power_study(SMALL, NOISY, 1, outcomes=("iga",))
    with pytest.raises(SynthtrialError, match="Dask scheduler"):
        power_study(SMALL, NOISY, 1, scheduler="tcp://127.0.0.1:9", methods=("welch",))


def test_power_method_choices_are_the_registry():
    from synthtrial.analyze.estimators import METHODS, REGISTRY
    from synthtrial.cli.power import PowerMethod

    assert [m.value for m in PowerMethod] == list(METHODS) == list(REGISTRY)
