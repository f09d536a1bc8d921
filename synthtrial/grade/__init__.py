"""The grading stage: a run directory and graders in, ``RUN/grades.parquet`` and ``RUN/grades.json`` out.

In: a run directory (``synthtrial.run``) and grader components (``synthtrial.graders``). Out: one row of
grades per image and the index of outcome columns that ``analyze`` reads. Owns: the grades files.
"""

from synthtrial.grade.stage import GRADE_CHUNK, PARTS_DIR, grade_run, visit_chunks

__all__ = ["GRADE_CHUNK", "PARTS_DIR", "grade_run", "visit_chunks"]
