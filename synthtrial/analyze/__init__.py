"""The analysis stage: a graded run directory in, treatment effects set beside the simulated truth out.

In: ``RUN/`` (manifest, truth, grades) or simulated trials (``power``). Out: ``RUN/analysis/`` (outcomes,
effects.csv, report.html) and power tables. Owns: the estimator registry and the ``Estimate`` record.
Calling the package, ``synthtrial.analyze(run)``, calls :func:`synthtrial.api.analyze` (see :mod:`synthtrial`).
"""
