"""Lesion tracking across visits: a patient's detections linked from visit to visit, per view, in face coordinates.

None of the published acne graders follows a lesion over time; this one does, on the detector's output. Choices,
stated once:

* **A sequence grader, not an image grader.** It grades a patient's series, not one image, so it is a
  :class:`~synthtrial.graders.base.GraderComponent` without weights that also implements
  :class:`~synthtrial.graders.base.SequenceGrader`: ``synthtrial grade --graders detector,tracker`` runs it
  after every image grader, on the detections the detector keeps in ``RUN/detections.parquet``. It needs the
  detector in the same call (``needs = ("detector",)``; the detector's finished chunks are reused, so this
  costs nothing when its grades are done), so its tracks always belong to the detections beside them.
* **What is tracked**: the detections the detector counts (an active class at or above its count threshold;
  ``counted`` in ``detections.parquet``), so the tracker's count per image is the detector's count.
* **Face coordinates**: MediaPipe's face mesh is found on every image (as the classical counter does; the run
  does not store landmarks). A detection's box centre is carried through the mesh onto the mesh of the first
  image of its sequence where a face was found, and given in that image's face frame (unit: the interocular
  distance; :func:`synthtrial.face.mesh.mesh_coordinates`: piecewise affine, so a head turn or a reframed
  photo moves it with the skin; a centre off the mesh falls back on the face frame). On the views run
  (25 degree head turns) the mesh puts a lesion seen in a side view a median 0.02-0.03 interocular distances
  from where the frontal view puts it, the face frame alone 0.11-0.13. An image where no face is found is
  left out of its sequence: NaN grades, its detections untracked, and it does not count as a missed visit.
* **Linking**: visit by visit (a sequence is one patient and one view, in day order), the Hungarian
  assignment (:func:`scipy.optimize.linear_sum_assignment`) of the visit's detections to the open tracks on
  the distance between the detection and the track's position (the mean of its detections so far: a lesion
  does not move on the face). A link longer than ``gate`` (default 0.05 interocular distances, about 3 mm or
  7 px on the shipped trial; a lesion's rendered centre varies by 0.01 at the 95th percentile across visits,
  and its nearest neighbour lies 0.06 away at the 5th percentile) is refused. A track stays open for
  ``max_gap`` missed visits (default 1: a lesion the detector misses once keeps its identity). ``class_penalty``
  (default 0) is added to the cost of a link whose class changed: lesions change type along their course
  (closed comedo -> papule -> pustule), so by default a class change is no evidence against a link.
* **Per visit** (:func:`visit_changes`, the same counting for the tracks and for the truth's ``lesion_id``):
  ``count`` (tracked lesions), ``persisting`` (seen at an earlier visit), ``new`` (first seen now),
  ``resolved`` (last seen at the previous visit), and the same for inflammatory lesions (papule, pustule,
  nodule: ``inflammatory``, ``persisting_inflammatory``, ``new_inflammatory`` — inflammatory now for the
  first time, a comedo turning into a papule included — and ``resolved_inflammatory``: inflammatory for the
  last time at the previous visit). At the first visit of a sequence nothing can be new, persisting or
  resolved: NaN. ``new_inflammatory`` is the tracker's outcome (``analyze``: new inflammatory lesions per
  period).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.graders.base import GraderComponent, GraderError
from synthtrial.run import rundir
from synthtrial.trial import scale
from synthtrial.util.progress import ProgressCallback

#: What :func:`visit_changes` reports per visit, in this order.
CHANGE_COLUMNS = ("count", "persisting", "new", "resolved", "inflammatory", "persisting_inflammatory",
                  "new_inflammatory", "resolved_inflammatory")
#: Columns that have no value at the first visit of a sequence.
NEEDS_PREVIOUS = tuple(c for c in CHANGE_COLUMNS if c not in ("count", "inflammatory"))
#: A sequence: one patient photographed from one view, in day order.
SEQUENCE_KEYS = ("patient_id", "view")
#: Largest gate (interocular distances) and gap (visits) a config may ask for.
MAX_GATE, MAX_GAP = 10.0, 1000


@dataclass
class TrackerConfig:
    """Plain data (``config.json``): the linking rule."""

    gate: float = 0.05
    max_gap: int = 1
    class_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.gate <= MAX_GATE:
            raise GraderError(f"tracker gate must be in (0, {MAX_GATE}] interocular distances, got {self.gate!r}")
        if not 0 <= self.max_gap <= MAX_GAP:
            raise GraderError(f"tracker max_gap must be 0-{MAX_GAP} visits, got {self.max_gap!r}")
        if not 0 <= self.class_penalty <= MAX_GATE:
            raise GraderError(f"tracker class_penalty must be in [0, {MAX_GATE}], got {self.class_penalty!r}")


# ------------------------------------------------------------------------------------------- linking

def link(visits: Sequence[int], positions: np.ndarray, classes: Sequence[str],
         config: TrackerConfig | None = None) -> np.ndarray:
    """Track ids (0, 1, ... in order of birth) of detections of one sequence.

    ``visits`` (N,) is each detection's visit index (0, 1, ... in time order), ``positions`` (N, 2) its face
    coordinates and ``classes`` its class. See the module docstring for the rule.
    """
    from scipy.optimize import linear_sum_assignment

    config = config or TrackerConfig()
    visits = np.asarray(visits, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    classes = np.asarray([str(c) for c in classes], dtype=object)
    if not len(visits) == len(positions) == len(classes):
        raise ValueError(f"visits, positions and classes must be of one length, got {len(visits)}, "
                         f"{len(positions)} and {len(classes)}")
    ids = np.full(len(visits), -1, dtype=np.int64)
    sums: list[np.ndarray] = []      # per track: sum of positions, number of detections, last visit, last class
    counts: list[int] = []
    last: list[int] = []
    last_class: list[str] = []
    for visit in np.unique(visits):
        here = np.flatnonzero(visits == visit)
        open_tracks = [t for t in range(len(sums)) if visit - last[t] <= config.max_gap + 1]
        matched = np.full(len(here), -1, dtype=np.int64)
        if open_tracks and len(here):
            centres = np.stack([sums[t] / counts[t] for t in open_tracks])
            distance = np.linalg.norm(centres[:, None, :] - positions[here][None, :, :], axis=2)
            changed = np.asarray([[last_class[t] != c for c in classes[here]] for t in open_tracks])
            cost = distance + config.class_penalty * changed
            cost = np.where(distance <= config.gate, cost, 1e6)
            rows, cols = linear_sum_assignment(cost)
            for r, c in zip(rows, cols):
                if distance[r, c] <= config.gate:
                    matched[c] = open_tracks[r]
        for k, det in enumerate(here):
            track = int(matched[k])
            if track < 0:
                track = len(sums)
                sums.append(np.zeros(2)), counts.append(0), last.append(-1), last_class.append("")
            ids[det] = track
            sums[track] = sums[track] + positions[det]
            counts[track] += 1
            last[track], last_class[track] = int(visit), str(classes[det])
    return ids


# ---------------------------------------------------------------------------------------- per visit

def visit_changes(visits: Sequence[int], objects: Sequence[Any], classes: Sequence[str], n_visits: int) -> pd.DataFrame:
    """:data:`CHANGE_COLUMNS` for each of ``n_visits`` visits (0, 1, ... in time order) of one sequence.

    ``visits``, ``objects`` and ``classes`` give one row per object seen at a visit (a lesion id or a track
    id, its class then). See the module docstring for the definitions.
    """
    frame = pd.DataFrame({"visit": np.asarray(visits, dtype=np.int64), "object": list(objects),
                          "inflammatory": [str(c) in scale.INFLAMMATORY_TYPES for c in classes]})
    if len(frame) and not frame["visit"].between(0, n_visits - 1).all():
        raise ValueError(f"visits must lie in 0..{n_visits - 1}")
    out = {c: np.zeros(n_visits) for c in CHANGE_COLUMNS}
    for prefix, rows in (("", frame), ("inflammatory", frame[frame["inflammatory"]])):
        if rows.empty:
            continue
        first = rows.groupby("object")["visit"].transform("min").to_numpy()
        ended = rows.groupby("object")["visit"].max().to_numpy()
        v = rows["visit"].to_numpy()
        present = np.bincount(v, minlength=n_visits).astype(float)
        new = np.bincount(v[first == v], minlength=n_visits).astype(float)
        resolved = np.r_[0.0, np.bincount(ended, minlength=n_visits)[:-1]].astype(float)[:n_visits]
        suffix = f"_{prefix}" if prefix else ""
        out[prefix or "count"] = present
        out[f"persisting{suffix}"] = present - new
        out[f"new{suffix}"] = new
        out[f"resolved{suffix}"] = resolved
    table = pd.DataFrame(out, columns=list(CHANGE_COLUMNS))
    if n_visits:
        table.loc[0, list(NEEDS_PREVIOUS)] = math.nan
    return table


def changes_by_image(manifest: pd.DataFrame, objects: pd.DataFrame, *, id_column: str, class_column: str,
                     skip: Sequence[str] = ()) -> pd.DataFrame:
    """:func:`visit_changes` of every sequence (patient and view, in day order) of ``manifest``: one row per
    manifest row (same index), :data:`CHANGE_COLUMNS`.

    ``objects`` holds one row per object seen on an image (``image``, ``id_column``, ``class_column``); object
    ids need only be distinct within a sequence. Images in ``skip`` (no face found) are no visit: NaN.
    """
    out = pd.DataFrame(math.nan, index=manifest.index, columns=list(CHANGE_COLUMNS))
    skipped = set(skip)
    by_image = {img: rows for img, rows in objects.groupby("image", sort=False)}
    for _, rows in sequences(manifest):
        rows = rows[~rows["image"].isin(skipped)]
        if rows.empty:
            continue
        parts = [(k, by_image[img]) for k, img in enumerate(rows["image"]) if img in by_image]
        seen = pd.concat([p.assign(_visit=k) for k, p in parts]) if parts else \
            pd.DataFrame({"_visit": [], id_column: [], class_column: []})
        table = visit_changes(seen["_visit"], seen[id_column], seen[class_column], len(rows))
        out.loc[rows.index, list(CHANGE_COLUMNS)] = table.to_numpy()
    return out


def sequences(manifest: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """The manifest's sequences (one patient, one view), each in day order (index kept)."""
    work = manifest.assign(_day=pd.to_numeric(manifest["day"], errors="coerce"),
                           _view=manifest["view"].astype(str) if "view" in manifest.columns else "frontal")
    found = []
    for (pid, view), rows in work.groupby([work["patient_id"].astype(str), "_view"], sort=True):
        found.append(((str(pid), str(view)), rows.sort_values("_day", kind="stable").drop(columns=["_day", "_view"])))
    return found


