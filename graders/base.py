"""The grader seam: one protocol every grader implements, a registry, and weights on disk.

A grader is a small object with a ``name`` and one ``predict(images, meta=None) -> DataFrame`` (one row per
image, in order; numeric columns). ``meta`` is the manifest rows of the images (``patient_id``, ``day``,
``view``, ...) when they come from a run, so a grader that fuses the views of a visit (IGA) can group them;
graders that look at one image at a time ignore it.

Every grader is a :class:`GraderComponent` (a component in the diffusers sense): a config dataclass of plain
data, saved flat in ``config.json`` with the grader's name and its training record, weights in
``model.safetensors``, ``from_pretrained(DIR)`` / ``save_pretrained(DIR)`` / ``default()`` and one
fingerprint (config + serialised weights). Nothing is ever unpickled: :func:`load_state` reads safetensors
only and refuses a pickle with a one-line error naming the file; NaN or infinite tensors and config values
are refused at load.

Two optional capabilities sit beside the protocol. A :class:`DetectingGrader` (the detector) also returns
what it found in each image, which the grading stage keeps in ``RUN/detections.parquet``. A
:class:`SequenceGrader` (the tracker) grades a patient's series rather than single images: the stage runs it
after the image graders, on the detections of a grader it ``needs``, which must be run in the same call.

The grading stage that runs graders over a run directory lives in :mod:`synthtrial.grade`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from synthtrial.run import rundir
from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.errors import SynthtrialError, one_line
from synthtrial.util.progress import ProgressCallback

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: Size limits of the graders' configs, so a typo is refused in one line before any memory is taken: the
#: detector's image side, tiles and anchors (pixels), a network's input side (pixels), the IGA CIFAR ResNet.
MAX_IMAGE_SIDE = 4096
MAX_INPUT_SIZE = 2048
MAX_DEPTH, MAX_WIDTH = 302, 256
#: Folder of the default weights shipped with the package.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class GraderError(SynthtrialError):
    """A grader that cannot be built, loaded or run on the input given."""


@runtime_checkable
class Grader(Protocol):
    """What ``grade_run`` and ``analyze`` need from a grader, and how it is stored (:class:`GraderComponent`
    implements the storage part for every grader)."""

    name: str
    #: output columns (without the prefix) that ``analyze`` uses as outcomes, e.g. ``("expected_grade",)``
    outcomes: tuple[str, ...]

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        """One row per image (``(H, W, 3)`` uint8 RGB), in order; numeric columns named without the prefix."""
        ...

    def fingerprint(self) -> str:
        """Changes whenever the grader's outputs could change (weights, settings)."""
        ...

    def save_pretrained(self, folder: str | os.PathLike[str], dtype: str | None = None) -> Path:
        """Write ``config.json`` (and ``model.safetensors``) into ``folder``."""
        ...

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], device: Any = None) -> Grader:
        """The grader saved in ``folder``."""
        ...

    @classmethod
    def default(cls, device: Any = None) -> Grader:
        """The shipped grader (default weights, or the default config of a grader without weights)."""
        ...


