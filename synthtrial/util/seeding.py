"""Seeds derived from names, so each patient, day, lesion course or replicate draws its own stream.

A derived seed depends only on the parts it is named by (unlike Python's ``hash``, which changes between
processes), so results do not change with the number of patients, their order, or the number of workers.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object, bits: int = 64) -> int:
    """An integer seed from ``parts`` (joined with ':' and hashed with SHA-256), ``bits`` wide."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[: bits // 8], "little")


def derived_rng(*parts: object) -> np.random.Generator:
    """A NumPy generator seeded by :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(*parts))
