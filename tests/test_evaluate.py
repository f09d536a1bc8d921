"""Tracking metrics (synthtrial.grade.evaluate) against cases computed by hand."""

import math

import pandas as pd
import pytest

from synthtrial.grade.evaluate import TRACK_METRICS, evaluate_tracks, tracking_metrics


def boxes(rows):
    """``(frame, id, x)`` -> unit-height boxes 10 px wide at x (far apart boxes never overlap)."""
    return pd.DataFrame([{"frame": f, "id": i, "x0": float(x), "y0": 0.0, "x1": float(x) + 10, "y1": 10.0}
                         for f, i, x in rows])


def test_one_identity_switch_and_one_false_positive():
    # two lesions A (x=0) and B (x=100) over 4 frames; track 1 follows A in frames 1-2, track 3 takes over A in
    # frames 3-4 (one identity switch), track 2 follows B throughout; frame 2 has a stray box (x=500)
    frames = [("s", f) for f in (1, 2, 3, 4)]
    truth = boxes([(f, "A", 0) for f in (1, 2, 3, 4)] + [(f, "B", 100) for f in (1, 2, 3, 4)])
    hypotheses = boxes([(1, 1, 0), (2, 1, 0), (3, 3, 0), (4, 3, 0), *[(f, 2, 100) for f in (1, 2, 3, 4)],
                        (2, 4, 500)])
    m = tracking_metrics(frames, truth, hypotheses)
    assert list(m) == list(TRACK_METRICS)
    # MOTA = 1 - (misses 0 + false positives 1 + switches 1) / 8 lesion boxes
    assert m["num_switches"] == 1 and m["num_false_positives"] == 1 and m["num_misses"] == 0
    assert m["mota"] == pytest.approx(1 - 2 / 8)
    # IDF1: the best one-to-one track-lesion assignment, A-1 (2 boxes) and B-2 (4): IDTP 6, IDFP 9 - 6 = 3,
    # IDFN 8 - 6 = 2 -> 2*6 / (2*6 + 3 + 2)
    assert m["idf1"] == pytest.approx(12 / 17)
    assert m["idp"] == pytest.approx(6 / 9) and m["idr"] == pytest.approx(6 / 8)
    assert m["num_objects"] == 8 and m["num_predictions"] == 9 and m["num_unique_objects"] == 2
    assert m["recall"] == pytest.approx(1.0) and m["precision"] == pytest.approx(8 / 9)


def test_iou_threshold_and_sequences_are_apart():
    # a box shifted by 4 of its 10 px overlaps with IoU 6/14 = 0.43: a match at 0.4, a miss + false positive at 0.5
    truth = boxes([(1, "A", 0)])
    hypotheses = boxes([(1, 7, 4)])
    assert tracking_metrics([("s", 1)], truth, hypotheses, iou=0.4)["mota"] == pytest.approx(1.0)
    strict = tracking_metrics([("s", 1)], truth, hypotheses, iou=0.5)
    assert strict["num_misses"] == 1 and strict["num_false_positives"] == 1 and strict["mota"] == pytest.approx(-1.0)
    # the same track id in two sequences is two tracks: no switch across them
    frames = [("p", 1), ("p", 2), ("q", 3), ("q", 4)]
    truth = boxes([(1, "A", 0), (2, "A", 0), (3, "B", 0), (4, "B", 0)])
    hypotheses = boxes([(1, 1, 0), (2, 1, 0), (3, 1, 0), (4, 1, 0)])
    m = tracking_metrics(frames, truth, hypotheses)
    assert m["mota"] == pytest.approx(1.0) and m["idf1"] == pytest.approx(1.0) and m["num_switches"] == 0
    empty = tracking_metrics([], truth.iloc[:0], hypotheses.iloc[:0])
    assert all(math.isnan(v) for v in empty.values())


def test_evaluate_tracks_against_the_simulated_and_the_visible_truth():
    manifest = pd.DataFrame({"image": ["i1", "i2"], "patient_id": "P", "day": [1, 2], "view": "frontal"})
    lesions = pd.DataFrame({"image": ["i1", "i1", "i2", "i2", "i2"], "lesion_id": [1, 2, 1, 2, 3],
                            "type": ["papule", "closed_comedo", "papule", "closed_comedo", "mark"],
                            "x0": [0.0, 100, 0, 100, 200], "y0": 0.0, "x1": [10.0, 110, 10, 110, 210], "y1": 10.0,
                            "visible": [True, False, True, False, True]})
    tracks = pd.DataFrame({"image": ["i1", "i2"], "track_id": [5, 5], "x0": 0.0, "y0": 0.0, "x1": 10.0, "y1": 10.0})
    m = evaluate_tracks(manifest, lesions, tracks)
    assert list(m.index) == ["simulated", "visible"]
    # marks are not tracked; the faint comedo is a miss only against the simulated truth
    assert m.loc["simulated", "num_objects"] == 4 and m.loc["simulated", "mota"] == pytest.approx(0.5)
    assert m.loc["visible", "num_objects"] == 2 and m.loc["visible", "mota"] == pytest.approx(1.0)
    with pytest.raises(Exception, match="visible"):
        evaluate_tracks(manifest, lesions.drop(columns="visible"), tracks)
