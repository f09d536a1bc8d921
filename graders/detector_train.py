"""Training data, training, evaluation and the RPN ablation of the lesion detector (``synthtrial.graders.detector``).

Choices, stated once:

* **Data.** A synthtrial run gives exact boxes and types (``lesions.parquet``; post-inflammatory marks are
  not a detector class). ACNE04 gives Pascal VOC boxes without a type (``synthtrial.data.acne04``): a
  detector trained on it has the one class ``lesion``; the two sources are not mixed. Images are resized
  so that their longer side is ``image_side``; all images are held in memory as uint8.
* **Targets: the visible lesions** (``visible_only``, default on; ``--all-lesions`` for every simulated one): a
  lesion the renderer measured as invisible (``lesions.parquet``'s ``visible``: contrast to its surround or
  signal, the change it made, below 5 ΔE, or smaller than 4 px) is not a target -- a detector taught to find
  what is not in the pixels learns to hallucinate. It is not a negative either in effect: it looks like the
  skin around it.
* **Masked crops where lesions are** (Zhang et al. 3.1.2): each step draws ``batch`` (default 2) ``tile`` x
  ``tile`` crops (and a horizontal flip) from random images; with probability ``focus`` (0.75) the crop is
  centred, up to a quarter tile off, on a target lesion drawn at random (so crops land where lesions are
  dense, as the paper samples), otherwise anywhere. A lesion cut by the crop edge is blacked out (its box
  inside the crop set to 0) instead of being kept as a partial box. ``balance`` (0-1, default 0) weights the
  lesion a focused crop is centred on by its class's frequency to the power ``-balance``: at 0 every lesion is
  equally likely (papules and marks fill most crops; a class as rare as visible closed comedones, 2 % of the
  grader set's, is met a few hundred times in a training), at 1 every class is; the image is drawn with the
  same weights summed over its lesions, so the pair is drawn from that one distribution.
* **Fine-tuning** (``init``): training may start from a detector's saved weights instead of a random
  initialisation (the same architecture: every config field but the count calibration must agree); a fresh
  optimiser, warm-up and cosine schedule then run for ``steps``. The start's weights hash is recorded. Its
  anchor sizes and NWD constant are kept rather than fitted to the new data (the network's RPN was trained
  with them), so a detector can be fine-tuned on other runs, e.g. another portrait's.
* **Anchors from the lesion sizes** (``fit_anchors``, default on): two anchor sizes per pyramid level, the
  sextile midpoints (1/12, 3/12, ..., 11/12 quantiles) of the target boxes' sqrt(w h) at the detector's scale,
  smallest on the finest level; recorded in the config.
* **Augmentation** (``augment``, default on; ``--no-augment``): before it is cropped, each drawn image gets the
  graders' photometric and geometric augmentation (``augmentation``: :data:`WIDE`, the detector's wider
  :data:`DETECTOR_AUGMENT`, or that with skin texture and wrinkles, :data:`TEXTURE_AUGMENT`) with its boxes
  (:mod:`synthtrial.graders.augment`: the boxes move with the lesions), its seed drawn from the step's stream.
* **Marks** (``marks`` / ``--marks``): visible post-inflammatory marks become targets of a seventh class that is
  never counted, so the detector learns them as what they are instead of meeting them only as background that
  a random RoI sample may miss; evaluation scores the six lesion classes and leaves mark detections out.
* **Optimiser.** AdamW (lr 2e-3, weight decay 1e-4, 50 warm-up steps, cosine decay, gradient norm clipped
  at 10) rather than the paper's SGD 0.002: the backbone starts from random weights and the CPU budget is
  a few hundred steps. Every step's draws come from ``(seed, step)``; the shared loop
  (:mod:`synthtrial.util.training`) writes a checkpoint every ``save_every`` steps, so a resumed run ends
  with the same bytes as an uninterrupted one.
* **Count calibration.** After training, on up to 200 training images
  (:mod:`synthtrial.graders.detector_count`): the visible count's score threshold, then the per-class weights,
  bias and monotone curve that map the detections to the simulated lesion count (see ``detector.py``,
  "Counting").
* **Evaluation** uses pycocotools' ``COCOeval`` (AP@[.5:.95], AP50, AP_small, AR with up to 200 detections per
  image), plus counting MAE / RMSE against the manifest's ``lesion_count`` and Hayashi-level accuracy against
  its ``acne04_level``. Beside the AP50 against the simulated truth stands its ceiling, ``AP50_ceiling``: the
  AP50 that a perfect detector of the visible lesions (each visible lesion's exact box, its class, score 1)
  scores against the same truth, in which invisible lesions count as missed (:func:`visible_ceiling`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from synthtrial.graders.augment import WIDE, AugmentConfig, Augmenter, draw_seeds
from synthtrial.graders.base import (CONFIG_FILE, WEIGHTS_FILE, GraderError, check_fine_tune_start, check_weights_out,
                                    read_rgb, train_grader)
from synthtrial.graders.detector import CLASSES, MARK, DetectorConfig, LesionDetector, build_model
from synthtrial.graders.detector_count import SOFT_FLOOR, calibrate
from synthtrial.run import rundir
from synthtrial.trial import scale
from synthtrial.util.atomic import write_text_atomic
from synthtrial.util.progress import ProgressCallback

ACNE04_CLASSES = ("lesion",)
#: The detector's own, wider augmentation (``--augment detector``): :data:`WIDE` plus a stronger colour
#: temperature and tint (a ruddy face such as hopper's, CIELAB a* ~31 on the cheeks against ~11 for astronaut's,
#: must lie inside the range), a wider scale, more blur and a sharpness change both ways (hopper's skin has
#: about twice the Laplacian contrast of astronaut's: wrinkles and texture must be no cue).
DETECTOR_AUGMENT = replace(WIDE, scale=(0.8, 1.25), temperature=0.3, tint=0.3, saturation=0.6, blur_p=0.3,
                           blur_sigma=(0.1, 1.5), sharpness_p=0.4, sharpness=(0.3, 3.0))
#: ``--augment texture``: :data:`DETECTOR_AUGMENT` plus skin texture and wrinkles (each on 60 % of the images;
#: :class:`synthtrial.graders.augment.SkinTexture`, :class:`~synthtrial.graders.augment.Wrinkles`): an older
#: face's fine structure and lines, which a detector trained on one smooth-skinned portrait otherwise takes
#: for lesions (on hopper 40 % of the 2026-12-06 weights' counted detections lay on no lesion and no mark).
TEXTURE_AUGMENT = replace(DETECTOR_AUGMENT, texture_p=0.6, texture=0.04, wrinkles_p=0.6, wrinkles=80,
                          wrinkle_depth=0.25)
AUGMENTS = {"wide": WIDE, "detector": DETECTOR_AUGMENT, "texture": TEXTURE_AUGMENT}


@dataclass
class DetectionData:
    """Images (uint8, longer side ``image_side``) with boxes (float32, same scale) and class indices."""

    images: list[np.ndarray]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    classes: tuple[str, ...]
    names: list[str]
    true_counts: np.ndarray     # lesion count per image (active lesions), for the count threshold


def _resize(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    from PIL import Image

    factor = side / max(image.shape[:2])
    if factor == 1.0:
        return image, 1.0
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)), factor


def load_run_data(runs: Sequence[str | Path], image_side: int, classes: tuple[str, ...] = CLASSES, *,
                  visible_only: bool = False) -> DetectionData:
    """Every image of the runs with its boxes of ``classes`` (resized so the longer side is ``image_side``);
    with ``visible_only`` only the lesions the run marks ``visible``."""
    data = DetectionData([], [], [], tuple(classes), [], np.zeros(0))
    counts = []
    for run in runs:
        manifest = rundir.read_manifest(run, ("image", "patient_id", "lesion_count"))
        lesions = rundir.read_lesions(run, set(manifest["image"]))
        lesions = lesions[lesions["type"].isin(classes)]
        if visible_only:
            if "visible" not in lesions.columns:
                raise GraderError(f"{run}: its lesion table has no 'visible' column (rendered before visibility was "
                                  "measured); generate it again, or train with --all-lesions")
            lesions = lesions[lesions["visible"].astype(bool)]
        by_image = dict(tuple(lesions.groupby("image", sort=False)))
        for rel, count in zip(manifest["image"], manifest["lesion_count"]):
            image, factor = _resize(read_rgb(Path(run) / rel), image_side)
            rows = by_image.get(rel)
            if rows is None:
                boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
            else:
                boxes = rows[["x0", "y0", "x1", "y1"]].to_numpy(np.float32) * factor
                labels = np.array([classes.index(t) for t in rows["type"]], np.int64)
            data.images.append(image), data.boxes.append(boxes), data.labels.append(labels)
            data.names.append(f"{run}:{rel}")
            counts.append(float(count))
    data.true_counts = np.asarray(counts)
    return data


def load_acne04_data(root: str | Path, image_side: int) -> DetectionData:
    """ACNE04 images that have VOC boxes (one class, ``lesion``), resized so the longer side is ``image_side``."""
    from synthtrial.data.acne04 import scan_acne04

    items = [it for it in scan_acne04(root, check_images=False) if it.boxes is not None]
    if not items:
        raise GraderError(f"{root}: no ACNE04 image has VOC boxes (Detection.tar's XML files); cannot train a detector")
    data = DetectionData([], [], [], ACNE04_CLASSES, [], np.zeros(0))
    for item in items:
        image, factor = _resize(read_rgb(item.path), image_side)
        data.images.append(image), data.boxes.append(item.boxes.astype(np.float32) * factor)
        data.labels.append(np.zeros(len(item.boxes), np.int64)), data.names.append(str(item.path))
    data.true_counts = np.array([float(len(b)) for b in data.boxes])
    return data


def _all_boxes(data: DetectionData) -> np.ndarray:
    """Every target box of ``data`` in one ``(N, 4)`` array; refused when there is none."""
    boxes = np.concatenate([b for b in data.boxes if len(b)] or [np.zeros((0, 4), np.float32)])
    if not len(boxes):
        raise GraderError("the training data has no lesion boxes of the detector's classes")
    return boxes


def fit_anchor_sizes(data: DetectionData, levels: int = 3, per_level: int = 2) -> tuple[int, ...]:
    """``levels * per_level`` anchor sizes (px, ascending, finest level first): the midpoints of equal-mass bins
    of the target boxes' sqrt(w h), rounded, at least 2 px and strictly increasing."""
    boxes = _all_boxes(data)
    sizes = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    n = levels * per_level
    picks = np.quantile(sizes, (2 * np.arange(n) + 1) / (2 * n))
    out: list[int] = []
    for value in picks:
        out.append(max(int(round(float(value))), 2, out[-1] + 1 if out else 2))
    return tuple(out)


