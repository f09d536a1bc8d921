"""Visibility of each lesion on the written image (contrast to a ring of lesion-free skin, area, the visible flag),
measured on hand-built images whose answer is known; and the count evaluation against both truths."""

import math

import numpy as np
import pandas as pd
import pytest
from skimage.color import deltaE_cie76, rgb2lab

from synthtrial.grade.evaluate import COUNT_METRICS, count_agreement, evaluate_count
from synthtrial.render.visibility import (MIN_AREA_PX, RING_PX, VISIBLE_DELTA_E, WIDE_RING_PX, is_visible,
                                          measure_visibility)

SKIN = (200, 160, 140)
RED = (180, 90, 90)


def delta_e(a, b) -> float:
    return float(deltaE_cie76(rgb2lab(np.uint8([[a]])), rgb2lab(np.uint8([[b]])))[0, 0])


def scene(size: int = 60):
    return np.full((size, size, 3), SKIN, np.uint8), np.zeros((size, size), np.uint16)


def put(image, labels, lesion_id, rows, cols, colour):
    image[rows, cols] = colour
    labels[rows, cols] = lesion_id + 1


def test_a_lesion_of_known_colour_on_uniform_skin_gives_the_known_delta_e():
    image, labels = scene()
    put(image, labels, 5, slice(20, 26), slice(20, 26), RED)
    out = measure_visibility(image, labels, [5])
    assert out.loc[0, "area_px"] == 36
    assert out.loc[0, "contrast"] == pytest.approx(delta_e(SKIN, RED), abs=1e-3)
    assert delta_e(SKIN, RED) > 30 and bool(out.loc[0, "visible"])


def test_a_lesion_the_colour_of_the_skin_is_not_visible():
    image, labels = scene()
    labels[20:26, 20:26] = 1  # lesion 0, drawn in the skin's own colour
    out = measure_visibility(image, labels, [0])
    assert out.loc[0, "contrast"] == 0.0 and not out.loc[0, "visible"] and out.loc[0, "area_px"] == 36


def test_an_empty_mask_is_not_visible():
    image, labels = scene()
    put(image, labels, 1, slice(5, 9), slice(5, 9), RED)
    out = measure_visibility(image, labels, [1, 7])  # lesion 7 has no pixel (turned away, say)
    assert out["area_px"].tolist() == [16, 0]
    assert math.isnan(out.loc[1, "contrast"]) and out["visible"].tolist() == [True, False]
    empty = measure_visibility(image, np.zeros_like(labels), [])
    assert list(empty.columns) == ["area_px", "contrast", "signal", "visible"] and empty.empty


def test_a_strong_lesion_below_the_least_area_is_not_visible():
    image, labels = scene()
    put(image, labels, 0, slice(10, 11), slice(10, 13), RED)  # 3 pixels
    put(image, labels, 1, slice(30, 32), slice(30, 32), RED)  # 4 pixels
    out = measure_visibility(image, labels, [0, 1])
    assert out["area_px"].tolist() == [3, MIN_AREA_PX]
    assert out["visible"].tolist() == [False, True]


def test_the_ring_leaves_out_other_lesions_and_non_skin():
    """A neighbour lesion (black) and a non-skin band (blue) touch the lesion: neither may enter its ring."""
    image, labels = scene()
    put(image, labels, 0, slice(20, 26), slice(20, 26), RED)
    put(image, labels, 1, slice(20, 26), slice(26, 30), (0, 0, 0))
    image[14:20, :] = (0, 0, 255)
    skin = np.ones(labels.shape, bool)
    skin[14:20, :] = False
    with_skin = measure_visibility(image, labels, [0], skin=skin)
    assert with_skin.loc[0, "contrast"] == pytest.approx(delta_e(SKIN, RED), abs=1e-3)
    without = measure_visibility(image, labels, [0])  # skin unknown: the blue band counts as surround
    assert abs(without.loc[0, "contrast"] - delta_e(SKIN, RED)) > 1


