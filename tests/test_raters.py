"""The simulated rater panel: its perceptual model, its panel file, `synthtrial rate`, ratings in analyze and power."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.grade.raters import (ACTIVE_TYPES, Panel, PanelError, Rater, draw_raters, load_panel, panel_from_dict,
                                     read_all, read_images, reading_table)
from synthtrial.trial import scale

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_image(lesions):
    images = pd.DataFrame({"image": ["a"], "calendar_day": [0.0]})
    return images, pd.DataFrame(lesions).assign(image="a")


def test_small_comedones_are_missed_more_and_growing_lesions_less_seen():
    _, lesions = one_image({"type": ["open_comedo", "open_comedo", "papule", "papule", "mark", "scar"],
                            "diameter_mm": [1.0, 2.0, 4.0, 4.0, 4.0, 2.0], "intensity": [1, 1, 1, 0.3, 1, 1]})
    images = pd.DataFrame({"image": ["a"], "calendar_day": [0.0]})
    p = reading_table(images, lesions, Panel())["p"]
    assert p[0] < p[1] < p[2]            # a 1 mm comedo is missed more than a 2 mm one, and that more than a papule
    assert p[3] < p[2]                   # a papule still growing is seen less than a grown one
    assert p[4] == Panel().confusion["mark"] and p[5] == Panel().confusion["scar"]


def test_counts_split_over_types_and_grades_come_from_the_scale():
    rng = np.random.default_rng(0)
    kinds = rng.choice(list(ACTIVE_TYPES) + ["mark"], size=300)
    images = pd.DataFrame({"image": [f"i{k}" for k in range(30)], "calendar_day": np.arange(30.0)})
    lesions = pd.DataFrame({"image": np.repeat(images["image"], 10).to_numpy(), "type": kinds,
                            "diameter_mm": rng.uniform(0.5, 6, 300), "intensity": rng.uniform(0.2, 1, 300)})
    panel = Panel()
    table = reading_table(images, lesions, panel)
    rater = Rater("x", bias=1.5, scale=1.2, threshold_shift=0.4, drift=0.1)
    reading = read_images(table, panel, rater, rng.random(len(table["p"])), rng.standard_normal(30))
    assert (reading["per_type"].sum(axis=1) == reading["count"]).all()
    per_type = reading["per_type"]
    inflammatory = per_type[:, 2:].sum(axis=1)
    shrink = np.exp(-0.4)
    assert (reading["iga"] == scale.iga_from_counts(inflammatory * shrink, per_type[:, 4] * shrink)).all()
    assert (reading["hayashi_level"] == scale.acne04_level_from_count(reading["count"] * shrink)).all()


def test_bias_scale_and_drift_move_the_counts():
    images = pd.DataFrame({"image": [f"i{k}" for k in range(200)], "calendar_day": np.linspace(0, 400, 200)})
    lesions = pd.DataFrame({"image": np.repeat(images["image"], 20).to_numpy(), "type": "papule", "diameter_mm": 4.0,
                            "intensity": 1.0})
    panel = panel_from_dict({"ceiling": {"papule": 1.0}, "d50_mm": {"papule": 0.0}, "read_sd": 0.0, "read_cv": 0.0,
                             "reread_fraction": 0.0, "raters": [{"name": "plain"}, {"name": "keen", "bias": 3},
                                                                {"name": "drifts", "drift": 0.1}]})
    reads = read_all(reading_table(images, lesions, panel), panel, draw_raters(panel, 3, 0), seed=0)
    counts = reads.pivot(index="image_index", columns="rater", values="count")
    assert (counts["plain"] == 20).all() and (counts["keen"] == 23).all()
    assert counts["drifts"].iloc[0] == 20 and counts["drifts"].iloc[-1] == round(20 * np.exp(0.4))


def test_rereads_and_seeds():
    images = pd.DataFrame({"image": [f"i{k}" for k in range(400)], "calendar_day": 0.0})
    lesions = pd.DataFrame({"image": np.repeat(images["image"], 5).to_numpy(), "type": "closed_comedo",
                            "diameter_mm": 1.5, "intensity": 1.0})
    panel = Panel(reread_fraction=0.25)
    table = reading_table(images, lesions, panel)
    raters = draw_raters(panel, 2, seed=4)
    reads = read_all(table, panel, raters, seed=4)
    share = reads.groupby("rater")["reread"].mean() / (1 - reads.groupby("rater")["reread"].mean())
    assert ((share > 0.19) & (share < 0.31)).all()
    assert reads.equals(read_all(table, panel, draw_raters(panel, 2, seed=4), seed=4))
    assert not reads.equals(read_all(table, panel, draw_raters(panel, 2, seed=5), seed=5))
    assert draw_raters(panel, 3, seed=4)[:2] == raters  # a bigger panel keeps the first raters


@pytest.mark.parametrize("data, key", [
    ({"bias_sd": -1}, "bias_sd"), ({"ceiling": {"papule": 1.5}}, "ceiling.papule"), ({"bogus": 1}, "bogus"),
    ({"d50_mm": {"cyst": 1}}, "d50_mm.cyst"), ({"raters": [{"name": "a b"}]}, "raters[0].name"),
    ({"raters": [{"scale": 0}]}, "raters[0].scale"), ({"respect_visibility": 1}, "respect_visibility"),
    ({"reread_fraction": True}, "reread_fraction")])
def test_bad_panel_values_name_the_key(data, key):
    with pytest.raises(PanelError, match=re.escape(f"panel.json: key '{key}'")) as info:
        panel_from_dict(data, "panel.json")
    assert "\n" not in str(info.value)


def test_load_panel(tmp_path):
    assert load_panel(None) == Panel()
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"bias_sd": 0.5, "raters": [{"name": "Ann", "bias": 1}]}))
    panel = load_panel(good)
    assert panel.bias_sd == 0.5 and panel.raters == (Rater("Ann", bias=1.0),) and panel.read_sd == Panel().read_sd
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(PanelError, match="bad.json: not JSON"):
        load_panel(bad)


@pytest.fixture(scope="module")
def rated_run(quick_run_256, tmp_path_factory):
    """The quick run rated by 4 raters (a copy: other tests read the run as generated)."""
    import shutil

    run = tmp_path_factory.mktemp("rated") / "run"
    shutil.copytree(quick_run_256, run)
    result = invoke("rate", run, "--raters", 4, "--simulations", 30, "--seed", 7)
    assert result.exit_code == 0, result.output
    return run, result.stdout


def test_rate_writes_ratings_and_truth_that_agree(rated_run):
    from synthtrial.grade.ratings import read_ratings

    run, stdout = rated_run
    assert "ICC(2,1)" in stdout and "kappa (quadratic)" in stdout
    assert all(len(line) <= 80 for line in stdout.splitlines()) and "…" not in stdout
    ratings, truth = read_ratings(run)
    manifest = pd.read_parquet(run / "manifest.parquet")
    first = ratings[~ratings["reread"]]
    assert len(first) == 4 * len(manifest) and set(first["image"]) == set(manifest["image"])
    assert truth["seed"] == 7 and len(truth["raters"]) == 4 and truth["panel"]["bias_sd"] == Panel().bias_sd
    for row in truth["agreement"]:  # each statistic within Monte-Carlo error of what the panel implies
        if row["observed"] is not None and row["implied"] is not None and row["mc_sd"]:
            assert abs(row["observed"] - row["implied"]) < 4 * row["mc_sd"] + 0.02, row


def test_rate_same_seed_same_bytes_and_bad_panel_writes_nothing(rated_run, tmp_path):
    import shutil

    run, _ = rated_run
    again = tmp_path / "again"
    shutil.copytree(run, again)
    for name in ("ratings.parquet", "ratings.json"):
        (again / name).unlink()
    assert invoke("rate", again, "--raters", 4, "--simulations", 30, "--seed", 7).exit_code == 0
    for name in ("ratings.parquet", "ratings.json"):
        assert (again / name).read_bytes() == (run / name).read_bytes(), name
    for name in ("ratings.parquet", "ratings.json"):
        (again / name).unlink()
    panel = tmp_path / "panel.json"
    panel.write_text(json.dumps({"read_sd": "lots"}))
    result = invoke("rate", again, "--raters", 2, "--panel", panel)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "panel.json: key 'read_sd'" in result.stderr
    assert not (again / "ratings.parquet").exists() and not (again / "ratings.json").exists()


def test_a_changed_ratings_table_is_refused(rated_run, tmp_path):
    import shutil

    from synthtrial.grade.ratings import rating_outcomes
    from synthtrial.run.rundir import RunError

    run, _ = rated_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    table = pd.read_parquet(copy / "ratings.parquet")
    table.assign(count=table["count"] + 1).to_parquet(copy / "ratings.parquet")
    with pytest.raises(RunError, match="ratings.parquet: does not match"):
        rating_outcomes(copy)


def test_analyze_takes_ratings_as_outcomes(rated_run):
    from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run

    run, _ = rated_run
    folder = analyze_run(run, AnalysisSettings(autoencoder=False, methods=("period", "lmm"), n_permutations=200),
                         progress=False)
    effects = pd.read_csv(folder / "effects.csv")
    names = set(effects["outcome"])
    assert {"grader_rater_R01_count", "grader_rater_R04_iga", "grader_raters_mean_count",
            "grader_raters_mean_hayashi_level"} <= names
    panel = effects[(effects["outcome"] == "grader_raters_mean_count") & (effects["method"] == "lmm")
                    & (effects["scope"] == "pooled")]
    assert panel["calibration_slope"].notna().all() and (panel["calibration_slope"] > 0).all()
    agreement = pd.read_csv(folder / "agreement.csv")
    assert set(agreement["statistic"]) >= {"ICC(2,1)", "ICC(2,k)", "alpha (interval)", "kappa (quadratic)"}
    assert "Rater panel agreement" in (folder / "report.html").read_text()


def test_power_with_raters_prints_rated_outcomes(tmp_path):
    out = tmp_path / "power.csv"
    result = invoke("power", "--preset", "quick", "--raters", 1, "--raters", 3, "--replicates", 3, "--effect-scale", 0,
                    "--effect-scale", 1, "--method", "period", "--method", "lmm", "--outcome", "oracle",
                    "--workers", 1, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "rated_count_k1" in result.stdout and "rated_count_k3" in result.stdout
    summary = pd.read_csv(out)
    rated = summary[summary["outcome"].str.startswith("rated_count_k")]
    assert set(rated["outcome"]) == {"rated_count_k1", "rated_count_k3"}
    assert set(rated["quantity"]) == {"type I error", "power"} and rated["rejection_rate"].notna().all()
    assert (rated[rated["quantity"] == "power"]["calibration"] > 0).all()
    result = invoke("power", "--preset", "quick", "--panel", tmp_path / "x.json")
    assert result.exit_code == 2 and "--panel needs --raters" in result.stderr


def test_rated_outcomes_hold_their_size():
    """Null trials read by raters: every inferential test's rejection rate stays near alpha (small: 12 trials)."""
    import warnings

    from synthtrial.analyze.power import StudySettings, power_study, scenario_grid
    from synthtrial.trial.simulate import preset

    design, model = preset("quick")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, summary = power_study(scenario_grid([("quick", design, model)], effect_scales=[0.0]), replicates=12,
                                 settings=StudySettings(raters=(1, 5), outcomes=("oracle",),
                                                        methods=("period", "lmm", "gls_kinetics")))
    rated = summary[summary["outcome"].str.startswith("rated_count") & (summary["role"] == "inferential")]
    assert len(rated) and rated["tests"].min() >= 12
    # at 12 trials x 3 patients, alpha + 3 MC SE is about 0.16 (per patient) and 0.24 (pooled)
    limit = 0.05 + 3 * np.sqrt(0.05 * 0.95 / rated["tests"])
    assert (rated["rejection_rate"] <= limit).all(), rated[["outcome", "method", "level", "rejection_rate"]]
