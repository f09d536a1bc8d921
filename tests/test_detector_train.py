"""The detector's training recipe (``synthtrial.graders.detector_train``): visible targets, crops where lesions
are, anchors fitted to the lesion sizes, and evaluation against the visible truth."""

from __future__ import annotations

import dataclasses

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


def test_the_ap50_ceiling_is_the_visible_share_of_the_truth():
    """A perfect detector of the visible lesions, scored against every lesion: one papule of two visible gives
    precision 1 up to recall 1/2, so AP50 = 51 / 101 (COCO's 101 recall points); both visible: 1."""
    from synthtrial.graders.detector_train import visible_ceiling

    images = [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}]
    truth = [{"id": k + 1, "image_id": 1, "category_id": 3, "bbox": [x, 10.0, 6.0, 6.0], "area": 36.0, "iscrowd": 0}
             for k, x in enumerate((10.0, 40.0))]
    half = visible_ceiling(truth, [True, False])
    assert half == [{"image_id": 1, "category_id": 3, "score": 1.0, "bbox": [10.0, 10.0, 6.0, 6.0]}]
    assert coco_stats(images, truth, half, CLASSES)[1] == pytest.approx(51 / 101, abs=1e-9)
    assert coco_stats(images, truth, visible_ceiling(truth, [True, True]), CLASSES)[1] == pytest.approx(1.0)


def test_any_class_ap_scores_where_not_which():
    images = [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}]
    papule = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 6.0, 6.0], "area": 36.0, "iscrowd": 0}
    called_pustule = [{"image_id": 1, "category_id": 4, "score": 0.9, "bbox": [10.0, 10.0, 6.0, 6.0]}]
    assert coco_stats(images, [papule], called_pustule, CLASSES)[1] == pytest.approx(0.0)
    assert coco_stats(images, [papule], called_pustule, CLASSES, agnostic=True)[1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- recipe (issue 20, item 3)

def test_ap50_matches_a_hand_computed_precision_recall_curve():
    """Two papules, three detections ranked hit (0.9), false alarm (0.8), hit (0.7): precision 1, 1/2, 2/3 at
    recall 1/2, 1/2, 1. COCO's 101-point interpolation gives 1 at recall 0-0.50 (51 points) and 2/3 at
    0.51-1.00 (50 points): AP50 = (51 + 50 * 2/3) / 101."""
    from synthtrial.graders.detector_train import per_class_ap50

    images = [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}]
    truth = [{"id": k + 1, "image_id": 1, "category_id": 3, "bbox": [x, 10.0, 6.0, 6.0], "area": 36.0, "iscrowd": 0}
             for k, x in enumerate((10.0, 40.0))]
    found = [{"image_id": 1, "category_id": 3, "score": 0.9, "bbox": [10.0, 10.0, 6.0, 6.0]},
             {"image_id": 1, "category_id": 3, "score": 0.8, "bbox": [25.0, 40.0, 6.0, 6.0]},
             {"image_id": 1, "category_id": 3, "score": 0.7, "bbox": [41.0, 10.0, 6.0, 6.0]}]   # IoU 30/42 > 0.5
    expected = (51 + 50 * 2 / 3) / 101
    assert coco_stats(images, truth, found, CLASSES)[1] == pytest.approx(expected, abs=1e-9)
    per = per_class_ap50(images, truth, found, CLASSES)
    assert per["papule"] == pytest.approx(expected, abs=1e-9)
    assert all(np.isnan(v) for c, v in per.items() if c != "papule")        # no truth of the other classes
    shifted = [found[0], found[1], {**found[2], "bbox": [43.0, 10.0, 6.0, 6.0]}]    # IoU 18/54 < 0.5: a miss
    assert per_class_ap50(images, truth, shifted, CLASSES)["papule"] == pytest.approx(51 / 101, abs=1e-9)


def test_highpass_input_ignores_skin_tone_but_keeps_the_lesion():
    import torch

    from synthtrial.graders.detector import highpass

    torch.manual_seed(0)
    skin = torch.rand(1, 3, 64, 64) * 0.1 + 0.4
    lesion = skin.clone()
    lesion[:, 0, 30:36, 30:36] += 0.3
    toned = skin + torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)          # another skin tone, same texture
    assert torch.allclose(highpass(toned, 4.0), highpass(skin, 4.0), atol=1e-5)
    assert (highpass(lesion, 4.0) - highpass(skin, 4.0))[0, 0, 30:36, 30:36].mean() > 0.2
    model = build_model(DetectorConfig(image_side=96, tile=64, infer_tile=96, highpass_sigma=4.0))
    model.eval()
    with torch.no_grad():
        a, b = model.backbone(skin), model.backbone(toned)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    with pytest.raises(GraderError, match="highpass_sigma"):
        DetectorConfig(highpass_sigma=-1)


