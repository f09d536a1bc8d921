"""The grader seam: one protocol every grader implements, a registry, and weights on disk.

A grader is a small object with a ``name`` and one ``predict(images, meta=None) -> DataFrame`` (one row per
image, in order; numeric columns). ``meta`` is the manifest rows of the images (``patient_id``, ``day``,
``view``, ...) when they come from a run, so a grader that fuses the views of a visit (IGA) can group them;
graders that look at one image at a time ignore it.

Weights live in a folder: ``model.safetensors`` + ``config.json`` (plain data: the grader's name, its
architecture settings, its training record). Nothing is ever unpickled: :func:`load_state` reads
safetensors only and refuses a pickle with a one-line error naming the file.

The grading stage that runs graders over a run directory lives in :mod:`synthtrial.grade`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from synthtrial.run import rundir
from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.errors import SynthtrialError, one_line

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: Folder of the default weights shipped with the package.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class GraderError(SynthtrialError):
    """A grader that cannot be built, loaded or run on the input given."""


@runtime_checkable
class Grader(Protocol):
    """What ``grade_run`` and ``analyze`` need from a grader."""

    name: str
    #: output columns (without the prefix) that ``analyze`` uses as outcomes, e.g. ``("expected_grade",)``
    outcomes: tuple[str, ...]

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        """One row per image (``(H, W, 3)`` uint8 RGB), in order; numeric columns named without the prefix."""
        ...

    def fingerprint(self) -> str:
        """Changes whenever the grader's outputs could change (weights, settings)."""
        ...


@dataclass(frozen=True)
class GraderSpec:
    """A registry entry: where the class lives and what it is."""

    name: str
    target: str            # "module:Class"; the class has ``load(path, device=None)`` and/or ``default()``
    summary: str
    needs_weights: bool = True

    def cls(self) -> Any:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


#: Every grader ``synthtrial grade`` knows, in the order they are listed. A grader module registers itself
#: here by name; only graders that are built appear.
REGISTRY: dict[str, GraderSpec] = {}


def register(spec: GraderSpec) -> GraderSpec:
    REGISTRY[spec.name] = spec
    return spec


register(GraderSpec("counter", "synthtrial.graders.counter:LesionCounter",
                    "classical lesion counter: skin-masked CIELAB blobs; count and ACNE04/Hayashi level",
                    needs_weights=False))
register(GraderSpec("iga", "synthtrial.graders.iga:IGAGrader",
                    "IGA severity network (QuantifiCare recipe): face crop, CIFAR ResNet, views of a visit fused; "
                    "5-grade and 3-class (0-1/2/3-4) probabilities, expected grade"))
register(GraderSpec("imageqx", "synthtrial.graders.imageqx:ImageQX",
                    "ImageQX photo quality (EfficientNet-B0): acceptable/poor and five reasons (bad framing, "
                    "bad light, blurry, low resolution, too far away)"))
register(GraderSpec("detector", "synthtrial.graders.detector:LesionDetector",
                    "two-stage lesion detector (Faster R-CNN + FPN, SADH + NWD RPN head): count, per-type counts, "
                    "ACNE04/Hayashi level, severity"))
register(GraderSpec("dermx", "synthtrial.graders.dermx:DermX",
                    "DermX: ACNE04 level and expected severity explained by lesion characteristics (probabilities; "
                    "Grad-CAM maps with `synthtrial graders explain`)"))


def available() -> list[str]:
    """Names of the graders that can be used now (built in, or with default weights shipped)."""
    return [name for name, spec in REGISTRY.items()
            if not spec.needs_weights or (DEFAULT_WEIGHTS_DIR / name / WEIGHTS_FILE).is_file()]


def get_grader(name: str, weights: str | os.PathLike[str] | None = None, device: str | None = None) -> Grader:
    """Build a registered grader: from ``weights`` (a folder), else from its shipped default weights."""
    if name not in REGISTRY:
        raise GraderError(f"unknown grader '{name}'; choose from: {', '.join(REGISTRY)} (option --graders)")
    spec = REGISTRY[name]
    cls = spec.cls()
    if weights is None and not spec.needs_weights:
        return cls.default(device=device) if hasattr(cls, "default") else cls()
    folder = Path(weights) if weights is not None else DEFAULT_WEIGHTS_DIR / name
    if weights is None and not (folder / WEIGHTS_FILE).is_file():
        raise GraderError(f"grader '{name}' has no default weights in {folder}; train them with "
                          f"`synthtrial graders train {name}` and pass --weights")
    return cls.load(folder, device=device)


# ------------------------------------------------------------------------------------------ weights


def save_state(folder: str | os.PathLike[str], tensors: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (contiguous CPU tensors) and ``config.json`` into ``folder``, atomically each."""
    from safetensors.torch import save

    folder = Path(folder)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    write_bytes_atomic(folder / WEIGHTS_FILE, data)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def load_state(folder: str | os.PathLike[str], *, kind: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, config)`` from a weights folder; one-line errors for anything but safetensors + JSON.

    ``kind`` checks ``config["grader"]`` so one grader's weights are not loaded into another.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GraderError(f"{folder}: no such weights folder (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = f" (it holds {pickles[0]}: pickled checkpoints are never loaded)" if pickles else ""
        raise GraderError(f"{folder}: no {WEIGHTS_FILE}{hint}")
    config = rundir.read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    if config is None:
        raise GraderError(f"{folder}: no {CONFIG_FILE} beside {WEIGHTS_FILE}")
    if kind is not None and config.get("grader") != kind:
        raise GraderError(f"{folder / CONFIG_FILE}: holds weights of grader {config.get('grader')!r}, not '{kind}'")
    from synthtrial.util.weights import WeightsError, load_safetensors

    try:
        tensors = load_safetensors(weights)
    except WeightsError as exc:  # the graders' own error type, same one line
        raise GraderError(str(exc)) from None
    return tensors, config


def load_into(module: Any, tensors: dict[str, Any], folder: str | os.PathLike[str], what: str) -> None:
    """``module.load_state_dict(tensors)``, with a one-line error when the weights do not fit ``what``."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise GraderError(f"{Path(folder) / WEIGHTS_FILE}: does not fit the {what} of its {CONFIG_FILE} "
                          f"({str(exc).splitlines()[0]})") from None


def fingerprint_of(config: dict[str, Any], weights: Path | None = None) -> str:
    """A short hash of a grader's config and (when given) its weights file."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if weights is not None:
        digest.update(rundir.sha256_file(weights).encode())
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------- images

def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, or a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError:
        raise GraderError(f"{path}: the image header claims more pixels than are read; refusing it") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise GraderError(f"{path}: cannot be read as an image ({one_line(exc)})") from None
