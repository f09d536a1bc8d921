"""Renderers that draw a day's lesions into a face photo."""

from synthtrial.render import procedural
from synthtrial.render.procedural import *  # noqa: F403  (the public names listed in procedural.__all__)

__all__ = list(procedural.__all__)