def test_a_walled_in_lesion_uses_the_wide_ring_or_has_no_contrast():
    image, labels = scene(80)
    put(image, labels, 0, slice(30, 34), slice(30, 34), RED)
    # wall of another lesion RING_PX wide all round: the first ring holds no lesion-free skin
    wall = np.zeros(labels.shape, bool)
    wall[30 - RING_PX:34 + RING_PX, 30 - RING_PX:34 + RING_PX] = True
    wall[30:34, 30:34] = False
    image[wall], labels[wall] = (0, 0, 0), 2
    out = measure_visibility(image, labels, [0])
    assert out.loc[0, "contrast"] == pytest.approx(delta_e(SKIN, RED), abs=1e-3)
    skin = np.zeros(labels.shape, bool)  # no skin within the wide ring either
    skin[:30 - WIDE_RING_PX - 1] = True
    out = measure_visibility(image, labels, [0], skin=skin)
    assert math.isnan(out.loc[0, "contrast"]) and not out.loc[0, "visible"] and out.loc[0, "area_px"] == 16


def test_a_lesion_table_keeps_its_index_and_bad_input_is_refused():
    image, labels = scene()
    put(image, labels, 3, slice(10, 14), slice(10, 14), RED)
    table = pd.DataFrame({"lesion_id": [9, 3], "type": ["papule", "mark"]}, index=[40, 41])
    out = measure_visibility(image, labels, table)
    assert out.index.tolist() == [40, 41] and out["visible"].tolist() == [False, True]
    with pytest.raises(ValueError, match="uint8 RGB"):
        measure_visibility(image.astype(float), labels, [3])
    with pytest.raises(ValueError, match="instance_mask"):
        measure_visibility(image, labels[:10], [3])
    with pytest.raises(ValueError, match="lesion ids"):
        measure_visibility(image, labels, [-1])


def test_the_rule_at_its_thresholds():
    at = [VISIBLE_DELTA_E, VISIBLE_DELTA_E - 1e-6, VISIBLE_DELTA_E, float("nan")]
    area = [MIN_AREA_PX, MIN_AREA_PX, MIN_AREA_PX - 1, 100]
    assert is_visible(at, area).tolist() == [True, False, False, False]
    signal = [VISIBLE_DELTA_E - 1e-6, float("nan"), VISIBLE_DELTA_E, 50.0]  # NaN: no reference, the rule as before
    assert is_visible([20.0] * 4, [100] * 4, signal).tolist() == [False, True, True, True]


def test_the_signal_is_what_the_lesion_changed_not_the_texture_under_it():
    """On a textured face a spot with nothing drawn can differ from its ring (contrast) though it changed
    nothing: against the lesion-free reference its signal is 0 and it is not visible. A lesion drawn onto the
    same texture has the signal of its own colour change."""
    reference = np.full((60, 60, 3), SKIN, np.uint8)
    reference[20:26, 20:26] = (150, 120, 105)          # a dark patch of skin: texture, no lesion
    image, labels = reference.copy(), np.zeros((60, 60), np.uint16)
    labels[20:26, 20:26] = 1                           # lesion 0 lies on that patch and changed nothing
    put(image, labels, 1, slice(40, 46), slice(40, 46), RED)  # lesion 1 drawn onto plain skin
    out = measure_visibility(image, labels, [0, 1], reference=reference)
    assert out.loc[0, "contrast"] == pytest.approx(delta_e(SKIN, (150, 120, 105)), abs=1e-3)
    assert out.loc[0, "contrast"] > VISIBLE_DELTA_E
    assert out.loc[0, "signal"] == 0.0 and not out.loc[0, "visible"]
    assert out.loc[1, "signal"] == pytest.approx(delta_e(SKIN, RED), abs=1e-3) and bool(out.loc[1, "visible"])
    without = measure_visibility(image, labels, [0, 1])  # no reference: the signal is unknown
    assert without["signal"].isna().all() and without["visible"].tolist() == [True, True]
    half = image.copy()
    half[40:46, 40:43] = SKIN                          # half the lesion's pixels changed: half the mean shift
    lab = rgb2lab(np.uint8([[SKIN, RED]]))[0]
    expected = float(np.linalg.norm(lab[1] - lab[0]) / 2)
    assert measure_visibility(half, labels, [1], reference=reference).loc[0, "signal"] == pytest.approx(expected,
                                                                                                         abs=1e-3)
    with pytest.raises(ValueError, match="reference"):
        measure_visibility(image, labels, [0], reference=reference[:30])


