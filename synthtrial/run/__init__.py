"""The run stage: a protocol rendered into a run directory, checked, and exported.

In: a protocol CSV and a renderer. Out: ``RUN/`` (images, masks, manifest, lesions, truth, grids) and exports
(COCO, ACNE04, imagefolder). Owns: the run-directory contract (``rundir``), which every later stage reads.
"""
