"""The run browser (``synthtrial view``): a small web app over a run directory, served from 127.0.0.1 or
written as a static site.

In: ``RUN/`` (manifest, lesions and masks; grades, detections and tracks when graded; ``analysis/`` when
analysed; Grad-CAM overlays when explained). Out: HTTP answers on 127.0.0.1, or a folder of the same files
(``--static``); the run is never written. Owns: the list of URLs a run may serve (:mod:`synthtrial.view.data`),
the server (:mod:`synthtrial.view.server`) and ``assets/``, the plain HTML/CSS/JavaScript pages (no build
step, nothing fetched from elsewhere).
"""