# ------------------------------------------------------------------------------------------- grader

class LesionTracker(GraderComponent):
    """``LesionTracker().grade_series(manifest, detections, read_image)`` -> per-image changes and the tracks."""

    name = "tracker"
    label = "tracker"
    outcomes = ("new_inflammatory",)
    needs = ("detector",)
    table = rundir.TRACKS
    config_class = TrackerConfig
    has_weights = False

    def __init__(self, config: TrackerConfig | None = None, model: Any = None, *, device: Any = None,
                 record: dict[str, Any] | None = None, landmarks: Any = None) -> None:
        super().__init__(config, model, device=device, record=record)
        self._landmarks = landmarks  # a synthtrial.face.faces.LandmarkDetector; built on first use when None

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """(468, 2) face-mesh landmarks of the image's largest face, or None."""
        if self._landmarks is None:
            from synthtrial.face.faces import LandmarkDetector

            self._landmarks = LandmarkDetector()
        return self._landmarks(image)

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        raise GraderError("the tracker grades a patient's series from the detector's detections, not single "
                          "images: run `synthtrial grade RUN --graders detector,tracker`")

    def grade_series(self, manifest: pd.DataFrame, detections: pd.DataFrame,
                     read_image: Callable[[str], np.ndarray],
                     progress: ProgressCallback | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Link the counted detections of every sequence of ``manifest`` (``image``, ``patient_id``, ``day``,
        ``view``); ``detections`` as in ``RUN/detections.parquet``, ``read_image(path)`` an image's pixels.

        Returns the per-image changes (:data:`CHANGE_COLUMNS`, one row per manifest row, in its order) and the
        tracks (``image``, ``track_id`` — distinct over the whole run —, box, ``class``, ``score``, ``face_x``,
        ``face_y``; one row per tracked detection).
        """
        from synthtrial.face.mesh import mesh_coordinates

        counted = detections[detections["counted"].astype(bool)]
        by_image = {img: rows for img, rows in counted.groupby("image", sort=False)}
        tracks, skipped, next_id, done = [], [], 0, 0
        for _, rows in sequences(manifest):
            reference, placed, visit = None, [], 0
            for img in rows["image"]:
                found = self.landmarks(read_image(img))
                done += 1
                if progress is not None:
                    progress(done, len(manifest), self.name)
                if found is None:   # no visit: a missed face does not use up a track's gap
                    skipped.append(img)
                    continue
                reference = found if reference is None else reference
                boxes = by_image.get(img, counted.iloc[:0])
                centres = np.column_stack([(boxes["x0"] + boxes["x1"]) / 2, (boxes["y0"] + boxes["y1"]) / 2])
                face, _ = mesh_coordinates(centres, found, reference)
                placed.append(boxes.assign(_visit=visit, face_x=face[:, 0], face_y=face[:, 1]))
                visit += 1
            seen = pd.concat(placed, ignore_index=True) if placed else counted.iloc[:0]
            if seen.empty:
                continue
            ids = link(seen["_visit"], seen[["face_x", "face_y"]].to_numpy(), seen["class"].astype(str), self.config)
            tracks.append(seen.assign(track_id=ids + next_id))
            next_id += int(ids.max()) + 1
        columns = ["image", "track_id", "x0", "y0", "x1", "y1", "class", "score", "face_x", "face_y"]
        table = pd.concat(tracks, ignore_index=True)[columns] if tracks else pd.DataFrame(columns=columns)
        table = table.astype({"track_id": "int64", "x0": "float64", "y0": "float64", "x1": "float64",
                              "y1": "float64", "score": "float64", "face_x": "float64", "face_y": "float64"})
        changes = changes_by_image(manifest, table, id_column="track_id", class_column="class", skip=skipped)
        return changes.reset_index(drop=True), table
