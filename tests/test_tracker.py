"""The lesion tracker (issue 20 item 7): face-mesh coordinates that follow the skin, Hungarian linking with a gate
and a gap, per-visit counts of persisting, new and resolved lesions, and the whole chain on a rendered run."""

import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.face.mesh import in_frame, interocular, mesh_coordinates, mesh_triangles
from synthtrial.grade import grade_run
from synthtrial.grade.evaluate import evaluate_run_tracks
from synthtrial.graders.base import GraderError, available, get_grader, image_graders
from synthtrial.graders.tracker import (CHANGE_COLUMNS, LesionTracker, TrackerConfig, changes_by_image, link,
                                        visit_changes)
from synthtrial.run import rundir
from synthtrial.trial import scale

#: Triangles far apart on the mesh that carry the synthetic lesions.
TRIANGLES = (40, 160, 300, 450, 600, 750)


@pytest.fixture(scope="module")
def meshes(bases):
    """A face's mesh and the same face at another visit: moved, scaled, rolled, and one side narrowed as a
    head turn narrows it (a deformation no similarity undoes)."""
    reference = bases[0].landmarks.astype(np.float64)
    centre = reference.mean(axis=0)
    angle = math.radians(6)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = (reference - centre) @ rotation.T * 1.2
    moved[:, 0] = np.where(moved[:, 0] > 0, moved[:, 0] * 0.7, moved[:, 0])
    return reference, moved + centre + np.array([45.0, -30.0])


def centroids(landmarks, triangles=TRIANGLES):
    """The centres of mesh triangles in an image with these landmarks."""
    return landmarks[mesh_triangles()[list(triangles)]].mean(axis=1)


def test_mesh_coordinates_follow_the_skin_where_the_face_frame_does_not(meshes):
    reference, moved = meshes
    truth = in_frame(centroids(reference), reference)
    placed, on_mesh = mesh_coordinates(centroids(moved), moved, reference)
    assert on_mesh.all()
    np.testing.assert_allclose(placed, truth, atol=1e-9)
    # the face frame alone (a similarity) misplaces them: the narrowed side moved
    frame_only = in_frame(centroids(moved), moved)
    assert np.abs(frame_only - truth).max() > 0.1
    # a point off the face is placed by the frame
    far = np.array([[-1e4, -1e4]])
    placed, on_mesh = mesh_coordinates(far, moved, reference)
    assert not on_mesh[0]
    np.testing.assert_allclose(placed, in_frame(far, moved))


def test_link_keeps_ids_through_a_head_turn_and_one_missed_visit(meshes):
    reference, moved = meshes
    # visit 0 on the reference, visit 1 on the moved face with lesion 2 missed, visit 2 on the reference again
    faces = [reference, moved, reference]
    shown = [list(range(6)), [0, 1, 3, 4, 5], list(range(6))]
    visits, positions, lesion = [], [], []
    for v, (face, ids) in enumerate(zip(faces, shown)):
        pts, _ = mesh_coordinates(centroids(face, [TRIANGLES[i] for i in ids]), face, reference)
        visits.append([v] * len(ids))
        positions.append(pts)
        lesion += ids
    visits = np.concatenate(visits)
    positions = np.concatenate(positions)
    ids = link(visits, positions, ["papule"] * len(visits))
    assert len(set(ids)) == 6
    assert [len(set(ids[np.asarray(lesion) == k])) for k in range(6)] == [1] * 6  # one track per lesion
    # in pixels the same linking breaks every track (the face moved by far more than the gate)
    iod = interocular(reference)
    pixels = np.concatenate([centroids(f, [TRIANGLES[i] for i in s]) for f, s in zip(faces, shown)]) / iod
    assert len(set(link(visits, pixels, ["papule"] * len(visits)))) > 6
    # without a gap allowance the missed lesion comes back as a new track
    assert len(set(link(visits, positions, ["papule"] * len(visits), TrackerConfig(max_gap=0)))) == 7


def test_link_assigns_by_least_total_distance_and_gates():
    # two lesions 0.04 apart; at visit 1 both detections shift by 0.03 towards +x: a greedy nearest match
    # would give detection (0.03) to track 0 and leave the other; Hungarian keeps both
    visits = [0, 0, 1, 1]
    positions = [[0.0, 0.0], [0.04, 0.0], [0.03, 0.0], [0.07, 0.0]]
    assert link(visits, positions, ["papule"] * 4).tolist() == [0, 1, 0, 1]
    # beyond the gate a detection starts a track
    assert link([0, 1], [[0.0, 0.0], [0.2, 0.0]], ["papule"] * 2).tolist() == [0, 1]
    # a class penalty tips a tie towards the lesion of the same class
    tie = link([0, 0, 1], [[0.0, 0.0], [0.04, 0.0], [0.02, 0.0]], ["papule", "nodule", "nodule"],
               TrackerConfig(class_penalty=0.01))
    assert tie.tolist() == [0, 1, 1]
    with pytest.raises(GraderError, match="gate"):
        TrackerConfig(gate=0)


