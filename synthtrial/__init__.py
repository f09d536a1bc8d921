"""synthtrial: simulated multimodal N-of-1 acne trials."""

from synthtrial.version import __version__

__all__ = ["__version__"]
