"""The lesion stage: a patient's daily severities in, a persistent lesion population over the series out.

In: latent severity per day (``synthtrial.trial``) and a face (``synthtrial.face``). Out: a ``LesionCourse``
whose lesions keep their ids, types, anchors in face-mesh coordinates and life stages from day to day.
"""
