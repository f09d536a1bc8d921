"""The IGA severity grader, after QuantifiCare's recipe (Bernhard et al.): face crop -> CIFAR-style ResNet ->
the five IGA grades (0 clear ... 4 severe), their 3-class clinical view (0-1 / 2 / 3-4) and an expected grade,
and, beside them, the visit's inflammatory lesion count (joint grading and counting, as LDL does).

Choices, stated once:

* **Resolution.** IGA is defined by counting inflammatory lesions (papules, pustules, nodules;
  :func:`synthtrial.trial.scale.iga_from_counts`), so the network must see them. At the shipped render size
  (512 px, 0.42 mm/px) a 3.5 mm papule spans 8 px and BlazeFace's face box, widened 10 %, spans 450-540 px: a
  384 px face crop keeps a papule at about 6 px (at the former 128 px it was 1-3 px). Face crops rather than
  native-resolution tiles, because the crop already holds the face at about native resolution, keeps the
  whole face (every lesion counted once, no tile bookkeeping) and keeps the views' fusion as it is.
* **Network.** He et al.'s CIFAR ResNet (depth ``6n + 2``: three stages of ``n`` basic blocks, ``w``/``2w``/``4w``
  channels, parameter-free "option A" shortcuts), dropout before the linear head; depth 110, width 16 is the
  paper's 1.7 M-parameter model. The stem brings a large input down to CIFAR-like feature maps: stride 1 is the
  CIFAR stem (one 3x3 convolution), 2 halves the input in it, 4 adds a second stride-2 3x3 convolution (a 384 px
  crop becomes 96 x 96 before the stages, 24 x 24 after them). Any timm model can replace it
  (``backbone="timm:<name>"``, trained from scratch or from the user's own safetensors backbone weights).
* **Count head** (``count_head``): a 1x1 convolution on the last feature map, softplus, summed over the map:
  a density map whose sum is the count (each lesion adds where it is, whatever the face's framing), two
  channels: inflammatory lesions and nodules. The counts give a second route to the grade: IGA from the
  counts by the scale's own rule (any nodule lifts it to 3). ``grade_from`` says which route fills ``grade``
  and ``group`` ("classifier" or "counts"); training picks it on the validation patients (``iga_train``).
* **Default** (the shipped weights): depth 14 (two blocks per stage), width 16, 384 px crops with a 10 %
  margin, stem stride 4, count head: 0.17 M parameters, 0.54 GFLOP per image. The paper's network is
  ``depth=110, width=16, image_size=224, stem_stride=1, count_head=False`` (1.7 M, 24.8 GFLOP per image).
* **Views.** A visit is graded from all its photos: the images given together that share ``patient_id`` and
  ``day`` (frontal + left + right from ``generate``) are fused by averaging their per-view log-probabilities
  (a renormalised geometric mean: every view votes, a confident view weighs more) and their per-view
  ``log(1 + count)`` (a geometric mean of the counts, the scale the count head is trained on), and every image of
  the visit gets the visit's grade and counts. Without ``meta`` (or without those columns) each image is its
  own visit.
* **Outputs** (columns): ``p_iga0..p_iga4``, ``p_group0..p_group2`` (sums over 0-1 / 2 / 3-4), ``grade``
  and ``group`` (of the ``grade_from`` route), ``expected_grade`` (sum of k * p_k), ``views`` (images fused) and
  ``face_found``; with the count head also ``inflammatory_count``, ``nodule_count``, ``count_grade`` and
  ``count_group`` (the counts' route). ``analyze`` takes ``expected_grade`` and, with the count head,
  ``inflammatory_count`` as outcomes.

Training and evaluation live in :mod:`synthtrial.graders.iga_train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.graders import classify
from synthtrial.graders.base import MAX_DEPTH, MAX_WIDTH, GraderComponent, GraderError
from synthtrial.trial import scale

N_GRADES = 5
GROUPS = ((0, 1), (2,), (3, 4))
GRADE_NAMES = ("0 clear", "1 almost clear", "2 mild", "3 moderate", "4 severe")
GROUP_NAMES = ("0-1", "2", "3-4")
#: what the count head counts, one channel each
COUNT_NAMES = ("inflammatory", "nodule")
#: where ``grade`` and ``group`` come from
GRADE_ROUTES = ("classifier", "counts")
STEM_STRIDES = (1, 2, 4)
OUTPUT_COLUMNS = (*(f"p_iga{k}" for k in range(N_GRADES)), *(f"p_group{k}" for k in range(len(GROUPS))),
                  "grade", "group", "expected_grade", "views", "face_found")
COUNT_COLUMNS = ("inflammatory_count", "nodule_count", "count_grade", "count_group")


@dataclass(frozen=True)
class IGAConfig:
    """The architecture and preprocessing (plain data, stored in ``config.json``)."""

    backbone: str = "cifar-resnet"      # or "timm:<model name>"
    depth: int = 14                     # CIFAR ResNet depth, 6n + 2 (110: the paper)
    width: int = 16                     # channels of the first stage, doubled twice (He et al.: 16)
    stem_stride: int = 4                # 1: the CIFAR stem; 2: halve the input first; 4: quarter it
    image_size: int = 384               # face crop side in pixels (the paper: 224)
    dropout: float = 0.2
    crop_margin: float = 0.1            # face box widened by this fraction on every side
    count_head: bool = True             # the inflammatory / nodule count head
    grade_from: str = "classifier"      # which route fills grade / group: "classifier" or "counts"

    def __post_init__(self) -> None:
        if not (self.backbone == "cifar-resnet" or self.backbone.startswith("timm:")):
            raise GraderError(f"IGA backbone must be 'cifar-resnet' or 'timm:<name>', got {self.backbone!r}")
        if self.depth < 8 or (self.depth - 2) % 6:
            raise GraderError(f"IGA depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {self.depth}")
        if self.depth > MAX_DEPTH:
            raise GraderError(f"IGA depth must be at most {MAX_DEPTH}, got {self.depth}")
        if not 1 <= self.width <= MAX_WIDTH or self.stem_stride not in STEM_STRIDES or not 16 <= self.image_size <= 1024:
            raise GraderError(f"IGA width must be 1-{MAX_WIDTH}, stem stride 1, 2 or 4, image size 16-1024; got "
                              f"width {self.width}, stem stride {self.stem_stride}, image size {self.image_size}")
        if not 0 <= self.dropout < 1 or not 0 <= self.crop_margin <= 1:
            raise GraderError("IGA dropout must be in [0, 1) and crop margin in [0, 1]")
        if self.grade_from not in GRADE_ROUTES:
            raise GraderError(f"IGA grade_from must be 'classifier' or 'counts', got {self.grade_from!r}")
        if self.grade_from == "counts" and not self.count_head:
            raise GraderError("IGA grade_from 'counts' needs the count head (count_head true)")


# ------------------------------------------------------------------------------------------ network

def build_network(config: IGAConfig) -> Any:
    """The network of ``config``: ``net(images)`` -> logits ``(N, 5)`` for ``(N, 3, S, S)`` images in [0, 1];
    ``net.both(images)`` -> ``(logits, counts)``, counts ``(N, 2)`` (inflammatory, nodules) or None without
    the count head."""
    return cifar_resnet(config) if config.backbone == "cifar-resnet" else timm_net(config)


def count_head(channels: int) -> Any:
    """A density map (1x1 convolution, softplus) summed over the feature map: ``(N, C, H, W) -> (N, 2)``."""
    import torch
    from torch import nn

    class CountHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.density = nn.Conv2d(channels, len(COUNT_NAMES), 1)
            nn.init.normal_(self.density.weight, std=0.01)
            with torch.no_grad():      # about 0.02 inflammatory lesions and 0.001 nodules per position at the start
                self.density.bias.copy_(torch.tensor([-4.0, -7.0]))

        def forward(self, features):
            return nn.functional.softplus(self.density(features)).sum(dim=(2, 3))

    return CountHead()


def cifar_resnet(config: IGAConfig) -> Any:
    """He et al.'s CIFAR ResNet of ``config`` (module docstring), with the count head if asked."""
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
            stem = [nn.Conv2d(3, w, 3, min(cfg.stem_stride, 2), 1, bias=False), nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True)]
            if cfg.stem_stride == 4:
                stem += [nn.Conv2d(w, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            self.stem = nn.Sequential(*stem)
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
            self.counter = count_head(cin) if cfg.count_head else None

        def both(self, x):
            features = self.features(self.stem(classify.normalize(x)))
            return self.head(features), (self.counter(features) if self.counter is not None else None)

        def forward(self, x):
            return self.both(x)[0]

    return CifarResNet(config)


def timm_net(config: IGAConfig) -> Any:
    """A timm model (from scratch) with the grade head and, if asked, the count head on its feature map."""
    from torch import nn

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
            self.counter = count_head(self.backbone.num_features) if cfg.count_head else None

        def both(self, x):
            features = self.backbone.forward_features(classify.normalize(x))
            logits = self.head(self.backbone.forward_head(features, pre_logits=True))
            if self.counter is None:
                return logits, None
            if features.ndim != 4:
                raise GraderError("the IGA count head needs a convolutional timm backbone (a feature map); "
                                  "pass --no-count-head for this one")
            return logits, self.counter(features)

        def forward(self, x):
            return self.both(x)[0]

    return TimmNet(config)


# ------------------------------------------------------------------------------------------- grader

class IGAGrader(GraderComponent):
    """``IGAGrader.from_pretrained(folder).predict(images, meta)`` -> IGA probabilities, 3-class view, expected
    grade and, with the count head, the inflammatory and nodule counts and their IGA."""

    name = "iga"
    config_class = IGAConfig
    label = "IGA"
    outcomes = ("expected_grade",)

    def __init__(self, config: IGAConfig | None = None, model: Any = None, *, device: Any = None,
                 record: dict[str, Any] | None = None) -> None:
        super().__init__(config, model, device=device, record=record)
        self.cropper = classify.FaceCropper(self.config.crop_margin)
        if self.config.count_head:
            self.outcomes = ("expected_grade", "inflammatory_count")

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

    def heads(self, crops: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, 5)`` float64 log-probabilities of the grades and ``(N, 2)`` counts (None without the count
        head), one row per crop."""
        import torch

        self.model.eval()
        logps, counts = [], []
        with torch.inference_mode():
            for part in classify.batches_of(len(crops), batch_size):
                logits, count = self.model.both(classify.to_tensor(crops[part], self.device))
                logps.append(torch.log_softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64))
                if count is not None:
                    counts.append(count.float().cpu().numpy().astype(np.float64))
        logp = np.concatenate(logps) if logps else np.zeros((0, N_GRADES))
        if not self.config.count_head:
            return logp, None
        return logp, (np.concatenate(counts) if counts else np.zeros((0, len(COUNT_NAMES))))

    def log_probs(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``(N, 5)`` float64 log-probabilities of the grades, one row per crop."""
        return self.heads(crops, batch_size)[0]

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        crops, found = self.crops(images)
        logp, counts = self.heads(crops)
        return outputs(logp, visits(meta, len(images)), found, counts, self.config.grade_from)


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


def fuse_counts(counts: np.ndarray, visit: np.ndarray) -> np.ndarray:
    """Per-image counts of the image's visit: ``exp(mean log(1 + count)) - 1`` over its views, per column."""
    logs = np.log1p(np.maximum(counts, 0.0))
    means = pd.DataFrame(logs).groupby(visit).transform("mean").to_numpy()
    return np.expm1(means)


def grade_from_counts(counts: np.ndarray) -> np.ndarray:
    """IGA grades of ``(N, 2)`` (inflammatory, nodule) counts by the scale's rule (nodules capped at the
    inflammatory count, of which they are part)."""
    inflammatory = np.maximum(counts[:, 0], 0.0)
    return np.asarray(scale.iga_from_counts(inflammatory, np.clip(counts[:, 1], 0.0, inflammatory)), dtype=np.int64)


def outputs(log_probs: np.ndarray, visit: np.ndarray, found: np.ndarray, counts: np.ndarray | None = None,
            grade_from: str = "classifier") -> pd.DataFrame:
    """The output columns (module docstring) of per-image log-probabilities and counts, views fused."""
    p = fuse(log_probs, visit)
    groups = np.stack([p[:, list(g)].sum(axis=1) for g in GROUPS], axis=1)
    n_views = np.bincount(visit, minlength=visit.max() + 1)[visit] if len(visit) else np.zeros(0)
    data = {**{f"p_iga{k}": p[:, k] for k in range(N_GRADES)},
            **{f"p_group{k}": groups[:, k] for k in range(len(GROUPS))},
            "grade": p.argmax(axis=1) if len(p) else np.zeros(0), "group": groups.argmax(axis=1) if len(p) else
            np.zeros(0), "expected_grade": p @ np.arange(N_GRADES, dtype=np.float64), "views": n_views,
            "face_found": found}
    columns = list(OUTPUT_COLUMNS)
    if counts is not None:
        fused = fuse_counts(counts, visit)
        grade = grade_from_counts(fused)
        data.update(inflammatory_count=fused[:, 0], nodule_count=np.minimum(fused[:, 1], fused[:, 0]),
                    count_grade=grade, count_group=group_of(grade))
        columns += COUNT_COLUMNS
        if grade_from == "counts":
            data.update(grade=grade, group=group_of(grade))
    return pd.DataFrame(data, columns=columns).astype("float64")


def group_of(grade: np.ndarray) -> np.ndarray:
    return np.asarray(scale.iga_group(np.asarray(grade, dtype=np.int64)), dtype=np.int64)