def test_anchor_ratios_and_rpn_iou_reach_torchvision():
    model = build_model(DetectorConfig(anchor_sizes=(3, 5, 7), anchor_ratios=(1.0,), rpn_fg_iou=0.3, rpn_bg_iou=0.15))
    assert model.rpn.anchor_generator.num_anchors_per_location() == [1, 1, 1]
    assert model.rpn.proposal_matcher.high_threshold == 0.3 and model.rpn.proposal_matcher.low_threshold == 0.15
    assert model.rpn.head.cls_logits.out_channels == 1
    with pytest.raises(GraderError, match="IoU"):
        DetectorConfig(rpn_fg_iou=0.3, rpn_bg_iou=0.3)


def test_marks_are_a_class_that_is_never_counted(tiny_run):
    import torch

    from synthtrial.graders.detector import MARK, LesionDetector

    data = load_run_data([tiny_run], 256, CLASSES + (MARK,), visible_only=True)
    lesions = rundir.read_lesions(tiny_run)
    visible_marks = int(((lesions["type"] == MARK) & lesions["visible"].astype(bool)).sum())
    assert visible_marks > 0 and sum(int((lab == len(CLASSES)).sum()) for lab in data.labels) == visible_marks
    torch.manual_seed(0)
    detector = LesionDetector(DetectorConfig(classes=CLASSES + (MARK,), image_side=96, tile=64, infer_tile=96),
                              device="cpu")
    found = {"labels": np.array([CLASSES.index("papule"), len(CLASSES), len(CLASSES)]),
             "scores": np.full(3, 0.9), "boxes": np.zeros((3, 4))}
    row = detector.counts(found, threshold=0.5)
    assert row["visible_count"] == 1 and row["n_mark"] == 2 and row["count"] == 1


