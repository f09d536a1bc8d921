"""The IGA severity grader, after QuantifiCare's recipe (Bernhard et al.): face crop -> CIFAR-style ResNet ->
the five IGA grades (0 clear ... 4 severe), their 3-class clinical view (0-1 / 2 / 3-4) and an expected grade.

Choices, stated once:

* **Network.** He et al.'s CIFAR ResNet (depth ``6n + 2``: three stages of ``n`` basic blocks, 16/32/64
  channels, parameter-free "option A" shortcuts), dropout before the linear head; depth 110 is the paper's
  1.7 M-parameter model. ``stem_stride`` 2 lets the first convolution halve a large input (224 px) so the
  CIFAR stages run on CIFAR-like feature maps. Any timm model can replace it (``backbone="timm:<name>"``,
  trained from scratch or from the user's own safetensors backbone weights).
* **Default** (the shipped weights): depth 8 (one block per stage), width 8, 128 px crops with a 10 % margin,
  stem stride 2: 19 k parameters, 0.025 GFLOP per image -- small enough to train 30 epochs on a shared CPU;
  the paper's depth 110, width 16 at 224 px with the CIFAR stem (1.7 M parameters) costs 24.8 GFLOP, ~1,000x. The model card states the cost and how to
  train the paper's settings (``--depth 110 --width 16 --image-size 224 --stem-stride 1``).
* **Training.** Class-weighted cross-entropy on the 5 grades (balanced weights from the training labels),
  Adam with a cosine schedule. Augmentation: by default the graders' wide photometric and geometric one
  (:mod:`synthtrial.graders.augment`, images only: an IGA grade survives any of it); with ``augment=False``
  (``--no-augment``) the paper's: horizontal flip, rotation (up to 15 degrees) and brightness (x0.8-1.2),
  each applied with probability ``augment_p`` (0.2).
* **Views.** A visit is graded from all its photos: the images given together that share ``patient_id`` and
  ``day`` (frontal + left + right from ``generate``) are fused by averaging their per-view log-probabilities
  (a renormalised geometric mean: every view votes, a confident view weighs more), and every image of the
  visit gets the visit's grade. Without ``meta`` (or without those columns) each image is its own visit.
* **Outputs** (columns): ``p_iga0..p_iga4``, ``p_group0..p_group2`` (sums over 0-1 / 2 / 3-4), ``grade``
  and ``group`` (most probable), ``expected_grade`` (sum of k * p_k; the outcome ``analyze`` uses), ``views``
  (images fused) and ``face_found``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.graders import classify
from synthtrial.graders.augment import WIDE, Augmenter, draw_seeds
from synthtrial.graders.base import MAX_DEPTH, MAX_WIDTH, GraderComponent, GraderError
from synthtrial.util.progress import ProgressCallback

N_GRADES = 5
GROUPS = ((0, 1), (2,), (3, 4))
GRADE_NAMES = ("0 clear", "1 almost clear", "2 mild", "3 moderate", "4 severe")
GROUP_NAMES = ("0-1", "2", "3-4")
OUTPUT_COLUMNS = (*(f"p_iga{k}" for k in range(N_GRADES)), *(f"p_group{k}" for k in range(len(GROUPS))),
                  "grade", "group", "expected_grade", "views", "face_found")


@dataclass(frozen=True)
class IGAConfig:
    """The architecture and preprocessing (plain data, stored in ``config.json``)."""

    backbone: str = "cifar-resnet"      # or "timm:<model name>"
    depth: int = 8                      # CIFAR ResNet depth, 6n + 2 (110: the paper)
    width: int = 8                      # channels of the first stage, doubled twice (He et al.: 16)
    stem_stride: int = 2                # 1: the CIFAR stem; 2: halve the input first
    image_size: int = 128               # face crop side in pixels (the paper: 224)
    dropout: float = 0.2
    crop_margin: float = 0.1            # face box widened by this fraction on every side

    def __post_init__(self) -> None:
        if not (self.backbone == "cifar-resnet" or self.backbone.startswith("timm:")):
            raise GraderError(f"IGA backbone must be 'cifar-resnet' or 'timm:<name>', got {self.backbone!r}")
        if self.depth < 8 or (self.depth - 2) % 6:
            raise GraderError(f"IGA depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {self.depth}")
        if self.depth > MAX_DEPTH:
            raise GraderError(f"IGA depth must be at most {MAX_DEPTH}, got {self.depth}")
        if not 1 <= self.width <= MAX_WIDTH or self.stem_stride not in (1, 2) or not 16 <= self.image_size <= 1024:
            raise GraderError(f"IGA width must be 1-{MAX_WIDTH}, stem stride 1 or 2, image size 16-1024; got width "
                              f"{self.width}, stem stride {self.stem_stride}, image size {self.image_size}")
        if not 0 <= self.dropout < 1 or not 0 <= self.crop_margin <= 1:
            raise GraderError("IGA dropout must be in [0, 1) and crop margin in [0, 1]")


# ------------------------------------------------------------------------------------------ network

def build_network(config: IGAConfig) -> Any:
    """The classifier ``images (N, 3, S, S) in [0, 1] -> logits (N, 5)`` for ``config``."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.extra:      # option A: zero-padded channels, no parameters
                short = nn.functional.pad(short, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return torch.relu(y + short)

    class CifarResNet(nn.Module):
        def __init__(self, cfg: IGAConfig) -> None:
            super().__init__()
            n, w = (cfg.depth - 2) // 6, cfg.width
            self.stem = nn.Sequential(nn.Conv2d(3, w, 3, cfg.stem_stride, 1, bias=False), nn.BatchNorm2d(w),
                                      nn.ReLU(inplace=True))
            layers, cin = [], w
            for stage, cout in enumerate((w, 2 * w, 4 * w)):
                for i in range(n):
                    layers.append(Block(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                    cin = cout
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout),
                                      nn.Linear(cin, N_GRADES))
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight)

        def forward(self, x):
            return self.head(self.features(self.stem(classify.normalize(x))))

    class TimmNet(nn.Module):
        def __init__(self, cfg: IGAConfig) -> None:
            super().__init__()
            import timm

            try:
                self.backbone = timm.create_model(cfg.backbone[5:], pretrained=False, num_classes=0)
            except RuntimeError as exc:
                raise GraderError(f"IGA backbone {cfg.backbone!r}: {exc}") from None
            n = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(n, N_GRADES))

        def forward(self, x):
            return self.head(self.backbone(classify.normalize(x)))

    return CifarResNet(config) if config.backbone == "cifar-resnet" else TimmNet(config)


