"""The trial stage: a protocol CSV and a design in, the schedule and every patient's latent severity out.

In: a protocol CSV (anchor or native form) or a ``TrialDesign``. Out: the normalised protocol table and
``truth.json``. Owns: the protocol contract (``protocol``), the severity scale (``scale``), the simulator.
"""
