"""Pooled mixed model: fast random-intercept REML against statsmodels, boundary fits, kinetics, CR1/CR2."""

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from synthtrial.analyze import mixed as M
from synthtrial.analyze.nof1 import Kinetics
from synthtrial.analyze.power import replicate_outcomes, with_effects
from synthtrial.analyze.stats import analyze_outcome
from synthtrial.util.seeding import derive_seed
from synthtrial.trial.simulate import PRESETS, simulate_trial


def _unbalanced(seed=1, intercept_sd=0.7):
    rng = np.random.default_rng(seed)
    frames = []
    for g in range(6):
        n = int(rng.integers(5, 15))
        t = rng.integers(0, 2, n)
        day = np.arange(n)
        y = 1 + rng.normal(0, intercept_sd) + 0.5 * t + 0.02 * day + rng.normal(0, 0.5, n)
        frames.append(pd.DataFrame({"g": f"G{g}", "t": t, "d": day, "y": y}))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("intercept_sd", [0.7, 0.0])
def test_random_intercept_reml_matches_statsmodels(intercept_sd):
    """Away from the bound the two fits agree to the optimisers' tolerance; at the bound ours is exactly 0,
    where statsmodels' gradient search stops just inside (a tiny positive variance)."""
    data = _unbalanced(intercept_sd=intercept_sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = smf.mixedlm("y ~ t + d", data, groups=data["g"]).fit(reml=True)
    x = np.asarray(reference.model.exog)
    fit = M.random_intercept_reml(x, data["y"].to_numpy(), data["g"].to_numpy())
    tolerance = 1e-5 if intercept_sd else 1e-3
    np.testing.assert_allclose(fit.fe_params, reference.fe_params.to_numpy(), rtol=tolerance, atol=tolerance)
    assert fit.scale == pytest.approx(reference.scale, rel=tolerance * 10)
    assert fit.tau2 == pytest.approx(float(reference.cov_re.iloc[0, 0]), abs=tolerance * 10)
    if not intercept_sd:
        assert fit.tau2 == 0.0


def test_boundary_fit_still_gives_an_estimate():
    # the replicate the issue names: both statsmodels fits failed there and the trial dropped out as NaN
    design, model = PRESETS["quick"]
    trial = simulate_trial(design, with_effects(model, null=True), seed=derive_seed("power", 0, 126, bits=32))
    data = replicate_outcomes(trial.protocol)
    for outcome in ("oracle", "lesion_severity"):
        both = M.mixed_model_both(data, outcome, "Control")
        for key in (M.CR2, M.CR1):
            estimate = both[key]["Cream"]
            assert np.isfinite(estimate.estimate) and np.isfinite(estimate.p), estimate.note
    flat = pd.DataFrame({"patient_id": np.repeat(["a", "b", "c"], 8), "day": np.tile(np.arange(8), 3),
                         "treatment": np.tile(["R", "T"] * 4, 3)})
    flat["y"] = np.random.default_rng(0).normal(size=24) + 0.3 * (flat["treatment"] == "T")
    flat["y"] -= flat.groupby("patient_id")["y"].transform("mean")  # no between-patient variation at all
    estimate = M.mixed_model(flat, "y", "R", random_slopes=False, trend=False)["T"]
    assert "boundary fit" in estimate.note and np.isfinite(estimate.se)


def test_constant_outcome_gives_nan_with_a_reason_not_a_traceback():
    data = pd.DataFrame({"patient_id": np.repeat(["a", "b"], 6), "day": np.tile(np.arange(6), 2),
                         "treatment": np.tile(["R", "R", "R", "T", "T", "T"], 2), "y": 3.0})
    estimate = M.mixed_model(data, "y", "R")["T"]
    assert np.isnan(estimate.estimate) and "no variation" in estimate.note


def test_kinetics_pooled_model_returns_the_delivered_mean_effect_on_a_noise_free_trial():
    design, model = PRESETS["anchor"]
    noise_free = dataclasses.replace(model, noise_sd=0.0, effect_sd=0.0)
    trial = simulate_trial(dataclasses.replace(design, n_patients=3), noise_free, seed=0)
    data = replicate_outcomes(trial.protocol)

    result = analyze_outcome(data, "oracle", "Baseline", methods=["lmm"], design=design,
                             kinetics=Kinetics(model.washin_half_life, model.washout_half_life))
    for arm, value in trial.truth["mean_delivered_effects"].items():
        assert result.set_index("arm").loc[arm, "estimate"] == pytest.approx(value, abs=1e-9)
