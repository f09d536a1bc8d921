"""`analyze`: outcomes per image, effects beside the truth, a report that renders, clear errors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthtrial.analyze.pipeline import (EFFECT_COLUMNS, AnalysisSettings, analyze_run, daily, image_outcomes,
                                         new_lesion_periods)
from synthtrial.util.errors import SynthtrialError
from synthtrial.run.generation import generate
from synthtrial.run.rundir import read_run
from synthtrial.trial.simulate import SeverityModel, TrialDesign, simulate_trial
from test_hostile import invoke, one_line_exit_2


def _rendered_abab(folder, *, n_patients, period_days, seed):
    """An ABAB trial of 4 periods with a large effect, simulated and rendered at 128 px into ``folder/run``."""
    design = TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=n_patients, blocks=4,
                         period_days=period_days)
    model = SeverityModel(effects={"Cream": -1.0}, effect_sd=0.1, baseline_mean=2.2, baseline_sd=0.2,
                          baseline_min=1.8, baseline_max=2.6, ar_phi=0.3, noise_sd=0.1)
    protocol, _ = simulate_trial(design, model, seed=seed).write(folder / "abab.csv")
    return generate(protocol, folder / "run", size=128, progress=False)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A small trial with a large effect: 4 patients x 24 days, ABAB in 6-day periods, rendered at 128 px."""
    run = _rendered_abab(tmp_path_factory.mktemp("analyze"), n_patients=4, period_days=6, seed=1)
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
    # the unsupervised score is fitted per patient (a pooled first component would only tell the faces apart),
    # centred on each patient's reference (Control) images and in units of their pooled within-patient SD
    reference = outcomes[outcomes["treatment"] == "Control"].groupby("patient_id")["ae_pca"]
    np.testing.assert_allclose(reference.mean(), 0, atol=1e-9)
    pooled_sd = np.sqrt(reference.apply(lambda v: ((v - v.mean()) ** 2).sum()).sum() / (reference.size() - 1).sum())
    assert pooled_sd == pytest.approx(1.0, rel=1e-6)
    pca = json.loads((analysis / "pca.json").read_text())
    assert set(pca["sign"]) == set(outcomes["patient_id"]) and "lesion count" in pca["orientation"]
    effects = pd.read_csv(analysis / "effects.csv")
    assert list(effects.columns) == list(EFFECT_COLUMNS)
    assert set(effects["method"]) == set(AnalysisSettings().methods)
    assert set(effects.loc[effects["method"].isin(["welch", "permutation", "gls_ar1", "hac"]), "role"]) == {"descriptive"}
    assert set(effects["outcome"]) == {"oracle", "lesion_severity", "lesion_count", "iga", "new_inflammatory", "ae_pca"}
    assert (effects["arm"] == "Cream").all() and (effects["reference"] == "Control").all()


def test_oracle_and_lesion_count_recover_the_truth(analysed):
    _, analysis = analysed
    effects = pd.read_csv(analysis / "effects.csv")
    truth = json.loads((analysis.parent / "truth.json").read_text())
    pooled = effects[(effects["scope"] == "pooled") & (effects["method"] == "lmm")].set_index("outcome")
    for outcome in ("oracle", "lesion_severity"):
        row = pooled.loc[outcome]
        # the CR2 interval is for the population: its truth is the population effect delivered through these
        # schedules; the patients' mean delivered contrast is kept beside it
        assert row["estimand"] == "population_delivered"
        assert row["true_effect"] == pytest.approx(truth["population_delivered_effects"]["Cream"])
        assert row["true_sample_mean"] == pytest.approx(truth["mean_delivered_effects"]["Cream"])
        assert row["covered"] in (True, "True")
        assert row["p"] < 0.01
        assert "exposure kinetics" in row["note"]  # the truth's half-lives were used
    assert pd.isna(pooled.loc["ae_pca", "true_effect"])  # the unsupervised score has no truth scale
    # one scale: every outcome's standardised effect beside the same standardised truth
    assert pooled["std_true_effect"].nunique() == 1 and pooled["std_true_effect"].iloc[0] < 0
    oracle = pooled.loc["oracle"]
    assert oracle["calibration_slope"] == pytest.approx(oracle["estimate"] / oracle["true_effect"], rel=1e-9)
    assert (pooled.loc["lesion_severity", "calibration_slope"] > 0.5
            and np.isfinite(pooled.loc["ae_pca", "calibration_slope"]))
    randomization = effects[effects["method"] == "randomization"]
    assert randomization["note"].str.contains("order is fixed").all()  # the truth's ABAB design is not randomised
    per_patient = effects[(effects["scope"] != "pooled") & (effects["outcome"] == "oracle")
                          & (effects["method"] == "welch")]
    assert len(per_patient) == 4 and (per_patient["estimate"] < 0).all()


