"""The grader components (installed as ``synthtrial.graders``): images in, one row of grades per image out.

In: RGB images (and the manifest rows of a run, for graders that fuse a visit). Out: DataFrames of grades.
Owns: the ``Grader`` protocol and registry (``base``), weights as ``config.json`` + ``model.safetensors``.
"""