def test_the_detector_recipe_trains_reloads_bit_for_bit_and_its_loss_falls(tmp_path, toy_detection_data):
    import torch

    from synthtrial.graders.detector import LesionDetector
    from synthtrial.graders.detector_train import DETECTOR_AUGMENT, masked_batch, train_detector

    data = toy_detection_data
    recipe = dict(anchor_ratios=(1.0,), rpn_iou=(0.3, 0.15), highpass_sigma=4.0, augmentation=DETECTOR_AUGMENT)
    trained = train_detector(data, tmp_path / "det", steps=3, batch_size=1, seed=2, image_side=96, tile=64,
                             device="cpu", **recipe)
    again = LesionDetector.from_pretrained(tmp_path / "det", device="cpu")
    assert again.config.highpass_sigma == 4.0 and again.config.anchor_ratios == (1.0,)
    assert again.config.rpn_fg_iou == 0.3 and trained.record["settings"]["rpn_iou"] == [0.3, 0.15]
    for (name, a), (_, b) in zip(trained.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    same = np.random.default_rng(1)
    torch.manual_seed(0)
    model = build_model(DetectorConfig(image_side=96, tile=64, infer_tile=96, anchor_sizes=(4, 6, 8),
                                       nwd_constant=6.0, anchor_ratios=(1.0,), rpn_fg_iou=0.3, rpn_bg_iou=0.15,
                                       highpass_sigma=4.0))
    model.train()
    batch = masked_batch(data, 64, 2, same, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for step in range(10):
        torch.manual_seed(step)
        loss = sum(model(*batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert np.isfinite(totals).all() and np.mean(totals[-3:]) < np.mean(totals[:3]), totals


def test_detector_augmentation_changes_sharpness_and_wide_stays_as_it_was():
    import torch

    from synthtrial.graders.augment import WIDE, Augmenter, RandomSharpness
    from synthtrial.graders.detector_train import DETECTOR_AUGMENT

    assert not any(isinstance(t, RandomSharpness) for t in _transforms(Augmenter(WIDE).pipeline))
    assert any(isinstance(t, RandomSharpness) for t in _transforms(Augmenter(DETECTOR_AUGMENT).pipeline))
    image = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
    sharper = RandomSharpness((3.0, 3.0))
    pixels = torch.from_numpy(image).permute(2, 0, 1)
    assert sharper.apply(pixels, {"factor": 3.0}).float().std() > pixels.float().std()   # crisper: more contrast
    aug = Augmenter(DETECTOR_AUGMENT)
    assert np.array_equal(aug.image(image, 7), aug.image(image, 7))


def _transforms(pipeline):
    for t in getattr(pipeline, "transforms", []):
        yield t
        yield from _transforms(t)


def test_cli_refuses_bad_anchor_ratios(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from synthtrial.cli import app

    result = CliRunner().invoke(app, ["graders", "train", "detector", "--data", str(tiny_run), "--out",
                                      str(tmp_path / "d"), "--anchor-ratios", "1,x", "--quiet"])
    assert result.exit_code == 2 and "--anchor-ratios" in result.output
    assert not (tmp_path / "d").exists()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["graders", "train", "detector", "--data", str(tiny_run), "--out",
                                      str(tmp_path / "d"), "--init", str(tmp_path / "empty"), "--quiet"])
    assert result.exit_code == 2 and "no model.safetensors" in result.output
    assert not (tmp_path / "d").exists()


def test_balance_draws_a_rare_class_as_often_as_a_common_one():
    import torch

    from synthtrial.graders.detector_train import balanced_draw, class_weights, masked_batch

    rng = np.random.default_rng(0)
    images, boxes, labels = [], [], []
    for k in range(20):                    # 19 images of 8 papules, one image with a single scar
        image = np.full((256, 256, 3), 180, np.uint8)
        n = 1 if k == 0 else 8
        xy = rng.integers(8, 240, (n, 2)).astype(np.float32)
        boxes.append(np.concatenate([xy, xy + 6], 1)), labels.append(np.full(n, 5 if k == 0 else 2, np.int64))
        images.append(image)
    data = DetectionData(images, boxes, labels, CLASSES, [str(k) for k in range(20)], np.zeros(20))
    w = class_weights(data, 1.0)
    assert w[5] / w[2] == pytest.approx(152.0) and w[0] == 0.0          # 152 papules against one scar
    assert class_weights(data, 0.0)[[2, 5]].tolist() == [1.0, 1.0]

    def scar_share(balance: float) -> float:
        draw = np.random.default_rng(3)
        hits = 0
        for _ in range(60):
            _, targets = masked_batch(data, 64, 4, draw, torch.device("cpu"), focus=1.0,
                                      balanced=balanced_draw(data, balance))
            hits += sum(int((t["labels"] == 6).any()) for t in targets)
        return hits / 240

    assert scar_share(1.0) > 0.35            # about half the crops centre on the one scar
    assert scar_share(0.0) < 0.12            # unweighted: its image is one in 20


def test_fine_tuning_starts_from_the_given_weights_and_refuses_another_architecture(tmp_path, toy_detection_data):
    import torch

    from synthtrial.graders.detector import LesionDetector
    from synthtrial.graders.detector_train import train_detector

    data = toy_detection_data
    first = train_detector(data, tmp_path / "a", steps=2, batch_size=1, seed=2, image_side=96, tile=64, device="cpu",
                           anchor_ratios=(1.0,))
    tuned = train_detector(data, tmp_path / "b", steps=1, batch_size=1, seed=2, image_side=96, tile=64, device="cpu",
                           anchor_ratios=(1.0,), lr=0.0, init=tmp_path / "a")
    for (name, a), (_, b) in zip(first.model.state_dict().items(), tuned.model.state_dict().items()):
        if a.is_floating_point() and "running" not in name:
            assert torch.equal(a, b), name                # lr 0: the start's weights, not a fresh initialisation
    fresh = train_detector(data, tmp_path / "c", steps=1, batch_size=1, seed=2, image_side=96, tile=64, device="cpu",
                           anchor_ratios=(1.0,), lr=0.0)
    assert not torch.equal(fresh.model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                           tuned.model.state_dict()["roi_heads.box_predictor.cls_score.weight"])
    start_sha = rundir.sha256_file(tmp_path / "a" / "model.safetensors")
    assert tuned.record["settings"]["init"]["weights_sha256"] == start_sha
    assert LesionDetector.from_pretrained(tmp_path / "b").record["settings"]["init"]["from"] == str(tmp_path / "a")
    with pytest.raises(GraderError, match="differs from this training's in anchor_ratios"):
        train_detector(data, tmp_path / "d", steps=1, batch_size=1, seed=2, image_side=96, tile=64, device="cpu",
                       anchor_ratios=(0.5, 1.0, 2.0), init=tmp_path / "a")
    # fine-tuned on other data (boxes 1.6 times the size): the start's anchors and NWD constant are kept
    def grown(b):
        centre, half = (b[:, :2] + b[:, 2:]) / 2, 0.8 * (b[:, 2:] - b[:, :2])
        return np.clip(np.column_stack([centre - half, centre + half]), 0, 96).astype(np.float32)
    bigger = dataclasses.replace(data, boxes=[grown(b) for b in data.boxes])
    assert fit_anchor_sizes(bigger) != first.config.anchor_sizes
    other = train_detector(bigger, tmp_path / "e", steps=1, batch_size=1, seed=2, image_side=96, tile=64,
                           device="cpu", anchor_ratios=(1.0,), lr=0.0, init=tmp_path / "a")
    assert (other.config.anchor_sizes, other.config.nwd_constant) == (first.config.anchor_sizes,
                                                                      first.config.nwd_constant)
