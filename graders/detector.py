"""The two-stage lesion detector: torchvision Faster R-CNN + FPN with the SADH RPN head and its NWD branch.

Choices, stated once:

* **Model.** torchvision's :class:`~torchvision.models.detection.FasterRCNN`, unchanged, on a light
  backbone trained from scratch (timm ``tinynet_e`` feature stages at strides 4, 8 and 16, random init)
  with torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` (64 channels). Anchors are sized for
  small lesions: ``anchors_per_level`` sizes on each of the three levels (strides 4, 8 and 16, finest
  first), ratios 0.5 / 1 / 2; training fits them to the lesion sizes of its data (two per level,
  ``detector_train.fit_anchor_sizes``), the config default is one size per level, 6 / 12 / 24 px (Zhang et
  al. use scale 8 on P2-P5 for 1024 px crops of 3500 x 5000 photos; our lesions are 3-20 px). R-CNN positives
  need
  IoU > 0.5, as in the paper; the RPN's thresholds (``rpn_fg_iou`` / ``rpn_bg_iou``, 0.5 / 0.3 as in the paper)
  and the anchor ratios (``anchor_ratios``, 0.5 / 1 / 2) are settings: lesions are round (w / h 0.67-1.5 for 90 %
  of them) and a few pixels wide, and at strides 4-16 a lesion of 3-9 px rarely meets an anchor at IoU 0.5 (42 %
  of the grader set's visible lesions do with the 0.5 / 1 / 2 anchors fitted to them, 94 % at IoU 0.3), so
  the recipe for these images lowers the foreground IoU to 0.3. The box head is a two-layer MLP of 256 units
  (torchvision's 1024 would triple the weights for nothing at this size).
* **RPN head** (``head``): ``rpn`` is torchvision's :class:`RPNHead` (the plain baseline); ``sadh`` is the
  Spatial Aware Double Head (classification: 1x1 conv + GroupNorm + ReLU, then 1x1 logits; box: 3x3 conv +
  GroupNorm + ReLU, then 1x1 deltas); ``sadh_nwd`` adds the NWD branch (1x1 conv on the box branch's
  intermediate map, sigmoid). All three drop into ``FasterRCNN(rpn_head=...)``; the NWD variant also swaps
  the RPN for :class:`NWDRegionProposalNetwork`, a small subclass of torchvision's
  :class:`RegionProposalNetwork` that adds the SBCE loss ``-log(1 - |y - p|)`` on positive anchors
  (``y`` = NWD between the decoded anchor box and its ground truth) as ``loss_rpn_nwd`` and rectifies the
  proposal scores to ``sqrt(s^(2-w) * p^w)`` (w = 1) before torchvision's own top-k and NMS.
* **Marks** (``mark`` in ``classes``, optional): post-inflammatory marks as a class of their own, detected and
  never counted (:data:`NOT_COUNTED`), so the detector learns to tell them from the papules they resemble.
* **High-pass input** (``highpass_sigma``, 0 = off): the normalised image minus its Gaussian blur (:func:`highpass`,
  no weights) before the backbone, so what the network sees is each pixel's difference from the skin around it;
  a face's tone and light, smooth over ``sigma`` px, carry no cue (hopper's cheeks are CIELAB a* ~31, astronaut's
  ~11). ``sigma`` should exceed the largest lesion radius (nodules: ~11 px at 512 px).
* **NWD** = ``exp(-W2 / C)`` with ``W2`` the 2-Wasserstein distance between the boxes' Gaussians
  (``||(cx, cy, w/2, h/2) - (cx', cy', w'/2, h'/2)||``) and ``C`` the average lesion size of the training
  data (mean of (w + h) / 2, in pixels at the detector's scale), recorded in the config.
* **Scale and tiles.** Images are resized so that their longer side is ``image_side`` (the side of the
  training images). Training sees ``tile`` x ``tile`` crops; inference, being convolutional, runs on
  ``infer_tile`` x ``infer_tile`` sub-images (the whole image at the default 512) cut with equal overlaps
  (at least ``overlap`` px) when the image is larger, as the paper crops; each detection is kept only by
  the tile whose core holds its centre, then class-wise NMS (IoU 0.5) merges the tiles. Training uses the
  paper's *masked crops*: lesions cut by a crop edge are blacked out rather than kept as partial boxes
  (``detector_train.masked_crop``).
* **Counting** (the LDL route): detections above ``count_threshold`` of the active lesion classes (all but
  ``scar``) are the ``visible_count`` -- what the detector sees, the threshold chosen on training images to
  match the number of target lesions there. The simulated lesion count also holds lesions too faint to see
  (most closed comedones), in a proportion that changes with the lesion mix, so ``count`` is a calibrated
  estimate of it: ``count_bias + sum_c count_weights[c] * f_c`` over per-class features ``f_c`` -- the counts
  above the threshold or, with ``count_soft_floor`` > 0, the sums of the scores from the floor on (a soft
  count) -- then, where there is one, the monotone ``count_curve``; without weights it is the visible count.
  :mod:`synthtrial.graders.detector_count` fits all of it. ``count`` gives the ACNE04 / Hayashi level and a
  0-3 severity through :mod:`synthtrial.trial.scale`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, batched_nms

from synthtrial.graders.base import MAX_IMAGE_SIDE, GraderComponent, GraderError
from synthtrial.util.images import IMAGENET_MEAN, IMAGENET_STD
from synthtrial.trial import scale

#: Detector classes (the issue's six lesion types; post-inflammatory marks are not lesions to find).
CLASSES = ("open_comedo", "closed_comedo", "papule", "pustule", "nodule", "scar")
#: The optional seventh class (``--marks``): post-inflammatory marks, detected so that they are told apart
#: from active lesions (never counted, never scored by the AP over :data:`CLASSES`).
MARK = "mark"
#: Classes that are not counted as active lesions.
NOT_COUNTED = ("scar", MARK)
HEADS = ("rpn", "sadh", "sadh_nwd")
#: Feature levels of the backbone (strides 4, 8, 16)
PYRAMID_LEVELS = 3


@dataclass
class DetectorConfig:
    """Plain data: architecture, scale, and the training record (written to ``config.json``)."""

    head: str = "sadh_nwd"
    classes: tuple[str, ...] = CLASSES
    backbone: str = "tinynet_e"
    fpn_channels: int = 64
    anchor_sizes: tuple[int, ...] = (6, 12, 24)
    anchors_per_level: int = 1
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou: float = 0.5
    rpn_bg_iou: float = 0.3
    highpass_sigma: float = 0.0
    image_side: int = 512
    tile: int = 256
    infer_tile: int = 512
    overlap: int = 32
    nwd_constant: float = 6.0
    nwd_weight: float = 1.0
    score_weight: float = 1.0
    count_threshold: float = 0.5
    count_weights: tuple[float, ...] = ()
    count_bias: float = 0.0
    count_soft_floor: float = 0.0
    count_curve: tuple[tuple[float, float], ...] = ()
    detections_per_tile: int = 200

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        self.anchor_ratios = tuple(float(r) for r in self.anchor_ratios)
        if not self.anchor_ratios or not all(0.1 <= r <= 10 for r in self.anchor_ratios):
            raise GraderError(f"detector anchor_ratios must be 0.1-10, got {list(self.anchor_ratios)}")
        if not 0 < self.rpn_bg_iou < self.rpn_fg_iou <= 1:
            raise GraderError(f"detector RPN IoU thresholds: need 0 < rpn_bg_iou < rpn_fg_iou <= 1, got "
                              f"{self.rpn_bg_iou} and {self.rpn_fg_iou}")
        if not 0 <= self.highpass_sigma <= 64:
            raise GraderError(f"detector highpass_sigma must be 0 (off) to 64 px, got {self.highpass_sigma}")
        if self.head not in HEADS:
            raise GraderError(f"detector head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.anchors_per_level < 1 or len(self.anchor_sizes) != PYRAMID_LEVELS * self.anchors_per_level:
            raise GraderError(f"detector anchor_sizes: need {PYRAMID_LEVELS} x anchors_per_level sizes "
                              f"({self.anchors_per_level} per level), got {len(self.anchor_sizes)}")
        if not self.classes:
            raise GraderError("detector needs at least one class")
        sides = {"image_side": self.image_side, "tile": self.tile, "infer_tile": self.infer_tile}
        for name, value in sides.items():
            if not 32 <= value <= MAX_IMAGE_SIDE:
                raise GraderError(f"detector {name} must be 32-{MAX_IMAGE_SIDE} pixels, got {value}")
        if not 0 <= self.overlap < self.infer_tile // 2:
            raise GraderError(f"detector overlap {self.overlap}: need 0 <= overlap < infer_tile / 2")
        if not (1 <= self.fpn_channels <= 1024 and 1 <= self.detections_per_tile <= 10_000
                and self.anchor_sizes and all(1 <= a <= MAX_IMAGE_SIDE for a in self.anchor_sizes)):
            raise GraderError("detector fpn_channels must be 1-1024, detections_per_tile 1-10000 and anchor_sizes "
                              f"1-{MAX_IMAGE_SIDE}")
        if not (self.nwd_constant > 0 and 0 <= self.score_weight <= 2):
            raise GraderError("detector nwd_constant must be > 0 and score_weight in [0, 2]")
        self.count_weights = tuple(float(w) for w in self.count_weights)
        if self.count_weights and (len(self.count_weights) != len(self.classes)
                                   or not all(0 <= w < 1e6 for w in self.count_weights)):
            raise GraderError(f"detector count_weights: need one weight in [0, 1e6) per class ({len(self.classes)}), "
                              f"got {list(self.count_weights)}")
        if not -1e6 < self.count_bias < 1e6:
            raise GraderError(f"detector count_bias must be in (-1e6, 1e6), got {self.count_bias}")
        if not 0 <= self.count_threshold <= 1 or not 0 <= self.count_soft_floor < 1:
            raise GraderError(f"detector count_threshold must be a score in [0, 1] and count_soft_floor in [0, 1), "
                              f"got {self.count_threshold} and {self.count_soft_floor}")
        self.count_curve = tuple((float(x), float(y)) for x, y in self.count_curve)
        xs, ys = np.array([p[0] for p in self.count_curve]), np.array([p[1] for p in self.count_curve])
        if self.count_curve and (len(xs) < 2 or np.any(np.diff(xs) <= 0) or np.any(np.diff(ys) < 0)
                                 or not np.all(np.isfinite(xs)) or not np.all((ys >= 0) & (ys < 1e6))):
            raise GraderError("detector count_curve: need at least two (x, y) points with x increasing, y not "
                              "decreasing and 0 <= y < 1e6")


# ----------------------------------------------------------------------------------------------- NWD

def wasserstein2(boxes: Tensor, gt: Tensor) -> Tensor:
    """Element-wise 2-Wasserstein distance between (x0, y0, x1, y1) boxes modelled as 2-D Gaussians."""
    def params(b: Tensor) -> Tensor:
        return torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                            (b[:, 2] - b[:, 0]) / 2, (b[:, 3] - b[:, 1]) / 2], dim=1)
    return torch.linalg.vector_norm(params(boxes) - params(gt), dim=1)


def nwd(boxes: Tensor, gt: Tensor, constant: float) -> Tensor:
    """Normalized Wasserstein Distance ``exp(-W2 / C)`` (Wang et al. 2021), element-wise, in (0, 1]."""
    return torch.exp(-wasserstein2(boxes, gt) / constant)


def sbce(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft-style binary cross-entropy ``-log(1 - |y - p|)``, summed (Zhang et al., Eq. 1)."""
    return -torch.log((1 - (target - pred).abs()).clamp_min(eps)).sum()