def test_visit_changes_on_a_hand_case():
    # visit 0: A papule, B closed comedo; visit 1: A pustule, B papule (turned inflammatory), C papule;
    # visit 2: C papule, D open comedo; visit 3: D
    rows = [(0, "A", "papule"), (0, "B", "closed_comedo"), (1, "A", "pustule"), (1, "B", "papule"),
            (1, "C", "papule"), (2, "C", "papule"), (2, "D", "open_comedo"), (3, "D", "open_comedo")]
    table = visit_changes(*zip(*rows), n_visits=4)
    nan = math.nan
    expected = {"count": [2, 3, 2, 1], "persisting": [nan, 2, 1, 1], "new": [nan, 1, 1, 0],
                "resolved": [nan, 0, 2, 1], "inflammatory": [1, 3, 1, 0], "persisting_inflammatory": [nan, 1, 1, 0],
                "new_inflammatory": [nan, 2, 0, 0], "resolved_inflammatory": [nan, 0, 2, 1]}
    assert list(table.columns) == list(CHANGE_COLUMNS)
    for column, values in expected.items():
        np.testing.assert_array_equal(table[column].to_numpy(), np.asarray(values, dtype=float), err_msg=column)


def test_changes_by_image_cuts_sequences_by_patient_and_view_and_skips_faceless_images():
    manifest = pd.DataFrame({"image": ["a3", "a1", "a2", "b1", "b2", "c1"], "patient_id": ["P", "P", "P", "P", "P", "Q"],
                             "day": [3, 1, 2, 1, 2, 1], "view": ["frontal"] * 3 + ["left"] * 2 + ["frontal"]})
    objects = pd.DataFrame({"image": ["a1", "a2", "a3", "a3", "b1", "b2", "b2", "c1"], "id": [1, 1, 1, 2, 1, 1, 3, 9],
                            "type": ["papule"] * 8})
    out = changes_by_image(manifest, objects, id_column="id", class_column="type", skip=["a2"])
    # P frontal in day order a1, (a2 skipped), a3: lesion 2 is new at a3; P left: lesion 3 new at b2
    assert out.loc[1, "count"] == 1 and math.isnan(out.loc[1, "new"])
    assert out.loc[2].isna().all()
    assert out.loc[0, "new_inflammatory"] == 1 and out.loc[0, "persisting"] == 1
    assert out.loc[4, "new"] == 1 and out.loc[4, "persisting"] == 1
    assert out.loc[5, "count"] == 1 and math.isnan(out.loc[5, "resolved"])


class FakeMesh:
    """Landmarks by the image's first pixel: 0 the reference, 1 the moved face, 2 no face."""

    def __init__(self, meshes):
        self.meshes = meshes

    def __call__(self, image):
        code = int(image[0, 0, 0])
        return None if code == 2 else self.meshes[code]


def test_grade_series_tracks_counted_detections_in_face_coordinates(meshes):
    reference, moved = meshes
    faces = {"d1": 0, "d2": 1, "d3": 2, "d4": 0}
    manifest = pd.DataFrame({"image": list(faces), "patient_id": "P", "day": [1, 2, 3, 4], "view": "frontal"})
    rows = []
    for img, code in faces.items():
        if code == 2:
            continue
        face = (reference, moved)[code]
        shown = [0, 1] if img == "d1" else [0, 1, 2]
        for k, (x, y) in zip(shown, centroids(face, [TRIANGLES[i] for i in shown])):
            rows.append({"image": img, "x0": x - 2, "y0": y - 2, "x1": x + 2, "y1": y + 2,
                         "class": "papule" if k else "closed_comedo", "score": 0.9, "counted": True})
        rows.append({"image": img, "x0": 0.0, "y0": 0.0, "x1": 3.0, "y1": 3.0, "class": "scar", "score": 0.9,
                     "counted": False})
    detections = pd.DataFrame(rows)
    images = {img: np.full((4, 4, 3), code, np.uint8) for img, code in faces.items()}
    tracker = LesionTracker(landmarks=FakeMesh(meshes))
    changes, tracks = tracker.grade_series(manifest, detections, images.__getitem__)
    assert len(tracks) == detections["counted"].sum()          # the uncounted scar is not tracked
    assert tracks.groupby("track_id")["image"].count().sort_index().tolist() == [3, 3, 2]
    np.testing.assert_array_equal(changes["count"], [2, 3, np.nan, 3])
    np.testing.assert_array_equal(changes["new"], [np.nan, 1, np.nan, 0])
    np.testing.assert_array_equal(changes["new_inflammatory"], [np.nan, 1, np.nan, 0])
    np.testing.assert_array_equal(changes["persisting"], [np.nan, 2, np.nan, 3])
    with pytest.raises(GraderError, match="detector,tracker"):
        tracker.predict([images["d1"]])


