"""DermX evaluation: the prevalence table on a hand case, the paper's plausibility averaging on hand-computed
masks, and the whole evaluation (CLI included) on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.graders.dermx import CHARACTERISTICS, DermX, DermXConfig, fuzzy_scores
from synthtrial.graders.dermx_eval import evaluate_dermx, plausibility_summary, prevalence_table, varied_subset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prevalence_table_on_a_hand_case():
    truth = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 1]])
    predicted = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    table = prevalence_table(truth, predicted, ["a", "b", "c"])
    assert table["prevalence"].tolist() == [1.0, 0.5, 0.25]
    assert table["absent"].tolist() == [0.0, 0.5, 0.75]
    assert table["support"].tolist() == [4, 2, 1]
    # a: tp 3, fn 1 -> precision 1, recall .75, F1 6/7; b: tp 1, fp 1, fn 1 -> .5 / .5 / .5; c: tp 0 -> 0
    assert table.loc["a", ["precision", "recall", "F1"]].tolist() == pytest.approx([1.0, 0.75, 6 / 7])
    assert table.loc["b", ["precision", "recall", "F1"]].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert table.loc["c", ["precision", "recall", "F1"]].tolist() == [0.0, 0.0, 0.0]


def test_varied_subset_keeps_every_characteristic_absent_from_a_quarter():
    # 'a' on 9 of 10 images, 'b' on 5, 'c' on none: 'a' is absent from one image only, so the subset keeps that
    # one and three with 'a' -- dropping first the images that also have 'b' while 'b' is not short, the last
    # such image on a tie
    truth = np.zeros((10, 3), bool)
    truth[:9, 0] = True
    truth[[0, 2, 4, 6, 8], 1] = True
    keep = varied_subset(truth)
    assert keep.sum() == 4 and keep[9]
    assert (~truth[keep]).mean(axis=0)[0] == 0.25
    assert keep.tolist() == [True, True, True, False, False, False, False, False, False, True]
    assert varied_subset(np.ones((4, 2), bool)).all()         # never absent: nothing to vary, all kept
    balanced = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool)
    assert varied_subset(balanced).all()


def test_fuzzy_scores_on_hand_computed_maps():
    cam = np.array([[1.0, 0.5], [0.0, 0.25]])
    area = np.array([[1.0, 1.0], [0.0, 0.0]])
    # sum min = 1.5; sum cam 1.75, sum area 2; sum min(1 - cam, 1 - area) = 0 + 0 + 1 + .75; sum(1 - area) = 2
    assert fuzzy_scores(cam, area) == pytest.approx((3 / 3.75, 0.75, 0.875))
    f1, sens, spec = fuzzy_scores(np.zeros((2, 2)), np.zeros((2, 2)))
    assert np.isnan(f1) and np.isnan(sens) and spec == 1.0


def test_plausibility_is_averaged_over_found_characteristics_then_over_characteristics():
    """Two characteristics: 'a' found on two images (F1 1 and 2/3) and missed on a third (F1 0), 'b' found once
    (F1 0.2). The paper's mean: per characteristic over the images where it was found (a 5/6, b .2), then over
    characteristics; over every image with the characteristic: a 5/9, b .2."""
    half = np.array([[1.0, 1.0], [0.0, 0.0]])
    quarter = np.array([[1.0, 0.0], [0.0, 0.0]])
    ninth = np.zeros((3, 3))
    ninth[0, 0] = 1.0
    records = [(0, True, fuzzy_scores(half, half)),              # F1 1
               (0, True, fuzzy_scores(np.ones((2, 2)), half)),   # 2 * 2 / (4 + 2) = 2/3
               (0, False, fuzzy_scores(quarter, 1 - quarter)),   # no overlap: 0
               (1, True, fuzzy_scores(np.ones((3, 3)), ninth))]  # 2 * 1 / (9 + 1) = .2
    assert [r[2][0] for r in records] == pytest.approx([1.0, 2 / 3, 0.0, 0.2])
    out = plausibility_summary(records, ["a", "b"])
    a_found = (1.0 + 2 / 3) / 2
    assert out["plausibility_F1"] == pytest.approx((a_found + 0.2) / 2)
    assert out["plausibility_F1_all_present"] == pytest.approx(((1.0 + 2 / 3 + 0.0) / 3 + 0.2) / 2)
    assert out["per_characteristic"]["a"]["samples"] == 2 and out["per_characteristic"]["b"]["samples"] == 1
    assert out["per_characteristic"]["b"]["sensitivity"] == pytest.approx(1.0)
    assert np.isnan(plausibility_summary([], ["a"])["plausibility_F1"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import render_small_run

    return render_small_run(tmp_path_factory, "dermx-eval", "B", "hopper", [2.8, 0.1, 1.6, 0.6], size=128, seed=4)


def test_evaluation_on_a_tiny_run_and_its_cli(tiny_run, tmp_path):
    import torch

    torch.manual_seed(0)
    folder = tmp_path / "w"
    DermX(DermXConfig(image_size=64), device="cpu").save_pretrained(folder)
    grader = DermX.from_pretrained(folder, device="cpu")
    metrics = evaluate_dermx(grader, tiny_run)
    assert metrics["images"] == 4 and metrics["truth"] == "visible"
    assert sum(metrics["level_true"]) == sum(metrics["level_predicted"]) == 4
    table = metrics["characteristics"]
    assert set(table) == set(CHARACTERISTICS)
    for row in table.values():
        assert row["prevalence"] + row["absent"] == pytest.approx(1.0)
        assert row["prevalence"] <= row["prevalence_simulated"]        # visible lesions are among the simulated
    assert metrics["rarely_absent"] == [c for c in CHARACTERISTICS if table[c]["absent"] < 0.25]
    assert metrics["every_characteristic_absent_from_a_quarter"] == (not metrics["rarely_absent"])
    assert 1 <= metrics["varied_images"] <= 4
    assert 0 <= metrics["plausibility_F1_all_present"] <= 1
    no_maps = evaluate_dermx(grader, tiny_run, plausibility=False)
    assert "plausibility_F1" not in no_maps and no_maps["level_accuracy"] == metrics["level_accuracy"]
    result = CliRunner().invoke(app, ["graders", "eval", "dermx", "--data", str(tiny_run), "--weights", str(folder),
                                      "--out", str(tmp_path / "m.json"), "-q"])
    assert result.exit_code == 0, result.output
    assert "closed_comedo" in result.output and "prev." in result.output and "plausibility_F1" in result.output
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["characteristics"]["papule"]["prevalence"] == pytest.approx(table["papule"]["prevalence"])
