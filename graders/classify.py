"""What the image-level classifiers (IGA, ImageQX) share: data, splits, class weights, the training loop,
resumable safetensors checkpoints and the metrics their papers report.

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
* **Checkpoints.** After every epoch the model, the optimiser state (Adam moments as tensors; its scalar
  settings in JSON) and the epoch number are written to ``OUT/checkpoint/`` (safetensors + JSON, atomic).
  Every epoch draws its shuffling and augmentation from ``(seed, epoch)``, so a resumed training ends with
  the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from synthtrial.util.images import IMAGENET_MEAN, IMAGENET_STD
from synthtrial.graders.base import GraderError, load_into, load_state, read_rgb, save_state
from synthtrial.run import rundir

CHECKPOINT_DIR = "checkpoint"


# ------------------------------------------------------------------------------------------ face crop

class NetworkWeights:
    """``load`` / ``save`` / ``fingerprint`` of a classifier grader that holds ``self.model`` (an ``nn.Module``
    built from ``self.config``, a dataclass of type ``config_cls``) and ``self.record`` (its training record).
    Weights are safetensors (float32 or float16) with the config beside them; loading checks they fit."""

    name: str
    config_cls: type
    label: str              # how errors name the model, e.g. "IGA"

    @classmethod
    def load(cls, folder: str | os.PathLike[str], device: str | None = None):
        tensors, config = load_state(folder, kind=cls.name)
        try:
            cfg = cls.config_cls(**config["model"])
        except (KeyError, TypeError) as exc:
            raise GraderError(f"{Path(folder) / 'config.json'}: not an {cls.label} config ({exc})") from None
        grader = cls(cfg, device=device, record=config.get("training"))
        load_into(grader.model, tensors, folder, "network")
        return grader

    def save(self, folder: str | os.PathLike[str], dtype: str = "float32") -> Path:
        import torch

        cast = {"float32": torch.float32, "float16": torch.float16}.get(dtype)
        if cast is None:
            raise GraderError(f"weights dtype must be float32 or float16, got {dtype!r}")
        tensors = {k: (v.to(cast) if v.is_floating_point() else v) for k, v in self.model.state_dict().items()}
        return save_state(folder, tensors, {"grader": self.name, "model": asdict(self.config),
                                            "weights_dtype": dtype, "training": self.record})

    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256(repr(sorted(asdict(self.config).items())).encode())
            for key, value in self.model.state_dict().items():
                digest.update(key.encode())
                digest.update(value.detach().to("cpu").contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:12]
        return self._fingerprint


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


WEIGHT_DTYPES = ("float32", "float16")


def check_weights_dtype(dtype: str) -> str:
    if dtype not in WEIGHT_DTYPES:
        raise GraderError(f"--weights-dtype must be float32 or float16, got {dtype!r}")
    return dtype


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
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``(N, S, S, 3)`` uint8: every image read and passed through ``prepare`` (crop / resize)."""
    out = []
    for i, path in enumerate(paths):
        out.append(prepare(read_rgb(Path(path))))
        if progress is not None:
            progress(i + 1)
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


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


# --------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(folder: Path, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Model + Adam state (tensors) and ``state`` (JSON: epoch, history, ...) under ``folder``."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{idx}.{key}"] = value if hasattr(value, "detach") else _as_tensor(value)
    save_state(folder, tensors, {"grader": state["grader"], "state": state, "param_groups": opt["param_groups"]})


def _as_tensor(value: Any) -> Any:
    import torch

    return torch.tensor(value)


def load_checkpoint(folder: Path, model: Any, optimizer: Any, kind: str, device: Any) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its ``state``."""
    tensors, config = load_state(folder, kind=kind)
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        raise GraderError(f"{folder}: checkpoint does not fit this model ({str(exc).splitlines()[0]}); "
                          "train with the same settings or pass --restart") from None
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": opt_state, "param_groups": config["param_groups"]})
    return config["state"]


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
    history: list[dict[str, Any]] = field(default_factory=list)


def fit(model: Any, plan: Fit, out: Path, kind: str, device: Any, *, restart: bool = False,
        progress: Callable[[int, str], None] | None = None, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Adam with a cosine learning rate from ``lr`` to ``lr_final``; checkpoint after every epoch; resume.

    Returns the training record (epochs, per-epoch mean loss and validation metrics).
    """
    import torch

    if plan.n_train < 1:
        raise GraderError("no training images (check --data and --identity)")
    record = json.loads(json.dumps(record))      # as it reads back from the checkpoint's JSON
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr)
    steps_per_epoch = math.ceil(plan.n_train / plan.batch_size)
    total_steps = steps_per_epoch * plan.epochs
    ckpt = out / CHECKPOINT_DIR
    start, history = 0, []
    if not restart and (ckpt / "model.safetensors").is_file():
        state = load_checkpoint(ckpt, model, optimizer, kind, device)
        if state.get("record") != record:
            raise GraderError(f"{ckpt}: was written by a training with other data or settings; pass --restart "
                              "to start over")
        start, history = int(state["epoch"]), list(state["history"])
    done = start * steps_per_epoch
    for epoch in range(start, plan.epochs):
        model.train()
        gen = torch.Generator().manual_seed(plan.seed * 100_003 + epoch)
        order = torch.randperm(plan.n_train, generator=gen).numpy()
        losses = []
        for b in range(steps_per_epoch):
            t = done / max(1, total_steps)
            lr = plan.lr_final + 0.5 * (plan.lr - plan.lr_final) * (1 + math.cos(math.pi * t))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = plan.batch_loss(order[b * plan.batch_size:(b + 1) * plan.batch_size], gen, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            done += 1
            if progress is not None:
                progress(done, f"epoch {epoch + 1}/{plan.epochs} loss {np.mean(losses[-20:]):.3f}")
        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if plan.validate is not None:
            model.eval()
            with torch.no_grad():
                entry.update(plan.validate())
        history.append(entry)
        save_checkpoint(ckpt, model, optimizer, {"grader": kind, "epoch": epoch + 1, "history": history,
                                                  "record": record})
    return {"epochs": plan.epochs, "steps": total_steps, "history": history}


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