def rectify_scores(cls_prob: Tensor, nwd_prob: Tensor, weight: float = 1.0) -> Tensor:
    """The paper's final proposal score ``sqrt(s^(2 - w) * p^w)`` (Eq. 5)."""
    return torch.sqrt(cls_prob.pow(2 - weight) * nwd_prob.pow(weight))


# --------------------------------------------------------------------------------------------- heads

class SADHHead(nn.Module):
    """Spatial Aware Double Head for torchvision's RPN: same contract as :class:`RPNHead`.

    ``forward(features) -> (objectness logits, box deltas)``, one tensor per level. With ``nwd=True`` the
    NWD branch's logits of the last call are kept in ``self.nwd_logits`` (same layout as the objectness),
    which :class:`NWDRegionProposalNetwork` reads; torchvision's RPN never sees a third output.
    """

    def __init__(self, in_channels: int, num_anchors: int, *, nwd: bool = False, groups: int = 16) -> None:
        super().__init__()
        groups = math.gcd(groups, in_channels)
        self.cls_conv = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.GroupNorm(groups, in_channels),
                                      nn.ReLU(inplace=True))
        self.box_conv = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1),
                                      nn.GroupNorm(groups, in_channels), nn.ReLU(inplace=True))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        self.nwd_pred = nn.Conv2d(in_channels, num_anchors, 1) if nwd else None
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)
        self.nwd_logits: list[Tensor] = []

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas, nwd_logits = [], [], []
        for feature in x:
            box_mid = self.box_conv(feature)
            logits.append(self.cls_logits(self.cls_conv(feature)))
            deltas.append(self.bbox_pred(box_mid))
            if self.nwd_pred is not None:
                nwd_logits.append(self.nwd_pred(box_mid))
        self.nwd_logits = nwd_logits
        return logits, deltas


class NWDRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN plus the NWD branch's SBCE loss and score rectification (head: :class:`SADHHead`).

    Only three hooks are overridden: ``assign_targets_to_anchors`` (remember the anchors and matched ground
    truth), ``compute_loss`` (add the SBCE on positive anchors) and ``filter_proposals`` (rank by the
    rectified score); ``forward`` reports the extra loss as ``loss_rpn_nwd``.
    """

    def __init__(self, *args: Any, nwd_constant: float, nwd_weight: float = 1.0, score_weight: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.head, SADHHead) or self.head.nwd_pred is None:
            raise GraderError("NWDRegionProposalNetwork needs a SADHHead built with nwd=True")
        self.nwd_constant, self.nwd_weight, self.score_weight = float(nwd_constant), float(nwd_weight), \
            float(score_weight)
        self._anchors: list[Tensor] = []
        self._matched: list[Tensor] = []
        self._nwd_loss: Tensor | None = None

    def _flat_nwd_logits(self) -> Tensor:
        logits = self.head.nwd_logits
        deltas = [torch.zeros(t.shape[0], t.shape[1] * 4, *t.shape[2:], device=t.device) for t in logits]
        flat, _ = concat_box_prediction_layers(logits, deltas)
        return flat.flatten()

    def forward(self, images, features, targets=None):  # noqa: D102  (torchvision's signature)
        self._nwd_loss = None
        boxes, losses = super().forward(images, features, targets)
        if self.training:
            losses["loss_rpn_nwd"] = self.nwd_weight * self._nwd_loss
        return boxes, losses

    def assign_targets_to_anchors(self, anchors, targets):  # noqa: D102
        labels, matched = super().assign_targets_to_anchors(anchors, targets)
        self._anchors, self._matched = anchors, matched
        return labels, matched

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):  # noqa: D102
        objectness_loss, box_loss = super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        positive = torch.where(torch.cat(labels) >= 1)[0]
        anchors = torch.cat(self._anchors)[positive]
        decoded = self.box_coder.decode_single(pred_bbox_deltas[positive].detach(), anchors)
        target = nwd(decoded, torch.cat(self._matched)[positive], self.nwd_constant)
        pred = torch.sigmoid(self._flat_nwd_logits()[positive])
        self._nwd_loss = sbce(pred, target) / max(1, positive.numel())
        self._anchors, self._matched = [], []
        return objectness_loss, box_loss

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):  # noqa: D102
        with torch.no_grad():
            cls_prob = torch.sigmoid(objectness.detach().reshape(-1))
            nwd_prob = torch.sigmoid(self._flat_nwd_logits().detach())
            final = rectify_scores(cls_prob, nwd_prob, self.score_weight).clamp(1e-6, 1 - 1e-6)
            logits = torch.logit(final).reshape(objectness.shape)
        return super().filter_proposals(proposals, logits, image_shapes, num_anchors_per_level)


# ------------------------------------------------------------------------------------------ backbone

def highpass(x: Tensor, sigma: float) -> Tensor:
    """``x`` minus its Gaussian blur (``sigma`` px, reflected borders), channel by channel: what is left is each
    pixel's difference from the skin around it, so a face's tone and light (smooth over ``sigma``) carry no cue."""
    from torchvision.transforms.v2.functional import gaussian_blur

    radius = max(1, math.ceil(3 * sigma))
    size = min(2 * radius + 1, 2 * (min(x.shape[-2:]) // 2) - 1)      # reflect padding needs kernel < 2 x side
    return x - gaussian_blur(x, [size, size], [sigma, sigma])


class TimmFPN(nn.Module):
    """timm feature stages (strides 4, 8, 16; random init) + torchvision FPN; ``out_channels`` as FasterRCNN wants.
    With ``highpass_sigma`` > 0 the (normalised) input first goes through :func:`highpass` (no weights)."""

    def __init__(self, name: str, out_channels: int, highpass_sigma: float = 0.0) -> None:
        super().__init__()
        import timm

        self.highpass_sigma = float(highpass_sigma)
        try:
            self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 2, 3))
        except RuntimeError as exc:
            raise GraderError(f"detector backbone {name!r}: {exc}") from None
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if self.highpass_sigma > 0:
            x = highpass(x, self.highpass_sigma)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_model(cfg: DetectorConfig) -> FasterRCNN:
    """The Faster R-CNN of ``cfg`` (random init)."""
    backbone = TimmFPN(cfg.backbone, cfg.fpn_channels, cfg.highpass_sigma)
    levels, per = PYRAMID_LEVELS, cfg.anchors_per_level
    anchors = AnchorGenerator(tuple(tuple(cfg.anchor_sizes[k * per:(k + 1) * per]) for k in range(levels)),
                              (cfg.anchor_ratios,) * levels)
    num_anchors = anchors.num_anchors_per_location()[0]
    head = RPNHead(cfg.fpn_channels, num_anchors) if cfg.head == "rpn" else \
        SADHHead(cfg.fpn_channels, num_anchors, nwd=cfg.head == "sadh_nwd")
    rpn_settings = dict(rpn_pre_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_train=500,
                        rpn_post_nms_top_n_test=500, rpn_nms_thresh=0.7, rpn_fg_iou_thresh=cfg.rpn_fg_iou,
                        rpn_bg_iou_thresh=cfg.rpn_bg_iou, rpn_batch_size_per_image=256, rpn_positive_fraction=0.5)
    roi = MultiScaleRoIAlign([str(i) for i in range(levels)], output_size=7, sampling_ratio=2)
    model = FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors, rpn_head=head, box_roi_pool=roi,
        box_head=TwoMLPHead(cfg.fpn_channels * 49, 256), box_predictor=FastRCNNPredictor(256, len(cfg.classes) + 1),
        min_size=cfg.tile, max_size=cfg.tile, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=cfg.detections_per_tile,
        box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=256, **rpn_settings)
    if cfg.head == "sadh_nwd":
        rpn = model.rpn
        model.rpn = NWDRegionProposalNetwork(
            anchors, head, cfg.rpn_fg_iou, cfg.rpn_bg_iou, 256, 0.5, dict(training=1000, testing=1000),
            dict(training=500, testing=500),
            0.7, nwd_constant=cfg.nwd_constant, nwd_weight=cfg.nwd_weight, score_weight=cfg.score_weight)
        model.rpn.score_thresh, model.rpn.min_size = rpn.score_thresh, rpn.min_size
    return model


# --------------------------------------------------------------------------------------------- tiles

def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length`` with equal overlaps of at least ``overlap`` (one when it fits)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


def _core_bounds(origins: list[int], tile: int, length: int) -> list[tuple[float, float]]:
    """The part of each tile that owns the detections centred in it (split at the middle of overlaps)."""
    bounds = []
    for k, start in enumerate(origins):
        lo = 0.0 if k == 0 else (start + origins[k - 1] + tile) / 2
        hi = float(max(length, tile)) if k == len(origins) - 1 else (origins[k + 1] + start + tile) / 2
        bounds.append((lo, hi))
    return bounds


# -------------------------------------------------------------------------------------------- grader

class LesionDetector(GraderComponent):
    """``LesionDetector.from_pretrained(folder).predict(images)`` -> count, level, severity and per-class counts."""

    name = "detector"
    label = "detector"
    outcomes = ("count", "severity")
    config_class = DetectorConfig

    def __init__(self, config: DetectorConfig | None = None, model: FasterRCNN | None = None, *,
                 device: Any = None, record: dict[str, Any] | None = None) -> None:
        super().__init__(config, model, device=device, record=record)
        # inference tiles are not resized by torchvision's transform (it would scale them to the training tile)
        self.model.transform.min_size, self.model.transform.max_size = (self.config.infer_tile,), \
            self.config.infer_tile

    @classmethod
    def build(cls, config: DetectorConfig) -> FasterRCNN:
        return build_model(config)

    # ----------------------------------------------------------------------------------- inference
    def _scale(self, image: np.ndarray) -> float:
        return self.config.image_side / max(image.shape[:2])

    def detect(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Boxes (N, 4; x0, y0, x1, y1 in the image's pixels), labels (class indices into ``classes``), scores."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise GraderError("detector: images must be (H, W, 3) uint8 RGB arrays")
        cfg = self.config
        factor = self._scale(image)
        pixels = torch.from_numpy(np.array(image, copy=True)).to(self.device).permute(2, 0, 1).float() / 255.0
        if factor != 1.0:
            size = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True,
                                   align_corners=False)[0].clamp(0, 1)
        height, width = pixels.shape[1:]
        tile = cfg.infer_tile
        ys, xs = tile_origins(height, tile, cfg.overlap), tile_origins(width, tile, cfg.overlap)
        y_core, x_core = _core_bounds(ys, tile, height), _core_bounds(xs, tile, width)
        crops, places = [], []
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                crop = pixels[:, y:y + tile, x:x + tile]
                pad = (0, tile - crop.shape[2], 0, tile - crop.shape[1])
                crops.append(F.pad(crop, pad) if any(pad) else crop)
                places.append((x, y, x_core[j], y_core[i]))
        boxes, labels, scores = [], [], []
        with torch.inference_mode():
            for start in range(0, len(crops), 8):
                outputs = self.model(crops[start:start + 8])
                for out, (x, y, (xlo, xhi), (ylo, yhi)) in zip(outputs, places[start:start + 8]):
                    b = out["boxes"] + torch.tensor([x, y, x, y], dtype=out["boxes"].dtype, device=self.device)
                    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
                    own = (cx >= xlo) & (cx < xhi) & (cy >= ylo) & (cy < yhi)
                    boxes.append(b[own]), labels.append(out["labels"][own]), scores.append(out["scores"][own])
            b, lab, s = torch.cat(boxes), torch.cat(labels), torch.cat(scores)
            if len(ys) * len(xs) > 1 and b.numel():
                keep = batched_nms(b, s, lab, 0.5)
                b, lab, s = b[keep], lab[keep], s[keep]
        order = torch.argsort(s, descending=True, stable=True)
        return {"boxes": (b[order] / factor).cpu().numpy().astype(np.float64),
                "labels": (lab[order] - 1).cpu().numpy().astype(np.int64),
                "scores": s[order].cpu().numpy().astype(np.float64)}

    def counted(self, found: dict[str, np.ndarray], threshold: float | None = None) -> np.ndarray:
        """Which of ``found``'s detections are counted: an active class (not :data:`NOT_COUNTED`) at or above
        the count threshold (``threshold`` instead, when given)."""
        threshold = self.config.count_threshold if threshold is None else threshold
        active = ~np.isin(np.asarray(self.config.classes, dtype=object)[found["labels"]], NOT_COUNTED)
        return (found["scores"] >= threshold) & active

    def count_features(self, found: dict[str, np.ndarray], threshold: float | None = None,
                       soft_floor: float | None = None) -> np.ndarray:
        """Per class, what ``count_weights`` multiply: the number of detections at or above the count threshold
        or, with a soft floor (``count_soft_floor``, or ``soft_floor`` when given) above 0, the sum of the
        scores of the detections at or above the floor -- each detection counts as the probability that it is
        a lesion, so faint lesions found at low scores still move the count."""
        cfg = self.config
        floor = cfg.count_soft_floor if soft_floor is None else soft_floor
        k = len(cfg.classes)
        if floor > 0:
            keep = found["scores"] >= floor
            return np.bincount(found["labels"][keep], weights=found["scores"][keep], minlength=k)[:k]
        labels = found["labels"][found["scores"] >= (cfg.count_threshold if threshold is None else threshold)]
        return np.bincount(labels, minlength=k)[:k].astype(np.float64)

    def count_from_features(self, features: np.ndarray) -> np.ndarray:
        """``count`` from :meth:`count_features` (one row per image, or one image): the linear estimate
        ``count_bias + features @ count_weights``, then the monotone ``count_curve`` (linear between its
        points, flat beyond them) where there is one, else clipped at 0."""
        cfg = self.config
        linear = cfg.count_bias + np.asarray(features, np.float64) @ np.asarray(cfg.count_weights, np.float64)
        if cfg.count_curve:
            xs, ys = np.array(cfg.count_curve).T
            return np.interp(linear, xs, ys)
        return np.maximum(linear, 0.0)

    def counts(self, found: dict[str, np.ndarray], threshold: float | None = None) -> dict[str, float]:
        """Per-class counts above the count threshold, the lesion count, its level and severity."""
        cfg = self.config
        per_class = self.count_features(found, threshold, soft_floor=0.0).tolist()
        visible = float(self.counted(found, threshold).sum())
        count = float(self.count_from_features(self.count_features(found, threshold))) if cfg.count_weights \
            else visible
        return {"count": count, "visible_count": visible, "level": float(scale.acne04_level_from_count(count)),
                "severity": float(scale.severity_from_count(count)),
                **{f"n_{name}": n for name, n in zip(cfg.classes, per_class)}}

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        return self.predict_detections(images, meta)[0]

    def predict_detections(self, images: Sequence[np.ndarray],
                           meta: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """:meth:`predict`'s counts and every detection (``index`` of its image, box, ``class``, ``score``,
        ``counted``: an active class at or above the count threshold), as ``synthtrial grade`` keeps them."""
        found = [self.detect(image) for image in images]
        columns = ["count", "visible_count", "level", "severity", *(f"n_{c}" for c in self.config.classes)]
        grades = pd.DataFrame([self.counts(f) for f in found], columns=columns).astype("float64")
        classes = np.asarray(self.config.classes, dtype=object)
        frames = [pd.DataFrame({"index": k, "x0": f["boxes"][:, 0], "y0": f["boxes"][:, 1], "x1": f["boxes"][:, 2],
                                "y1": f["boxes"][:, 3], "class": classes[f["labels"]], "score": f["scores"],
                                "counted": self.counted(f)})
                  for k, f in enumerate(found)]
        detections = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["index", "x0", "y0", "x1", "y1", "class", "score", "counted"])
        return grades, detections.astype({"index": "int64", "x0": "float64", "y0": "float64", "x1": "float64",
                                          "y1": "float64", "score": "float64", "counted": "bool"})
