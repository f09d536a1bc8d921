"""Rendered replicates of `power`: image outcomes through the real pipeline, seeded, on any number of workers."""

import dataclasses
import tempfile

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from synthtrial.analyze.power import StudySettings, power_study, scenario_grid, scenario_key
from synthtrial.analyze.power_render import RenderedSettings, render_trial, rendered_outcome_names
from synthtrial.cli import app
from synthtrial.util.errors import SynthtrialError
from synthtrial.trial.simulate import PRESETS, simulate_trial

# the quick design cut to 2 patients x 8 days (16 images of 128 px per rendered trial)
TINY = dataclasses.replace(PRESETS["quick"][0], n_patients=2, blocks=2)
MODEL = PRESETS["quick"][1]
FAST = RenderedSettings(replicates=1, epochs=1)
METHODS = ("period", "lmm")
IMAGE_OUTCOMES = ["ae_pca", "grader_counter_count", "grader_counter_severity"]


def test_a_rendered_trial_has_finite_image_outcomes_the_same_for_the_same_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the temporary run folder goes
    trial = simulate_trial(TINY, MODEL, seed=4)
    threads = torch.get_num_threads()
    first = render_trial(trial, FAST, seed=4)
    assert torch.get_num_threads() == threads  # restored
    assert not list(tmp_path.glob("synthtrial-render-*"))  # the temporary run folder is gone
    assert list(rendered_outcome_names(FAST)) == IMAGE_OUTCOMES
    assert list(first.columns) == ["patient_id", "day", "treatment", "block", *IMAGE_OUTCOMES]
    assert len(first) == len(trial.protocol) == 16
    assert np.isfinite(first[IMAGE_OUTCOMES].to_numpy()).all()
    assert first["grader_counter_count"].min() > 0  # the counter finds the faces and some lesions
    pd.testing.assert_frame_equal(first, render_trial(trial, FAST, seed=4))
    other = render_trial(trial, FAST, seed=5)  # other faces/lesion placement and autoencoder initialisation
    assert not np.allclose(first["ae_pca"], other["ae_pca"])


@pytest.fixture(scope="module")
def study():
    grid = scenario_grid([("tiny", TINY, MODEL)], effect_scales=(0.0, 1.0))
    settings = StudySettings(seed=2, methods=METHODS, rendered=FAST)
    return grid, settings, *power_study(grid, replicates=2, settings=settings)


def test_only_the_first_replicates_are_rendered_and_the_summary_counts_them(study):
    _, _, estimates, summary = study
    image = estimates[estimates["outcome"].isin(IMAGE_OUTCOMES)]
    assert set(image["replicate"]) == {0} and set(image["outcome"]) == set(IMAGE_OUTCOMES)
    assert set(estimates.loc[~estimates["outcome"].isin(IMAGE_OUTCOMES), "replicate"]) == {0, 1}
    assert image["bias"].isna().all() and image["covered"].isna().all()  # no truth on the severity scale
    assert image["std_true_effect"].notna().any() and image["residual_sd"].gt(0).all()
    pooled = summary[summary["level"] == "pooled"].set_index(["effect_scale", "outcome"])
    for scale in (0.0, 1.0):
        for outcome in IMAGE_OUTCOMES:
            assert pooled.loc[(scale, outcome), "tests"] == 1
        assert pooled.loc[(scale, "oracle"), "tests"] == 2 and pooled.loc[(scale, "lesion_severity"), "tests"] == 2
    per_patient = summary[(summary["level"] == "per patient") & summary["outcome"].isin(IMAGE_OUTCOMES)]
    assert (per_patient["tests"] == TINY.n_patients).all()
    assert np.isnan(pooled.loc[(1.0, "ae_pca"), "bias"]) and np.isfinite(pooled.loc[(1.0, "ae_pca"), "calibration"])


