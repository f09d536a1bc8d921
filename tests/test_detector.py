"""The lesion detector: NWD / SBCE / score rectification against hand-computed values, the SADH head on
torchvision's contract, masked crops, tiling, training on a tiny run (losses finite and falling; resume gives
the same bytes), safetensors checkpoints, pickles refused, and the grader seam end to end."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from synthtrial.graders.base import GraderError, get_grader, read_rgb
from synthtrial.grade import grade_run
from synthtrial.graders.detector import (CLASSES, DetectorConfig, LesionDetector, NWDRegionProposalNetwork, SADHHead,
                              build_model, nwd, rectify_scores, sbce, tile_origins, wasserstein2)
from synthtrial.graders.detector_train import (masked_batch, evaluate_detector, load_run_data,
                                    masked_crop, mean_lesion_size, train_detector)
from synthtrial.run import rundir
from synthtrial.trial import scale
from synthtrial.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two patients x two days of one portrait at 256 px (acne from mild to severe)."""
    from conftest import render_small_run

    return render_small_run(tmp_path_factory, "detector", "A", "astronaut", [2.5, 1.0, 3.0, 0.5], size=256, seed=3)


def _tiny_config(**kw) -> DetectorConfig:
    return DetectorConfig(**{"image_side": 256, "tile": 128, "infer_tile": 256, "nwd_constant": 4.0, **kw})


# ---------------------------------------------------------------------------------------------- formulas

def test_nwd_matches_hand_computed_values():
    b = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 20.0, 30.0]])
    g = torch.tensor([[1.0, 1.0, 5.0, 7.0], [10.0, 10.0, 20.0, 30.0]])
    # Gaussians (cx, cy, w/2, h/2): (2, 2, 2, 2) vs (3, 4, 2, 3) -> differences (1, 2, 0, 1), W2 = sqrt(6)
    assert wasserstein2(b, g).tolist() == pytest.approx([math.sqrt(6), 0.0])
    assert nwd(b, g, 2.0).tolist() == pytest.approx([math.exp(-math.sqrt(6) / 2), 1.0])
    # a 4-px shift of a lesion-sized box with C = 32 (the paper's constant)
    assert nwd(torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([[4.0, 0, 12, 8]]), 32.0).item() == \
        pytest.approx(math.exp(-4 / 32))


def test_sbce_is_soft_bce():
    y = torch.tensor([0.3, 1.0, 0.0])
    p = torch.tensor([0.3, 0.8, 0.1])
    assert sbce(p, y).item() == pytest.approx(-math.log(1.0) - math.log(0.8) - math.log(0.9), rel=1e-5)
    assert sbce(y, y).item() == pytest.approx(0.0, abs=1e-5)


def test_score_rectification_matches_the_formula():
    s, p = torch.tensor([0.64, 0.9]), torch.tensor([0.25, 0.1])
    assert rectify_scores(s, p, 1.0).tolist() == pytest.approx([0.4, math.sqrt(0.09)])
    assert rectify_scores(s, p, 0.0).tolist() == pytest.approx(s.tolist())
    assert rectify_scores(s, p, 2.0).tolist() == pytest.approx(p.tolist())
    assert rectify_scores(s, p, 0.5).tolist() == pytest.approx((torch.sqrt(s ** 1.5 * p ** 0.5)).tolist())


def test_rpn_filter_ranks_by_rectified_score():
    model = build_model(_tiny_config())
    rpn = model.rpn
    assert isinstance(rpn, NWDRegionProposalNetwork) and isinstance(rpn.head, SADHHead)
    # one level of 1 x 1 x 2 anchors: the second has the higher objectness but a poor predicted NWD
    rpn.head.nwd_logits = [torch.tensor([[[[2.0]], [[-3.0]]]])]
    objectness = torch.tensor([[0.0], [1.0]])
    proposals = torch.tensor([[[0.0, 0, 10, 10], [50.0, 50, 60, 60]]])
    rpn.eval()
    boxes, scores = rpn.filter_proposals(proposals, objectness, [(100, 100)], [2])
    expected = rectify_scores(torch.sigmoid(objectness.flatten()), torch.sigmoid(torch.tensor([2.0, -3.0])))
    assert boxes[0][0].tolist() == [0.0, 0, 10, 10]
    assert scores[0].tolist() == pytest.approx(sorted(expected.tolist(), reverse=True), rel=1e-4)


