"""The detector's count calibration (graders/detector_count.py): the visible count's threshold, per-class weights
on counts or on soft counts (score sums), the monotone curve, and a calibrated detector that counts by them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthtrial.graders.base import GraderError
from synthtrial.graders.detector import CLASSES, DetectorConfig, LesionDetector
from synthtrial.graders.detector_count import (calibrate, calibrate_threshold, fit_count_curve, fit_count_weights,
                                               target_counts)
from synthtrial.graders.detector_train import DetectionData

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAPULE, COMEDO, SCAR = CLASSES.index("papule"), CLASSES.index("open_comedo"), CLASSES.index("scar")


def tiny_detector(**config) -> LesionDetector:
    torch.manual_seed(0)
    return LesionDetector(DetectorConfig(**{"image_side": 96, "tile": 64, "infer_tile": 96, **config}), device="cpu")


def found_of(labels, scores):
    labels = np.asarray(labels, np.int64)
    return {"labels": labels, "scores": np.asarray(scores, np.float64), "boxes": np.zeros((len(labels), 4))}


def data_of(truth):
    n = len(truth)
    return DetectionData([np.zeros((8, 8, 3), np.uint8)] * n, [np.zeros((0, 4))] * n, [np.zeros(0)] * n, CLASSES,
                         ["x"] * n, np.asarray(truth, float))


def test_count_weights_map_detections_to_the_simulated_count():
    detector = tiny_detector()
    rng = np.random.default_rng(1)
    found, truth = [], []
    for _ in range(30):
        n_pap, n_com, n_scar = rng.integers(0, 20, 3)
        labels = np.r_[np.full(n_pap, PAPULE), np.full(n_com, COMEDO), np.full(n_scar, SCAR)]
        found.append(found_of(labels, np.full(len(labels), 0.9)))
        truth.append(3.0 + 1.0 * n_pap + 2.0 * n_com)        # every seen comedo stands for two simulated ones
    weights, bias = fit_count_weights(detector, data_of(truth), 0.5, (np.arange(30), found))
    assert weights[PAPULE] == pytest.approx(1.0, abs=1e-3) and weights[COMEDO] == pytest.approx(2.0, abs=1e-3)
    assert weights[SCAR] == 0.0 and bias == pytest.approx(3.0, abs=1e-3)
    assert weights[CLASSES.index("nodule")] == 0.0          # never detected in the sample: no weight
    stray = [found_of(np.r_[f["labels"], [CLASSES.index("nodule")] * (k == 0)], np.r_[f["scores"], [0.9] * (k == 0)])
             for k, f in enumerate(found)]
    assert fit_count_weights(detector, data_of(truth), 0.5, (np.arange(30), stray))[0][CLASSES.index("nodule")] == 0
    calibrated = LesionDetector(DetectorConfig(image_side=96, tile=64, infer_tile=96, count_weights=weights,
                                               count_bias=bias), detector.model, device="cpu")
    row = calibrated.counts(found[0], threshold=0.5)
    assert row["count"] == pytest.approx(truth[0], abs=1e-2)
    assert row["visible_count"] == row["n_papule"] + row["n_open_comedo"]      # scars are not counted
    with pytest.raises(GraderError, match="count_weights"):
        DetectorConfig(count_weights=(1.0, 2.0))


def test_soft_counts_sum_the_scores_from_the_floor_on():
    detector = tiny_detector()
    found = found_of([PAPULE, PAPULE, PAPULE, COMEDO, SCAR], [0.9, 0.4, 0.05, 0.6, 0.8])
    hard = detector.count_features(found, threshold=0.5)
    assert hard[PAPULE] == 1 and hard[COMEDO] == 1 and hard[SCAR] == 1 and hard.sum() == 3
    soft = detector.count_features(found, soft_floor=0.1)
    assert soft[PAPULE] == pytest.approx(1.3) and soft[COMEDO] == pytest.approx(0.6) and soft[SCAR] == pytest.approx(0.8)
    assert detector.count_features(found_of([], []), soft_floor=0.1).tolist() == [0.0] * len(CLASSES)
    # weights fitted on soft counts recover the rule that made the truth
    rng = np.random.default_rng(2)
    sample, truth = [], []
    for _ in range(40):
        scores = rng.uniform(0.05, 1.0, rng.integers(0, 30))
        sample.append(found_of(np.full(len(scores), PAPULE), scores))
        truth.append(2.0 + 1.5 * scores[scores >= 0.2].sum())
    weights, bias = fit_count_weights(detector, data_of(truth), 0.5, (np.arange(40), sample), soft_floor=0.2)
    assert weights[PAPULE] == pytest.approx(1.5, abs=1e-3) and bias == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(GraderError, match="count_soft_floor"):
        DetectorConfig(count_soft_floor=1.0)


def test_the_count_curve_is_the_isotonic_fit_and_counts_through_it():
    # hand-computed: the violating pair (3, 2) pools to 2.5
    assert fit_count_curve([1, 2, 3, 4], [1, 3, 2, 4]) == ((1.0, 1.0), (2.0, 2.5), (3.0, 2.5), (4.0, 4.0))
    assert fit_count_curve([1, 1, 1], [0, 2, 4]) == ()
    with pytest.raises(GraderError, match="3 estimates but 2 counts"):
        fit_count_curve([1, 2, 3], [1, 2])
    curve = ((2.0, 0.0), (6.0, 4.0), (10.0, 20.0))
    detector = tiny_detector(count_weights=(0, 0, 1, 0, 0, 0), count_bias=1.0, count_curve=curve)
    # linear estimate 1 + n_papule; then the curve, flat beyond its ends
    assert [float(detector.count_from_features(np.eye(6)[PAPULE] * n)) for n in (0, 3, 5, 7, 30)] == [
        0.0, 2.0, 4.0, 12.0, 20.0]
    assert detector.counts(found_of([PAPULE] * 7, [0.9] * 7))["count"] == pytest.approx(12.0)
    for bad in (((1.0, 2.0),), ((1.0, 2.0), (1.0, 3.0)), ((1.0, 3.0), (2.0, 2.0)), ((1.0, -1.0), (2.0, 0.0))):
        with pytest.raises(GraderError, match="count_curve"):
            DetectorConfig(count_curve=bad)


def test_calibrated_threshold_minimises_count_error(toy_detection_data):
    data = toy_detection_data
    detector = tiny_detector()
    t = calibrate_threshold(detector, data)
    found = [detector.detect(im) for im in data.images]

    def mae(th):
        return np.mean([abs(((f["scores"] >= th) & (f["labels"] != SCAR)).sum() - 4) for f in found])
    assert mae(t) <= min(mae(th) for th in np.arange(0.05, 0.951, 0.05)) + 1e-9


def test_calibrate_fits_everything_on_the_sample_and_saves_it(toy_detection_data, tmp_path):
    data = toy_detection_data
    data.true_counts = np.array([4.0, 6.0, 8.0])
    detector = calibrate(tiny_detector(), data, images=3, soft_floor=0.1, source="toy images")
    cfg = detector.config
    assert cfg.count_soft_floor == 0.1 and cfg.count_weights and target_counts(data).tolist() == [4, 4, 4]
    assert detector.record["count_calibration"] == {"images": 3, "source": "toy images", "soft_floor": 0.1,
                                                    "curve": True}
    predicted = [detector.counts(detector.detect(im))["count"] for im in data.images]
    # the curve is monotone in the linear estimate and its points are means of the sample's counts
    assert all(4.0 <= p <= 8.0 for p in predicted)
    detector.save_pretrained(tmp_path / "d")
    again = LesionDetector.from_pretrained(tmp_path / "d", device="cpu")
    assert again.config == cfg
    assert [again.counts(again.detect(im))["count"] for im in data.images] == predicted
    with pytest.raises(GraderError, match="at least 2 images"):
        calibrate(detector, data, images=1)


def test_cli_recalibrates_saved_weights_without_touching_the_network(tmp_path_factory, tmp_path):
    import json

    from typer.testing import CliRunner

    from conftest import render_small_run
    from synthtrial.cli import app

    run = render_small_run(tmp_path_factory, "calibrate", "C", "astronaut", [2.5, 0.5, 3.0], size=128, seed=5)
    folder = tmp_path / "start"
    tiny_detector(image_side=128, infer_tile=128).save_pretrained(folder)
    out = tmp_path / "calibrated"
    result = CliRunner().invoke(app, ["graders", "calibrate", "detector", "--weights", str(folder), "--data", str(run),
                                      "--out", str(out), "--images", "3", "--soft-floor", "0.2", "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["count_soft_floor"] == 0.2 and len(config["count_weights"]) == len(CLASSES)
    assert config["training"]["count_calibration"]["images"] == 3 and "soft floor 0.20" in result.output
    bad = CliRunner().invoke(app, ["graders", "calibrate", "detector", "--weights", str(folder), "--data", str(tmp_path),
                                   "--out", str(tmp_path / "x"), "-q"])
    assert bad.exit_code == 2 and "not a run directory" in bad.output and not (tmp_path / "x").exists()
    onto_run = CliRunner().invoke(app, ["graders", "calibrate", "detector", "--weights", str(folder), "--data",
                                        str(run), "--out", str(run), "-q"])
    assert onto_run.exit_code == 2 and "is a run directory" in onto_run.output
