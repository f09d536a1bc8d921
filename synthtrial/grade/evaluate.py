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
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.run import rundir
from synthtrial.run.rundir import RunError

__all__ = ["COUNT_METRICS", "MIN_IMAGES_PER_PATIENT", "TRUTHS", "count_agreement", "evaluate_count",
           "evaluate_run_count"]

#: The two truths: name -> manifest column.
TRUTHS = {"simulated": "lesion_count", "visible": "visible_count"}
#: What :func:`count_agreement` returns, in this order.
COUNT_METRICS = ("n", "mae", "rmse", "bias", "pearson_r", "spearman_r", "within_spearman_median", "within_patients")
#: Fewest images of a patient for a within-patient Spearman r.
MIN_IMAGES_PER_PATIENT = 3


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


def _correlation(x: np.ndarray, y: np.ndarray, method: str) -> float:
    """Pearson's or Spearman's r (``method``); NaN for fewer than two pairs or a constant series."""
    from scipy import stats

    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float((stats.pearsonr if method == "pearson" else stats.spearmanr)(x, y)[0])