def test_sadh_head_keeps_torchvision_contract():
    from torchvision.models.detection.rpn import RPNHead

    feats = [torch.randn(2, 64, 16, 16), torch.randn(2, 64, 8, 8)]
    plain = RPNHead(64, 3)(feats)
    head = SADHHead(64, 3, nwd=True)
    ours = head(feats)
    assert [t.shape for t in ours[0]] == [t.shape for t in plain[0]]
    assert [t.shape for t in ours[1]] == [t.shape for t in plain[1]]
    assert [t.shape for t in head.nwd_logits] == [t.shape for t in plain[0]]
    assert head.cls_conv[0].kernel_size == (1, 1) and head.box_conv[0].kernel_size == (3, 3)
    assert isinstance(head.cls_conv[1], torch.nn.GroupNorm) and isinstance(head.box_conv[1], torch.nn.GroupNorm)
    assert SADHHead(64, 3).nwd_pred is None
    assert type(build_model(_tiny_config(head="rpn")).rpn.head) is RPNHead


# ------------------------------------------------------------------------------------------- crops, tiles

def test_masked_crop_blacks_out_cut_lesions():
    image = np.full((100, 100, 3), 200, np.uint8)
    boxes = np.array([[20, 20, 30, 30], [55, 40, 70, 50], [80, 80, 90, 90]], np.float32)   # inside, cut, outside
    crop, kept, labels = masked_crop(image, boxes, np.array([0, 1, 2]), 10, 10, 50)
    assert crop.shape == (50, 50, 3)
    assert kept.tolist() == [[10, 10, 20, 20]] and labels.tolist() == [0]
    assert (crop[30:40, 45:50] == 0).all()              # the part of the cut lesion inside the crop
    assert (crop[10:20, 10:20] == 200).all()            # the whole lesion is untouched
    assert (crop[:, :45] != 0).all()
    # past the image's edge the crop is padded with zeros
    crop, kept, _ = masked_crop(image, boxes, np.array([0, 1, 2]), 60, 60, 50)
    assert (crop[40:, :] == 0).all() and kept.tolist() == [[20, 20, 30, 30]]


def test_tiles_cover_with_overlap():
    assert tile_origins(512, 512, 32) == [0]
    origins = tile_origins(1100, 512, 32)
    assert origins[0] == 0 and origins[-1] == 1100 - 512
    assert all(b - a <= 512 - 32 for a, b in zip(origins, origins[1:]))


