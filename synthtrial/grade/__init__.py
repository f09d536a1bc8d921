"""The grading stage: a run directory and graders in, ``RUN/grades.parquet`` and ``RUN/grades.json`` out.

In: a run directory (``synthtrial.run``) and grader components (``synthtrial.graders``). Out: one row of
grades per image and the index of outcome columns that ``analyze`` reads. Owns: the grades files, and the
evaluation of a grade count, and of the tracker's tracks, against the simulated and the visible truth (``evaluate``).
Calling the package, ``synthtrial.grade(run)``, calls :func:`synthtrial.api.grade` (see :mod:`synthtrial`).
"""

#: What the stage exports, by module; loaded on first use, so that ``import synthtrial`` (which makes this
#: package callable, :mod:`synthtrial`) stays light.
_FROM_EVALUATE = ("count_agreement", "evaluate_count", "evaluate_run_count", "evaluate_run_tracks", "evaluate_tracks",
                  "tracking_metrics")
_FROM_STAGE = ("GRADE_CHUNK", "PARTS_DIR", "grade_run", "visit_chunks")

__all__ = sorted([*_FROM_EVALUATE, *_FROM_STAGE])


def __getattr__(name: str) -> object:
    if name in _FROM_EVALUATE:
        from synthtrial.grade import evaluate

        return getattr(evaluate, name)
    if name in _FROM_STAGE:
        from synthtrial.grade import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
