"""A grader's per-image count against both levels of the ground truth: the simulated and the visible lesions.

The simulated truth is the manifest's ``lesion_count`` (every active lesion the course puts on the face); the
visible truth its ``visible_count`` (those the written image shows, :mod:`synthtrial.render.visibility`). A
perfect grader can only see the visible ones, so a count is judged against both.

Per truth: ``n`` (images with both values), ``mae``, ``rmse``, ``bias`` (mean of count − truth), ``pearson_r``
and ``spearman_r`` over all images, and ``within_spearman_median``: the median over patients of the Spearman r
between count and truth across that patient's images (patients with fewer than
:data:`MIN_IMAGES_PER_PATIENT` images, or whose count or truth never changes, have no r and are left out;
``within_patients`` says how many had one). Correlations are NaN where undefined (fewer than two images, or
a constant series). Images whose count is missing (NaN: the grader could not score them) are left out.

Tracks (``RUN/tracks.parquet``, the tracker's) are judged as multi-object tracking with motmetrics, against the
lesions' stable ``lesion_id`` (:func:`evaluate_tracks`). Truth: the active lesions (``lesion_count``'s types;
marks and scars are not tracked) of every image — all of them (simulated) or those whose ``visible`` is true —
and a frame is an image, a sequence one patient's series in one view, in day order. A track box matches a
lesion box when their IoU is at least ``iou`` (default 0.5, the MOT benchmarks' and the detector's AP50
criterion). Reported per truth over all sequences together (:data:`TRACK_METRICS`): ``mota`` (1 - (misses +
false positives + identity switches) / lesions), ``idf1`` (F1 of the identity-preserving matching: the share
of detections and lesions matched under one global track-to-lesion assignment), ``idp``, ``idr``,
``num_switches``, ``num_false_positives``, ``num_misses``, ``num_objects`` (lesion boxes), ``num_predictions``
(track boxes), ``num_unique_objects`` (lesion ids), ``mostly_tracked`` / ``mostly_lost`` (lesions covered in
at least 80 % / at most 20 % of their frames), ``precision``, ``recall`` and ``motp`` (motmetrics' convention:
the mean 1 - IoU of the matched pairs; lower is better).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.run import rundir
from synthtrial.run.rundir import RunError

__all__ = ["COUNT_METRICS", "MIN_IMAGES_PER_PATIENT", "TRACK_IOU", "TRACK_METRICS", "TRUTHS", "count_agreement",
           "evaluate_count", "evaluate_run_count", "evaluate_run_tracks", "evaluate_tracks", "tracking_metrics"]

#: The two truths: name -> manifest column.
TRUTHS = {"simulated": "lesion_count", "visible": "visible_count"}
#: What :func:`count_agreement` returns, in this order.
COUNT_METRICS = ("n", "mae", "rmse", "bias", "pearson_r", "spearman_r", "within_spearman_median", "within_patients")
#: Fewest images of a patient for a within-patient Spearman r.
MIN_IMAGES_PER_PATIENT = 3
#: What :func:`tracking_metrics` returns (motmetrics' names), in this order.
TRACK_METRICS = ("mota", "idf1", "idp", "idr", "num_switches", "num_false_positives", "num_misses", "num_objects",
                 "num_predictions", "num_unique_objects", "mostly_tracked", "mostly_lost", "precision", "recall",
                 "motp")
#: Least IoU of a track box and a lesion box that match.
TRACK_IOU = 0.5


def count_agreement(count: Any, truth: Any, patient_id: Any | None = None) -> dict[str, float]:
    """:data:`COUNT_METRICS` of ``count`` against ``truth`` (equal-length sequences; ``patient_id`` the
    patient of each image, for the within-patient r). Pure; see the module docstring."""
    count = np.asarray(count, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    patients = np.asarray(patient_id if patient_id is not None else np.zeros(len(count)), dtype=object)
    if not count.shape == truth.shape == patients.shape or count.ndim != 1:
        raise ValueError(f"count, truth and patient_id must be 1-D and of one length, got {count.shape}, "
                         f"{truth.shape} and {patients.shape}")
    keep = np.isfinite(count) & np.isfinite(truth)
    count, truth, patients = count[keep], truth[keep], patients[keep]
    error = count - truth
    n = int(count.size)
    within = [_correlation(count[patients == p], truth[patients == p], "spearman") for p in pd.unique(patients)
              if int((patients == p).sum()) >= MIN_IMAGES_PER_PATIENT]
    within = [r for r in within if not math.isnan(r)]
    return {
        "n": n,
        "mae": float(np.abs(error).mean()) if n else math.nan,
        "rmse": float(np.sqrt((error ** 2).mean())) if n else math.nan,
        "bias": float(error.mean()) if n else math.nan,
        "pearson_r": _correlation(count, truth, "pearson"),
        "spearman_r": _correlation(count, truth, "spearman"),
        "within_spearman_median": float(np.median(within)) if within else math.nan,
        "within_patients": len(within),
    }


def evaluate_count(manifest: pd.DataFrame, count: Any) -> pd.DataFrame:
    """One row per truth (index ``simulated``, ``visible``), columns :data:`COUNT_METRICS`: ``count`` (one
    value per manifest row, in its order) against the manifest's ``lesion_count`` and ``visible_count``."""
    missing = [c for c in ("patient_id", *TRUTHS.values()) if c not in manifest.columns]
    if missing:
        raise RunError(f"the manifest has no column {', '.join(map(repr, missing))} to evaluate a count against"
                       + ("; re-run `synthtrial generate` to add the visible counts" if "visible_count" in missing
                          else ""))
    count = np.asarray(count, dtype=np.float64)
    if count.shape != (len(manifest),):
        raise ValueError(f"count must hold one value per manifest row ({len(manifest)}), got shape {count.shape}")
    rows = {name: count_agreement(count, manifest[column].to_numpy(dtype=np.float64), manifest["patient_id"])
            for name, column in TRUTHS.items()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(COUNT_METRICS)).rename_axis("truth")