def mean_lesion_size(data: DetectionData) -> float:
    """The NWD constant C: mean of (w + h) / 2 over every box (pixels at the detector's scale)."""
    boxes = _all_boxes(data)
    return float(np.mean(((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2))


def masked_crop(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, x: int, y: int,
                tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``tile`` x ``tile`` crop at (x, y) (zero-padded past the image), the boxes wholly inside it (shifted),
    their labels; lesions cut by the crop edge are blacked out in the crop instead of kept as partial boxes."""
    crop = np.zeros((tile, tile, 3), np.uint8)
    part = image[y:y + tile, x:x + tile]
    crop[:part.shape[0], :part.shape[1]] = part
    if not len(boxes):
        return crop, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    shifted = boxes - np.array([x, y, x, y], np.float32)
    inside = (shifted[:, 0] >= 0) & (shifted[:, 1] >= 0) & (shifted[:, 2] <= tile) & (shifted[:, 3] <= tile)
    touches = (shifted[:, 2] > 0) & (shifted[:, 3] > 0) & (shifted[:, 0] < tile) & (shifted[:, 1] < tile)
    for x0, y0, x1, y1 in shifted[touches & ~inside]:
        crop[max(0, int(math.floor(y0))):max(0, int(math.ceil(y1))),
             max(0, int(math.floor(x0))):max(0, int(math.ceil(x1)))] = 0
    keep = inside & (shifted[:, 2] > shifted[:, 0]) & (shifted[:, 3] > shifted[:, 1])
    return crop, shifted[keep], labels[keep]


def crop_origin(shape: tuple[int, ...], boxes: np.ndarray, tile: int, focus: float,
                rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a training crop: with probability ``focus`` centred (up to a quarter tile off) on one
    of ``boxes`` drawn at random, otherwise uniform; always inside the image where the image is larger."""
    height, width = shape[:2]
    x_max, y_max = max(0, width - tile), max(0, height - tile)
    if len(boxes) and rng.random() < focus:
        box = boxes[int(rng.integers(len(boxes)))]
        jitter = rng.uniform(-tile / 4, tile / 4, 2)
        x = int(round((box[0] + box[2]) / 2 + jitter[0] - tile / 2))
        y = int(round((box[1] + box[3]) / 2 + jitter[1] - tile / 2))
        return min(max(x, 0), x_max), min(max(y, 0), y_max)
    return int(rng.integers(x_max + 1)), int(rng.integers(y_max + 1))


def class_weights(data: DetectionData, balance: float) -> np.ndarray:
    """Per class, the weight of one of its lesions when a focused crop picks its centre: the class's share of the
    target boxes to the power ``-balance`` (0: every lesion alike; 1: every class alike); 0 for an absent class."""
    labels = np.concatenate([lab for lab in data.labels if len(lab)] or [np.zeros(0, np.int64)])
    freq = np.bincount(labels, minlength=len(data.classes)).astype(float)
    with np.errstate(divide="ignore"):
        return np.where(freq > 0, (freq / max(freq.sum(), 1.0)) ** -float(balance), 0.0)


def balanced_origin(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, weights: np.ndarray, tile: int,
                    rng: np.random.Generator) -> tuple[int, int]:
    """A focused crop's corner (:func:`crop_origin` with ``focus`` 1) centred on a lesion drawn with its class's
    weight; uniform when the image has no weighted lesion."""
    w = weights[labels] if len(labels) else np.zeros(0)
    if not len(w) or w.sum() <= 0:
        return crop_origin(image.shape, boxes[:0], tile, 0.0, rng)
    pick = int(rng.choice(len(w), p=w / w.sum()))
    return crop_origin(image.shape, boxes[pick:pick + 1], tile, 1.0, rng)


@dataclass(frozen=True)
class BalancedDraw:
    """What class-balanced focused crops draw from (:func:`balanced_draw`, computed once per training): the
    weight of a lesion of each class, and each image's probability (None when no lesion has a weight)."""

    weights: np.ndarray
    image_p: np.ndarray | None


def balanced_draw(data: DetectionData, balance: float) -> BalancedDraw | None:
    """The :class:`BalancedDraw` of ``data`` at ``balance`` (module docstring); None at 0 (unweighted crops)."""
    if balance <= 0:
        return None
    weights = class_weights(data, balance)
    per_image = np.array([weights[lab].sum() if len(lab) else 0.0 for lab in data.labels])
    return BalancedDraw(weights, per_image / per_image.sum() if per_image.sum() > 0 else None)


def masked_batch(data: DetectionData, tile: int, batch: int, rng: np.random.Generator, device: torch.device,
                 augmenter: Augmenter | None = None, focus: float = 0.0, balanced: BalancedDraw | None = None):
    """``batch`` masked crops of random images (and a horizontal flip each), drawn with ``rng``, each image first
    augmented with its boxes by ``augmenter`` (when given) and cropped where :func:`crop_origin` puts it (with
    ``balanced``, from :func:`balanced_draw`, a focused crop's image and lesion are drawn class-weighted: module
    docstring): images and torchvision targets (labels shifted by one: 0 is the background)."""
    weights = balanced.weights if balanced is not None else None
    image_p = balanced.image_p if balanced is not None else None
    images, targets = [], []
    for _ in range(batch):
        focused = image_p is not None and rng.random() < focus
        k = int(rng.choice(len(data.images), p=image_p)) if focused else int(rng.integers(len(data.images)))
        image, boxes, labels = data.images[k], data.boxes[k], data.labels[k]
        if augmenter is not None:
            image, boxes, labels = augmenter.with_boxes(image, boxes, labels, int(draw_seeds(1, rng)[0]))
        if weights is None:
            x, y = crop_origin(image.shape, boxes, tile, focus, rng)
        elif focused:
            x, y = balanced_origin(image, boxes, labels, weights, tile, rng)
        else:
            x, y = crop_origin(image.shape, boxes, tile, 0.0, rng)
        crop, boxes, labels = masked_crop(image, boxes, labels, x, y, tile)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
            boxes = np.stack([tile - boxes[:, 2], boxes[:, 1], tile - boxes[:, 0], boxes[:, 3]], 1) if len(boxes) \
                else boxes
        images.append(torch.from_numpy(np.ascontiguousarray(crop)).to(device).permute(2, 0, 1).float() / 255.0)
        targets.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4),
                        "labels": torch.as_tensor(labels + 1, dtype=torch.int64, device=device)})
    return images, targets