def test_the_procedural_renderer_leaves_its_photo_as_the_reference():
    """``draws_onto_photo``: outside the lesions' footprints the procedural output is the photo bit for bit,
    so the photo is a valid lesion-free reference."""
    from synthtrial.render.procedural import LesionSpec, ProceduralRenderer

    rng = np.random.default_rng(0)
    photo = np.clip(rng.normal(170, 12, (96, 96, 3)), 0, 255).astype(np.uint8)
    spec = LesionSpec(lesion_id=0, type="papule", cx=48.0, cy=48.0, radius_px=4.0, intensity=1.0, seed=3)
    renderer = ProceduralRenderer()
    assert renderer.draws_onto_photo
    result = renderer(photo, [spec], skin_mask=np.ones((96, 96), bool), seed=1)
    changed = (result.image != photo).any(axis=2)
    assert changed.any() and not changed[:, :30].any() and not changed[:, 66:].any()
    labels = result.masks[0].astype(np.uint16)
    out = measure_visibility(result.image, labels, [0], reference=photo)
    assert out.loc[0, "signal"] > VISIBLE_DELTA_E


# ------------------------------------------------------------------------------- the count against both truths

def test_count_agreement_against_hand_computed_values():
    count = [2, 4, 6, 9, 1, 1, 5]
    truth = [1, 4, 8, 9, 3, 2, 1]
    patients = ["a", "a", "a", "a", "b", "b", "b"]
    got = count_agreement(count, truth, patients)
    errors = np.array([1, 0, -2, 0, -2, -1, 4])
    assert got["n"] == 7
    assert got["mae"] == pytest.approx(10 / 7) and got["bias"] == pytest.approx(0.0)
    assert got["rmse"] == pytest.approx(math.sqrt((errors ** 2).sum() / 7))
    # Pearson by hand: centred sums
    c, t = np.array(count) - 4, np.array(truth) - 4
    assert got["pearson_r"] == pytest.approx((c * t).sum() / math.sqrt((c * c).sum() * (t * t).sum()))
    # patient a: ranks agree exactly (r 1); patient b: count ranks 1.5 1.5 3, truth 3 2 1 -> r = -0.866
    assert got["within_patients"] == 2
    assert got["within_spearman_median"] == pytest.approx((1.0 - math.sqrt(3) / 2) / 2)


def test_count_agreement_leaves_out_missing_counts_and_flat_patients():
    got = count_agreement([1, float("nan"), 3, 5, 5, 5], [1, 2, 3, 4, 5, 6], ["a", "a", "a", "b", "b", "b"])
    assert got["n"] == 5 and got["mae"] == pytest.approx(2 / 5)
    assert got["within_patients"] == 0 and math.isnan(got["within_spearman_median"])  # a has 2 images, b is flat
    assert math.isnan(count_agreement([1], [1])["pearson_r"])


def test_evaluate_count_judges_against_the_simulated_and_the_visible_truth():
    manifest = pd.DataFrame({"patient_id": ["a"] * 4, "lesion_count": [10, 20, 30, 40],
                             "visible_count": [5, 10, 15, 20]})
    table = evaluate_count(manifest, [5, 10, 15, 20])  # a perfect reader of the visible lesions
    assert table.index.tolist() == ["simulated", "visible"] and list(table.columns) == list(COUNT_METRICS)
    assert table.loc["visible", "mae"] == 0 and table.loc["visible", "within_spearman_median"] == 1
    assert table.loc["simulated", "bias"] == -12.5 and table.loc["simulated", "spearman_r"] == 1
    with pytest.raises(Exception, match="visible_count"):
        evaluate_count(manifest.drop(columns="visible_count"), [1, 2, 3, 4])
    with pytest.raises(ValueError, match="one value per manifest row"):
        evaluate_count(manifest, [1, 2])