class OracleDetector:
    """A detecting grader that finds exactly the run's active lesions (boxes and types from lesions.parquet)."""

    name = "detector"
    outcomes = ("count",)

    def __init__(self, run):
        lesions = rundir.read_lesions(run)
        self.lesions = lesions[lesions["type"].isin(scale.LESION_TYPES)]

    def fingerprint(self):
        return "oracle"

    def predict(self, images, meta=None):
        return self.predict_detections(images, meta)[0]

    def predict_detections(self, images, meta=None):
        frames = [self.lesions[self.lesions["image"] == img].assign(index=k) for k, img in enumerate(meta["image"])]
        found = pd.concat(frames, ignore_index=True)
        detections = pd.DataFrame({"index": found["index"], "x0": found["x0"], "y0": found["y0"], "x1": found["x1"],
                                   "y1": found["y1"], "class": found["type"], "score": 1.0, "counted": True})
        counts = pd.DataFrame({"count": [float((found["index"] == k).sum()) for k in range(len(images))]})
        return counts, detections


def test_tracker_on_perfect_detections_recovers_the_lesion_ids(quick_run_256, tmp_path):
    import shutil

    run = tmp_path / "R"
    shutil.copytree(quick_run_256, run)
    grade_run(run, [LesionTracker(), OracleDetector(run)])
    grades = rundir.read_grades(run)
    np.testing.assert_array_equal(grades["tracker_count"], grades["detector_count"])
    assert rundir.read_grades_index(run)["tracker"]["outcomes"] == ["tracker_new_inflammatory"]
    metrics = evaluate_run_tracks(run)
    simulated = metrics.loc["simulated"]
    assert simulated["num_misses"] == 0 and simulated["num_false_positives"] == 0
    assert simulated["idf1"] > 0.95 and simulated["mota"] > 0.95, simulated.to_dict()
    # the tracker's new inflammatory lesions are the truth's when its links are right
    from synthtrial.analyze.pipeline import new_inflammatory_truth

    manifest = rundir.read_manifest(run, ("sha256", "day", "view"))
    truth = new_inflammatory_truth(run, manifest)
    tracked = grades.set_index("image").loc[manifest["image"], "tracker_new_inflammatory"].to_numpy()
    both = np.isfinite(truth)
    np.testing.assert_array_equal(np.isfinite(tracked), both)
    assert np.abs(tracked[both] - truth[both]).sum() <= 0.05 * truth[both].sum() + 1
    result = CliRunner().invoke(app, ["graders", "eval", "tracker", "--data", str(run), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "MOTA" in result.output and "visible" in result.output and (tmp_path / "m.json").is_file()
    # resumed: the saved tracks are reused (no face mesh is looked for) and written to the same bytes
    before = (run / rundir.TRACKS).read_bytes()
    grade_run(run, [OracleDetector(run), LesionTracker(landmarks=no_mesh)])
    assert (run / rundir.TRACKS).read_bytes() == before
    # the detector graded again without the tracker: tracks made from its earlier output go
    grade_run(run, [OracleDetector(run)])
    assert not (run / rundir.TRACKS).exists() and "tracker" not in rundir.read_grades_index(run)
    assert not any(c.startswith("tracker_") for c in rundir.read_grades(run).columns)
    assert (run / rundir.DETECTIONS).is_file()


def no_mesh(image):
    raise AssertionError("the face mesh was looked for although the tracks were saved")


def test_tracker_needs_the_detector_in_the_same_call(quick_run_256, tmp_path):
    assert "tracker" in available() and available().index("tracker") > available().index("detector")
    assert "detector" in image_graders() and "tracker" not in image_graders()   # it grades series, not images
    with pytest.raises(GraderError, match="--graders detector,tracker"):
        grade_run(quick_run_256, [get_grader("tracker")])
    result = CliRunner().invoke(app, ["graders", "eval", "tracker", "--data", str(quick_run_256)])
    assert result.exit_code == 2 and "--graders detector,tracker" in result.output
