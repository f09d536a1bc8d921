"""The grader seam: one protocol every grader implements, a registry, weights on disk, and ``grade_run``.

A grader is a small object with a ``name`` and one ``predict(images, meta=None) -> DataFrame`` (one row per
image, in order; numeric columns). ``meta`` is the manifest rows of the images (``patient_id``, ``day``,
``view``, ...) when they come from a run, so a grader that fuses the views of a visit (IGA) can group them;
graders that look at one image at a time ignore it.

Weights live in a folder: ``model.safetensors`` + ``config.json`` (plain data: the grader's name, its
architecture settings, its training record). Nothing is ever unpickled: :func:`load_state` reads
safetensors only and refuses a pickle with a one-line error naming the file.

:func:`grade_run` scores every image of a run directory with the given graders and writes
``RUN/grades.parquet`` (``image`` + ``<grader>_<column>``) and ``RUN/grades.json`` (per grader: its
fingerprint, columns, and the columns ``analyze`` takes as outcomes). Work is saved per chunk of images (a
chunk never splits a visit: the images of one patient-day) under
``RUN/.grades/<grader>-<fingerprint>/``, so an interrupted ``synthtrial grade`` resumes; a grader whose
weights change gets a new fingerprint and is scored again.
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

from synthtrial import rundir
from synthtrial.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.errors import SynthtrialError, one_line

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: Folder of the default weights shipped with the package.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Images graded per saved chunk (resume granularity).
CHUNK = 64
PARTS_DIR = ".grades"


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


register(GraderSpec("counter", "graders.counter:LesionCounter",
                    "classical lesion counter: skin-masked CIELAB blobs; count and ACNE04/Hayashi level",
                    needs_weights=False))
register(GraderSpec("iga", "graders.iga:IGAGrader",
                    "IGA severity network (QuantifiCare recipe): face crop, CIFAR ResNet, views of a visit fused; "
                    "5-grade and 3-class (0-1/2/3-4) probabilities, expected grade"))
register(GraderSpec("imageqx", "graders.imageqx:ImageQX",
                    "ImageQX photo quality (EfficientNet-B0): acceptable/poor and five reasons (bad framing, "
                    "bad light, blurry, low resolution, too far away)"))
register(GraderSpec("detector", "graders.detector:LesionDetector",
                    "two-stage lesion detector (Faster R-CNN + FPN, SADH + NWD RPN head): count, per-type counts, "
                    "ACNE04/Hayashi level, severity"))
register(GraderSpec("dermx", "graders.dermx:DermX",
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

def resolve_device(device: str | None) -> Any:
    """A torch device: ``device`` as given (checked), else CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise GraderError(f"--device '{device}' is not a torch device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GraderError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise GraderError(f"--device {device}: only cpu and cuda are supported")
    return dev


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
    from synthtrial.weights import WeightsError, load_safetensors

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


# ---------------------------------------------------------------------------------------- grade_run

def grade_run(run: str | os.PathLike[str], graders: Sequence[Grader], *, batch_size: int = CHUNK,
              progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Score every image of ``run`` with ``graders``; write ``RUN/grades.parquet`` and return its path.

    Columns: ``image`` and ``<grader>_<column>`` for each grader's output columns. Columns of other graders
    already in the file are kept. Each chunk of ``batch_size`` images is saved under ``RUN/.grades/`` as it
    is done, so a re-run resumes. ``progress(done, total, status)`` is called after each chunk.
    """
    run_dir = Path(run)
    manifest = rundir.read_manifest(run_dir, ("image", "patient_id", "day", "view"))
    if not graders:
        raise GraderError("no graders given (option --graders)")
    names = [g.name for g in graders]
    if len(set(names)) != len(names):
        raise GraderError(f"grader listed twice: {', '.join(names)} (option --graders)")
    chunks = visit_chunks(manifest, batch_size)
    total, done = len(manifest) * len(graders), 0
    with rundir.locked(run_dir, what="grading"):
        columns: dict[str, pd.DataFrame] = {}
        for grader in graders:
            folder = run_dir / PARTS_DIR / f"{grader.name}-{grader.fingerprint()}"
            frames = []
            for k, chunk in enumerate(chunks):
                part = folder / f"{k:05d}.parquet"
                if part.is_file():
                    frame = rundir.read_parquet(part)
                else:
                    images = [read_rgb(run_dir / rel) for rel in chunk["image"]]
                    frame = grader.predict(images, chunk.reset_index(drop=True))
                    _check_output(grader, frame, len(chunk))
                    rundir.write_table(part, frame.reset_index(drop=True))
                frames.append(frame)
                done += len(chunk)
                if progress is not None:
                    progress(done, total, grader.name)
            out = pd.concat(frames, ignore_index=True)
            columns[grader.name] = out.add_prefix(f"{grader.name}_")
        grades = pd.concat([manifest[["image"]].reset_index(drop=True), *columns.values()], axis=1)
        old = rundir.read_grades(run_dir)
        if old is not None:
            keep = [c for c in old.columns if c != rundir.GRADES_KEY
                    and not any(c.startswith(f"{n}_") for n in names)]
            if keep:
                grades = grades.merge(old[[rundir.GRADES_KEY, *keep]], on=rundir.GRADES_KEY, how="left")
        index = rundir.read_grades_index(run_dir)
        for grader in graders:
            index[grader.name] = {"fingerprint": grader.fingerprint(),
                                  "columns": [c for c in columns[grader.name].columns],
                                  "outcomes": [f"{grader.name}_{c}" for c in grader.outcomes]}
        path = rundir.write_table(run_dir / rundir.GRADES, grades)
        write_text_atomic(run_dir / rundir.GRADES_INDEX, json.dumps({"graders": index}, indent=2, sort_keys=True)
                          + "\n")
    return path


def visit_chunks(manifest: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Consecutive runs of about ``size`` rows that never split a visit (the rows of one ``patient_id`` and
    ``day``), so a grader that fuses a visit's views (IGA) sees all of them in one call."""
    keys = list(zip(manifest["patient_id"].astype(str), manifest["day"].astype(str)))
    starts = [0]
    for i in range(1, len(keys)):
        if i - starts[-1] >= size and keys[i] != keys[i - 1]:
            starts.append(i)
    return [manifest.iloc[a:b] for a, b in zip(starts, [*starts[1:], len(keys)])]


def _check_output(grader: Grader, frame: Any, n: int) -> None:
    if not isinstance(frame, pd.DataFrame) or len(frame) != n:
        raise GraderError(f"grader '{grader.name}' returned {type(frame).__name__} of length "
                          f"{len(frame) if hasattr(frame, '__len__') else '?'} for {n} images")
    missing = [c for c in grader.outcomes if c not in frame.columns]
    if missing:
        raise GraderError(f"grader '{grader.name}' did not return its outcome columns {missing}")
