"""Utilities every stage shares: errors, atomic writes, progress, seeding, devices, weights files, image constants.

In: nothing from the rest of synthtrial (this layer imports no stage). Out: small functions and constants.
Owns: the error type and one-line messages, atomic writes, the progress-callback signature, seed derivation.
"""