def evaluate_run_count(run: str | os.PathLike[str], column: str) -> pd.DataFrame:
    """:func:`evaluate_count` of the grade column ``column`` of ``RUN/grades.parquet`` (e.g. ``counter_count``),
    matched to the manifest by image; a one-line error when the run is ungraded or has no such column."""
    manifest = rundir.read_manifest(run, ("lesion_count", "visible_count"), images_must_exist=False)
    grades = rundir.read_grades(run)
    path = rundir.check_run_dir(run) / rundir.GRADES
    if grades is None:
        raise RunError(f"{path}: no such file; run `synthtrial grade {run}` first")
    if column not in grades.columns or column == rundir.GRADES_KEY:
        numeric = [c for c in grades.columns if c != rundir.GRADES_KEY and pd.api.types.is_numeric_dtype(grades[c])]
        raise RunError(f"{path}: no grade column {rundir.show(column)} (numeric columns: {', '.join(numeric)})")
    if not pd.api.types.is_numeric_dtype(grades[column]):
        raise RunError(f"{path}: column {rundir.show(column)} holds {grades[column].dtype} values, not counts")
    merged = manifest[["image"]].merge(grades[[rundir.GRADES_KEY, column]], left_on="image",
                                       right_on=rundir.GRADES_KEY, how="left")
    return evaluate_count(manifest, merged[column].to_numpy(dtype=np.float64, na_value=np.nan))


def tracking_metrics(frames: Any, truth: pd.DataFrame, hypotheses: pd.DataFrame, *,
                     iou: float = TRACK_IOU) -> dict[str, float]:
    """:data:`TRACK_METRICS` of ``hypotheses`` against ``truth`` (motmetrics; pure).

    ``frames``: the frames in time order, each a ``(sequence, frame)`` pair (a sequence's frames consecutive);
    ``truth`` and ``hypotheses``: one row per object per frame, columns ``frame``, ``id`` (any hashable; one id in
    two sequences is two objects), ``x0, y0, x1, y1``.
    A pair matches when its IoU is at least ``iou``. Each sequence is accumulated alone; the metrics are over all.
    """
    import motmetrics as mm

    if not 0 < iou <= 1:
        raise ValueError(f"iou must be in (0, 1], got {iou!r}")
    # motmetrics keeps ids as floats: any hashable id becomes its code
    truth, hypotheses = (t.assign(id=pd.factorize(t["id"])[0]) for t in (truth, hypotheses))
    groups = {name: dict(tuple(table.groupby("frame", sort=False))) for name, table in
              (("truth", truth), ("hypotheses", hypotheses))}
    accumulators: dict[Any, Any] = {}
    for sequence, frame in frames:
        acc = accumulators.setdefault(sequence, mm.MOTAccumulator(auto_id=True))
        gt, hyp = (groups[name].get(frame, table.iloc[:0]) for name, table in
                   (("truth", truth), ("hypotheses", hypotheses)))
        distances = mm.distances.iou_matrix(_xywh(gt), _xywh(hyp), max_iou=1 - iou + 1e-12)
        acc.update(gt["id"].tolist(), hyp["id"].tolist(), distances)
    if not accumulators:
        return dict.fromkeys(TRACK_METRICS, math.nan)
    names = [str(k) for k in accumulators]
    summary = mm.metrics.create().compute_many(list(accumulators.values()), names=names,
                                               metrics=[m for m in TRACK_METRICS if m != "num_predictions"],
                                               generate_overall=True)
    row = summary.loc["OVERALL"] if len(names) > 1 else summary.iloc[0]
    metrics = {m: float(row[m]) for m in TRACK_METRICS if m != "num_predictions"}
    metrics["num_predictions"] = float(len(hypotheses[hypotheses["frame"].isin({f for _, f in frames})]))
    return {m: metrics[m] for m in TRACK_METRICS}