def test_new_inflammatory_lesions_per_period_beside_the_other_outcomes(analysed):
    run, analysis = analysed
    outcomes = pd.read_parquet(analysis / "outcomes.parquet")
    first = outcomes.groupby("patient_id")["day"].transform("min") == outcomes["day"]
    assert outcomes.loc[first, "new_inflammatory"].isna().all() and outcomes.loc[~first, "new_inflammatory"].notna().all()
    assert outcomes["new_inflammatory"].sum() > 0
    effects = pd.read_csv(analysis / "effects.csv")
    rows = effects[effects["outcome"] == "new_inflammatory"]
    assert set(rows["method"]) == set(AnalysisSettings().methods)
    pooled = rows[(rows["scope"] == "pooled") & (rows["method"] == "lmm")].iloc[0]
    oracle = effects[(effects["outcome"] == "oracle") & (effects["scope"] == "pooled") & (effects["method"] == "lmm")]
    assert pooled["std_true_effect"] == pytest.approx(oracle["std_true_effect"].item()) and np.isfinite(pooled["calibration_slope"])
    periods = pd.read_csv(analysis / "new_lesions.csv")
    assert len(periods) == 4 * 4 and periods.groupby("patient_id")["period"].max().eq(4).all()
    # each period's count is the sum of its visits' new lesions (the first visit has none to compare with)
    per_day = daily(outcomes, ["new_inflammatory"])
    for (pid, period), row in periods.set_index(["patient_id", "period"]).iterrows():
        days = per_day[(per_day["patient_id"] == pid) & (per_day["day"].sub(row["mid_day"]).abs() < 3)]
        assert row["new_inflammatory"] == pytest.approx(days["new_inflammatory"].sum())
        assert row["visits_new_inflammatory"] == days["new_inflammatory"].notna().sum()


def test_new_lesion_periods_on_a_hand_table():
    nan = np.nan
    per_day = pd.DataFrame({
        "patient_id": "P", "day": [1, 2, 3, 4, 5, 6, 7, 8],
        "treatment": ["A", "A", "A", "Washout", "B", "B", "B", "A"], "block": [1, 1, 1, 1, 2, 2, 2, 3],
        "new_inflammatory": [nan, 2, 1, 4, 0, 0, 1, 3],
        "grader_tracker_new_inflammatory": [nan, 3, nan, 5, 1, 0, 0, nan]})
    table = new_lesion_periods(per_day, exclude=("Washout",))
    assert table["treatment"].tolist() == ["A", "B", "A"] and table["period"].tolist() == [1, 2, 3]
    assert table["mid_day"].tolist() == [2.0, 6.0, 8.0]
    assert table["new_inflammatory"].tolist() == [3.0, 1.0, 3.0]
    assert table["visits_new_inflammatory"].tolist() == [2, 3, 1]
    assert table["grader_tracker_new_inflammatory"].tolist()[:2] == [3.0, 1.0]
    assert np.isnan(table["grader_tracker_new_inflammatory"].iloc[2])
    assert table["visits_grader_tracker_new_inflammatory"].tolist() == [1, 3, 0]


def test_effects_carry_adjusted_responder_calls_and_the_fixed_order_test_is_not_available(analysed):
    from statsmodels.stats.multitest import multipletests

    _, analysis = analysed
    effects = pd.read_csv(analysis / "effects.csv")
    period = effects[(effects["method"] == "period") & (effects["outcome"] == "oracle")]
    assert len(period) == 4
    np.testing.assert_allclose(period["p_holm"], multipletests(period["p"], method="holm")[1])
    np.testing.assert_allclose(period["p_bh"], multipletests(period["p"], method="fdr_bh")[1])
    expected = (period["p_holm"] < 0.05) & (period["estimate"] < 0)
    assert period["responder_holm"].astype(str).tolist() == expected.astype(str).tolist()
    pooled = effects[effects["scope"] == "pooled"]
    assert pooled["p_holm"].isna().all() and pooled["responder"].isna().all()
    randomization = effects[effects["method"] == "randomization"]
    assert (randomization["role"] == "not available").all()
    report = (analysis / "report.html").read_text()
    assert "Responders" in report and "p_holm" in report and "not available" in report


