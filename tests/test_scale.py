"""The severity scale: monotone, invertible, and in agreement with the anchor's round(s)."""

import numpy as np
import pandas as pd
import pytest

from synthtrial.trial import scale


def test_count_knots_are_exact():
    s = [0.0, 0.5, 1.5, 2.5, 3.0]
    assert scale.expected_lesion_count(s).tolist() == [0.0, 5.5, 20.5, 50.5, 65.0]
    assert scale.expected_lesion_count(1.0) == pytest.approx(13.0)


def test_count_is_strictly_monotone_and_round_trips():
    s = np.linspace(0, 3, 3001)
    count = scale.expected_lesion_count(s)
    assert np.all(np.diff(count) > 0)
    np.testing.assert_allclose(scale.severity_from_count(count), s, atol=1e-12)
    c = np.linspace(0, 65, 1001)
    np.testing.assert_allclose(scale.expected_lesion_count(scale.severity_from_count(c)), c, atol=1e-12)


def test_acne04_level_from_integer_counts_follows_hayashi():
    counts = np.arange(0, 80)
    expected = np.select([counts <= 5, counts <= 20, counts <= 50], [0, 1, 2], 3)
    assert scale.acne04_level_from_count(counts).tolist() == expected.tolist()


def test_level_of_count_agrees_with_round_of_severity():
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 3, 20000)
    s = s[np.abs(np.mod(s, 1) - 0.5) > 1e-9]  # exact half-integers are ties that round() breaks to even
    anchor = np.minimum(np.round(s), 3).astype(int)
    assert (scale.acne04_level(s) == anchor).all()
    # the anchor format writes -0.0, which is level 0 and clips to +0.0
    assert scale.acne04_level(-0.0) == 0
    assert str(scale.clip_severity(-0.0)) == "0.0"


def test_levels_are_monotone_in_severity():
    s = np.linspace(0, 3, 601)
    assert np.all(np.diff(scale.acne04_level(s)) >= 0)
    assert np.all(np.diff(scale.expected_iga(s)) >= 0)
    assert scale.acne04_level(s)[[0, -1]].tolist() == [0, 3]
    assert scale.expected_iga(s)[[0, -1]].tolist() == [0, 4]


@pytest.mark.parametrize(("n", "nodules", "iga"), [
    (0, 0, 0), (1, 0, 1), (2, 0, 1), (3, 0, 2), (10, 0, 2), (11, 0, 3), (30, 0, 3), (31, 0, 4),
    (1, 1, 3), (2, 1, 3), (12, 1, 3), (40, 2, 4),
])
def test_iga_from_counts(n, nodules, iga):
    assert scale.iga_from_counts(n, nodules) == iga


def test_iga_rejects_impossible_counts():
    with pytest.raises(ValueError):
        scale.iga_from_counts(1, 2)
    with pytest.raises(ValueError):
        scale.iga_from_counts(-1)


def test_iga_group_is_quantificare_grouping():
    assert scale.iga_group([0, 1, 2, 3, 4]).tolist() == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError):
        scale.iga_group(5)


def test_lesion_mix_sums_to_one_and_nodules_only_when_severe():
    s = np.linspace(0, 3, 301)
    mix = scale.lesion_mix(s)
    np.testing.assert_allclose(sum(mix.values()), 1.0, atol=1e-12)
    assert (mix["nodule"][s <= 1.0] == 0).all()
    assert (mix["nodule"][s > 1.0] > 0).all()
    assert np.all(np.diff(scale.inflammatory_fraction(s)) > 0)


def test_vectorised_over_series_and_scalars():
    series = pd.Series([0.2, 1.2, 2.2])
    assert scale.acne04_level(series).tolist() == [0, 1, 2]
    assert np.ndim(scale.acne04_level(1.2)) == 0
    assert scale.expected_iga(np.array([[0.0, 3.0]])).shape == (1, 2)


def test_nan_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        scale.expected_lesion_count([1.0, float("nan")])


def test_scale_table():
    table = scale.scale_table()
    assert table["severity"].iloc[0] == 0 and table["severity"].iloc[-1] == 3
    assert table.loc[table["severity"] == 1.0, "acne04_name"].item() == "moderate"
    assert table.loc[table["severity"] == 3.0, "iga_name"].item() == "severe"