def _lr(step: int, steps: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def load_detection_data(sources: Sequence[str | Path], image_side: int, *, visible_only: bool = True,
                        marks: bool = False) -> DetectionData:
    """Training data from ``--data``: run directories (the six lesion classes, and ``mark`` with ``marks``; with
    ``visible_only`` their visible lesions), or one ACNE04 copy (one class, ``lesion``); the two are not mixed."""
    from synthtrial.graders.classify import is_run_dir

    sources = [Path(s) for s in sources]
    if not sources:
        raise GraderError("--data: give at least one run directory (or one ACNE04 copy)")
    for source in sources:
        if not source.is_dir():
            raise GraderError(f"--data {source}: no such folder (a run directory or an ACNE04 copy)")
    runs = [is_run_dir(s) for s in sources]
    if all(runs):
        return load_run_data(sources, image_side, CLASSES + (MARK,) if marks else CLASSES, visible_only=visible_only)
    if len(sources) > 1:
        raise GraderError("--data: runs and ACNE04 are not mixed, and only one ACNE04 copy is read")
    return load_acne04_data(sources[0], image_side)


def train_detector(data: DetectionData, out: str | Path, *, head: str = "sadh_nwd", steps: int = 600,
                   batch_size: int = 2, lr: float = 2e-3, seed: int = 0, image_side: int = 512, tile: int = 256,
                   save_every: int = 100, device: str | None = None, sources: Sequence[str] = (),
                   restart: bool = False, force: bool = False, augment: bool = True, focus: float = 0.75,
                   fit_anchors: bool = True, backbone: str = "tinynet_e", anchor_ratios: Sequence[float] = (0.5, 1, 2),
                   rpn_iou: tuple[float, float] = (0.5, 0.3), highpass_sigma: float = 0.0,
                   augmentation: AugmentConfig = WIDE, balance: float = 0.0, init: str | Path | None = None,
                   soft_floor: float = SOFT_FLOOR, progress: ProgressCallback | None = None) -> LesionDetector:
    """Train a detector on ``data`` through the shared loop and save it to ``out`` (``model.safetensors`` +
    ``config.json``).

    ``augment`` applies the graders' augmentation to every drawn image, ``focus`` is the share of crops centred
    on a lesion and ``fit_anchors`` sizes the anchors from the data (see the module docstring); ``backbone`` is
    a timm model name; ``anchor_ratios``, ``rpn_iou`` (the RPN's foreground and background IoU) and
    ``highpass_sigma`` go to :class:`DetectorConfig`; ``augmentation`` is the augmentation used when ``augment``;
    ``balance`` weights focused crops by class and ``init`` names weights to fine-tune (module docstring);
    ``soft_floor`` goes to the count calibration (:mod:`synthtrial.graders.detector_count`).
    Resumes from ``out/checkpoint`` when it holds a checkpoint of the same settings (``restart`` starts over);
    an ``out`` holding anything but detector weights is refused unless ``force``. ``progress(step, steps,
    "loss ...")`` is called after every step.
    """
    from synthtrial.util.device import resolve_device
    from synthtrial.util.training import Plan

    check_weights_out(out, LesionDetector.name, force)
    dev = resolve_device(device)
    settings = {"head": head, "steps": steps, "batch": batch_size, "lr": lr, "seed": seed, "image_side": image_side,
                "tile": tile, "classes": list(data.classes), "sources": [str(s) for s in sources],
                "images": len(data.images), "augment": augment, "focus": focus, "fit_anchors": fit_anchors,
                "backbone": backbone}
    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value))
    extra = plain({"anchor_ratios": [float(r) for r in anchor_ratios], "rpn_iou": [float(v) for v in rpn_iou],
                   "highpass_sigma": float(highpass_sigma), "augmentation": asdict(augmentation) if augment else None})
    if extra != plain({"anchor_ratios": [0.5, 1.0, 2.0], "rpn_iou": [0.5, 0.3], "highpass_sigma": 0.0,
                       "augmentation": asdict(WIDE) if augment else None}):
        settings.update(extra)      # recorded when not the first recipe's, so its checkpoints still resume
    if not 0 <= balance <= 1:
        raise GraderError(f"detector balance must be 0-1, got {balance}")
    if balance:
        settings["balance"] = float(balance)
    start = None
    if init is not None:
        start = LesionDetector.from_pretrained(init, device="cpu")
        settings["init"] = {"from": str(init), "weights_sha256": rundir.sha256_file(Path(init) / WEIGHTS_FILE)}
    if start is not None:            # the network's anchors and NWD constant stay those it was trained with
        anchors = dict(anchor_sizes=start.config.anchor_sizes, anchors_per_level=start.config.anchors_per_level)
        nwd_constant = start.config.nwd_constant
    else:
        anchors = dict(anchor_sizes=fit_anchor_sizes(data), anchors_per_level=2) if fit_anchors else {}
        nwd_constant = round(mean_lesion_size(data), 3)
    cfg = DetectorConfig(head=head, classes=data.classes, image_side=image_side, tile=tile, backbone=backbone,
                         nwd_constant=nwd_constant, anchor_ratios=tuple(anchor_ratios),
                         rpn_fg_iou=rpn_iou[0], rpn_bg_iou=rpn_iou[1], highpass_sigma=highpass_sigma, **anchors)
    torch.manual_seed(seed)
    if start is not None:
        check_same_architecture(cfg, start.config, init)
    model = build_model(cfg)
    if start is not None:
        model.load_state_dict({k: v.float() for k, v in start.model.state_dict().items()})
    model = model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    augmenter = Augmenter(augmentation) if augment else None
    balanced = balanced_draw(data, balance)

    def step(i: int) -> dict[str, float]:
        rng = np.random.default_rng([seed, i])
        torch.manual_seed(seed * 1_000_003 + i)
        images, targets = masked_batch(data, tile, batch_size, rng, dev, augmenter, focus, balanced)
        for group in opt.param_groups:
            group["lr"] = _lr(i, steps, lr)
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}

    model.train()
    plan = Plan(steps, step, LesionDetector.name, settings, save_every=save_every, log_every=25)
    history = train_grader(model, opt, plan, out, restart=restart, progress=progress)["history"]
    model.eval()
    detector = LesionDetector(cfg, model, device=dev, record={"settings": settings, "step": steps,
                                                              "loss_history": history})
    detector = calibrate(detector, data, soft_floor=soft_floor)
    detector.save_pretrained(out)
    return LesionDetector.from_pretrained(out, device=dev)