def test_a_truth_file_written_before_the_estimands_is_still_read(analysed):
    """An older truth.json (no carryover, no population values): analyze reads it; with its design and seed the
    estimands are recomputed (the same table as with a current file), without them only the pooled truth, whose
    interval is for the population, stays blank, and no estimate changes."""
    from test_estimands import older

    from synthtrial.analyze.estimands import with_estimands
    from synthtrial.analyze.pipeline import outcome_effects

    run, analysis = analysed
    outcomes = pd.read_parquet(analysis / "outcomes.parquet")
    truth = json.loads((run / "truth.json").read_text())
    settings = AnalysisSettings(autoencoder=False, methods=("period", "lmm"))

    def effects(t):
        return outcome_effects(outcomes, ["oracle"], t, "Control", ("Washout",), settings)

    current = effects(truth)
    pd.testing.assert_frame_equal(effects(with_estimands(older(truth))), current)
    bare = older({k: v for k, v in truth.items() if k not in ("design", "seed")})
    old = effects(with_estimands(bare))
    pooled = (old["scope"] == "pooled").to_numpy()
    assert old.loc[pooled, "true_effect"].isna().all() and old.loc[pooled, "covered"].isna().all()
    np.testing.assert_allclose(old.loc[pooled, "true_sample_mean"], truth["mean_delivered_effects"]["Cream"])
    for col in ("estimate", "se", "p", "true_effect", "true_steady_state"):
        np.testing.assert_array_equal(old.loc[~pooled, col], current.loc[~pooled, col])
    assert old["true_carryover"].isna().all() and current["true_carryover"].notna().all()


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


# ------------------------------------------------------------------------ hostile inputs (issue 19)

@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """A small run (2 patients x 8 days, ABAB in 2-day periods, 128 px) graded by the counter."""
    from synthtrial.grade import grade_run
    from synthtrial.graders.base import get_grader

    run = _rendered_abab(tmp_path_factory.mktemp("graded"), n_patients=2, period_days=2, seed=2)
    grade_run(run, [get_grader("counter", device="cpu")])
    return run


@pytest.fixture()
def graded_copy(graded, tmp_path):
    import shutil

    return Path(shutil.copytree(graded, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


FAST_AE = ("--epochs", 1, "--image-size", 16, "--permutations", 100, "-q")


def _all_nan_grades(run: Path) -> str:
    grades = pd.read_parquet(run / "grades.parquet")
    grades["counter_count"] = np.nan  # an all-NaN grade column: the analysis is refused
    grades.to_parquet(run / "grades.parquet")
    return "grader_counter_count"


def _one_arm(run: Path) -> str:
    manifest = pd.read_parquet(run / "manifest.parquet")
    manifest["treatment"] = manifest["treatment"].iloc[0]  # every image under one arm: nothing to compare
    manifest.to_parquet(run / "manifest.parquet")
    return "no arm besides the reference"


def _one_day(run: Path) -> str:
    manifest = pd.read_parquet(run / "manifest.parquet")
    keep = manifest[manifest["day"] == manifest["day"].min()]  # a one-day run (its lesions kept with it)
    keep.to_parquet(run / "manifest.parquet")
    lesions = pd.read_parquet(run / "lesions.parquet")
    lesions[lesions["image"].isin(keep["image"])].to_parquet(run / "lesions.parquet")
    return "no arm besides the reference"


@pytest.mark.parametrize("damage", [_all_nan_grades, _one_arm, _one_day])
def test_a_refused_analyze_leaves_the_previous_set_untouched(graded_copy, damage):
    run = graded_copy
    assert invoke("analyze", run, *FAST_AE).exit_code == 0
    before = _files(run / "analysis")
    assert {"outcomes.parquet", "effects.csv", "report.html", "embeddings.parquet"} <= set(before)
    needle = damage(run)
    # other autoencoder settings: the refused attempt trains (and would keep) a new embedding first
    result = invoke("analyze", run, "--epochs", 2, "--image-size", 16, "--permutations", 100, "-q")
    one_line_exit_2(result, needle)
    assert _files(run / "analysis") == before  # same files, same bytes: nothing of the refused attempt
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".analysis")) == []


