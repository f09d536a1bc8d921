"""DermX: severity explained through lesion characteristics, with per-characteristic Grad-CAM maps.

Choices, stated once:

* **Network** (Jalaboi et al.'s DermX, scaled to this machine): a backbone trained from scratch to stride 8
  (lesions are a few pixels, so finer maps beat depth here), then a 3x3 conv + BatchNorm + ReLU block
  (``cam``: the layer every Grad-CAM map is taken from, 32 x 32 cells at the default 256 px input). The default
  backbone ``plain`` is five 3x3 conv + BatchNorm + ReLU layers (24, 32, 48, 64, 64 channels; strides 2, 2, 1,
  2, 1; receptive field 39 px): on a 2-core CPU it trains at about 12x the images per second of timm's
  ``tinynet_e`` cut at the same stride (depthwise convolutions are slow there; measured 22 vs 1.8 images/s at
  256 px, batch 16), and the budget buys epochs, not depth. ``backbone`` may name any timm model instead
  (``stage``: which of its feature stages feeds ``cam``; the paper's EfficientNet-B2 is ``efficientnet_b2``).
  Global average pooling feeds the characteristic head (dropout, linear 64, ReLU, dropout, linear C) and a
  reduced feature (linear 32, ReLU); the diagnosis head reads the reduced feature concatenated with the
  characteristic logits. Diagnosis = the ACNE04 / Hayashi level 0-3; ``severity`` is its expectation
  (sum of k x p_k) on the 0-3 scale, the outcome ``analyze`` uses.
* **Characteristics**: open comedo, closed comedo, papule, pustule, nodule, scar, erythema (the generator's
  post-inflammatory ``mark``); an image has a characteristic when at least one such lesion is drawn on it.
* **Presence read from the maps** (``presence``; opt-in, fitted after training on training images:
  :func:`synthtrial.graders.dermx_train.fit_presence`): the pooled characteristic head learns prevalence (on the
  grader set it said "present" on every image for the four common characteristics and never for closed
  comedones and scars), while each characteristic's map does show where its lesions are. So a characteristic's
  score is a logistic model of :data:`PRESENCE_FEATURES` -- its head logit and the peak, top-5 mean and mean
  of its (unnormalised) Grad-CAM map, the last three as ``log1p`` -- whose threshold for F1 on the
  calibration images is folded into the bias, so that "present" stays ``score >= 0.5`` for every consumer.
  The scores are decisions on a probability scale, not calibrated probabilities. Weights without ``presence``
  (empty) use the head's sigmoid, as trained.
* **Count head** (``count_head``; opt-in): a 1x1 convolution on the ``cam`` features, softplus, summed over the
  grid -- a lesion density whose sum is the image's simulated active-lesion count (the count the Hayashi level is
  defined on), trained jointly with the rest (``lambda_N`` x the squared error of ``log(1 + count)``): joint
  grading and counting, as LDL does and as the IGA grader's count head did. ``predict`` adds the ``count``
  column.
* **Characteristic counts** (``characteristic_counts``; opt-in): a 1x1 convolution on the ``cam`` features with
  one softplus density per characteristic, each summed over the grid -- how many lesions of that type the image
  shows (the training truth's lesions: visible ones by default), trained jointly (``lambda_K`` x the squared
  error of ``log(1 + count)``, averaged over the characteristics). The pooled characteristic head learns
  prevalence; a count has to find the lesions, one by one. After training each characteristic gets the count
  threshold with the best F1 on training images (``count_thresholds``,
  :func:`synthtrial.graders.dermx_train.fit_count_thresholds`), and its score becomes the logit
  ``log(count / threshold)``: "present" is still ``score >= 0.5`` for every consumer, and that is the count
  reaching its threshold. The Grad-CAM maps still come from the characteristic head (the explanations are
  unchanged); ``predict`` adds a ``count_<characteristic>`` column each. Not combined with ``presence``.
* **Level route** (``level_from``): ``classifier`` (the default) -- the level is the diagnosis head's arg-max and
  ``severity`` its expectation; ``count`` (with a count head) -- the level is the Hayashi level of the count
  (:func:`synthtrial.trial.scale.acne04_level_from_count`) and ``severity`` the severity that count stands for
  (:func:`~synthtrial.trial.scale.severity_from_count`), the way the Hayashi level itself is defined. Training
  chooses it on training images (:func:`synthtrial.graders.dermx_train.choose_level_route`), as the IGA
  grader chooses its ``grade_from``.
* **Loss** ``L = lambda_D * CE + lambda_C * BCE`` (1 and 1); DermX+ (``guided=True``) adds
  ``lambda_A * Dice`` (lambda_A = 10) between each present characteristic's Grad-CAM map and its explanation
  area at the CAM's resolution (:mod:`synthtrial.graders.dermx_train`).
* **Differentiable Grad-CAM.** The heads see the ``cam`` features only through a global average, so the
  Grad-CAM channel weights (spatial means of the gradients) equal ``d logit / d pooled`` / (h w): the training
  map is ``ReLU(sum_ch alpha_ch * A_ch)`` with ``alpha`` from ``torch.autograd.grad(create_graph=True)`` on the
  small heads only. At inference, maps come from the maintained ``grad-cam`` package (``GradCAM`` on the same
  layer; the test suite checks that both agree) and are resized to the image's own height and width.
* **Plausibility** (Jalaboi et al.'s localisation F1, sensitivity and specificity, eqs. 6-8 of the DermX
  paper): fuzzy ``F1 = 2 sum min(A, M) / (sum A + sum M)`` of the Grad-CAM map ``A`` (min-max scaled to
  [0, 1], as the grad-cam package scales it; not binarised: the paper compares the activations themselves)
  against the explanation map ``M``, at the CAM's resolution (:mod:`synthtrial.graders.dermx_eval`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synthtrial.graders.base import MAX_INPUT_SIZE, GraderComponent, GraderError
from synthtrial.trial import scale
from synthtrial.util.images import IMAGENET_MEAN, IMAGENET_STD

#: what a characteristic's presence model reads (module docstring): its head logit, then log1p of its map's
#: peak, top-5 mean and mean
PRESENCE_FEATURES = ("logit", "log1p_cam_peak", "log1p_cam_top5", "log1p_cam_mean")
CHARACTERISTICS = ("open_comedo", "closed_comedo", "papule", "pustule", "nodule", "scar", "erythema")
#: the run's lesion type behind each characteristic
LESION_TYPE = {c: ("mark" if c == "erythema" else c) for c in CHARACTERISTICS}
LEVELS = 4
#: where ``level`` and ``severity`` come from (module docstring, "Level route")
LEVEL_ROUTES = ("classifier", "count")


@dataclass
class DermXConfig:
    """Plain data: architecture and input size (``config.json``)."""

    backbone: str = "plain"           # "plain" (module docstring) or a timm model name
    stage: int = 2                    # timm backbones: the feature stage that feeds ``cam`` (2: stride 8)
    cam_channels: int = 64
    image_size: int = 256
    characteristics: tuple[str, ...] = CHARACTERISTICS
    guided: bool = False
    #: per characteristic: a weight per PRESENCE_FEATURES and a bias (empty: the head's sigmoid)
    presence: tuple[tuple[float, ...], ...] = ()
    count_head: bool = False          # a lesion-count head on the ``cam`` features (module docstring)
    level_from: str = "classifier"    # "classifier" or "count": the route of level and severity (module docstring)
    characteristic_counts: bool = False     # a count head per characteristic (module docstring)
    #: per characteristic, the count at which it is called present (empty: the head's sigmoid)
    count_thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.characteristics = tuple(self.characteristics)
        self.count_thresholds = tuple(float(v) for v in self.count_thresholds)
        if self.count_thresholds:
            if not self.characteristic_counts:
                raise GraderError("dermx count_thresholds need the characteristic count heads (characteristic_counts "
                                  "true)")
            if (len(self.count_thresholds) != len(self.characteristics)
                    or not all(math.isfinite(t) and t > 0 for t in self.count_thresholds)):
                raise GraderError(f"dermx count_thresholds: need one positive number per characteristic "
                                  f"({len(self.characteristics)}), or none")
            if self.presence:
                raise GraderError("dermx: presence models and count thresholds are two presence routes; give one")
        self.presence = tuple(tuple(float(v) for v in row) for row in self.presence)
        if self.presence and (len(self.presence) != len(self.characteristics)
                              or any(len(row) != len(PRESENCE_FEATURES) + 1 for row in self.presence)
                              or not np.isfinite(np.asarray(self.presence)).all()):
            raise GraderError(f"dermx presence: need one row of {len(PRESENCE_FEATURES) + 1} finite numbers per "
                              f"characteristic ({len(self.characteristics)}), or none")
        if not 64 <= self.image_size <= MAX_INPUT_SIZE or self.image_size % 16:
            raise GraderError(f"dermx image_size must be a multiple of 16 from 64 to {MAX_INPUT_SIZE}, got "
                              f"{self.image_size}")
        if self.backbone != "plain":
            import timm

            if not timm.is_model(self.backbone):
                raise GraderError(f"dermx backbone must be plain or a timm model name, got '{self.backbone}'")
        if self.level_from not in LEVEL_ROUTES:
            raise GraderError(f"dermx level_from must be {' or '.join(LEVEL_ROUTES)}, got {self.level_from!r}")
        if self.level_from == "count" and not self.count_head:
            raise GraderError("dermx level_from 'count' needs the count head (count_head true)")
        if self.stage not in (1, 2, 3, 4):
            raise GraderError(f"dermx stage must be 1-4 (backbone stride 4-32), got {self.stage}")
        if not 1 <= self.cam_channels <= 1024:
            raise GraderError(f"dermx cam_channels must be 1-1024, got {self.cam_channels}")
        unknown = [c for c in self.characteristics if c not in CHARACTERISTICS]
        if unknown or not self.characteristics:
            raise GraderError(f"dermx characteristics must be among {', '.join(CHARACTERISTICS)}, got {unknown}")


#: the ``plain`` backbone: (channels, stride) of each 3x3 conv + BatchNorm + ReLU layer (stride 8 in all)
PLAIN_LAYERS = ((24, 2), (32, 2), (48, 1), (64, 2), (64, 1))


def plain_backbone() -> tuple[nn.Module, int]:
    """The ``plain`` backbone (module docstring) and its output channels."""
    layers, width = [], 3
    for channels, stride in PLAIN_LAYERS:
        layers += [nn.Conv2d(width, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        width = channels
    return nn.Sequential(*layers), width


class DermXNet(nn.Module):
    """``forward(x) -> (diagnosis logits (B, 4), characteristic logits (B, C))``."""

    def __init__(self, cfg: DermXConfig) -> None:
        super().__init__()
        if cfg.backbone == "plain":
            self.body, width = plain_backbone()
        else:
            import timm

            try:
                self.body = timm.create_model(cfg.backbone, pretrained=False, features_only=True,
                                              out_indices=(cfg.stage,))
            except RuntimeError as exc:
                raise GraderError(f"dermx backbone {cfg.backbone!r}: {exc}") from None
            width = self.body.feature_info.channels()[-1]
        self.cam = nn.Sequential(nn.Conv2d(width, cfg.cam_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cfg.cam_channels), nn.ReLU(inplace=False))
        n = len(cfg.characteristics)
        self.char_head = nn.Sequential(nn.Dropout(0.2), nn.Linear(cfg.cam_channels, 64), nn.ReLU(), nn.Dropout(0.2),
                                       nn.Linear(64, n))
        self.reduce = nn.Sequential(nn.Linear(cfg.cam_channels, 32), nn.ReLU())
        self.diagnosis = nn.Linear(32 + n, LEVELS)
        self.counter = nn.Conv2d(cfg.cam_channels, 1, 1) if cfg.count_head else None
        self.char_counter = nn.Conv2d(cfg.cam_channels, n, 1) if cfg.characteristic_counts else None

    def features(self, x: Tensor) -> Tensor:
        body = self.body(x)
        return self.cam(body[-1] if isinstance(body, (list, tuple)) else body)

    def heads(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        chars = self.char_head(pooled)
        return self.diagnosis(torch.cat([self.reduce(pooled), chars], dim=1)), chars

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.features(x).mean(dim=(2, 3)))

    def count(self, feats: Tensor) -> Tensor:
        """The lesion count ``(B,)`` from the ``cam`` features: a density (1x1 conv, softplus) summed over the
        grid. Only with ``count_head``."""
        if self.counter is None:
            raise GraderError("dermx: these weights have no count head")
        return F.softplus(self.counter(feats)).sum(dim=(1, 2, 3))

    def characteristic_counts(self, feats: Tensor) -> Tensor:
        """How many lesions of each characteristic ``(B, C)`` from the ``cam`` features: one density per
        characteristic (1x1 conv, softplus) summed over the grid. Only with ``characteristic_counts``."""
        if self.char_counter is None:
            raise GraderError("dermx: these weights have no characteristic count heads")
        return F.softplus(self.char_counter(feats)).sum(dim=(2, 3))

    def forward_with_cams(self, x: Tensor, create_graph: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Logits and every characteristic's Grad-CAM map ``(B, C, h, w)`` (not normalised), differentiable."""
        return self.heads_with_cams(self.features(x), create_graph)

    def heads_with_cams(self, feats: Tensor, create_graph: bool = True,
                        relu: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward_with_cams` from the ``cam`` layer's features (which may carry no graph); ``relu=False``:
        the maps before Grad-CAM's ReLU (negative where the features speak against the characteristic)."""
        pooled = feats.mean(dim=(2, 3))
        if not pooled.requires_grad:
            pooled = pooled.detach().requires_grad_(True)
        diag, chars = self.heads(pooled)
        alphas = []
        for k in range(chars.shape[1]):
            (grad,) = torch.autograd.grad(chars[:, k].sum(), pooled, create_graph=create_graph, retain_graph=True)
            alphas.append(grad / (feats.shape[2] * feats.shape[3]))
        alpha = torch.stack(alphas, dim=1)                       # (B, C, channels)
        cams = torch.einsum("bkc,bchw->bkhw", alpha, feats)
        return diag, chars, F.relu(cams) if relu else cams


class CharacteristicLogits(nn.Module):
    """The network seen by ``pytorch_grad_cam``: image in, characteristic logits out."""

    def __init__(self, net: DermXNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[1]


def presence_features(chars: Tensor, cams: Tensor) -> Tensor:
    """``(B, C, 4)`` :data:`PRESENCE_FEATURES` from characteristic logits ``(B, C)`` and unnormalised maps
    ``(B, C, h, w)``."""
    flat = cams.flatten(2)
    top = flat.topk(min(5, flat.shape[2]), dim=2).values.mean(2)
    return torch.stack([chars, torch.log1p(flat.amax(2)), torch.log1p(top), torch.log1p(flat.mean(2))], dim=2)


class DermXOutputs(NamedTuple):
    """:meth:`DermX.outputs` per image: level probabilities ``(N, 4)``, characteristic probabilities ``(N, C)``,
    the count head's lesion count ``(N,)`` and the characteristic counts ``(N, C)`` (None without the head)."""

    levels: np.ndarray
    characteristics: np.ndarray
    counts: np.ndarray | None
    characteristic_counts: np.ndarray | None


def count_logits(counts: Tensor, thresholds: Sequence[float], floor: float = 1e-6) -> Tensor:
    """Characteristic scores from counts ``(B, C)`` (module docstring): ``log(count / threshold)``, so that the
    sigmoid is ``count / (count + threshold)`` and reaches 0.5 at the threshold."""
    t = torch.tensor(tuple(thresholds), dtype=counts.dtype, device=counts.device)
    return torch.log(counts.clamp_min(floor)) - torch.log(t)


def route_grades(route: str, levels: np.ndarray, counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Level (int) and severity (float, 0-3) per image by a level route (module docstring, "Level route"):
    ``classifier`` -- the arg-max and the expectation of the ``(N, 4)`` level probabilities; ``count`` -- the
    Hayashi level of each count (negative counts read as 0) and the severity it stands for."""
    if route == "count":
        if counts is None:
            raise GraderError("dermx: level_from 'count' needs the counts of a count head")
        counts = np.maximum(np.asarray(counts, np.float64), 0.0)
        return (np.asarray(scale.acne04_level_from_count(counts), int),
                np.asarray(scale.severity_from_count(counts), np.float64))
    if route != "classifier":
        raise GraderError(f"dermx level_from must be {' or '.join(LEVEL_ROUTES)}, got {route!r}")
    levels = np.asarray(levels, np.float64)
    return levels.argmax(1), levels @ np.arange(LEVELS, dtype=np.float64)


def normalise_maps(cams: Tensor, eps: float = 1e-7) -> Tensor:
    """Each map divided by its maximum (ReLU'd maps, so the result is in [0, 1])."""
    return cams / (cams.amax(dim=(-2, -1), keepdim=True) + eps)


def dice_loss(maps: Tensor, targets: Tensor, present: Tensor, eps: float = 1.0) -> Tensor:
    """Mean soft-Dice loss ``1 - (2 sum(m g) + eps) / (sum m + sum g + eps)`` over the (image, characteristic)
    pairs marked ``present``; 0 when there are none."""
    inter = (maps * targets).sum(dim=(-2, -1))
    total = maps.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1))
    loss = 1 - (2 * inter + eps) / (total + eps)
    weight = present.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def fuzzy_scores(cam: np.ndarray, area: np.ndarray) -> tuple[float, float, float]:
    """Fuzzy F1, sensitivity and specificity (the DermX paper's eqs. 6-8) of a [0, 1] map against a [0, 1]
    reference of the same shape; NaN where a denominator is 0."""
    a, m = np.asarray(cam, np.float64), np.asarray(area, np.float64)
    inter = np.minimum(a, m).sum()

    def ratio(num: float, den: float) -> float:
        return float(num / den) if den > 0 else float("nan")

    return (ratio(2 * inter, a.sum() + m.sum()), ratio(inter, m.sum()),
            ratio(np.minimum(1 - a, 1 - m).sum(), (1 - m).sum()))


def fuzzy_f1(cam: np.ndarray, mask: np.ndarray) -> float:
    """Fuzzy F1 (Jalaboi et al.'s explanation plausibility) of a [0, 1] map against a [0, 1] mask."""
    return fuzzy_scores(cam, mask)[0]


def to_tensor(images: Sequence[np.ndarray], side: int, device: torch.device) -> Tensor:
    """Images of one shape, resized so the longer side is ``side`` (the other rounded to a multiple of 16),
    ImageNet-normalised, as a (B, 3, H, W) batch."""
    batch = torch.stack([torch.from_numpy(np.array(im, copy=True)) for im in images]).to(device)
    x = batch.permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[2:]
    factor = side / max(h, w)
    size = (max(16, int(round(h * factor / 16)) * 16), max(16, int(round(w * factor / 16)) * 16))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


class DermX(GraderComponent):
    """``DermX.from_pretrained(folder).predict(images)`` -> level, severity and one probability per
    characteristic."""

    name = "dermx"
    label = "DermX"
    outcomes = ("severity",)
    config_class = DermXConfig

    @classmethod
    def build(cls, config: DermXConfig) -> DermXNet:
        return DermXNet(config)

    @staticmethod
    def _check(image: Any) -> None:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise GraderError("dermx: images must be (H, W, 3) uint8 RGB arrays")

    def probabilities(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) level probabilities and (N, C) characteristic probabilities."""
        return self.outputs(images)[:2]

    def outputs(self, images: Sequence[np.ndarray]) -> DermXOutputs:
        """:meth:`probabilities` and, with the count heads, the lesion count and the characteristic counts per
        image (else None)."""
        n, c = len(images), len(self.config.characteristics)
        levels, chars = np.zeros((n, LEVELS)), np.zeros((n, c))
        counts = np.zeros(n) if self.config.count_head else None
        char_counts = np.zeros((n, c)) if self.config.characteristic_counts else None
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            self._check(image)
            groups.setdefault(image.shape, []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), 32):
                part = idx[start:start + 32]
                diag, ch, feats, per_char = self.scores(to_tensor([images[i] for i in part], self.config.image_size,
                                                                  self.device))
                levels[part] = torch.softmax(diag.float(), 1).cpu().numpy()
                chars[part] = torch.sigmoid(ch.float()).cpu().numpy()
                if counts is not None:
                    with torch.no_grad():
                        counts[part] = self.model.count(feats).float().cpu().numpy()
                if char_counts is not None:
                    char_counts[part] = per_char.float().cpu().numpy()
        return DermXOutputs(levels, chars, counts, char_counts)

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Level logits, characteristic scores (logits; from the maps where the config has ``presence``, from
        the characteristic counts where it has ``count_thresholds``), the ``cam`` layer's features (for the
        count head) and, with the characteristic count heads, their counts ``(B, C)`` (else None) of a
        normalised batch; nothing keeps a graph."""
        with torch.no_grad():
            feats = self.model.features(x)
            per_char = self.model.characteristic_counts(feats) if self.config.characteristic_counts else None
            if self.config.count_thresholds:
                diag = self.model.heads(feats.mean(dim=(2, 3)))[0]
                return diag, count_logits(per_char, self.config.count_thresholds), feats, per_char
            if not self.config.presence:
                return (*self.model.heads(feats.mean(dim=(2, 3))), feats, per_char)
        diag, maps = self._map_features(feats)
        weights = torch.tensor(self.config.presence, dtype=torch.float32, device=maps.device)
        return diag, (maps * weights[:, :-1]).sum(-1) + weights[:, -1], feats, per_char

    def map_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Level logits ``(B, 4)`` and :data:`PRESENCE_FEATURES` ``(B, C, 4)`` of a normalised batch (the maps
        need gradients through the small heads only); nothing keeps a graph."""
        with torch.no_grad():
            feats = self.model.features(x)
        return self._map_features(feats)

    def _map_features(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`map_features` from the ``cam`` layer's features."""
        with torch.enable_grad():
            diag, chars, cams = self.model.heads_with_cams(feats, create_graph=False)
        return diag.detach(), presence_features(chars.detach(), cams.detach())

    def grades(self, levels: np.ndarray, counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Level (int) and severity (float, 0-3) per image from :meth:`outputs`' level probabilities and counts,
        by the config's ``level_from`` route (:func:`route_grades`)."""
        return route_grades(self.config.level_from, levels, counts)

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        levels, chars, counts, char_counts = self.outputs(images)
        level, severity = self.grades(levels, counts)
        frame = pd.DataFrame({"severity": severity, "level": level.astype(float)})
        for k, name in enumerate(self.config.characteristics):
            frame[f"p_{name}"] = chars[:, k]
        if counts is not None:
            frame["count"] = counts
        if char_counts is not None:
            for k, name in enumerate(self.config.characteristics):
                frame[f"count_{name}"] = char_counts[:, k]
        return frame.astype("float64")

    def explain(self, image: np.ndarray, grid: bool = False) -> np.ndarray:
        """Grad-CAM map of every characteristic, ``(C, H, W)`` in [0, 1] at the image's own height and width
        (``pytorch_grad_cam.GradCAM`` on the ``cam`` layer, resized bilinearly); ``grid``: at the ``cam`` layer's
        own resolution instead (``(C, h, w)``, one value per cell, nothing interpolated)."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        self._check(image)
        x = to_tensor([image], self.config.image_size, self.device)
        n = len(self.config.characteristics)
        with grid_grad_cam()(model=CharacteristicLogits(self.model).eval(), target_layers=[self.model.cam]) as cam:
            if grid:
                with torch.inference_mode():
                    cells = self.model.features(x).shape[-2:]
                cam.grid = (int(cells[1]), int(cells[0]))
            maps = cam(input_tensor=x.expand(n, -1, -1, -1).contiguous(),
                       targets=[ClassifierOutputTarget(k) for k in range(n)])
        maps = torch.from_numpy(np.asarray(maps, np.float32))[:, None]
        if grid:
            return maps[:, 0].clamp(0, 1).numpy()
        resized = F.interpolate(maps, size=image.shape[:2], mode="bilinear", align_corners=False)[:, 0]
        return resized.clamp(0, 1).numpy()


def grid_grad_cam() -> type:
    """``pytorch_grad_cam.GradCAM`` whose maps stay at ``grid`` = (width, height) when that is set (the package
    resizes them to the input otherwise); its min-max scaling is unchanged."""
    from pytorch_grad_cam import GradCAM

    class GridGradCAM(GradCAM):
        grid: tuple[int, int] | None = None

        def get_target_width_height(self, input_tensor: Tensor) -> tuple[int, int]:
            return self.grid if self.grid is not None else super().get_target_width_height(input_tensor)

    return GridGradCAM


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 overlay of a [0, 1] map on an image (grad-cam's JET colouring)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255.0, cam.astype(np.float32), use_rgb=True,
                             image_weight=1 - alpha)
