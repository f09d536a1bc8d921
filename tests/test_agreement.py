"""Agreement of a simulated rater panel: the field's statistics, and the values the panel's parameters imply."""

import numpy as np
import pandas as pd
import pytest

from synthtrial.grade.agreement import agreement_table, expected_anova, icc_from_anova, observed_agreement
from synthtrial.grade.raters import Panel, Rater, draw_raters, panel_from_dict, read_all, reading_table


def papule_table(counts, seed=0):
    """Images holding ``counts`` fully developed 4 mm papules each (and nothing else)."""
    images = pd.DataFrame({"image": [f"i{k:04d}" for k in range(len(counts))], "calendar_day": 0.0})
    lesions = pd.DataFrame({"image": np.repeat(images["image"].to_numpy(), counts), "type": "papule",
                            "diameter_mm": 4.0, "intensity": 1.0})
    return images, lesions


#: Every lesion seen, nothing confused, no personal scale, drift or threshold shift: only what a test sets.
EXACT = {"ceiling": {t: 1.0 for t in ("open_comedo", "closed_comedo", "papule", "pustule", "nodule")},
         "d50_mm": {t: 0.0 for t in ("open_comedo", "closed_comedo", "papule", "pustule", "nodule")},
         "fading": 0.0, "confusion": {"mark": 0.0, "scar": 0.0}, "bias_sd": 0.0, "scale_sd": 0.0,
         "threshold_shift_sd": 0.0, "drift_sd": 0.0, "read_sd": 0.0, "read_cv": 0.0, "reread_fraction": 0.0}


def test_zero_noise_panel_agrees_perfectly():
    images, lesions = papule_table(np.arange(0, 60, 3))
    panel = panel_from_dict(EXACT)
    raters = draw_raters(panel, 4, seed=1)
    table = reading_table(images, lesions, panel)
    ratings = read_all(table, panel, raters, seed=1)
    assert (ratings.groupby("image_index")["count"].nunique() == 1).all()
    result = agreement_table(ratings, table, panel, raters, seed=1, simulations=3).set_index(["variable", "statistic"])
    for key in [("count", "ICC(2,1)"), ("count", "ICC(2,k)"), ("count", "alpha (interval)"),
                ("iga", "kappa (quadratic)"), ("iga", "alpha (ordinal)"), ("hayashi_level", "alpha (ordinal)")]:
        assert result.loc[key, "observed"] == pytest.approx(1.0), key
        assert result.loc[key, "implied"] == pytest.approx(1.0), key


def test_known_noise_panel_gives_the_icc_computed_by_hand():
    """Raters biased -2, 0, +2, read noise SD 2: ICC(2,1) = var(true) / (var(true) + var(bias) + 2^2 + 1/12)."""
    rng = np.random.default_rng(5)
    counts = rng.integers(12, 45, size=400)
    images, lesions = papule_table(counts)
    panel = panel_from_dict({**EXACT, "read_sd": 2.0, "raters": [{"bias": -2.0}, {"bias": 0.0}, {"bias": 2.0}]})
    raters = draw_raters(panel, 3, seed=0)
    var_true, var_bias, var_error = np.var(counts, ddof=1), 4.0, 4.0 + 1 / 12
    by_hand = var_true / (var_true + var_bias + var_error)
    by_hand_k = var_true / (var_true + (var_bias + var_error) / 3)
    table = reading_table(images, lesions, panel)
    ratings = read_all(table, panel, raters, seed=0)
    result = agreement_table(ratings, table, panel, raters, seed=0, simulations=20).set_index(["variable", "statistic"])
    icc = result.loc[("count", "ICC(2,1)")]
    assert icc["implied"] == pytest.approx(by_hand, abs=2e-3)  # the analytic value is the hand's
    assert abs(icc["observed"] - by_hand) < 4 * icc["mc_sd"] and icc["mc_sd"] < 0.02
    assert result.loc[("count", "ICC(2,k)"), "implied"] == pytest.approx(by_hand_k, abs=2e-3)
    retest = result.loc[("count", "test-retest SD")]
    assert np.isnan(retest["observed"])  # no rereads in this panel
    assert retest["implied"] == pytest.approx(np.sqrt(var_error), abs=1e-3)


def test_noisier_panel_agrees_less_and_the_implied_value_follows():
    counts = np.random.default_rng(2).integers(5, 40, size=150)
    images, lesions = papule_table(counts)
    values = []
    for read_sd in (1.0, 6.0):
        panel = panel_from_dict({**EXACT, "read_sd": read_sd, "bias_sd": 1.0})
        raters = draw_raters(panel, 4, seed=3)
        table = reading_table(images, lesions, panel)
        result = agreement_table(read_all(table, panel, raters, seed=3), table, panel, raters, seed=3,
                                 simulations=10).set_index(["variable", "statistic"])
        row = result.loc[("count", "ICC(2,1)")]
        assert abs(row["observed"] - row["implied"]) < 4 * row["mc_sd"] + 0.01
        values.append(row["implied"])
    assert values[1] < values[0] - 0.1