#: config fields a fine-tuning start may differ in (set after training)
CALIBRATION_FIELDS = ("count_threshold", "count_weights", "count_bias", "count_soft_floor", "count_curve")


def check_same_architecture(cfg: DetectorConfig, start: DetectorConfig, where: Any) -> None:
    """Refuse (one line naming the fields) to fine-tune from weights of another architecture or scale."""
    check_fine_tune_start(cfg, start, where, "detector", CALIBRATION_FIELDS)


# ---------------------------------------------------------------------------------------- evaluation

def _coco_evaluator(images: list[dict], annotations: list[dict], results: list[dict], classes: Sequence[str],
                    agnostic: bool = False) -> Any:
    """A pycocotools ``COCOeval`` of ``results`` against the truth, evaluated and accumulated (max 10 / 100 /
    200 detections per image); None without detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return None
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.params.maxDets = [10, 100, 200]
        evaluator.params.useCats = 0 if agnostic else 1
        evaluator.evaluate(), evaluator.accumulate()
    return evaluator


def coco_stats(images: list[dict], annotations: list[dict], results: list[dict],
               classes: Sequence[str], *, agnostic: bool = False) -> np.ndarray:
    """pycocotools' twelve ``COCOeval`` box statistics (max 10 / 100 / 200 detections); NaN without detections.
    Annotations with ``iscrowd`` 1 are ignore regions: neither missed nor matched (a detection on one is no
    false positive). ``agnostic`` scores lesions whatever their class (COCOeval's ``useCats = 0``): where a
    lesion is, not which kind."""
    evaluator = _coco_evaluator(images, annotations, results, classes, agnostic)
    if evaluator is None:
        return np.full(12, np.nan)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    return np.asarray(evaluator.stats, float)


def per_class_ap50(images: list[dict], annotations: list[dict], results: list[dict],
                   classes: Sequence[str]) -> dict[str, float]:
    """Each class's AP50 (COCOeval's 101-point interpolated precision at IoU 0.5, all areas, 200 detections per
    image); NaN for a class without (non-ignored) truth. The mean of the non-NaN values is COCO's AP50."""
    evaluator = _coco_evaluator(images, annotations, results, classes)
    if evaluator is None:
        return {c: float("nan") for c in classes}
    precision = evaluator.eval["precision"][0, :, :, 0, -1]        # IoU 0.5, recall points, class, all areas, 200
    return {c: float(precision[:, k].mean()) if (precision[:, k] > -1).all() else float("nan")
            for k, c in enumerate(classes)}


