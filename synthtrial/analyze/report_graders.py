"""The report's grader accuracy: each grader's columns against the run's own truth, before any effect is read.

Computed from ``RUN/grades.parquet`` (which columns: ``grades.json``) and the manifest, with the grading stage's
own metric (:func:`synthtrial.grade.evaluate.count_agreement`: MAE, bias, Pearson and Spearman r over the
images, and the median over patients of the within-patient Spearman r). Which truth a column is set against
follows its name (:data:`TRUTHS_BY_SUFFIX`): a count against the simulated and the visible lesion count, a
severity against the simulated severity, an expected IGA grade against the drawn lesions' IGA, new lesions
against the simulated new inflammatory lesions. Graded levels are shown as confusion matrices against the
truth's (:data:`LEVELS`: a Hayashi/ACNE04 level against the manifest's ``acne04_level``, an IGA grade against
its ``iga``). A grader graded below its targets (``grades.json``'s ``meets_targets``) is named in one line.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from synthtrial.analyze.report_tables import html_table, png, pyplot
from synthtrial.grade.evaluate import count_agreement
from synthtrial.run import rundir

#: Column-name suffix -> the truths it is measured against (name -> truth column).
TRUTHS_BY_SUFFIX = (
    ("new_inflammatory", {"simulated": "new_inflammatory"}),
    ("visible_count", {"visible": "visible_count"}),
    ("count", {"simulated": "lesion_count", "visible": "visible_count"}),
    ("severity", {"simulated": "severity"}),
    ("expected_grade", {"simulated": "iga"}),
)
#: Graded-level suffix -> (truth column, number of classes).
LEVELS = {"level": ("acne04_level", 4), "grade": ("iga", 5)}
#: The manifest columns the truths come from.
TRUTH_COLUMNS = ("severity", "lesion_count", "visible_count", "acne04_level", "iga")


def truths_for(column: str) -> dict[str, str]:
    """The truths a grade column is set against ({} when none applies)."""
    for suffix, truths in TRUTHS_BY_SUFFIX:
        if column.endswith(suffix):
            return truths
    return {}


def graded_table(run_dir: Path, outcomes: pd.DataFrame) -> tuple[pd.DataFrame, dict] | None:
    """The manifest's truths, the outcomes' ``new_inflammatory`` and every grade column, one row per image; and
    ``grades.json``'s entries. None when the run is not graded."""
    grades = rundir.read_grades(run_dir)
    if grades is None:
        return None
    manifest = rundir.read_manifest(run_dir, ("patient_id",), images_must_exist=False)
    truth = manifest[["image", "patient_id", *[c for c in TRUTH_COLUMNS if c in manifest.columns]]]
    if "new_inflammatory" in outcomes.columns:
        truth = truth.merge(outcomes[["image", "new_inflammatory"]], on="image", how="left")
    table = truth.merge(grades.drop(columns=[rundir.GRADES_SHA], errors="ignore"), left_on="image",
                        right_on=rundir.GRADES_KEY, how="inner")
    return table, rundir.read_grades_index(run_dir)


def evaluated_columns(index: dict) -> list[str]:
    """Per grader, its outcome columns and its counts (``<grader>_count``, ``<grader>_visible_count``)."""
    out: list[str] = []
    for name, entry in index.items():
        columns = entry.get("columns", [])
        for c in [*entry.get("outcomes", []), f"{name}_count", f"{name}_visible_count"]:
            if c in columns and c not in out:
                out.append(c)
    return out