def evaluate_tracks(manifest: pd.DataFrame, lesions: pd.DataFrame, tracks: pd.DataFrame, *,
                    iou: float = TRACK_IOU) -> pd.DataFrame:
    """One row per truth (index ``simulated``, ``visible``), columns :data:`TRACK_METRICS`: the ``tracks``
    (``image``, ``track_id``, box) of ``manifest``'s images against the active ``lesions`` (``image``,
    ``lesion_id``, ``type``, box, ``visible``), every sequence (patient and view, in day order) on its own."""
    from synthtrial.graders.tracker import sequences
    from synthtrial.trial import scale

    if "visible" not in lesions.columns:
        raise RunError("the lesion table has no column 'visible' to evaluate tracks against the visible truth; "
                       "re-run `synthtrial generate` to add it")
    frames = [(key, img) for key, rows in sequences(manifest) for img in rows["image"]]
    active = lesions[lesions["type"].isin(scale.LESION_TYPES)]
    hypotheses = tracks.rename(columns={"image": "frame", "track_id": "id"})
    rows = {}
    for name, truth in (("simulated", active), ("visible", active[active["visible"].astype(bool)])):
        rows[name] = tracking_metrics(frames, truth.rename(columns={"image": "frame", "lesion_id": "id"}),
                                      hypotheses, iou=iou)
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(TRACK_METRICS)).rename_axis("truth")


def evaluate_run_tracks(run: str | os.PathLike[str], *, iou: float = TRACK_IOU) -> pd.DataFrame:
    """:func:`evaluate_tracks` of a run's ``tracks.parquet``; a one-line error when the run has no tracks or
    they were made on images that changed since."""
    manifest = rundir.read_manifest(run, ("sha256", "day", "view"), images_must_exist=False)
    tracks = rundir.read_grade_table(run, rundir.TRACKS)
    path = rundir.check_run_dir(run) / rundir.TRACKS
    if tracks is None:
        raise RunError(f"{path}: no such file; run `synthtrial grade {run} --graders detector,tracker` first")
    known = set(zip(manifest["image"], manifest["sha256"]))
    stale = [i for i, key in enumerate(zip(tracks["image"], tracks[rundir.GRADES_SHA])) if key not in known]
    if stale:
        raise RunError(f"{path}: row {stale[0] + 1}: image {rundir.show(tracks['image'].iloc[stale[0]])} is not in "
                       f"the manifest with that sha256 (it changed since); run `synthtrial grade {run} --graders "
                       "detector,tracker` again")
    lesions = rundir.read_lesions(run, set(manifest["image"]))
    return evaluate_tracks(manifest, lesions, tracks, iou=iou)


def _xywh(table: pd.DataFrame) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) as motmetrics' (x, y, width, height)."""
    boxes = table[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64).reshape(-1, 4)
    return np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])


def _correlation(x: np.ndarray, y: np.ndarray, method: str) -> float:
    """Pearson's or Spearman's r (``method``); NaN for fewer than two pairs or a constant series."""
    from scipy import stats

    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float((stats.pearsonr if method == "pearson" else stats.spearmanr)(x, y)[0])
