"""The package version, in a leaf module: every stage records it (``config.json``, ``truth.json``) without
importing the top-level package, whose facade (:mod:`synthtrial.api`) imports the stages."""

__version__ = "0.1.0"
