"""`power`: rejection rates over simulated trials, calibrated under the null, seeded, worker-independent."""

import json

import numpy as np
import pandas as pd
import pytest

from synthtrial.analyze.power import design_from_file, power_study, replicate_outcomes, with_effects
from synthtrial.errors import SynthtrialError
from synthtrial.simulate import PRESETS, SeverityModel, TrialDesign, simulate_trial

SMALL = TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=5, blocks=4, period_days=5)
NOISY = SeverityModel(effects={"Cream": -0.3}, effect_sd=0.0, baseline_mean=1.8, baseline_sd=0.3, baseline_min=1.0,
                      baseline_max=2.6, ar_phi=0.0, noise_sd=0.3)


def test_null_rejection_rate_is_near_alpha():
    null = with_effects(NOISY, null=True)
    _, summary = power_study(SMALL, null, 150, seed=3, methods=("welch", "lmm"), outcomes=("oracle",),
                             random_slopes=False)
    rows = summary[(summary["outcome"] == "oracle")].set_index(["method", "level"])
    assert (rows["quantity"] == "type I error").all()
    for key in (("lmm", "pooled"), ("welch", "per patient")):
        rate, se = rows.loc[key, "rejection_rate"], rows.loc[key, "mc_se"]
        assert abs(rate - 0.05) < max(3 * se, 0.04), (key, rate)


def test_power_grows_with_the_effect():
    _, weak = power_study(SMALL, with_effects(NOISY, {"Cream": -0.1}), 20, seed=1, methods=("lmm",),
                          outcomes=("oracle",), random_slopes=False)
    _, strong = power_study(SMALL, with_effects(NOISY, {"Cream": -0.6}), 20, seed=1, methods=("lmm",),
                            outcomes=("oracle",), random_slopes=False)
    pick = lambda s: s[(s["outcome"] == "oracle")]["rejection_rate"].item()  # noqa: E731
    assert pick(strong) == 1.0 and pick(weak) < 0.8
    row = strong[strong["outcome"] == "oracle"].iloc[0]
    assert row["quantity"] == "power" and abs(row["bias"]) < 0.05 and row["coverage"] > 0.8


def test_seeded_and_independent_of_workers():
    a, _ = power_study(SMALL, NOISY, 4, seed=5, methods=("welch", "lmm"))
    b, _ = power_study(SMALL, NOISY, 4, seed=5, methods=("welch", "lmm"), workers=2)
    pd.testing.assert_frame_equal(a, b)
    c, _ = power_study(SMALL, NOISY, 4, seed=6, methods=("welch", "lmm"))
    assert not np.allclose(a["estimate"], c["estimate"])


def test_replicate_outcomes_are_the_lesion_model_counts():
    trial = simulate_trial(*PRESETS["quick"], seed=0)
    data = replicate_outcomes(trial.protocol)
    from synthtrial import scale

    counts = np.rint(scale.expected_lesion_count(data["oracle"].to_numpy()))
    np.testing.assert_allclose(scale.expected_lesion_count(data["lesion_severity"].to_numpy()), counts, atol=1e-9)


def test_design_from_truth_file(tmp_path):
    _, truth_path = simulate_trial(*PRESETS["quick"], seed=0).write(tmp_path / "q.csv")
    design, model = design_from_file(truth_path)
    assert design == PRESETS["quick"][0] and model.effects == PRESETS["quick"][1].effects
    (tmp_path / "bad.json").write_text(json.dumps({"design": {}}))
    with pytest.raises(SynthtrialError, match="needs 'design' and 'model'"):
        design_from_file(tmp_path / "bad.json")
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(SynthtrialError, match="not JSON"):
        design_from_file(tmp_path / "notjson.json")