def test_image_outcomes_do_not_depend_on_the_number_of_dask_workers(study, tmp_path):
    grid, settings, inline, _ = study
    two, _ = power_study(grid, replicates=2, settings=settings, workers=2, cache=tmp_path)
    pd.testing.assert_frame_equal(inline, two)
    resumed, _ = power_study(grid, replicates=2, settings=settings, cache=tmp_path)  # every replicate read back
    pd.testing.assert_frame_equal(inline, resumed)


def test_the_cache_key_follows_the_render_settings():
    scenario = scenario_grid([("tiny", TINY, MODEL)])[0]
    keys = {scenario_key(scenario, StudySettings(rendered=r)) for r in
            (None, FAST, RenderedSettings(replicates=2, epochs=1), RenderedSettings(replicates=1, epochs=2),
             RenderedSettings(replicates=1, epochs=1, image_size=256), RenderedSettings(replicates=1, epochs=1,
                                                                                          ae_image_size=32),
             RenderedSettings(replicates=1, epochs=1, graders=("counter", "dermx")))}
    assert len(keys) == 7
    assert scenario_key(scenario, StudySettings(rendered=FAST)) == scenario_key(
        scenario, StudySettings(rendered=RenderedSettings(replicates=1, epochs=1, graders=["counter"])))


@pytest.mark.parametrize(("change", "message"), [
    ({"replicates": 0}, "--rendered must be a whole number >= 1"),
    ({"image_size": 64}, "--size must be a whole number >= 128"),
    ({"image_size": 2048}, "--size must be between 128 and 1024"),
    ({"epochs": 0}, "--ae-epochs"),
    ({"ae_image_size": 48}, "--ae-image-size must be a power of two"),
    ({"ae_image_size": 256}, "--ae-image-size must be a power of two from 16 to --size"),
    ({"graders": ("magic",)}, "--grader: unknown grader 'magic'"),
    ({"graders": ("imageqx",)}, "--grader imageqx: grades no trial outcome"),
    ({"graders": ("counter", "counter")}, "--grader: a grader is named twice"),
])
def test_bad_render_settings_are_one_line_errors(change, message):
    with pytest.raises(SynthtrialError, match=message) as info:
        RenderedSettings(**change)
    assert "\n" not in str(info.value)


def test_more_rendered_than_replicates_is_refused_before_any_work():
    with pytest.raises(SynthtrialError, match="--rendered 2 exceeds --replicates 1"):
        power_study(TINY, MODEL, 1, rendered=RenderedSettings(replicates=2))
    with pytest.raises(SynthtrialError, match="RenderedSettings or None"):
        power_study(TINY, MODEL, 1, rendered=1)


def test_power_command_renders_and_prints_the_image_outcomes(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["power", "--preset", "quick", "--patients", "2", "--period-days", "1",
                                 "--replicates", "2", "--rendered", "1", "--ae-epochs", "1", "--method", "lmm",
                                 "--outcome", "oracle", "--report", str(tmp_path / "power"), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), result.stdout
    rows, section = {}, None  # each outcome is a section: a heading row, then one row per method and arm
    for line in lines:
        if line.strip() in ("oracle", "AE-PCA", "ctr n", "ctr sev"):
            section = line.strip()
        elif line.split()[:1] == ["lmm"]:
            rows[section] = line.split()                          # method, arm, rate, MC SE, tests, no p, ...
    assert rows["oracle"][4] == "2" and rows["AE-PCA"][4] == "1" and rows["ctr n"][4] == "1"
    assert "2 trials (1 rendered)" in result.stdout and "ctr sev = grader_counter_severity" in result.stdout
    report = (tmp_path / "power.html").read_text()
    assert "grader_counter_count" in report and "rendered.image_size" in report
    for args, message in ((["--size", "256"], "--size needs --rendered"),
                          (["--rendered", "1", "--grader", "imageqx"], "--grader imageqx"),
                          (["--rendered", "3"], "--rendered 3 exceeds --replicates 2")):
        result = runner.invoke(app, ["power", "--preset", "quick", "--replicates", "2", *args])
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