def _count_metrics(pred: np.ndarray, truth: np.ndarray, levels: np.ndarray | None, suffix: str) -> dict[str, float]:
    out = {f"count_MAE{suffix}": float(np.abs(pred - truth).mean()),
           f"count_RMSE{suffix}": float(np.sqrt(((pred - truth) ** 2).mean()))}
    if levels is not None:
        out[f"level_accuracy{suffix}"] = float((scale.acne04_level_from_count(pred) == levels).mean())
    return out


def evaluate_detector(detector: LesionDetector, run: str | Path,
                      progress: ProgressCallback | None = None) -> tuple[dict[str, float], list[dict]]:
    """COCO AP / AP50 / AP_small / AR (pycocotools; ``AP50_any_class`` whatever the class) and counting MAE / RMSE /
    level accuracy on a run, against the simulated truth (every lesion; the grader's ``count``) and, where the
    run measured visibility, the visible truth (``_visible`` metrics: invisible lesions are ignore regions, the
    grader's ``visible_count`` against the manifest's, and ``level_accuracy_visible``: the Hayashi level of the
    former against that of the latter, the level a grader of the photograph alone can reach);
    ``progress(done, images, "")`` after each image.

    Returns the metrics and the detections in COCO results format (``image_id``, ``category_id``, ``bbox``
    as x, y, w, h, ``score``). A detector with the ``mark`` class is scored on the six lesion classes: its mark
    detections are left out (a mark is no lesion, so a mark called a mark is neither a hit nor a false alarm).
    ``AP50_<class>_visible`` is each class's AP50 against the visible truth (NaN where no lesion of it is visible).
    """
    if tuple(detector.config.classes) not in (CLASSES, CLASSES + (MARK,)):
        raise GraderError(f"evaluation on a synthtrial run needs a detector of the classes {', '.join(CLASSES)} "
                          f"(and optionally {MARK}); this one has {', '.join(detector.config.classes)}")
    classes = CLASSES
    manifest = rundir.read_manifest(run, ("image", "patient_id", "lesion_count", "acne04_level"))
    lesions = rundir.read_lesions(run, set(manifest["image"]))
    lesions = lesions[lesions["type"].isin(classes)]
    has_visible = "visible" in lesions.columns and "visible_count" in manifest.columns
    images, annotations, visible, results, counts, seen = [], [], [], [], [], []
    by_image = dict(tuple(lesions.groupby("image", sort=False)))
    for k, rel in enumerate(manifest["image"], start=1):
        image = read_rgb(Path(run) / rel)
        images.append({"id": k, "file_name": rel, "height": int(image.shape[0]), "width": int(image.shape[1])})
        rows = by_image.get(rel)
        if rows is not None:
            for r in rows.itertuples(index=False):
                w, h = float(r.x1 - r.x0), float(r.y1 - r.y0)
                annotations.append({"id": len(annotations) + 1, "image_id": k, "category_id": classes.index(r.type) + 1,
                                    "bbox": [float(r.x0), float(r.y0), w, h], "area": w * h, "iscrowd": 0})
                visible.append(bool(r.visible) if has_visible else True)
        found = detector.detect(image)
        row = detector.counts(found)
        counts.append(row["count"]), seen.append(row["visible_count"])
        for box, label, score in zip(found["boxes"], found["labels"], found["scores"]):
            if label >= len(classes):
                continue
            results.append({"image_id": k, "category_id": int(label) + 1, "score": round(float(score), 5),
                            "bbox": [round(float(box[0]), 3), round(float(box[1]), 3),
                                     round(float(box[2] - box[0]), 3), round(float(box[3] - box[1]), 3)]})
        if progress is not None:
            progress(k, len(manifest), "")
    stats = coco_stats(images, annotations, results, classes)
    pred = np.asarray(counts, float)
    metrics = {"AP": float(stats[0]), "AP50": float(stats[1]), "AP_small": float(stats[3]), "AR": float(stats[8]),
               "AP50_any_class": float(coco_stats(images, annotations, results, classes, agnostic=True)[1]),
               **_count_metrics(pred, manifest["lesion_count"].to_numpy(float),
                                manifest["acne04_level"].to_numpy(int), ""),
               "images": float(len(manifest)), "lesions": float(len(annotations))}
    if has_visible:
        metrics["AP50_ceiling"] = float(coco_stats(images, annotations, visible_ceiling(annotations, visible),
                                                   classes)[1])
        ignored = [{**a, "iscrowd": int(not v)} for a, v in zip(annotations, visible)]
        per_class = per_class_ap50(images, ignored, results, classes)
        vis = coco_stats(images, ignored, results, classes)
        metrics.update({"AP_visible": float(vis[0]), "AP50_visible": float(vis[1]), "AP_small_visible": float(vis[3]),
                        "AR_visible": float(vis[8]),
                        "AP50_any_class_visible": float(coco_stats(images, ignored, results, classes, agnostic=True)[1]),
                        **{f"AP50_{c}_visible": v for c, v in per_class.items()},
                        **_count_metrics(np.asarray(seen, float), manifest["visible_count"].to_numpy(float),
                                         scale.acne04_level_from_count(manifest["visible_count"].to_numpy(float)),
                                         "_visible"),
                        "lesions_visible": float(sum(visible))})
    return metrics, results