def test_detect_tiles_large_images_and_returns_image_coordinates():
    torch.manual_seed(0)
    detector = LesionDetector(_tiny_config(infer_tile=128, overlap=16), device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    found = detector.detect(image)
    assert found["boxes"].shape[1] == 4 and len(found["boxes"]) == len(found["labels"]) == len(found["scores"])
    assert (found["boxes"][:, 2] <= 300 + 1e-3).all() and (found["boxes"][:, 3] <= 200 + 1e-3).all()
    assert np.all(np.diff(found["scores"]) <= 0)
    assert set(found["labels"].tolist()) <= set(range(len(CLASSES)))
    with pytest.raises(GraderError, match="uint8"):
        detector.detect(image.astype(np.float32))


# ------------------------------------------------------------------------------------------------ training

def test_sadh_nwd_trains_on_a_tiny_run(tiny_run):
    data = load_run_data([tiny_run], 256)
    assert mean_lesion_size(data) > 1
    torch.manual_seed(0)
    model = build_model(_tiny_config(nwd_constant=mean_lesion_size(data)))
    model.train()
    images, targets = masked_batch(data, 128, 2, np.random.default_rng(0), torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for step in range(10):
        torch.manual_seed(step)
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    frame = pd.DataFrame(history)
    assert set(frame.columns) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
                                  "loss_rpn_nwd"}
    assert np.isfinite(frame.to_numpy()).all()
    for column in ("loss_classifier", "loss_objectness", "loss_rpn_box_reg"):
        assert frame[column].iloc[-3:].mean() < frame[column].iloc[:3].mean(), column
    assert frame.sum(axis=1).iloc[-3:].mean() < frame.sum(axis=1).iloc[:3].mean()


def test_nwd_branch_learns_its_target(tiny_run):
    """With everything else frozen the SBCE targets stay put, so the NWD loss must fall."""
    data = load_run_data([tiny_run], 256)
    torch.manual_seed(1)
    model = build_model(_tiny_config())
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("rpn.head.nwd_pred"))
    torch.nn.init.constant_(model.rpn.head.nwd_pred.bias, -3.0)      # start far from the targets (p ~ 0.05)
    images, targets = masked_batch(data, 128, 2, np.random.default_rng(1), torch.device("cpu"))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    values = []
    for step in range(6):
        torch.manual_seed(0)
        loss = model(images, targets)["loss_rpn_nwd"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert np.isfinite(values).all() and values[-1] < values[0] * 0.5, values


def test_training_resumes_to_the_same_bytes_and_writes_safetensors(tmp_path, toy_detection_data):
    data = toy_detection_data
    kw = dict(head="sadh_nwd", steps=4, batch_size=1, seed=5, image_side=96, tile=64, save_every=2, device="cpu")
    whole = train_detector(data, tmp_path / "whole", **kw)

    def interrupt(step, total, status):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_detector(data, tmp_path / "resumed", progress=interrupt, **kw)
    assert (tmp_path / "resumed" / "checkpoint" / "model.safetensors").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    train_detector(data, tmp_path / "resumed", **kw)
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (tmp_path / "resumed" / "model.safetensors").read_bytes()
    assert (tmp_path / "whole" / "model.safetensors").read_bytes()[8:9] == b"{"     # safetensors JSON header
    assert 0.05 <= whole.config.count_threshold <= 0.95
    assert whole.config.nwd_constant == pytest.approx(6.0)
    history = whole.record["loss_history"]
    assert history[-1]["step"] == 4 and all(math.isfinite(h["loss"]) for h in history)
    with pytest.raises(GraderError, match="other settings"):
        train_detector(data, tmp_path / "resumed", **{**kw, "steps": 6})


def test_pickles_are_refused(tmp_path):
    detector = LesionDetector(_tiny_config(), device="cpu")
    detector.save_pretrained(tmp_path / "w")
    again = LesionDetector.from_pretrained(tmp_path / "w", device="cpu")
    for key, value in detector.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key])
    assert again.fingerprint() == LesionDetector.from_pretrained(tmp_path / "w").fingerprint()
    torch.save(detector.model.state_dict(), tmp_path / "w" / "model.safetensors")
    with pytest.raises(GraderError, match="pickled"):
        LesionDetector.from_pretrained(tmp_path / "w")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model.pt").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(GraderError, match="never loaded"):
        LesionDetector.from_pretrained(tmp_path / "p")


