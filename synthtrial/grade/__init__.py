"""The grading stage: a run directory and graders in, ``RUN/grades.parquet`` and ``RUN/grades.json`` out.

In: a run directory (``synthtrial.run``) and grader components (``synthtrial.graders``). Out: one row of
grades per image and the index of outcome columns that ``analyze`` reads. Owns: the grades files, and the
evaluation of a grade count, and of the tracker's tracks, against the simulated and the visible truth (``evaluate``).
"""

from synthtrial.grade.evaluate import (count_agreement, evaluate_count, evaluate_run_count, evaluate_run_tracks,
                                      evaluate_tracks, tracking_metrics)
from synthtrial.grade.stage import GRADE_CHUNK, PARTS_DIR, grade_run, visit_chunks

__all__ = ["GRADE_CHUNK", "PARTS_DIR", "count_agreement", "evaluate_count", "evaluate_run_count", "evaluate_run_tracks",
           "evaluate_tracks", "grade_run", "tracking_metrics", "visit_chunks"]
