"""Rendered replicates of a power study: image-based outcomes (autoencoder/PCA, graders) of simulated trials.

A power study's rendering-free outcomes (:mod:`synthtrial.analyze.power`) say how well a perfect grader or
the lesion model's count would find an effect. To say the same of the outcomes read off the images, the
first ``replicates`` trials of every scenario are also rendered and scored, through the same public stages
a user runs:

1. the simulated protocol and its truth are written to a temporary folder and rendered by
   :func:`synthtrial.run.generation.generate` (procedural backend, built-in faces, ``image_size`` pixels, one process);
2. :func:`synthtrial.grade.grade_run` scores every image with each of ``graders`` (their shipped defaults);
3. :func:`synthtrial.analyze.pipeline.run_outcomes` (through which ``synthtrial analyze`` reads a run's
   outcomes) adds the graders' columns and trains the convolutional autoencoder on the trial's images
   (``ae_image_size`` pixels, ``epochs``, the default pre-sigmoid embedding), reducing each patient's
   embeddings to the first principal component (``ae_pca``, in that patient's SD units);
4. :func:`synthtrial.analyze.pipeline.daily` averages the views of a day, as ``synthtrial analyze`` does.

The outcome columns carry the names ``analyze`` gives them (``ae_pca``, ``grader_<grader>_<column>``). They
are not on the severity scale, so they have no raw truth (bias and coverage are NaN); the standardised
effect, its coverage of the standardised truth and the calibration slope come from :func:`~synthtrial.analyze.stats.
standardize` as for every outcome.

Choices, stated once:

* Which replicates: the first ``replicates`` of each scenario (indices 0, 1, ...), so the set, and every
  number, does not depend on the number of workers, chunking or resuming.
* Seeds: the images from ``derive_seed("power-render", seed)`` and the autoencoder from
  ``derive_seed("power-autoencoder", seed)``, ``seed`` being the replicate's trial seed (so scenarios of one
  grid share faces and lesion placement for a replicate, as they share its noise).
* Determinism: everything runs on the CPU (graders and autoencoder) with one torch thread
  (``torch.set_num_threads(1)``, restored afterwards): a CPU training is bit-reproducible only with a fixed
  number of threads, so a replicate gives the same numbers in this process and on any Dask worker. A Dask
  worker running several tasks at once (``threads_per_worker > 1`` on a ``--scheduler`` cluster) would
  share that setting; ``synthtrial power``'s own cluster has single-threaded workers.
* Graders are built once per process (their weights and MediaPipe's models load once, not per replicate);
  their predictions depend on the image alone, so reusing them changes no number.
* Cost: rendering and grading dominate; they grow with the number of images (patients x days x views) and
  with ``image_size`` (a quick-design replicate, 48 images: ~3 s at 128 px, ~12 s at 512 px, counter only,
  one core); ``benchmarks/power.py`` prints the seconds per rendered replicate.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from synthtrial.analyze.limits import MAX_AE_IMAGE_SIZE, MAX_EPOCHS, MAX_RENDERED, MIN_AE_IMAGE_SIZE
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.seeding import derive_seed

if TYPE_CHECKING:
    from synthtrial.trial.simulate import SimulatedTrial

#: The autoencoder outcome's column (as ``synthtrial analyze`` names it).
AE_OUTCOME = "ae_pca"
#: generate's smallest image side; the default keeps rendering cheap.
MIN_IMAGE_SIZE = 128
MAX_IMAGE_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class RenderedSettings:
    """Which replicates are rendered and how; checked when built (errors name the ``synthtrial power`` option)."""

    replicates: int = 1
    image_size: int = MIN_IMAGE_SIZE
    epochs: int = 3
    ae_image_size: int = 64
    graders: tuple[str, ...] = ("counter",)

    def __post_init__(self) -> None:
        def whole(name: str, option: str, minimum: int, maximum: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise SynthtrialError(f"{option} must be a whole number >= {minimum}, got {value!r}")
            if value > maximum:
                raise SynthtrialError(f"{option} must be between {minimum} and {maximum}, got {value}")
            object.__setattr__(self, name, int(value))
            return int(value)

        whole("replicates", "--rendered", 1, MAX_RENDERED)
        size = whole("image_size", "--size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        whole("epochs", "--ae-epochs", 1, MAX_EPOCHS)
        ae = whole("ae_image_size", "--ae-image-size", MIN_AE_IMAGE_SIZE, MAX_AE_IMAGE_SIZE)
        if ae & (ae - 1) or ae > size:
            raise SynthtrialError(f"--ae-image-size must be a power of two from 16 to --size ({size}), got {ae}")
        graders = (self.graders,) if isinstance(self.graders, str) else tuple(self.graders)
        if len(set(graders)) != len(graders):
            raise SynthtrialError(f"--grader: a grader is named twice ({', '.join(graders)})")
        for name in graders:
            grader_outcomes(name)
        object.__setattr__(self, "graders", graders)


def is_image_outcome(name: str) -> bool:
    """Whether an outcome column comes from rendered images (the autoencoder's or a grader's)."""
    from synthtrial.analyze.estimators import GRADER_OUTCOME_PREFIX

    return name == AE_OUTCOME or name.startswith(GRADER_OUTCOME_PREFIX)


def grader_outcomes(name: str) -> tuple[str, ...]:
    """The outcome columns a registered grader adds (``grader_<name>_<column>``); a one-line error naming
    ``--grader`` for an unknown grader, one without shipped weights, or one that grades no outcome."""
    from synthtrial.graders.base import REGISTRY, available

    if name not in REGISTRY:
        raise SynthtrialError(f"--grader: unknown grader '{name}'; choose from {', '.join(REGISTRY)}")
    if name not in available():
        raise SynthtrialError(f"--grader {name}: no default weights shipped (train them with "
                              f"`synthtrial graders train {name}`)")
    outcomes = tuple(getattr(REGISTRY[name].cls(), "outcomes", ()))
    if not outcomes:
        raise SynthtrialError(f"--grader {name}: grades no trial outcome (it judges photo quality)")
    from synthtrial.analyze.estimators import GRADER_OUTCOME_PREFIX

    return tuple(f"{GRADER_OUTCOME_PREFIX}{name}_{column}" for column in outcomes)


@functools.lru_cache(maxsize=None)
def _cpu_grader(name: str):
    from synthtrial.graders.base import get_grader

    return get_grader(name, device="cpu")


def rendered_outcome_names(settings: RenderedSettings) -> tuple[str, ...]:
    """The image outcome columns a rendered replicate adds, in order."""
    return (AE_OUTCOME, *(c for name in settings.graders for c in grader_outcomes(name)))


def render_trial(trial: SimulatedTrial, settings: RenderedSettings, seed: int) -> pd.DataFrame:
    """Render, grade and embed one simulated trial (``simulate_trial(...)``'s result); one row per patient-day.

    Columns: ``patient_id, day, treatment, block`` and :func:`rendered_outcome_names` (views averaged).
    The stages are those a user runs: ``generate``, ``grade`` and ``analyze``'s
    :func:`~synthtrial.analyze.pipeline.run_outcomes` and :func:`~synthtrial.analyze.pipeline.daily`. The
    temporary folder is removed afterwards, also on an error.
    """
    import torch

    from synthtrial.analyze.pipeline import ANALYSIS, AnalysisSettings, Timings, daily, run_outcomes
    from synthtrial.grade import grade_run
    from synthtrial.run.generation import generate
    from synthtrial.run.rundir import read_run

    columns = list(rendered_outcome_names(settings))
    analysis = AnalysisSettings(epochs=settings.epochs, image_size=settings.ae_image_size,
                                seed=derive_seed("power-autoencoder", seed, bits=32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="synthtrial-render-") as tmp:
            protocol_path, _ = trial.write(Path(tmp) / "trial.csv")
            run_dir = generate(protocol_path, Path(tmp) / "run", seed=derive_seed("power-render", seed, bits=32),
                               size=settings.image_size, workers=1, progress=False, backend="procedural")
            if settings.graders:
                grade_run(run_dir, [_cpu_grader(name) for name in settings.graders])
            manifest, _ = read_run(run_dir)
            outcomes = run_outcomes(run_dir, manifest, analysis, run_dir / ANALYSIS, Timings(), device="cpu",
                                    progress=False)
    finally:
        torch.set_num_threads(threads)
    missing = [c for c in columns if c not in outcomes.columns]
    if missing:
        raise SynthtrialError(f"a rendered replicate lacks the outcome column(s) {', '.join(missing)}")
    return daily(outcomes, columns)