def augment(x: Any, gen: Any, p: float = 0.2, max_degrees: float = 15.0) -> Any:
    """The paper's augmentation on a [0, 1] batch: flip, rotation, brightness, each with probability ``p``."""
    import torch
    from torchvision.transforms.v2 import functional as F

    draws = torch.rand(len(x), 6, generator=gen)
    out = []
    for img, d in zip(x, draws):
        if d[0] < p:
            img = torch.flip(img, dims=(2,))
        if d[1] < p:
            img = F.rotate(img, float((d[2] * 2 - 1) * max_degrees), interpolation=F.InterpolationMode.BILINEAR)
        if d[3] < p:
            img = (img * float(0.8 + 0.4 * d[4])).clamp(0, 1)
        out.append(img)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------- grader

class IGAGrader(GraderComponent):
    """``IGAGrader.from_pretrained(folder).predict(images, meta)`` -> IGA probabilities, 3-class view, expected
    grade."""

    name = "iga"
    config_class = IGAConfig
    label = "IGA"
    outcomes = ("expected_grade",)

    def __init__(self, config: IGAConfig | None = None, model: Any = None, *, device: Any = None,
                 record: dict[str, Any] | None = None) -> None:
        super().__init__(config, model, device=device, record=record)
        self.cropper = classify.FaceCropper(self.config.crop_margin)

    @classmethod
    def build(cls, config: IGAConfig) -> Any:
        return build_network(config)

    # inference ------------------------------------------------------------------------------------
    def crops(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(N, S, S, 3)`` uint8 face crops and whether a face was found in each."""
        classify.check_images(images, "iga")
        pairs = [self.cropper.crop(image, self.config.image_size) for image in images]
        if not pairs:
            return np.zeros((0, self.config.image_size, self.config.image_size, 3), np.uint8), np.zeros(0, bool)
        return np.stack([c for c, _ in pairs]), np.array([f for _, f in pairs])

    def log_probs(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """``(N, 5)`` float64 log-probabilities of the grades, one row per crop."""
        import torch

        self.model.eval()
        out = []
        with torch.inference_mode():
            for part in classify.batches_of(len(crops), batch_size):
                logits = self.model(classify.to_tensor(crops[part], self.device))
                out.append(torch.log_softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros((0, N_GRADES))

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        crops, found = self.crops(images)
        return outputs(self.log_probs(crops), visits(meta, len(images)), found)


def visits(meta: pd.DataFrame | None, n: int) -> np.ndarray:
    """A visit number per image: images sharing ``patient_id`` and ``day`` in ``meta``; else one per image."""
    if meta is None or len(meta) != n or not {"patient_id", "day"} <= set(meta.columns):
        return np.arange(n)
    keys = list(zip(meta["patient_id"].astype(str), meta["day"].astype(str)))
    index: dict[tuple[str, str], int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def fuse(log_probs: np.ndarray, visit: np.ndarray) -> np.ndarray:
    """Per-image probabilities of the image's visit: the softmax of the mean log-probability of its views."""
    fused = np.zeros_like(log_probs)
    for v in np.unique(visit):
        rows = visit == v
        mean = log_probs[rows].mean(axis=0)
        p = np.exp(mean - mean.max())
        fused[rows] = p / p.sum()
    return fused


def outputs(log_probs: np.ndarray, visit: np.ndarray, found: np.ndarray) -> pd.DataFrame:
    p = fuse(log_probs, visit)
    groups = np.stack([p[:, list(g)].sum(axis=1) for g in GROUPS], axis=1)
    counts = np.bincount(visit, minlength=visit.max() + 1)[visit] if len(visit) else np.zeros(0)
    data = {**{f"p_iga{k}": p[:, k] for k in range(N_GRADES)},
            **{f"p_group{k}": groups[:, k] for k in range(len(GROUPS))},
            "grade": p.argmax(axis=1) if len(p) else np.zeros(0), "group": groups.argmax(axis=1) if len(p) else
            np.zeros(0), "expected_grade": p @ np.arange(N_GRADES, dtype=np.float64), "views": counts,
            "face_found": found}
    return pd.DataFrame(data, columns=list(OUTPUT_COLUMNS)).astype("float64")


def group_of(grade: np.ndarray) -> np.ndarray:
    from synthtrial.trial import scale

    return np.asarray(scale.iga_group(np.asarray(grade, dtype=np.int64)), dtype=np.int64)


# ---------------------------------------------------------------------------------- train / evaluate

@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-3
    lr_final: float = 3e-4
    val_fraction: float = 0.2
    seed: int = 0
    class_weighted: bool = True
    augment_p: float = 0.2          # the paper's augmentation, used when ``augment`` is off
    augment: bool = True            # the wide augmentation (synthtrial.graders.augment.WIDE)


def prepare_source(grader: IGAGrader, source: classify.Source,
                   progress: ProgressCallback | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Face crops of every image of ``source`` and whether a face was found (``progress`` per image)."""
    found: list[bool] = []

    def one(image: np.ndarray) -> np.ndarray:
        crop, ok = grader.cropper.crop(image, grader.config.image_size)
        found.append(ok)
        return crop

    crops = classify.load_images(source.paths, one, progress)
    return crops, np.array(found, dtype=bool)


def train(data: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
          extra: Sequence[str | os.PathLike[str]] = (), identities: Sequence[str] | None = None,
          config: IGAConfig | None = None, settings: TrainSettings | None = None, device: str | None = None,
          backbone_weights: str | os.PathLike[str] | None = None, restart: bool = False, force: bool = False,
          weights_dtype: str = "float32", read_progress: ProgressCallback | None = None,
          progress: ProgressCallback | None = None) -> IGAGrader:
    """Train the IGA grader on ``data`` (runs or ACNE04; ``extra`` runs join the training part only) and save
    it to ``out`` (``model.safetensors`` + ``config.json``; checkpoints in ``out/checkpoint``). An ``out``
    holding anything but IGA weights is refused unless ``force``. ``read_progress`` counts the face crops of
    all sources (status: the source), ``progress`` the training steps (status: the loss)."""
    import torch

    config = config or IGAConfig()
    settings = settings or TrainSettings()
    grader, sources, extras = classify.start_training(IGAGrader, config, settings.seed, out, data=data, extra=extra,
                                                      identities=identities, device=device,
                                                      weights_dtype=weights_dtype, force=force)
    if backbone_weights is not None:
        load_backbone(grader.model, backbone_weights)
    dev = grader.device
    images, labels, groups, is_extra = [], [], [], []
    everything = [*sources, *extras]
    for k, (src, reading) in enumerate(zip(everything, classify.source_progress(everything, read_progress))):
        crops, _ = prepare_source(grader, src, reading)
        images.append(crops)
        labels.append(src.meta["iga"].to_numpy(np.int64))
        groups.append(np.array([f"{k}:{g}" for g in src.meta["group"]]))
        is_extra.append(np.full(len(src), k >= len(sources)))
    x, y, g, ex = (np.concatenate(a) for a in (images, labels, groups, is_extra))
    if ((y < 0) | (y >= N_GRADES)).any():
        raise GraderError("IGA labels must be grades 0-4 (manifest column 'iga')")
    own = np.flatnonzero(~ex)
    tr_own, va_own = classify.grouped_split(group_of(y[own]), g[own], settings.val_fraction, settings.seed)
    train_idx = np.sort(np.concatenate([own[tr_own], np.flatnonzero(ex)]))
    val_idx = own[va_own]
    weights = classify.class_weights(y[train_idx], N_GRADES) if settings.class_weighted else np.ones(N_GRADES)
    weight_t = torch.tensor(weights, dtype=torch.float32, device=dev)
    x_train, y_train = x[train_idx], torch.from_numpy(y[train_idx]).to(dev)

    wide = Augmenter(WIDE) if settings.augment else None

    def batch_loss(idx: np.ndarray, gen: Any, epoch: int) -> Any:
        if wide is not None:
            batch = classify.to_tensor(wide.images(x_train[idx], draw_seeds(len(idx), gen)), dev)
        else:
            batch = classify.to_tensor(x_train[idx], dev)
            if settings.augment_p > 0:
                batch = augment(batch.cpu(), gen, settings.augment_p).to(dev)
        return torch.nn.functional.cross_entropy(grader.model(batch), y_train[idx], weight=weight_t)

    def validate() -> dict[str, Any]:
        if not len(val_idx):
            return {}
        pred = grader.log_probs(x[val_idx]).argmax(axis=1)
        r = classify.report(group_of(y[val_idx]), group_of(pred), GROUP_NAMES)
        return {"val_accuracy3": r["accuracy"], "val_recall3": r["recall"]}

    plan = classify.Fit(len(train_idx), settings.epochs, settings.batch_size, settings.lr, settings.lr_final,
                        settings.seed, batch_loss, validate)
    return classify.fit_and_save(
        grader, plan, out, sources=sources, extras=extras, identities=identities, settings=settings,
        restart=restart, progress=progress, weights_dtype=weights_dtype, device=device,
        record={"backbone_weights": None if backbone_weights is None else str(backbone_weights)},
        summary={"n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
                 "train_grade_counts": np.bincount(y[train_idx], minlength=N_GRADES).tolist(),
                 "class_weights": [round(float(w), 6) for w in weights]})


def load_backbone(model: Any, path: str | os.PathLike[str]) -> None:
    """Load a user's safetensors weights into a timm backbone (``backbone.*`` keys or bare keys)."""
    from synthtrial.util.weights import load_safetensors

    path = Path(path)
    if not hasattr(model, "backbone"):
        raise GraderError("--backbone-weights needs a timm backbone (--backbone timm:<name>)")
    if path.suffix != ".safetensors" or not path.is_file():
        raise GraderError(f"--backbone-weights {path}: must be an existing .safetensors file (pickles are refused)")
    state = load_safetensors(path)
    state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
    missing, _ = model.backbone.load_state_dict(state, strict=False)
    if len(missing) == len(model.backbone.state_dict()):
        raise GraderError(f"--backbone-weights {path}: no tensor matches the backbone's parameter names")


def evaluate(grader: IGAGrader, data: str | os.PathLike[str], identities: Sequence[str] | None = None,
             progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Visit-level metrics on a run: per-grade and 3-class precision / recall / F1, accuracy, confusion
    (``progress`` counts the face crops)."""
    source = classify.read_source(data, identities, "--data")
    crops, found = prepare_source(grader, source, progress)
    visit = visits(source.meta, len(source))
    frame = outputs(grader.log_probs(crops), visit, found)
    first = pd.Series(np.arange(len(visit))).groupby(visit).first().to_numpy()
    truth = source.meta["iga"].to_numpy(np.int64)
    truth_visit = pd.Series(truth).groupby(visit).max().to_numpy()     # views of a visit share one grade
    pred = frame["grade"].to_numpy(np.int64)[first]
    return {"data": source.where, "identities": list(identities or []), "images": len(source),
            "visits": int(len(first)), "faces_found": float(found.mean()) if len(found) else float("nan"),
            "grades": classify.report(truth_visit, pred, GRADE_NAMES),
            "groups": classify.report(group_of(truth_visit), frame["group"].to_numpy(np.int64)[first], GROUP_NAMES),
            "mae_expected_grade": float(np.mean(np.abs(frame["expected_grade"].to_numpy()[first] - truth_visit)))}