def test_grade_evaluate_and_cli_on_a_run(tiny_run, tmp_path):
    folder = tmp_path / "w"
    torch.manual_seed(0)
    LesionDetector(_tiny_config(count_threshold=0.05), device="cpu").save_pretrained(folder)
    grader = get_grader("detector", folder, device="cpu")
    grade_run(tiny_run, [grader])
    grades = rundir.read_grades(tiny_run)
    assert {"detector_count", "detector_severity", "detector_level", "detector_n_papule"} <= set(grades.columns)
    assert rundir.read_grades_index(tiny_run)["detector"]["outcomes"] == ["detector_count", "detector_severity"]
    assert (grades["detector_severity"].between(0, 3)).all()
    metrics, results = evaluate_detector(grader, tiny_run)
    assert {"AP", "AP50", "AP_small", "AR", "count_MAE", "count_RMSE", "level_accuracy"} <= set(metrics)
    assert metrics["lesions"] > 0 and all(r["category_id"] in range(1, 7) for r in results)
    counts = rundir.read_manifest(tiny_run, ("lesion_count",))["lesion_count"].to_numpy(float)
    assert metrics["count_MAE"] == pytest.approx(np.abs(grades["detector_count"].to_numpy() - counts).mean())
    visible = rundir.read_manifest(tiny_run, ("visible_count",))["visible_count"].to_numpy(float)
    assert metrics["count_MAE_visible"] == pytest.approx(np.abs(grades["detector_visible_count"].to_numpy() - visible).mean())
    seen_level = scale.acne04_level_from_count(grades["detector_visible_count"].to_numpy())
    assert metrics["level_accuracy_visible"] == pytest.approx((seen_level == scale.acne04_level_from_count(visible)).mean())
    assert 0 < metrics["lesions_visible"] < metrics["lesions"] and "AP50_visible" in metrics
    assert 0 < metrics["AP50_ceiling"] < 1          # some lesions of the tiny run are invisible
    result = CliRunner().invoke(app, ["graders", "eval", "detector", "--data", str(tiny_run), "--weights", str(folder), "-q",
                                      "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "AP50" in result.output and "visible" in result.output and (tmp_path / "m.json").is_file()
    result = CliRunner().invoke(app, ["graders", "train", "detector", "--data", str(tiny_run), "--out", str(tmp_path / "x"),
                                      "--head", "fpn"])
    assert result.exit_code == 2 and "--head 'fpn'" in result.output


def test_trains_on_acne04_voc_boxes(tmp_path, tiny_run):
    from test_acne04 import LABELS, _jpeg, _lines, _voc

    from synthtrial.graders.detector_train import load_acne04_data

    root = tmp_path / "ACNE04"
    for k, name in enumerate(LABELS):
        _jpeg(root / "Classification" / "JPEGImages" / name, size=(96, 64), value=k)
        _voc(root / "Detection" / "VOC2007" / "Annotations" / f"{name[:-4]}.xml", LABELS[name][1])
    (root / "Classification" / "NNEW_trainval_0.txt").write_text(_lines(LABELS))
    data = load_acne04_data(root, 64)
    assert data.classes == ("lesion",) and len(data.images) == len(LABELS)
    assert data.images[0].shape == (43, 64, 3)
    assert data.boxes[0][0].tolist() == pytest.approx([0, 0, 2.0, 8 / 3])      # VOC (0, 0, 3, 4) at 2/3 size
    assert data.true_counts.tolist() == [float(v[1]) for v in LABELS.values()]
    detector = train_detector(data, tmp_path / "w", steps=2, batch_size=2, image_side=64, tile=64, device="cpu")
    assert detector.config.classes == ("lesion",)
    with pytest.raises(GraderError, match="classes"):
        evaluate_detector(detector, tiny_run)


def test_ablation_trains_three_variants_resumes_and_restarts(tiny_run, tmp_path):
    runner = CliRunner()
    argv = ["graders", "ablation", "--data", str(tiny_run), "--test-data", str(tiny_run), "--out", str(tmp_path / "a"),
            "--steps", "2", "--batch-size", "1", "-q"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "a" / "ablation.csv")
    assert table["head"].tolist() == ["rpn", "sadh", "sadh_nwd"] and "AP50" in result.output
    weights = {h: (tmp_path / "a" / h / "model.safetensors") for h in table["head"]}
    stamps = {h: w.stat().st_mtime_ns for h, w in weights.items()}
    first = {h: w.read_bytes() for h, w in weights.items()}
    assert runner.invoke(app, argv).exit_code == 0                      # evaluated again, not retrained
    assert {h: w.stat().st_mtime_ns for h, w in weights.items()} == stamps
    assert runner.invoke(app, [*argv, "--restart"]).exit_code == 0      # trained again, to the same bytes
    assert {h: w.stat().st_mtime_ns for h, w in weights.items()} != stamps
    assert {h: w.read_bytes() for h, w in weights.items()} == first


def test_detections_kept_are_the_ones_counted(tiny_run):
    detector = get_grader("detector", device="cpu")       # the shipped weights: they find lesions here
    threshold = detector.config.count_threshold
    manifest = rundir.read_manifest(tiny_run)
    images = [read_rgb(Path(tiny_run) / rel) for rel in manifest["image"][:2]]
    grades, found = detector.predict_detections(images)
    assert grades.equals(detector.predict(images))
    assert list(found.columns) == ["index", "x0", "y0", "x1", "y1", "class", "score", "counted"]
    assert set(found["index"]) <= {0, 1} and set(found["class"]) <= set(detector.config.classes)
    assert (found["x0"] <= found["x1"]).all() and (found["x1"] <= 256).all()
    counted = found[found["counted"]].groupby("index").size().reindex([0, 1], fill_value=0)
    assert grades["visible_count"].tolist() == counted.astype(float).tolist() and counted.sum() > 0
    never = found["class"].isin(["scar", "mark"])                   # scars and marks (a class of these weights)
    assert not found.loc[never, "counted"].any()
    active = found[~never]
    assert (active["counted"] == (active["score"] >= threshold)).all() and (~active["counted"]).any()