def test_expected_anova_of_a_fixed_table_reproduces_pingouin_and_krippendorff():
    """With no variance, the expected sums of squares are the table's own: the formulas must give the libraries'
    values exactly."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 30, size=(25, 4)).astype(float) + np.arange(4)
    ratings = pd.DataFrame({"image_index": np.repeat(np.arange(25), 4), "rater": np.tile(["a", "b", "c", "d"], 25),
                            "reread": False, "count": values.ravel(), "iga": 0, "hayashi_level": 0})
    observed = observed_agreement(ratings)
    mine = icc_from_anova(expected_anova(values, np.zeros_like(values)))
    for name in ("ICC(2,1)", "ICC(2,k)", "alpha (interval)"):
        assert mine[name] == pytest.approx(observed[("count", name)], abs=1e-9), name


def test_weighted_kappa_is_the_pairwise_mean():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(1)
    grades = rng.integers(0, 5, size=(40, 3))
    ratings = pd.DataFrame({"image_index": np.repeat(np.arange(40), 3), "rater": np.tile(["a", "b", "c"], 40),
                            "reread": False, "count": rng.integers(0, 9, 120), "iga": grades.ravel(),
                            "hayashi_level": 0})
    pairs = [cohen_kappa_score(grades[:, a], grades[:, b], weights="quadratic") for a, b in ((0, 1), (0, 2), (1, 2))]
    assert observed_agreement(ratings)[("iga", "kappa (quadratic)")] == pytest.approx(np.mean(pairs))


def test_one_rater_has_no_agreement_but_a_retest_sd():
    images, lesions = papule_table(np.arange(10, 40))
    panel = Panel(reread_fraction=1.0)
    raters = [Rater("solo")]
    table = reading_table(images, lesions, panel)
    result = agreement_table(read_all(table, panel, raters, seed=0), table, panel, raters, seed=0, simulations=3)
    rows = result.set_index(["variable", "statistic"])
    assert np.isnan(rows.loc[("count", "ICC(2,1)"), "observed"])
    assert rows.loc[("count", "test-retest SD"), "observed"] > 0


def _tabulated(reading, names):
    """The long table :func:`observed_agreement` reads, from a :func:`read_arrays` reading."""
    frames = []
    for k, name in enumerate(names):
        parts = [(np.arange(reading["count"].shape[1]), False, {c: reading[c][k] for c in ("count", "iga",
                                                                                            "hayashi_level")})]
        if reading["reread"] is not None:
            parts.append((reading["reread"][k][0], True, reading["reread"][k][1]))
        for idx, again, one in parts:
            frames.append(pd.DataFrame({"rater": name, "image_index": idx, "reread": again, "count": one["count"],
                                        "iga": one["iga"], "hayashi_level": one["hayashi_level"]}))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("case", ["default", "gappy"])
def test_array_agreement_equals_the_libraries(case):
    """The simulation's numpy statistics give pingouin's ICCs, sklearn's weighted kappa and the krippendorff
    package's alphas: on a default panel's reading, and on hand-made grades with unused levels between used ones
    (sklearn weights label indices, not values), a constant rater and two identical raters."""
    from synthtrial.grade.agreement import array_agreement, reading_of
    from synthtrial.grade.raters import read_arrays

    if case == "default":
        counts = np.random.default_rng(4).integers(0, 50, size=60)
        images, lesions = papule_table(counts)
        lesions["type"] = np.random.default_rng(5).choice(["papule", "open_comedo", "pustule", "nodule", "mark"],
                                                          len(lesions))
        lesions["diameter_mm"] = np.random.default_rng(6).uniform(0.5, 4.0, len(lesions))
        panel = Panel(reread_fraction=0.3)
        raters = draw_raters(panel, 4, seed=2)
        reading = read_arrays(reading_table(images, lesions, panel), panel, raters, seed=2)
    else:
        rng = np.random.default_rng(9)
        grades = rng.choice([0, 2, 4], size=(4, 50))
        grades[2] = 2           # a constant rater
        grades[3] = grades[0]   # two identical raters
        reading = {"count": rng.integers(0, 9, size=(4, 50)), "iga": grades,
                   "hayashi_level": rng.choice([1, 3], size=(4, 50)), "reread": None}
    names = [f"r{k}" for k in range(reading["count"].shape[0])]
    fast = array_agreement(reading)
    tabulated = _tabulated(reading, names)
    slow = observed_agreement(tabulated)
    again = array_agreement(reading_of(tabulated))
    assert list(fast) == list(slow)
    for key, value in slow.items():
        if np.isnan(value):
            assert np.isnan(fast[key]), key
        else:
            assert fast[key] == pytest.approx(value, abs=1e-9), key
        assert again[key] == fast[key] or (np.isnan(again[key]) and np.isnan(fast[key])), key
    if case == "default":
        assert np.isfinite(fast[("count", "test-retest SD")])
