"""The detector's training recipe (``synthtrial.graders.detector_train``): visible targets, crops where lesions
are, anchors fitted to the lesion sizes, and evaluation against the visible truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthtrial.graders.base import GraderError
from synthtrial.graders.detector import CLASSES, DetectorConfig, build_model
from synthtrial.graders.detector_train import (DetectionData, coco_stats, crop_origin, fit_anchor_sizes,
                                               load_run_data)
from synthtrial.run import rundir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One patient, two days of one portrait at 256 px, severe (many lesions, some invisible)."""
    from synthtrial.run.generation import generate

    folder = tmp_path_factory.mktemp("dettrain")
    pd.DataFrame({"patient_id": ["A1", "A1"], "day": [1, 2], "treatment": ["Control"] * 2, "severity": [3.0, 2.5],
                  "face": ["astronaut"] * 2}).to_csv(folder / "p.csv", index=False)
    return generate(folder / "p.csv", folder / "run", size=256, seed=5, progress=False)


def test_visible_only_keeps_exactly_the_visible_lesions(tiny_run):
    every = load_run_data([tiny_run], 256)
    seen = load_run_data([tiny_run], 256, visible_only=True)
    lesions = rundir.read_lesions(tiny_run)
    lesions = lesions[lesions["type"].isin(CLASSES)]
    assert sum(len(b) for b in every.boxes) == len(lesions)
    assert sum(len(b) for b in seen.boxes) == int(lesions["visible"].sum())
    assert 0 < int(lesions["visible"].sum()) < len(lesions)      # the fixture has both kinds
    np.testing.assert_array_equal(seen.true_counts, every.true_counts)   # counts stay the simulated ones


def test_visible_only_refuses_a_run_without_visibility(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(tiny_run, copy)
    table = pd.read_parquet(copy / rundir.LESIONS).drop(columns=["visible"])
    table.to_parquet(copy / rundir.LESIONS)
    with pytest.raises(GraderError, match="no 'visible' column"):
        load_run_data([copy], 256, visible_only=True)


def test_focused_crops_hold_a_lesion_and_stay_inside():
    rng = np.random.default_rng(0)
    boxes = np.array([[400.0, 300.0, 408.0, 308.0]], np.float32)
    for _ in range(200):
        x, y = crop_origin((512, 512, 3), boxes, 128, 1.0, rng)
        assert 0 <= x <= 384 and 0 <= y <= 384
        assert x <= 400 and 408 <= x + 128 and y <= 300 and 308 <= y + 128    # a quarter-tile jitter keeps it in
    uniform = [crop_origin((512, 512, 3), boxes, 128, 0.0, rng) for _ in range(400)]
    inside = np.mean([x <= 400 and 408 <= x + 128 and y <= 300 and 308 <= y + 128 for x, y in uniform])
    assert inside < 0.2                                     # without focus most crops miss this lesion
    assert crop_origin((100, 90, 3), boxes[:0], 128, 1.0, rng) == (0, 0)   # a small image: the crop is padded


def test_anchor_sizes_follow_the_lesion_sizes():
    sizes = np.array([2, 3, 3, 4, 5, 6, 8, 10, 12, 14, 18, 30], np.float32)
    boxes = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], 1)
    data = DetectionData([np.zeros((8, 8, 3), np.uint8)], [boxes], [np.zeros(len(sizes), np.int64)], CLASSES,
                         ["x"], np.array([12.0]))
    anchors = fit_anchor_sizes(data)
    # midpoints of six equal-mass bins of the sizes: the 1/12, 3/12, ..., 11/12 quantiles, rounded
    expected = np.round(np.quantile(sizes, np.arange(1, 12, 2) / 12)).astype(int)
    assert anchors[0] == max(2, expected[0]) and anchors[-1] == expected[-1]
    assert list(anchors) == sorted(set(anchors))            # strictly increasing
    model = build_model(DetectorConfig(anchor_sizes=anchors, anchors_per_level=2))
    assert model.rpn.anchor_generator.num_anchors_per_location() == [6, 6, 6]
    with pytest.raises(GraderError, match="anchor_sizes"):
        DetectorConfig(anchor_sizes=(4, 8, 16, 32), anchors_per_level=2)