def accuracy_table(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per grade column and truth: n, MAE and bias (where both are on one scale), Pearson r, Spearman r, the
    median within-patient Spearman r and over how many patients."""
    rows = []
    for column in columns:
        for truth_name, truth in truths_for(column).items():
            if truth not in table.columns or column not in table.columns:
                continue
            m = count_agreement(table[column].to_numpy(dtype=float, na_value=np.nan),
                                table[truth].to_numpy(dtype=float, na_value=np.nan), table["patient_id"])
            same_scale = column.endswith(("count", "new_inflammatory", "severity", "expected_grade"))
            rows.append({"grade column": column, "against": f"{truth_name} ({truth})", "images": m["n"],
                         "MAE": m["mae"] if same_scale else np.nan, "bias": m["bias"] if same_scale else np.nan,
                         "Pearson r": m["pearson_r"], "Spearman r": m["spearman_r"],
                         "within-patient Spearman r (median)": m["within_spearman_median"],
                         "patients": m["within_patients"]})
    return pd.DataFrame(rows)


def _count_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if c.endswith("count") and not c.endswith("new_inflammatory")]


def scatter_figure(table: pd.DataFrame, columns: list[str]) -> str | None:
    """Base64 PNG: per count column (a panel), the grader's count against the simulated (black) and the
    visible (orange) lesion count of every image, with the identity line; None when no grader counts."""
    counts = [c for c in _count_columns(columns) if c in table.columns]
    if not counts:
        return None

    plt = pyplot()
    fig, axes = plt.subplots(1, len(counts), figsize=(3.6 * len(counts), 3.4), squeeze=False)
    for ax, column in zip(axes.flat, counts):
        y = table[column].to_numpy(dtype=float, na_value=np.nan)
        top = 1.0
        for truth, colour in (("lesion_count", "#222222"), ("visible_count", "#ff7f0e")):
            if truth in table.columns and (truth != "lesion_count" or not column.endswith("visible_count")):
                x = table[truth].to_numpy(dtype=float, na_value=np.nan)
                ax.scatter(x, y, s=9, alpha=0.6, color=colour, label=truth.replace("_", " "))
                top = max(top, np.nanmax(x) if np.isfinite(x).any() else 0)
        top = max(top, np.nanmax(y) if np.isfinite(y).any() else 0) * 1.05
        ax.plot([0, top], [0, top], color="#999999", lw=0.8, ls=":")
        ax.set_xlim(0, top), ax.set_ylim(0, top)
        ax.set_xlabel("true count"), ax.set_ylabel(column)
        ax.legend(fontsize=7, loc="upper left")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return png(fig)


def level_pairs(index: dict, table: pd.DataFrame) -> list[tuple[str, str, int]]:
    """(grade column, truth column, classes) for every graded level (``<grader>_level``, ``<grader>_grade``) that
    ``grades.json`` lists and whose truth the run has."""
    pairs = []
    for name, entry in index.items():
        for suffix, (truth, classes) in LEVELS.items():
            column = f"{name}_{suffix}"
            if column in entry.get("columns", []) and column in table.columns and truth in table.columns:
                pairs.append((column, truth, classes))
    return pairs


def confusion(truth: np.ndarray, graded: np.ndarray, classes: int) -> np.ndarray:
    """Counts of (true class, graded class), ``classes`` x ``classes``; images with a missing value left out."""
    keep = np.isfinite(truth) & np.isfinite(graded)
    t = np.clip(np.rint(truth[keep]).astype(int), 0, classes - 1)
    g = np.clip(np.rint(graded[keep]).astype(int), 0, classes - 1)
    matrix = np.zeros((classes, classes), dtype=int)
    np.add.at(matrix, (t, g), 1)
    return matrix


def confusion_figure(table: pd.DataFrame, pairs: list[tuple[str, str, int]]) -> str | None:
    """Base64 PNG: a confusion matrix per graded level (rows the truth, columns the grade), counts written in,
    accuracy in the title; None when nothing is graded in levels."""
    if not pairs:
        return None

    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.0 * len(pairs), 3.0), squeeze=False)
    for ax, (column, truth, classes) in zip(axes.flat, pairs):
        matrix = confusion(table[truth].to_numpy(dtype=float, na_value=np.nan),
                           table[column].to_numpy(dtype=float, na_value=np.nan), classes)
        ax.imshow(matrix, cmap="Blues")
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > matrix.max() / 2 else "black")
        accuracy = np.trace(matrix) / matrix.sum() if matrix.sum() else np.nan
        ax.set_title(f"{column}: accuracy {accuracy:.2f}", fontsize=8, loc="left")
        ax.set_xlabel("graded", fontsize=8), ax.set_ylabel(f"true ({truth})", fontsize=8)
        ax.set_xticks(range(classes)), ax.set_yticks(range(classes))
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return png(fig)


def below_target_lines(index: dict) -> list[str]:
    """One line per grader graded below its targets (what ``grade`` and ``analyze`` warned)."""
    from synthtrial.graders.cards import below_targets_line

    return [below_targets_line(name, str(entry.get("below_targets", "below its targets")))
            for name, entry in index.items() if entry.get("meets_targets") is False]


def grader_section(run_dir: Path, outcomes: pd.DataFrame) -> str:
    """The report's grader-accuracy section (HTML), or one line saying the run is not graded."""
    found = graded_table(run_dir, outcomes)
    if found is None:
        return (f"<p>Not graded: run <code>synthtrial grade {html.escape(str(run_dir))}</code> to score the images "
                "and see each grader against the truth here.</p>")
    table, index = found
    columns = evaluated_columns(index)
    parts = [f'<p class=warn>{html.escape(line)}</p>' for line in below_target_lines(index)]
    parts.append("<p>Each grade column against the run's truth: MAE and bias in the column's units, Pearson and "
                 "Spearman r over all images, and the median over patients of the Spearman r within a patient "
                 "(does the grade follow the patient's course?).</p>")
    parts.append(html_table(accuracy_table(table, columns), cls="accuracy"))
    scatter = scatter_figure(table, columns)
    if scatter is not None:
        parts.append(f'<img alt="count vs truth" src="data:image/png;base64,{scatter}">')
    matrices = confusion_figure(table, level_pairs(index, table))
    if matrices is not None:
        parts.append(f'<img alt="confusion matrices" src="data:image/png;base64,{matrices}">')
    return "".join(parts)
