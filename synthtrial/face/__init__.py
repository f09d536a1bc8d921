"""The face stage: portraits in, landmarked faces with identities and views out.

In: built-in or user portraits. Out: ``Face`` objects (image, 468-point mesh, skin regions, head turns).
Owns: the face-mesh topology and frames (``mesh``), identities (``faces``) and side views (``headturn``).
"""