def test_analyze_lock_errors_name_the_run_not_an_option_analyze_lacks(graded_copy):
    """analyze takes the run as an argument: a busy or unwritable run must not point at --out."""
    from synthtrial.run import rundir

    run = graded_copy
    with rundir.locked(run):
        busy = invoke("analyze", run, *FAST_AE)
    one_line_exit_2(busy, "another synthtrial process is analysing this run; wait for it to finish")
    assert "--out" not in busy.stderr and "choose another" not in busy.stderr
    (run / ".lock").unlink()
    (run / ".lock").mkdir()  # cannot be opened for writing, as on a read-only run
    blocked = invoke("analyze", run, *FAST_AE)
    one_line_exit_2(blocked, "cannot be written")
    assert "(the run directory given)" in blocked.stderr and "--out" not in blocked.stderr
    assert not (run / "analysis").exists()


def test_a_truncated_embeddings_cache_is_recomputed(graded_copy):
    run = graded_copy
    settings = AnalysisSettings(epochs=1, image_size=16, n_permutations=100)
    analysis = analyze_run(run, settings, progress=False)
    whole = (analysis / "embeddings.parquet").read_bytes()
    (analysis / "embeddings.parquet").write_bytes(whole[: len(whole) // 2])
    analyze_run(run, settings, progress=False)
    assert (analysis / "embeddings.parquet").read_bytes() == whole  # retrained, bit for bit on the CPU


@pytest.mark.parametrize("damage, needle", [
    ("image outcome", "'image' is the key column"),
    ("duplicated outcome", "named twice"),
    ("entry not an object", "must be a JSON object"),
    ("outcomes not a list", "must be a list of column names"),
    ("string column", "not numbers"),
    ("huge grade", "is not a finite grade"),
    ("infinite grade", "is not a finite grade"),
])
def test_hostile_grades_are_one_line_errors(graded_copy, damage, needle):
    run = graded_copy
    index = json.loads((run / "grades.json").read_text())
    entry = index["graders"]["counter"]
    grades = pd.read_parquet(run / "grades.parquet")
    if damage == "image outcome":
        entry["outcomes"] = ["image"]
    elif damage == "duplicated outcome":
        entry["outcomes"] = ["counter_count", "counter_count"]
    elif damage == "entry not an object":
        index["graders"]["counter"] = ["counter_count"]
    elif damage == "outcomes not a list":
        entry["outcomes"] = "counter_count"
    elif damage == "string column":
        grades["counter_count"] = grades["counter_count"].astype(str)
    else:
        grades.loc[3, "counter_severity"] = 1e308 if damage == "huge grade" else np.inf
    (run / "grades.json").write_text(json.dumps(index))
    grades.to_parquet(run / "grades.parquet")
    one_line_exit_2(invoke("analyze", run, "--no-autoencoder", "--permutations", 100, "-q"), needle)
    assert not (run / "analysis").exists()


def test_size_limits_are_refused_before_any_work(graded_copy):
    run = graded_copy
    for args, needle in ((("--epochs", 10 ** 12), "--epochs"), (("--image-size", 4096), "--image-size"),
                         (("--permutations", 10 ** 9), "--permutations"), (("--alpha", 0.9), "--alpha")):
        one_line_exit_2(invoke("analyze", run, *args, "-q"), needle)
    assert not (run / "analysis").exists()
    with pytest.raises(SynthtrialError, match="--epochs must be a whole number from 1 to 1000"):
        AnalysisSettings(epochs=10 ** 12)
    assert "1<=x<=1000" in " ".join(invoke("analyze", "--help").stdout.split())  # the limit is stated


def test_outcomes_too_large_to_analyse_are_refused():
    from synthtrial.analyze.stats import analyze_outcome

    frame = pd.DataFrame({"patient_id": "P1", "day": np.arange(8), "treatment": ["A", "B"] * 4,
                          "y": [1e308, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]})
    with pytest.raises(SynthtrialError, match="outcome 'y' holds values beyond"):
        analyze_outcome(frame, "y", "A", methods=("welch",))
