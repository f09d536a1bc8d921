"""`analyze`: outcomes per image, effects beside the truth, a report that renders, clear errors."""

import json

import numpy as np
import pandas as pd
import pytest

from synthtrial.analyze.pipeline import EFFECT_COLUMNS, AnalysisSettings, analyze_run, image_outcomes
from synthtrial.util.errors import SynthtrialError
from synthtrial.run.generation import generate
from synthtrial.run.rundir import read_run
from synthtrial.trial.simulate import SeverityModel, TrialDesign, simulate_trial


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A small trial with a large effect: 4 patients x 24 days, ABAB in 6-day periods, rendered at 128 px."""
    folder = tmp_path_factory.mktemp("analyze")
    design = TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=4, blocks=4, period_days=6)
    model = SeverityModel(effects={"Cream": -1.0}, effect_sd=0.1, baseline_mean=2.2, baseline_sd=0.2,
                          baseline_min=1.8, baseline_max=2.6, ar_phi=0.3, noise_sd=0.1)
    protocol, _ = simulate_trial(design, model, seed=1).write(folder / "abab.csv")
    run = generate(protocol, folder / "run", size=128, progress=False)
    settings = AnalysisSettings(epochs=2, image_size=32, n_permutations=200)
    analysis = analyze_run(run, settings, progress=False)
    return run, analysis


def test_writes_outcomes_effects_and_report(analysed):
    run, analysis = analysed
    for name in ("outcomes.parquet", "effects.csv", "report.html", "embeddings.parquet", "autoencoder.safetensors",
                 "autoencoder.json", "pca.json", "settings.json", "timings.json"):
        assert (analysis / name).is_file(), name
    outcomes = pd.read_parquet(analysis / "outcomes.parquet")
    manifest, _ = read_run(run)
    assert len(outcomes) == len(manifest)
    for col in ("oracle", "lesion_count", "lesion_severity", "iga", "ae_pca"):
        assert outcomes[col].notna().all(), col
    np.testing.assert_allclose(outcomes["oracle"], manifest["severity"])
    # the unsupervised score is fitted and standardised per patient (a pooled first component would only
    # tell the faces apart): mean 0 and SD 1 within every patient
    per_patient = outcomes.groupby("patient_id")["ae_pca"]
    np.testing.assert_allclose(per_patient.mean(), 0, atol=1e-9)
    np.testing.assert_allclose(per_patient.std(ddof=0), 1, rtol=1e-6)
    effects = pd.read_csv(analysis / "effects.csv")
    assert list(effects.columns) == list(EFFECT_COLUMNS)
    assert set(effects["method"]) == set(AnalysisSettings().methods)
    assert set(effects.loc[effects["method"].isin(["welch", "permutation", "gls_ar1", "hac"]), "role"]) == {"descriptive"}
    assert set(effects["outcome"]) == {"oracle", "lesion_severity", "lesion_count", "iga", "ae_pca"}
    assert (effects["arm"] == "Cream").all() and (effects["reference"] == "Control").all()


def test_oracle_and_lesion_count_recover_the_truth(analysed):
    _, analysis = analysed
    effects = pd.read_csv(analysis / "effects.csv")
    truth = json.loads((analysis.parent / "truth.json").read_text())
    pooled = effects[(effects["scope"] == "pooled") & (effects["method"] == "lmm")].set_index("outcome")
    for outcome in ("oracle", "lesion_severity"):
        row = pooled.loc[outcome]
        assert row["true_effect"] == pytest.approx(truth["mean_delivered_effects"]["Cream"])
        assert row["covered"] in (True, "True")
        assert row["p"] < 0.01
        assert "exposure kinetics" in row["note"]  # the truth's half-lives were used
    assert pd.isna(pooled.loc["ae_pca", "true_effect"])  # the unsupervised score has no truth scale
    # one scale: every outcome's standardised effect beside the same standardised truth
    assert pooled["std_true_effect"].nunique() == 1 and pooled["std_true_effect"].iloc[0] < 0
    oracle = pooled.loc["oracle"]
    assert oracle["share"] == pytest.approx(oracle["estimate"] / oracle["true_effect"], rel=1e-9)
    assert pooled.loc["lesion_severity", "share"] > 0.5 and np.isfinite(pooled.loc["ae_pca", "share"])
    randomization = effects[effects["method"] == "randomization"]
    assert randomization["note"].str.contains("order is fixed").all()  # the truth's ABAB design is not randomised
    per_patient = effects[(effects["scope"] != "pooled") & (effects["outcome"] == "oracle")
                          & (effects["method"] == "welch")]
    assert len(per_patient) == 4 and (per_patient["estimate"] < 0).all()


def test_report_renders_every_section(analysed):
    _, analysis = analysed
    report = (analysis / "report.html").read_text()
    for heading in ("Pooled effects", "All outcomes on one scale", "Per-patient tests", "Trajectories",
                    "What the outcomes measured", "Autoencoder embeddings", "Estimates beside the truth"):
        assert heading in report
    assert report.count("data:image/png;base64,") == 4  # trajectories, image strip, embeddings, forest plot
    assert "Simulation truth" in report


def test_embeddings_are_cached(analysed):
    run, analysis = analysed
    first = json.loads((analysis / "timings.json").read_text())
    assert "train autoencoder" in first
    before = (analysis / "embeddings.parquet").read_bytes()
    analyze_run(run, AnalysisSettings(epochs=2, image_size=32, n_permutations=200), progress=False)
    assert "train autoencoder" not in json.loads((analysis / "timings.json").read_text())  # not trained again
    assert (analysis / "embeddings.parquet").read_bytes() == before
    # other autoencoder settings are a different analysis: trained again
    analyze_run(run, AnalysisSettings(epochs=1, image_size=32, n_permutations=200), progress=False)
    assert "train autoencoder" in json.loads((analysis / "timings.json").read_text())


def test_grader_scores_become_outcomes(analysed, tmp_path):
    run, _ = analysed
    manifest, _ = read_run(run)
    grades = pd.DataFrame({"image": manifest["image"], "iga_prob": np.linspace(0, 1, len(manifest)),
                           "label": "x"})
    grades.to_parquet(run / "grades.parquet")
    try:
        outcomes = image_outcomes(run, manifest)
        assert "grader_iga_prob" in outcomes.columns and "grader_label" not in outcomes.columns
    finally:
        (run / "grades.parquet").unlink()


def test_incomplete_run_is_a_clear_error(tmp_path):
    with pytest.raises(SynthtrialError, match="manifest.parquet is missing"):
        (tmp_path / "config.json").write_text("{}")
        analyze_run(tmp_path, AnalysisSettings(autoencoder=False), progress=False)
    with pytest.raises(SynthtrialError, match="--image-size"):
        analyze_run(tmp_path, AnalysisSettings(image_size=48), progress=False)
    with pytest.raises(SynthtrialError, match="--image-size"):
        analyze_run(tmp_path, AnalysisSettings(image_size=65536), progress=False)
    for device in ("bogus", "cuda:7" if not __import__("torch").cuda.is_available() else "tpu"):
        with pytest.raises(SynthtrialError, match="--device"):
            analyze_run(tmp_path, AnalysisSettings(), device=device, progress=False)
    assert not (tmp_path / "analysis").exists()  # nothing written
