"""Limits on the size-like inputs of ``analyze`` and ``power``, stated once (their ``--help`` shows them).

Each keeps one command within minutes to hours and within memory on a workstation, far beyond any
setting the anchors use; anything larger is refused with one line before any work. This module imports
nothing, so the command line can state the limits without loading the analysis stack.
"""

#: A significance level lies strictly between these: CIs are ``1 - alpha``, and a level of one half or more
#: would call more than half of all null results significant.
ALPHA_RANGE = (0.0, 0.5)
#: Autoencoder training epochs (``analyze --epochs``, ``power --ae-epochs``); Schneider et al. train 10.
MAX_EPOCHS = 1000
#: Autoencoder input side (a 1024 px image already takes 12 MB as float32); a power of two from 16.
MIN_AE_IMAGE_SIZE, MAX_AE_IMAGE_SIZE = 16, 1024
#: Relabelings per day-level permutation test (``analyze --permutations``).
MIN_PERMUTATIONS, MAX_PERMUTATIONS = 100, 1_000_000
#: Simulated trials per scenario (``power --replicates``), and over the whole grid (scenarios x replicates):
#: every estimate is kept in memory, some 50 rows per quick-design trial.
MAX_REPLICATES = 100_000
MAX_TRIALS = 100_000
#: Rendered replicates per scenario (``power --rendered``; about 3 s each on the quick design).
MAX_RENDERED = 1000
#: Patients per simulated trial (``power --patients`` and a ``--design`` file's ``n_patients``).
MAX_PATIENTS = 1000
#: Days of one patient's whole schedule in a power study (the period length's limit is the design's own,
#: :data:`synthtrial.trial.simulate.MAX_PERIOD_DAYS`).
MAX_DAYS_PER_PATIENT = 3650
#: Largest magnitude of an outcome value the estimators take: far beyond any severity, count or score, and
#: small enough that sums of squares over a trial stay finite.
MAX_OUTCOME = 1e12