@runtime_checkable
class DetectingGrader(Protocol):
    """A grader that also keeps what it found: boxes, classes and scores (``RUN/detections.parquet``)."""

    def predict_detections(self, images: Sequence[np.ndarray],
                           meta: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(predict's frame, detections)``: one row per detection with ``index`` (the image's position in
        ``images``), ``x0, y0, x1, y1`` (pixels of the image), ``class``, ``score`` and ``counted`` (whether it
        is part of the grader's lesion count)."""
        ...


@runtime_checkable
class SequenceGrader(Protocol):
    """A grader of a patient's series: it reads the detections of the graders it ``needs`` (run in the same
    ``grade`` call) and every image of the run, and returns per-image grades and a table of its own."""

    needs: tuple[str, ...]
    #: the file its table goes to (one of :data:`synthtrial.run.rundir.GRADE_TABLES`)
    table: str

    def grade_series(self, manifest: pd.DataFrame, detections: pd.DataFrame, read_image: Any,
                     progress: ProgressCallback | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(grades, table)``: one row of grades per ``manifest`` row, in its order; the table keyed by ``image``."""
        ...


@dataclass(frozen=True)
class GraderSpec:
    """A registry entry: where the class lives and what it is; ``needs`` the graders whose output it reads."""

    name: str
    target: str            # "module:Class", a :class:`GraderComponent`
    summary: str
    needs_weights: bool = True
    needs: tuple[str, ...] = ()

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
register(GraderSpec("tracker", "synthtrial.graders.tracker:LesionTracker",
                    "lesion tracker: the detector's lesions linked visit to visit in face-mesh coordinates; "
                    "persisting, new and resolved lesions per visit (all and inflammatory)",
                    needs_weights=False, needs=("detector",)))


def available() -> list[str]:
    """Names of the graders that can be used now (built in, or with default weights shipped, and so are the
    graders whose output they read)."""
    ready = {name for name, spec in REGISTRY.items()
             if not spec.needs_weights or (DEFAULT_WEIGHTS_DIR / name / WEIGHTS_FILE).is_file()}
    return [name for name, spec in REGISTRY.items() if name in ready and all(n in ready for n in spec.needs)]


def image_graders() -> list[str]:
    """The :func:`available` graders that grade single images: all but the series graders (those that read
    other graders' output, as the tracker reads the detector's boxes)."""
    return [name for name in available() if not REGISTRY[name].needs]


def get_grader(name: str, weights: str | os.PathLike[str] | None = None, device: Any = None) -> Grader:
    """Build a registered grader: from ``weights`` (a folder), else its :meth:`~GraderComponent.default`."""
    if name not in REGISTRY:
        raise GraderError(f"unknown grader '{name}'; choose from: {', '.join(REGISTRY)} (option --graders)")
    cls = REGISTRY[name].cls()
    return cls.default(device=device) if weights is None else cls.from_pretrained(weights, device=device)


# ------------------------------------------------------------------------------------------ weights


def save_state(folder: str | os.PathLike[str], tensors: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (contiguous CPU tensors) and ``config.json`` into ``folder``, atomically each."""
    from safetensors.torch import save

    folder = Path(folder)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    write_bytes_atomic(folder / WEIGHTS_FILE, data)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def read_config(folder: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """``folder/config.json`` as a dict; ``kind`` checks its ``grader`` so one grader's weights are not loaded
    into another."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GraderError(f"{folder}: no such weights folder (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
    config = rundir.read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    if config is None:
        raise GraderError(f"{folder}: no {CONFIG_FILE}")
    if not isinstance(config, dict):
        raise GraderError(f"{folder / CONFIG_FILE}: is not a JSON object")
    if kind is not None and config.get("grader") != kind:
        raise GraderError(f"{folder / CONFIG_FILE}: holds weights of grader {config.get('grader')!r}, not '{kind}'")
    return config


def load_state(folder: str | os.PathLike[str], *, kind: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, config)`` from a weights folder; one-line errors for anything but safetensors + JSON, and
    for tensors holding NaN or infinity."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if folder.is_dir() and not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = f" (it holds {pickles[0]}: pickled checkpoints are never loaded)" if pickles else ""
        raise GraderError(f"{folder}: no {WEIGHTS_FILE}{hint}")
    config = read_config(folder, kind)
    from synthtrial.util.weights import WeightsError, load_safetensors

    try:
        tensors = load_safetensors(weights)
    except WeightsError as exc:  # the graders' own error type, same one line
        raise GraderError(str(exc)) from None
    import torch

    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise GraderError(f"{weights}: tensor {name} holds NaN or infinite values; refusing these weights")
    return tensors, config


def load_into(module: Any, tensors: dict[str, Any], folder: str | os.PathLike[str], what: str) -> None:
    """``module.load_state_dict(tensors)``, with a one-line error when the weights do not fit ``what``."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise GraderError(f"{Path(folder) / WEIGHTS_FILE}: does not fit the {what} of its {CONFIG_FILE} "
                          f"({str(exc).splitlines()[0]})") from None


def fingerprint_of(config: dict[str, Any], weights: bytes | None = None) -> str:
    """A short hash of a grader's config and (when given) its serialised weights."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if weights is not None:
        digest.update(hashlib.sha256(weights).hexdigest().encode())
    return digest.hexdigest()[:12]


def check_fine_tune_start(cfg: Any, start: Any, where: Any, what: str, free: Sequence[str] = ()) -> None:
    """Refuse (one line naming the fields, ``--init WHERE``) to fine-tune from saved weights whose config (a
    dataclass like ``cfg``) differs from this training's in any field but ``free`` (those set after training)."""
    wanted, have = dataclasses.asdict(cfg), dataclasses.asdict(start)
    differ = [k for k in wanted if k not in free and wanted[k] != have.get(k)]
    if differ:
        raise GraderError(f"--init {where}: its {what} differs from this training's in "
                          + ", ".join(f"{k} ({have.get(k)!r} there, {wanted[k]!r} here)" for k in differ))


def check_weights_out(folder: str | os.PathLike[str], name: str, force: bool = False) -> Path:
    """Refuse, before any work, an ``--out`` folder that holds something other than grader ``name``'s weights
    (a run, another grader's weights, any other ``config.json``) unless ``force``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GraderError(f"--out {folder}: is a file, not a folder")
    if force or not folder.is_dir():
        return folder
    if (folder / rundir.MANIFEST).exists():
        raise GraderError(f"--out {folder}: is a run directory; choose another folder (or pass --force)")
    config_file = folder / CONFIG_FILE
    if config_file.exists():
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or data.get("grader") != name:
            raise GraderError(f"--out {folder}: its {CONFIG_FILE} is not '{name}' weights and would be replaced; "
                              "choose another folder (or pass --force)")
    return folder


def train_grader(model: Any, optimizer: Any, plan: Any, out: str | os.PathLike[str], *, restart: bool = False,
                 progress: ProgressCallback | None = None) -> dict[str, Any]:
    """:func:`synthtrial.util.training.train_loop` for a grader: its refusals as :class:`GraderError`."""
    from synthtrial.util.training import TrainingError, train_loop

    try:
        return train_loop(model, optimizer, plan, Path(out), restart=restart, progress=progress)
    except TrainingError as exc:
        raise GraderError(str(exc)) from None


# ------------------------------------------------------------------------------------ config <-> JSON

def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _same_kind(default: Any, value: Any) -> bool:
    """Whether a JSON value fits a field of this default (an int field takes no 512.5, a float one an int)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple))
    return True


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON data (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def check_config(config: Any, who: str) -> None:
    """Refuse a config dataclass with a NaN or infinite value (one line naming the field)."""
    for f in dataclasses.fields(config):
        if _non_finite(getattr(config, f.name)):
            raise GraderError(f"{who} setting {f.name} must be finite, got {getattr(config, f.name)!r}")


def config_from_dict(cls: type, data: dict[str, Any], where: str, reserved: Sequence[str] = ()) -> Any:
    """A config dataclass ``cls`` from JSON data; unknown keys, wrong types, non-finite and out-of-range values
    are refused in one line naming ``where``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - set(reserved))
    if unknown:
        raise GraderError(f"{where}: unknown setting(s) {unknown}")
    values = {k: v for k, v in data.items() if k in known}
    bad = [k for k, v in values.items() if _non_finite(v)]
    if bad:
        raise GraderError(f"{where}: setting {bad[0]} must be finite, got {values[bad[0]]!r}")
    for f in dataclasses.fields(cls):
        if f.name in values and not _same_kind(f.default, values[f.name]):
            raise GraderError(f"{where}: setting {f.name} must be of type {type(f.default).__name__}, got "
                              f"{values[f.name]!r}")
    try:
        return cls(**values)
    except GraderError as exc:
        raise GraderError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise GraderError(f"{where}: {one_line(exc)}") from None


# --------------------------------------------------------------------------------------- component

WEIGHT_DTYPES = ("float32", "float16")


def check_weights_dtype(dtype: str) -> str:
    if dtype not in WEIGHT_DTYPES:
        raise GraderError(f"--weights-dtype must be float32 or float16, got {dtype!r}")
    return dtype


#: keys of ``config.json`` beside the config's own fields
RESERVED = ("grader", "training", "weights_dtype")


class GraderComponent:
    """The one base of every grader, a component in the diffusers sense.

    A subclass names ``name``, ``label`` (how errors call it), ``outcomes``, ``config_class`` (a dataclass of
    plain data) and, when it has weights, ``build(config)`` returning its network (``self.model``).
    ``config.json`` is flat: ``{"grader": name, **config fields, "training": record, "weights_dtype": ...}``
    (no ``weights_dtype`` for a grader without weights); the weights are ``model.safetensors``.
    """

    name: str = ""
    label: str = ""
    outcomes: tuple[str, ...] = ()
    config_class: type = type(None)
    has_weights: bool = True

    def __init__(self, config: Any = None, model: Any = None, *, device: Any = None,
                 record: dict[str, Any] | None = None) -> None:
        from synthtrial.util.device import resolve_device

        self.config = config if config is not None else self.config_class()
        check_config(self.config, self.label or self.name)
        self.device = resolve_device(device)
        self.record = dict(record or {})
        self.weights_dtype = "float32"
        self.model = None
        self.weights_folder: Path | None = None   # set by from_pretrained
        if self.has_weights:
            self.model = (model if model is not None else self.build(self.config)).to(self.device).eval()
        self._fingerprint: str | None = None

    @classmethod
    def build(cls, config: Any) -> Any:
        """The network of ``config`` (random init); graders with weights override it."""
        raise GraderError(f"grader '{cls.name}' has no network")

    # persistence ------------------------------------------------------------------------------------
    def config_json(self) -> dict[str, Any]:
        data = {"grader": self.name, **config_to_dict(self.config), "training": self.record}
        return {**data, "weights_dtype": self.weights_dtype} if self.has_weights else data

    def tensors(self, dtype: str | None = None) -> dict[str, Any]:
        """The weights as saved: float tensors in ``dtype`` (default: the grader's ``weights_dtype``)."""
        import torch

        cast = {"float32": torch.float32, "float16": torch.float16}[dtype or self.weights_dtype]
        return {k: (v.to(cast) if v.is_floating_point() else v) for k, v in self.model.state_dict().items()}

    def save_pretrained(self, folder: str | os.PathLike[str], dtype: str | None = None) -> Path:
        """Write ``config.json`` (and ``model.safetensors``) into ``folder``; ``dtype`` float32 or float16."""
        if dtype is not None:
            self.weights_dtype, self._fingerprint = check_weights_dtype(dtype), None
        folder = Path(folder)
        if not self.has_weights:
            write_text_atomic(folder / CONFIG_FILE, json.dumps(self.config_json(), indent=2, sort_keys=True) + "\n")
            return folder
        return save_state(folder, self.tensors(), self.config_json())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], device: Any = None) -> GraderComponent:
        """The grader saved in ``folder``; one-line errors for pickles, other graders' weights, bad configs,
        non-finite values and weights that do not fit the config."""
        if cls.has_weights:
            tensors, data = load_state(folder, kind=cls.name)
        else:
            tensors, data = {}, read_config(folder, cls.name)
        where = str(Path(folder) / CONFIG_FILE)
        config = config_from_dict(cls.config_class, data, where, RESERVED)
        dtype = data.get("weights_dtype", "float32")
        if cls.has_weights and dtype not in WEIGHT_DTYPES:
            raise GraderError(f"{where}: weights_dtype must be float32 or float16, got {dtype!r}")
        record = data.get("training") or {}
        if not isinstance(record, dict):
            raise GraderError(f"{where}: 'training' must be a JSON object")
        model = None
        if cls.has_weights:
            model = cls.build(config)
            load_into(model, tensors, folder, f"{cls.label or cls.name} network")
        grader = cls(config, model, device=device, record=record)
        grader.weights_dtype = dtype
        grader.weights_folder = Path(folder)   # whose model card (graders/cards.py) speaks for these weights
        return grader

    @classmethod
    def default(cls, device: Any = None) -> GraderComponent:
        """The shipped grader: its default weights (or, without weights, its default config)."""
        if not cls.has_weights:
            return cls(device=device)
        folder = DEFAULT_WEIGHTS_DIR / cls.name
        if not (folder / WEIGHTS_FILE).is_file():
            raise GraderError(f"grader '{cls.name}' has no default weights in {folder}; train them with "
                              f"`synthtrial graders train {cls.name}` and pass --weights")
        return cls.from_pretrained(folder, device=device)

    def fingerprint(self) -> str:
        """Changes whenever the outputs could: the grader, its config and its weights (not the training record)."""
        if self._fingerprint is None:
            config = {"grader": self.name, **config_to_dict(self.config)}
            weights = None
            if self.has_weights:
                from safetensors.torch import save

                config["weights_dtype"] = self.weights_dtype
                weights = save({k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()})
            self._fingerprint = fingerprint_of(config, weights)
        return self._fingerprint


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
