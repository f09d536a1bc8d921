"""What the image-level classifiers (IGA, ImageQX) share: data, splits, class weights, their training plan
and the metrics their papers report.

Choices, stated once:

* **Data.** A training source is a run directory (``manifest.parquet``; the truth is in the manifest) or an
  ACNE04 copy (read by :func:`synthtrial.data.acne04.scan_acne04`). ``identities`` keeps only the patients
  whose identity was made from the given base portraits (``astronaut``, ``hopper``, or a ``--faces`` key),
  which is how a held-out-identity evaluation is set up from one run.
* **Face crop.** MediaPipe's BlazeFace (``face_detection``, full-range model; it ships inside the wheel), the
  box widened by ``margin`` on every side, made square and resized with area averaging. An image without a
  detectable face is centre-cropped to a square instead (and says so in ``face_found``).
* **Split.** Patient-grouped and stratified: scikit-learn's ``StratifiedGroupKFold``; the first of
  ``round(1 / val_fraction)`` folds is held out, so no patient is in both parts.
* **Class weights.** ``n / (k * n_c)`` over the classes present in the training labels (the "balanced"
  weights); a class absent from the training set gets weight 0.
* **Training** goes through the shared loop (:mod:`synthtrial.util.training`): a checkpoint after every
  epoch holding the model, the optimiser, every RNG state and the history. Every epoch draws its shuffling
  and augmentation from ``(seed, epoch)``, so a resumed training ends with the same weights as an
  uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from synthtrial.util.images import IMAGENET_MEAN, IMAGENET_STD
from synthtrial.graders.base import GraderError, check_weights_dtype, check_weights_out, read_rgb, train_grader
from synthtrial.run import rundir
from synthtrial.util.progress import ProgressCallback


# ------------------------------------------------------------------------------------------ face crop

class FaceCropper:
    """Square face crops with MediaPipe BlazeFace: ``crop(image, size) -> (crop, face_found)``."""

    def __init__(self, margin: float = 0.25, min_confidence: float = 0.5) -> None:
        self.margin = float(margin)
        self.min_confidence = float(min_confidence)
        self._detector = None

    def box(self, image: np.ndarray) -> tuple[int, int, int] | None:
        """``(x0, y0, side)`` of the widened square face box (may reach past the image), or None."""
        from synthtrial.face.faces import quiet_native_stderr  # MediaPipe's C++ core logs straight to fd 2

        if self._detector is None:
            os.environ.setdefault("GLOG_minloglevel", "2")
            with quiet_native_stderr():
                from mediapipe.python.solutions import face_detection

                self._detector = face_detection.FaceDetection(model_selection=1,
                                                              min_detection_confidence=self.min_confidence)
        with quiet_native_stderr():
            result = self._detector.process(np.ascontiguousarray(image))
        if not result.detections:
            return None
        best = max(result.detections, key=lambda d: d.score[0])
        rel = best.location_data.relative_bounding_box
        h, w = image.shape[:2]
        cx, cy = (rel.xmin + rel.width / 2) * w, (rel.ymin + rel.height / 2) * h
        side = max(rel.width * w, rel.height * h) * (1 + 2 * self.margin)
        if not (math.isfinite(side) and side >= 8):
            return None
        return int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(side))

    def crop(self, image: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
        found = self.box(image)
        h, w = image.shape[:2]
        if found is None:
            side = min(h, w)
            x0, y0 = (w - side) // 2, (h - side) // 2
        else:
            x0, y0, side = found
        pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
        if pad:
            image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
            x0, y0 = x0 + pad, y0 + pad
        square = image[y0:y0 + side, x0:x0 + side]
        return resize_square(square, size), found is not None

    def close(self) -> None:
        if self._detector is not None:
            self._detector.close()
            self._detector = None


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized to ``size`` x ``size`` (area averaging when shrinking, bicubic when growing)."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) >= size else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(image, (size, size), interpolation=interp))


def check_images(images: Sequence[np.ndarray], who: str) -> None:
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise GraderError(f"{who}: image {i} is not an (H, W, 3) uint8 RGB array")


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Source:
    """Images of one training source and what is known about them (one row of ``meta`` per image)."""

    paths: list[Path]
    meta: pd.DataFrame        # patient_id, day, view, group (split key), identity base, and the label columns
    kind: str                 # "run" or "acne04"
    where: str

    def __len__(self) -> int:
        return len(self.paths)


def is_run_dir(path: Path) -> bool:
    return (path / rundir.MANIFEST).is_file()


def identity_base(value: Any) -> str:
    """The base portrait key of a manifest ``identity`` (JSON text), or '' when it has none."""
    try:
        return str(json.loads(value).get("base", "")) if isinstance(value, str) else ""
    except (ValueError, AttributeError):
        return ""


def read_source(path: str | os.PathLike[str], identities: Sequence[str] | None = None,
                option: str = "--data") -> Source:
    """A run directory or an ACNE04 folder as a :class:`Source` (``identities`` applies to runs only)."""
    path = Path(path)
    if not path.is_dir():
        raise GraderError(f"{option} {path}: no such folder (a run directory or an ACNE04 copy)")
    if is_run_dir(path):
        manifest = rundir.read_manifest(path, ("image", "patient_id", "day", "view", "iga", "identity"))
        manifest = manifest.assign(base=[identity_base(v) for v in manifest["identity"]])
        if identities:
            known = sorted(set(manifest["base"]))
            unknown = [k for k in identities if k not in known]
            if unknown:
                raise GraderError(f"{option} {path}: no patient has identity '{unknown[0]}' "
                                  f"(its identities: {', '.join(known)}; option --identity)")
            manifest = manifest[manifest["base"].isin(list(identities))].reset_index(drop=True)
        meta = manifest.assign(group=manifest["patient_id"].astype(str))
        return Source([path / rel for rel in meta["image"]], meta.reset_index(drop=True), "run", str(path))
    from synthtrial.trial import scale
    from synthtrial.data.acne04 import scan_acne04

    items = scan_acne04(path, check_images=False)
    counts = [it.count for it in items]
    severity = [scale.severity_from_count(c) if c is not None else float(it.level)
                for it, c in zip(items, counts)]
    meta = pd.DataFrame({
        "image": [str(it.path) for it in items],
        "patient_id": [it.path.stem for it in items],     # ACNE04 names no patients: one image, one group
        "day": 0, "view": "frontal", "base": "acne04",
        "acne04_level": [it.level for it in items],
        "iga": np.asarray(scale.expected_iga(np.asarray(severity, float)), dtype=np.int64),
    })
    return Source([it.path for it in items], meta.assign(group=meta["patient_id"]), "acne04", str(path))


def load_images(paths: Sequence[Path], prepare: Callable[[np.ndarray], np.ndarray],
                progress: ProgressCallback | None = None) -> np.ndarray:
    """``(N, S, S, 3)`` uint8: every image read and passed through ``prepare`` (crop / resize);
    ``progress(done, N, "")`` after each."""
    out = []
    for i, path in enumerate(paths):
        out.append(prepare(read_rgb(Path(path))))
        if progress is not None:
            progress(i + 1, len(paths), "")
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def source_progress(sources: Sequence[Source],
                    progress: ProgressCallback | None) -> list[ProgressCallback | None]:
    """One callback per source, each reporting into ``progress`` as one count over the images of all
    ``sources`` (status: the source being read), for reading several sources behind one bar."""
    if progress is None:
        return [None] * len(sources)
    total = sum(len(s) for s in sources)
    starts = np.cumsum([0, *(len(s) for s in sources)])[:-1].tolist()
    return [lambda done, _n, _status, start=start, where=s.where: progress(start + done, total, where)
            for s, start in zip(sources, starts)]


def grouped_split(labels: np.ndarray, groups: np.ndarray, val_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: patient-grouped, stratified on ``labels`` (``StratifiedGroupKFold``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups.tolist()))
    if val_fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, np.int64)
    if not 0 < val_fraction < 1:
        raise GraderError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    folds = max(2, int(round(1 / val_fraction)))
    if n_groups < folds:
        raise GraderError(f"--val-fraction {val_fraction}: needs at least {folds} patients, the data has "
                          f"{n_groups}; lower it or pass 0")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, val = next(iter(splitter.split(np.zeros(len(labels)), labels, groups)))
    return np.sort(train), np.sort(val)


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced weights ``n / (k * n_c)`` over the ``k`` classes present; 0 for an absent class."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes, np.float64)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


# ------------------------------------------------------------------------------------------- metrics

def report(truth: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Per-class precision / recall / F1 / support, accuracy, macro F1 and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
    present = s > 0
    return {
        "classes": list(names),
        "precision": [float(v) for v in p], "recall": [float(v) for v in r], "f1": [float(v) for v in f],
        "support": [int(v) for v in s],
        "accuracy": float(np.mean(np.asarray(truth) == np.asarray(pred))) if len(truth) else float("nan"),
        "macro_f1": float(np.mean(f[present])) if present.any() else float("nan"),
        "confusion": confusion_matrix(truth, pred, labels=labels).tolist(),
    }


def confusion_png(path: Path, result: dict[str, Any], title: str) -> Path:
    """The confusion matrix (rows: truth, columns: prediction) as a PNG, written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synthtrial.util.atomic import write_bytes_atomic

    matrix = np.asarray(result["confusion"])
    names = result["classes"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.0 + 0.8 * len(names)), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title(f"{title}\naccuracy {result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)


# ------------------------------------------------------------------------------------------ training

@dataclass
class Fit:
    """What :func:`fit` needs beyond the model: the data as index lists and a per-batch loss."""

    n_train: int
    epochs: int
    batch_size: int
    lr: float
    lr_final: float
    seed: int
    #: ``loss(indices, generator, epoch) -> scalar tensor`` for one batch (it augments with ``generator``)
    batch_loss: Callable[[np.ndarray, Any, int], Any]
    #: ``validate() -> dict`` run after each epoch (metrics for the history), or None
    validate: Callable[[], dict[str, Any]] | None = None


@dataclass(frozen=True)
class TrainSettings:
    """What every classifier training is told; a grader's own settings add fields to it (and may declare other
    defaults for these)."""

    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    lr_final: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0

    def plan(self, n_train: int, batch_loss: Callable[[np.ndarray, Any, int], Any],
             validate: Callable[[], dict[str, Any]] | None = None) -> Fit:
        """The :class:`Fit` of these settings for ``n_train`` images."""
        return Fit(n_train, self.epochs, self.batch_size, self.lr, self.lr_final, self.seed, batch_loss, validate)


def start_training(cls: Any, config: Any, seed: int, out: str | os.PathLike[str], *, data: Sequence[Any],
                   extra: Sequence[Any], identities: Sequence[str] | None, device: Any, weights_dtype: str,
                   force: bool) -> tuple[Any, list[Source], list[Source]]:
    """What every classifier training does first: refuse a bad dtype or ``--out`` before any work, seed torch,
    build a fresh grader ``cls(config)`` and read the sources: ``(grader, sources, extras)``."""
    import torch

    check_weights_dtype(weights_dtype)
    check_weights_out(out, cls.name, force)
    torch.manual_seed(seed)
    grader = cls(config, device=device)
    sources = [read_source(d, identities, "--data") for d in data]
    return grader, sources, [read_source(d, None, "--extra") for d in extra]


def fit_and_save(grader: Any, plan: Fit, out: str | os.PathLike[str], *, sources: Sequence[Source],
                 extras: Sequence[Source], identities: Sequence[str] | None, settings: Any, restart: bool,
                 progress: ProgressCallback | None, weights_dtype: str, device: Any,
                 record: dict[str, Any] | None = None, summary: dict[str, Any] | None = None) -> Any:
    """What every classifier training does last: :func:`fit` (its record names the data, the settings, the
    config and ``record``; ``progress`` gets its steps), then the grader saved to ``out`` with its training
    record (plus ``summary``) and loaded back from there."""
    record = {"data": [s.where for s in sources], "extra": [s.where for s in extras],
              "identities": list(identities or []), "settings": asdict(settings), "model": asdict(grader.config),
              **(record or {})}
    history = fit(grader.model, plan, Path(out), grader.name, restart=restart, record=record, progress=progress)
    grader.model.eval()
    grader.record = {**record, **history, **(summary or {})}
    grader.save_pretrained(out, weights_dtype)
    return type(grader).from_pretrained(out, device=device)


def fit(model: Any, plan: Fit, out: Path, kind: str, *, restart: bool = False,
        progress: ProgressCallback | None = None, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Adam with a cosine learning rate from ``lr`` to ``lr_final``, through the shared training loop
    (:func:`synthtrial.util.training.train_loop`: checkpoint after every epoch, resume, ``restart``).

    Every epoch's order and augmentation come from a generator seeded by ``(seed, epoch)``. Returns the
    training record (epochs, steps, per-epoch mean loss and validation metrics).
    """
    import torch

    from synthtrial.util.training import Plan

    if plan.n_train < 1:
        raise GraderError("no training images (check --data and --identity)")
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr)
    per_epoch = math.ceil(plan.n_train / plan.batch_size)
    total = per_epoch * plan.epochs
    epoch_draws: dict[str, Any] = {}

    def step(i: int) -> dict[str, float]:
        epoch, b = divmod(i, per_epoch)
        if b == 0 or epoch_draws.get("epoch") != epoch:      # checkpoints fall on epoch ends
            gen = torch.Generator().manual_seed(plan.seed * 100_003 + epoch)
            epoch_draws.update(epoch=epoch, gen=gen, order=torch.randperm(plan.n_train, generator=gen).numpy())
        lr = plan.lr_final + 0.5 * (plan.lr - plan.lr_final) * (1 + math.cos(math.pi * i / max(1, total)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss = plan.batch_loss(epoch_draws["order"][b * plan.batch_size:(b + 1) * plan.batch_size],
                               epoch_draws["gen"], epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    def summarize(done: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"epoch": done // per_epoch}
        if plan.validate is not None:
            model.eval()
            with torch.no_grad():
                entry.update(plan.validate())
        return entry

    loop = Plan(total, step, kind, record, save_every=per_epoch, log_every=per_epoch, summarize=summarize)
    result = train_grader(model, optimizer, loop, out, restart=restart, progress=progress)
    return {"epochs": plan.epochs, "steps": total, "history": result["history"]}


def batches_of(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def to_tensor(images: np.ndarray, device: Any) -> Any:
    """``(N, S, S, 3)`` uint8 -> ``(N, 3, S, S)`` float32 in [0, 1] on ``device``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: Any) -> Any:
    """ImageNet mean / std normalisation of a [0, 1] batch (kept so a user's ImageNet backbone fits)."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