def test_ignore_regions_neither_miss_nor_match():
    images = [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}]
    seen = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 6.0, 6.0], "area": 36.0, "iscrowd": 0}
    hidden = {"id": 2, "image_id": 1, "category_id": 3, "bbox": [40.0, 40.0, 6.0, 6.0], "area": 36.0, "iscrowd": 0}
    found = [{"image_id": 1, "category_id": 3, "score": 0.9, "bbox": [10.0, 10.0, 6.0, 6.0]}]
    everything = coco_stats(images, [seen, hidden], found, CLASSES)
    visible = coco_stats(images, [seen, {**hidden, "iscrowd": 1}], found, CLASSES)
    assert visible[1] == pytest.approx(1.0)                 # the one visible lesion is found: AP50 1
    assert everything[1] < 0.6                              # the hidden one counts as missed: recall 1/2
    on_hidden = found + [{"image_id": 1, "category_id": 3, "score": 0.95, "bbox": [40.0, 40.0, 6.0, 6.0]}]
    assert coco_stats(images, [seen, {**hidden, "iscrowd": 1}], on_hidden, CLASSES)[1] == pytest.approx(1.0)
    assert np.isnan(coco_stats(images, [seen], [], CLASSES)).all()


def test_count_weights_map_detections_to_the_simulated_count():
    import torch

    from synthtrial.graders.detector import LesionDetector
    from synthtrial.graders.detector_train import fit_count_weights

    torch.manual_seed(0)
    detector = LesionDetector(DetectorConfig(image_side=96, tile=64, infer_tile=96), device="cpu")
    papule, comedo, scar = CLASSES.index("papule"), CLASSES.index("open_comedo"), CLASSES.index("scar")
    rng = np.random.default_rng(1)
    found, truth = [], []
    for _ in range(30):
        n_pap, n_com, n_scar = rng.integers(0, 20, 3)
        labels = np.r_[np.full(n_pap, papule), np.full(n_com, comedo), np.full(n_scar, scar)].astype(np.int64)
        found.append({"labels": labels, "scores": np.full(len(labels), 0.9), "boxes": np.zeros((len(labels), 4))})
        truth.append(3.0 + 1.0 * n_pap + 2.0 * n_com)        # every seen comedo stands for two simulated ones
    data = DetectionData([np.zeros((8, 8, 3), np.uint8)] * 30, [np.zeros((0, 4))] * 30, [np.zeros(0)] * 30, CLASSES,
                         ["x"] * 30, np.array(truth))
    weights, bias = fit_count_weights(detector, data, 0.5, (np.arange(30), found))
    assert weights[papule] == pytest.approx(1.0, abs=1e-3) and weights[comedo] == pytest.approx(2.0, abs=1e-3)
    assert weights[scar] == 0.0 and bias == pytest.approx(3.0, abs=1e-3)
    calibrated = LesionDetector(DetectorConfig(image_side=96, tile=64, infer_tile=96, count_weights=weights,
                                               count_bias=bias), detector.model, device="cpu")
    row = calibrated.counts(found[0], threshold=0.5)
    assert row["count"] == pytest.approx(truth[0], abs=1e-2)
    assert row["visible_count"] == row["n_papule"] + row["n_open_comedo"]      # scars are not counted
    with pytest.raises(GraderError, match="count_weights"):
        DetectorConfig(count_weights=(1.0, 2.0))


def test_any_class_ap_scores_where_not_which():
    images = [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}]
    papule = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 6.0, 6.0], "area": 36.0, "iscrowd": 0}
    called_pustule = [{"image_id": 1, "category_id": 4, "score": 0.9, "bbox": [10.0, 10.0, 6.0, 6.0]}]
    assert coco_stats(images, [papule], called_pustule, CLASSES)[1] == pytest.approx(0.0)
    assert coco_stats(images, [papule], called_pustule, CLASSES, agnostic=True)[1] == pytest.approx(1.0)
