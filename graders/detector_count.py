"""The lesion detector's count calibration: from its detections to the simulated lesion count.

Choices, stated once (``detector.py``, "Counting", says what the grader does with them):

* **Sample.** Up to :data:`CALIBRATION_IMAGES` images spread evenly over the calibration data (the training
  images, after training; any run directories with ``synthtrial graders calibrate detector``).
* **The visible count's threshold**: the score (0.05-0.95, step 0.05) whose counts of active detections have
  the smallest mean absolute error against the target lesions (the visible ones) of the sample
  (:func:`calibrate_threshold`); it gives ``visible_count`` and the per-class ``n_<type>`` columns.
* **What the count weights multiply** (``soft_floor``): per class, the number of detections above that
  threshold (``soft_floor`` 0, the calibration of weights trained before 2026-12-07), or the sum of the scores
  of the detections at or above ``soft_floor`` -- a soft count, in which a detection counts as the probability
  that it is a lesion, so the faint lesions the detector finds at low scores still move the count
  (:data:`SOFT_FLOOR`, the default).
* **Weights and bias**: bounded least squares (weights >= 0, the bias free) of the simulated active-lesion
  count on those per-class features (:func:`fit_count_weights`); scars and marks get weight 0.
* **The curve** (``curve``, default on): an isotonic regression (scikit-learn) of the simulated count on the
  linear estimate, stored as its points and applied by linear interpolation (:func:`fit_count_curve`). A
  linear map with a bias over-counts clear faces (the bias stands for the invisible lesions that come with
  visible ones, and a clear face has none); the monotone curve keeps the order of the linear estimate and
  puts each estimate at the mean count of its neighbours in the sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from synthtrial.graders.base import GraderError
from synthtrial.graders.detector import NOT_COUNTED, LesionDetector
from synthtrial.util.progress import ProgressCallback

#: Images the count threshold, weights and curve are fitted on (at most)
CALIBRATION_IMAGES = 200
#: Sample images a class must be detected on for its count weight to be fitted
MIN_SUPPORT = 10
#: The default soft floor: detections from this score on count with their score
SOFT_FLOOR = 0.05


def target_counts(data: Any) -> np.ndarray:
    """Per image of a ``DetectionData``, the target boxes of the counted (active) classes: the visible count when
    the data holds the visible lesions only."""
    counted = [k for k, c in enumerate(data.classes) if c not in NOT_COUNTED]
    return np.array([float(np.isin(labels, counted).sum()) for labels in data.labels])


def detect_sample(detector: LesionDetector, data: Any, limit: int,
                  progress: ProgressCallback | None = None) -> tuple[np.ndarray, list[dict]]:
    """Up to ``limit`` images spread evenly over ``data`` and the detector's detections on each
    (``progress(done, total, "")`` after each)."""
    picks = np.linspace(0, len(data.images) - 1, min(limit, len(data.images))).round().astype(int)
    found = []
    for done, k in enumerate(picks, start=1):
        found.append(detector.detect(data.images[k]))
        if progress is not None:
            progress(done, len(picks), "")
    return picks, found


def calibrate_threshold(detector: LesionDetector, data: Any, limit: int = 32,
                        sample: tuple[np.ndarray, list[dict]] | None = None) -> float:
    """The score threshold (0.05-0.95) whose active-lesion counts have the smallest MAE against the target lesions
    on up to ``limit`` images (or on ``sample``, from :func:`detect_sample`)."""
    picks, found = sample if sample is not None else detect_sample(detector, data, limit)
    target = target_counts(data)[picks]
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    errors = []
    for t in grid:
        pred = np.array([detector.counted(f, t).sum() for f in found], float)
        errors.append(np.abs(pred - target).mean())
    return float(grid[int(np.argmin(errors))])


def fit_count_weights(detector: LesionDetector, data: Any, threshold: float, sample: tuple[np.ndarray, list[dict]],
                      soft_floor: float = 0.0) -> tuple[tuple[float, ...], float]:
    """Per-class weights (>= 0, 0 for classes not counted) and a bias mapping the detector's per-class features
    (:meth:`LesionDetector.count_features` at ``threshold`` / ``soft_floor``) to the simulated lesion count
    (``data.true_counts``), by bounded least squares. A class detected on fewer than :data:`MIN_SUPPORT` images
    of the sample gets weight 0: its weight cannot be estimated there (one stray detection could take any
    weight, and multiply every detection of the class elsewhere)."""
    from scipy.optimize import lsq_linear

    picks, found = sample
    classes = detector.config.classes
    x = np.array([detector.count_features(f, threshold, soft_floor) for f in found]).reshape(len(found), len(classes))
    counted = np.array([c not in NOT_COUNTED for c in classes]) & ((x > 0).sum(axis=0) >= min(MIN_SUPPORT, len(x)))
    design = np.column_stack([x[:, counted], np.ones(len(found))])
    lower = np.r_[np.zeros(int(counted.sum())), -np.inf]
    fit = lsq_linear(design, data.true_counts[picks], bounds=(lower, np.inf))
    weights = np.zeros(len(classes))
    weights[counted] = fit.x[:-1]
    return tuple(round(float(w), 4) for w in weights), round(float(fit.x[-1]), 4)


def fit_count_curve(linear: Sequence[float], truth: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """The points (x increasing, y not decreasing, y >= 0; 4 decimals) of the isotonic regression of ``truth`` on
    ``linear``; () when fewer than two distinct ``linear`` values."""
    from sklearn.isotonic import IsotonicRegression

    linear, truth = np.asarray(linear, np.float64), np.asarray(truth, np.float64)
    if len(linear) != len(truth):
        raise GraderError(f"count curve: {len(linear)} estimates but {len(truth)} counts")
    if len(np.unique(linear)) < 2:
        return ()
    iso = IsotonicRegression(y_min=0.0, out_of_bounds="clip").fit(linear, truth)
    points: list[tuple[float, float]] = []
    for x, y in zip(np.round(iso.X_thresholds_, 4), np.round(iso.y_thresholds_, 4)):
        if points and x <= points[-1][0]:
            continue
        points.append((float(x), max(float(y), points[-1][1] if points else 0.0)))
    return tuple(points) if len(points) >= 2 else ()


def calibrate(detector: LesionDetector, data: Any, *, images: int = CALIBRATION_IMAGES,
              soft_floor: float = SOFT_FLOOR, curve: bool = True, source: str = "training images",
              progress: ProgressCallback | None = None) -> LesionDetector:
    """``detector`` with its count calibration (threshold, weights, bias, floor, curve; module docstring) fitted
    on up to ``images`` images of ``data`` (a ``DetectionData`` whose ``true_counts`` are the simulated active
    lesion counts); the network is shared, the record gains ``count_calibration``."""
    if images < 2:
        raise GraderError(f"count calibration needs at least 2 images, got {images}")
    if not 0 <= soft_floor < 1:
        raise GraderError(f"count soft floor must be a score in [0, 1), got {soft_floor}")
    sample = detect_sample(detector, data, images, progress)
    threshold = calibrate_threshold(detector, data, sample=sample)
    weights, bias = fit_count_weights(detector, data, threshold, sample, soft_floor)
    cfg = replace(detector.config, count_threshold=threshold, count_weights=weights, count_bias=bias,
                  count_soft_floor=float(soft_floor), count_curve=())
    if curve:
        features = np.array([detector.count_features(f, threshold, soft_floor) for f in sample[1]])
        estimate = bias + features @ np.asarray(weights)          # the linear estimate, before any curve
        cfg = replace(cfg, count_curve=fit_count_curve(estimate, data.true_counts[sample[0]]))
    record = {**detector.record, "count_calibration_from": f"{len(sample[0])} {source}",
              "count_calibration": {"images": int(len(sample[0])), "source": source, "soft_floor": float(soft_floor),
                                    "curve": bool(curve)}}
    return LesionDetector(cfg, detector.model, device=detector.device, record=record)
