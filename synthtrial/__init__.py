"""synthtrial: simulated multimodal N-of-1 acne trials."""

__version__ = "0.1.0"
