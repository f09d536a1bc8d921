"""DermX evaluation: the prevalence table on a hand case, the paper's plausibility averaging on hand-computed
masks, and the whole evaluation (CLI included) on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.graders.dermx import CHARACTERISTICS, DermX, DermXConfig, DermXOutputs, fuzzy_scores
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


def test_map_scores_carry_the_chance_level_of_an_all_ones_map():
    from synthtrial.graders.dermx_eval import map_scores

    area = np.zeros((4, 4))
    area[0, :2] = 1.0                                    # 2 of 16 cells: f = 1/8
    cam = np.zeros((4, 4))
    cam[0, 0], cam[1, 1] = 1.0, 0.5
    f1, sens, spec, uniform, share = map_scores(cam, area)
    # sum min = 1; sum cam 1.5, sum area 2 -> 2 / 3.5; sens 1/2; spec: (14 - .5) / 14; uniform 2 * 2 / (16 + 2)
    assert (f1, sens, spec) == pytest.approx((2 / 3.5, 0.5, 13.5 / 14))
    assert uniform == pytest.approx(2 * (1 / 8) / (1 + 1 / 8)) and share == 0.125
    out = plausibility_summary([(0, True, map_scores(cam, area)), (0, True, fuzzy_scores(cam, area))], ["a"])
    assert out["plausibility_F1_uniform"] == pytest.approx(uniform)    # a record without it counts as missing
    assert out["per_characteristic"]["a"]["area_share"] == 0.125


def test_composition_and_side_by_side_on_hand_cases():
    from synthtrial.graders.dermx_eval import HEADLINE, composition, side_by_side

    names = ["open_comedo", "closed_comedo", "papule", "nodule"]
    present = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], bool)
    assert composition(present, names) == {"no_lesion": 1, "comedones_only": 2, "with_nodules": 1}
    frame = side_by_side({"DermX": {"level_accuracy": 0.5, "plausibility_F1": 0.2},
                          "DermX+": {"level_accuracy": 0.25}})
    assert list(frame.columns) == ["DermX", "DermX+"] and list(frame.index) == list(HEADLINE)
    assert frame.loc["level_accuracy"].tolist() == [0.5, 0.25]
    assert frame.loc["plausibility_F1", "DermX"] == 0.2 and np.isnan(frame.loc["plausibility_F1", "DermX+"])


def test_plausibility_pipeline_against_hand_pooled_areas(tiny_run, monkeypatch):
    """A network whose map is 1 on every cell and that finds every characteristic: its plausibility F1 is, per
    characteristic, the mean over the images that show it of 2 f / (1 + f), f the share of the 8 x 8 cells (16 px
    blocks of the 128 px image) that the explanation area touches -- computed here with a reshape, apart from
    the evaluation's max-pooling."""
    import torch

    from synthtrial.graders.dermx_train import image_truth
    from synthtrial.run import rundir

    torch.manual_seed(0)
    dermx = DermX(DermXConfig(image_size=64), device="cpu")
    n = len(CHARACTERISTICS)
    monkeypatch.setattr(dermx, "explain", lambda image, grid=False: np.ones((n, 8, 8), np.float32))
    monkeypatch.setattr(dermx, "outputs", lambda images: DermXOutputs(np.full((1, 4), 0.25), np.ones((1, n)), None,
                                                                      None))
    metrics = evaluate_dermx(dermx, tiny_run)
    manifest, lesions = rundir.read_manifest(tiny_run), rundir.read_lesions(tiny_run)
    expected: dict[int, list[float]] = {}
    for rel in manifest["image"]:
        has, areas = image_truth(tiny_run, rel, lesions[lesions["image"] == rel], CHARACTERISTICS, "visible")
        assert areas.shape[1:] == (128, 128)
        for c in np.flatnonzero(has):
            f = areas[c].reshape(8, 16, 8, 16).any(axis=(1, 3)).mean()
            expected.setdefault(c, []).append(2 * f / (1 + f))
    assert expected
    for c, values in expected.items():
        row = metrics["characteristics"][CHARACTERISTICS[c]]
        assert row["plausibility_F1"] == pytest.approx(np.mean(values))
        assert row["plausibility_F1_uniform"] == pytest.approx(np.mean(values))
        assert row["plausibility_sensitivity"] == pytest.approx(1.0)
    assert metrics["plausibility_F1"] == pytest.approx(np.mean([np.mean(v) for v in expected.values()]))