def visible_ceiling(annotations: Sequence[dict], visible: Sequence[bool]) -> list[dict]:
    """The COCO results of a perfect detector of the visible lesions: each visible annotation's box and class at
    score 1 (the invisible ones it cannot see)."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": list(a["bbox"])}
            for a, v in zip(annotations, visible) if v]


def write_metrics(path: Path, metrics: dict[str, Any]) -> Path:
    return write_text_atomic(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


ABLATION = (("rpn", "Faster R-CNN (plain RPN)"), ("sadh", "+ SADH"), ("sadh_nwd", "+ SADH + NWD"))


def run_ablation(train_runs: Sequence[str | Path], test_run: str | Path | Sequence[str | Path], out: str | Path, *,
                 steps: int, batch_size: int, seed: int, device: str | None = None, restart: bool = False,
                 marks: bool = False, progress: ProgressCallback | None = None, **recipe: Any) -> pd.DataFrame:
    """Train the three RPN variants on the same data with the same seed and evaluate each on ``test_run`` (one
    run or several: the held-out seed and the held-out portrait).

    Each variant goes to ``out/<head>/`` (resumable; ``restart`` trains every variant again from scratch); the
    table (one row per variant and test run, column ``test``) is written to ``out/ablation.csv``. ``marks``
    adds the mark class; ``recipe`` (lr, tile, backbone, focus, anchor_ratios, rpn_iou, highpass_sigma,
    augmentation, ...) goes to :func:`train_detector` for every variant alike. ``progress(step, steps, "<head>
    loss ...")`` counts each variant's training steps, its head named in the status.
    """
    out = Path(out)
    tests = [test_run] if isinstance(test_run, (str, Path)) else list(test_run)
    data = load_run_data(train_runs, 512, CLASSES + (MARK,) if marks else CLASSES, visible_only=True)
    rows = []
    for head, label in ABLATION:
        def step_cb(step: int, total: int, status: str, head: str = head) -> None:
            if progress is not None:
                progress(step, total, f"{head} {status}")
        folder = out / head
        if not restart and (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file():
            detector = LesionDetector.from_pretrained(folder, device=device)
            done = detector.record.get("settings", {})
            wanted = {"head": head, "steps": steps, "batch": batch_size, "seed": seed,
                      "sources": [str(r) for r in train_runs]}
            if any(done.get(k) != v for k, v in wanted.items()):
                raise GraderError(f"{folder}: holds a detector trained with other settings "
                                  f"({ {k: done.get(k) for k in wanted} }); use another --out or remove it")
        else:
            detector = train_detector(data, folder, head=head, steps=steps, batch_size=batch_size, seed=seed,
                                      device=device, sources=[str(r) for r in train_runs], restart=restart,
                                      progress=step_cb, **recipe)
        for test in tests:
            metrics, _ = evaluate_detector(detector, test)
            name = "metrics.json" if len(tests) == 1 else f"metrics_{Path(test).name}.json"
            write_metrics(folder / name, metrics)
            rows.append({"variant": label, "head": head, "test": str(test), **metrics})
    table = pd.DataFrame(rows)
    write_text_atomic(out / "ablation.csv", table.to_csv(index=False))
    return table
