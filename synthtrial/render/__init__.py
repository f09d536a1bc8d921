"""The render stage: a face, a day's lesions and photo settings in, an image, its instance mask and boxes out.

In: ``RenderRequest`` (face, ``LesionSpec`` list, view, seed). Out: ``RenderResult`` (image, mask, lesion table).
Owns: the renderer protocol and backend registry (``base``); procedural and SDXL backends; fine-tuning.
"""