def test_two_weights_side_by_side_and_the_card(tiny_run, tmp_path):
    """DermX+ beside DermX: each model's metrics equal its own evaluation; --beside prints both, --card writes
    the figures (with the varied subset's) into the weights' evaluation.json, which the targets then read."""
    import torch

    from synthtrial.graders.cards import card_status, read_card, weights_sha256
    from synthtrial.graders.dermx_eval import evaluate_dermx_models

    torch.manual_seed(0)
    plain, plus = tmp_path / "dx", tmp_path / "dxplus"
    DermX(DermXConfig(image_size=64), device="cpu").save_pretrained(plain)
    DermX(DermXConfig(image_size=64, guided=True), device="cpu").save_pretrained(plus)
    a, b = DermX.from_pretrained(plain, device="cpu"), DermX.from_pretrained(plus, device="cpu")
    both = evaluate_dermx_models({"DermX": a, "DermX+": b}, tiny_run)
    alone = evaluate_dermx(b, tiny_run)
    assert json.dumps(both["DermX+"], sort_keys=True) == json.dumps(alone, sort_keys=True)
    assert set(both) == {"DermX", "DermX+"}
    (plain / "evaluation.json").write_text(json.dumps({"figures": {"held_out_portrait": {"level_accuracy": 0.9}},
                                                       "weights_sha256": "old"}))
    result = CliRunner().invoke(app, ["graders", "eval", "dermx", "--data", str(tiny_run), "--weights", str(plain),
                                      "--beside", str(plus), "--card", "held_out_seed", "--out",
                                      str(tmp_path / "m.json"), "-q"])
    assert result.exit_code == 0, result.output
    assert "side by side" in result.output and "DermX+" in result.output
    written = json.loads((tmp_path / "m.json").read_text())
    assert 0 < written["plausibility_F1_uniform_all_present"] <= 1
    assert written["beside"]["DermX+"]["level_accuracy"] == alone["level_accuracy"]
    card = read_card(plain)
    assert card["weights_sha256"] == weights_sha256(plain)
    assert set(card["figures"]) == {"held_out_seed", "varied_characteristics"}       # the stale figures dropped
    assert card["figures"]["held_out_seed"]["level_accuracy"] == round(both["DermX"]["level_accuracy"], 3)
    assert card["figures"]["varied_characteristics"]["characteristic_macro_f1"] == \
        round(both["DermX"]["characteristic_F1_macro_varied"], 3)
    assert "--card held_out_seed" in card["measured_by"]["held_out_seed"]
    status = card_status("dermx", plain)
    assert [c.value for c in status.checks][0] == card["figures"]["held_out_seed"]["level_accuracy"]
    bad = CliRunner().invoke(app, ["graders", "eval", "dermx", "--data", str(tiny_run), "--weights", str(plain),
                                   "--card", "varied_characteristics"])
    assert bad.exit_code == 2 and "--card must be one of" in bad.output


def test_level_figures_follow_the_weights_level_route(tiny_run, monkeypatch):
    """Count-head weights whose level comes from the count: the headline level accuracy and severity MAE are the
    count route's, and both routes' accuracies and the count's MAE stand beside them -- checked by hand against
    the manifest, with a count 2 above the truth and a diagnosis head that always says level 0."""
    from synthtrial.run import rundir
    from synthtrial.trial import scale

    manifest = rundir.read_manifest(tiny_run)
    truth = manifest["lesion_count"].to_numpy(float)
    n = len(CHARACTERISTICS)
    for route in ("count", "classifier"):
        dermx = DermX(DermXConfig(image_size=64, count_head=True, level_from=route), device="cpu")
        fed = iter(truth + 2.0)
        monkeypatch.setattr(dermx, "outputs", lambda images: DermXOutputs(
            np.array([[1.0, 0.0, 0.0, 0.0]]), np.ones((1, n)), np.array([next(fed)]), None))
        metrics = evaluate_dermx(dermx, tiny_run, plausibility=False)
        by_count = scale.acne04_level_from_count(truth + 2.0)
        levels = manifest["acne04_level"].to_numpy(int)
        assert metrics["level_from"] == route and metrics["count_MAE"] == pytest.approx(2.0)
        assert metrics["level_accuracy_count"] == pytest.approx((by_count == levels).mean())
        assert metrics["level_accuracy_classifier"] == pytest.approx((levels == 0).mean())
        if route == "count":
            assert metrics["level_accuracy"] == metrics["level_accuracy_count"]
            assert metrics["severity_MAE"] == pytest.approx(
                np.abs(scale.severity_from_count(truth + 2.0) - manifest["severity"].to_numpy(float)).mean())
        else:
            assert metrics["level_accuracy"] == metrics["level_accuracy_classifier"]
            assert metrics["severity_MAE"] == pytest.approx(manifest["severity"].to_numpy(float).mean())


def test_characteristic_count_errors_against_the_visible_lesions_by_hand(tiny_run, monkeypatch):
    """Weights with characteristic counts that say 1 of everything on every image: each characteristic's count
    MAE is the mean of |1 - its visible lesions on the image|, counted here from lesions.parquet."""
    from synthtrial.graders.dermx import LESION_TYPE
    from synthtrial.run import rundir

    manifest, lesions = rundir.read_manifest(tiny_run), rundir.read_lesions(tiny_run)
    n = len(CHARACTERISTICS)
    dermx = DermX(DermXConfig(image_size=64, characteristic_counts=True), device="cpu")
    monkeypatch.setattr(dermx, "outputs", lambda images: DermXOutputs(np.full((1, 4), 0.25), np.ones((1, n)),
                                                                      None, np.ones((1, n))))
    metrics = evaluate_dermx(dermx, tiny_run, plausibility=False)
    visible = lesions[lesions["visible"].to_numpy(bool)]
    expected = [np.mean([abs(1 - ((visible["image"] == rel) & (visible["type"] == LESION_TYPE[c])).sum())
                         for rel in manifest["image"]]) for c in CHARACTERISTICS]
    got = [metrics["characteristics"][c]["count_MAE"] for c in CHARACTERISTICS]
    np.testing.assert_allclose(got, expected)
    assert metrics["characteristic_count_MAE"] == pytest.approx(np.mean(expected))
    assert max(expected) > 1          # some characteristic has more than two lesions on an image of the run
