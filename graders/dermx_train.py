"""Training of DermX (``synthtrial.graders.dermx``) on synthtrial runs, whose masks are pixel-exact; the data and
explanation areas that :mod:`synthtrial.graders.dermx_eval` scores against.

Choices, stated once:

* **Data.** Every image of the runs, resized to ``image_size`` (longer side; square images), with its
  ACNE04 / Hayashi level (manifest ``acne04_level``, from the simulated count), which characteristics it
  shows and each characteristic's explanation area. Everything is held in memory; the explanation areas as
  one byte per pixel (bit k = characteristic k), so 3,000 images at 256 px take 0.6 GB in all.
* **Truth** (``truth``): ``visible`` (default) -- an image has a characteristic when at least one lesion of
  that type is visible on it (``lesions.parquet``'s ``visible``: contrast, signal and size, see
  :mod:`synthtrial.render.visibility`); ``simulated`` -- when the course puts at least one on the face,
  drawn or not (the old rule: a closed comedo a quarter of which can be seen, or a lesion turned away in a
  side view, still counts). A perfect grader can only see the visible truth, so that is what it is trained
  on; the evaluation reports both.
* **Explanation areas** (the reference a Grad-CAM map is scored against, and DermX+'s attention target):
  the instance masks of the characteristic's counted lesions, each widened to the erythema halo the renderer
  draws around it: a disc about the lesion's centre of ``reach x r``, ``r = sqrt(mask pixels / pi)`` (the
  radius of a round mask of that area; the mask's edge sits at one radius) and ``reach`` the type's
  ``halo_factor`` (:func:`synthtrial.render.procedural.default_looks`): papule 2.5, pustule 2.4, nodule 2.0,
  1 (no halo, the mask alone) for comedones, marks (erythema) and scars. So a papule's area reaches 1.5 radii
  past its edge: 2.6 mm for a 3.5 mm papule, 6 px at the shipped trial's 0.42 mm/px. Resized to the input
  and to the CAM grid by max-pooling (a cell belongs to the area when any of its pixels does): the paper
  notes that its linear downscaling shrank the targets of small characteristics "to an almost empty mask",
  and a comedo of 4 px covers 2 % of a 16 px cell.
* **Optimisation.** AdamW (lr 2e-3, weight decay 1e-4, cosine decay over the run), batch 8, 10 epochs; every
  epoch's order and every step's dropout and augmentation come from ``(seed, epoch, step)``. The shared loop
  (:mod:`synthtrial.util.training`) writes a checkpoint after every epoch, so a resumed run ends with the
  same bytes. The level cross-entropy is class-weighted (balanced weights from the training levels); with
  ``balanced`` (``--balanced-characteristics``) each characteristic's BCE weighs its positives by its
  negatives / positives ratio in the training images (:func:`characteristic_pos_weight`, clipped to
  [0.1, 10]): without it a characteristic present on 80 % of the images is learned as "always present" and one
  on 6 % as "never" (measured: recall 1.0 on open comedones, papules, pustules and erythema, 0 on closed
  comedones and scars, after 6 epochs on the grader set).
* **DermX+** (``guided``): ``lambda_A x Dice`` between each characteristic's differentiable Grad-CAM (at the
  CAM grid, scaled to max 1) and its explanation area max-pooled to that grid, over the characteristics the
  image shows.
* **Live maps** (``live_maps``, ``--live-maps``, with ``guided``): a Grad-CAM map is ``ReLU(sum alpha_ch A_ch)``;
  where the head's gradient speaks against the characteristic on every cell the map is 0 everywhere, and the
  Dice loss has no gradient there (the ReLU's). That happened: the weights trained to 2026-12-07 show empty
  maps for open and closed comedones and scars on every image (plausibility F1 0 for three of seven
  characteristics). This term adds ``lambda_A x mean(ReLU(0.1 - peak / max|map|))`` over the characteristics an
  image shows: ``peak`` the highest value of the map before the ReLU on its explanation area's cells, divided
  by the map's largest magnitude (no gradient through that scale): 0 once the map's peak on the area reaches a
  tenth of that (the Dice loss then has cells to work on), at most 1.1. It trains the heads only (the maps of the
  features detached): through the features, the cheapest way to raise a negative peak is to switch them off
  there, and a map of zero features stays 0 (measured on a toy network).
* **Fine-tuning** (``init``): training may start from saved DermX weights instead of a random initialisation
  (the same network: every config field but those decided after training and ``guided`` must agree, else a
  one-line refusal naming them); a fresh optimiser and cosine schedule then run for ``epochs``, the count heads
  keep their trained weights, and the start's weights hash is recorded. The decisions after training are made
  again.
* **Presence from the maps** (``presence_from_maps``, ``--presence-from-maps``, off by default;
  :data:`synthtrial.graders.dermx.PRESENCE_FEATURES`): after training, on up to :data:`PRESENCE_IMAGES` training
  images spread evenly over the set, per characteristic a logistic regression (scikit-learn, unweighted) of its
  presence on its head logit and map statistics, then the threshold (0.02-0.98, step 0.02) with the best F1
  there, folded into the bias (:func:`fit_presence`). A characteristic present on all or none of those images
  keeps its head. Measured on the shipped weights (held-out seed, 600 images): characteristic macro F1 0.639 ->
  0.689, on the varied subset 0.587 -> 0.649 (closed comedones 0.00 -> 0.39, scars 0.00). Off by default because the
  paper's plausibility average then takes in the characteristics it newly finds, whose maps are empty (closed
  comedones, scars: fuzzy F1 0), and falls below the target (model card). It is a calibration, not a training
  setting, so re-running a finished training with it adds it to the saved weights.
* **Level route** (``level_from``; :data:`synthtrial.graders.dermx.LEVEL_ROUTES`): ``auto`` (the default) keeps
  the classifier unless the weights have a count head and the Hayashi level read from the count is right more
  often than the diagnosis head's on the same :data:`PRESENCE_IMAGES` training images
  (:func:`choose_level_route`; both accuracies go into the record); ``classifier`` / ``count`` force a route.
  Like the presence models it is decided after training, so re-running a finished training sets it again.
* **Characteristic counts** (``characteristic_counts``, ``--characteristic-counts``;
  :mod:`synthtrial.graders.dermx`): each image's target is how many lesions of each characteristic count under
  ``truth`` (:func:`truth_counts`; present exactly where that is at least 1), the loss ``LAMBDA_K`` (1) x the
  squared error of ``log(1 + count)`` (with ``balanced``, an image's error on a characteristic it shows weighs
  that characteristic's positive weight, as in the BCE: :func:`characteristic_count_loss`); each density head
  starts at its characteristic's mean count spread evenly over the grid. After training, on the same
  :data:`PRESENCE_IMAGES` training images as the presence models, each characteristic's count threshold with
  the best F1 (:func:`fit_count_thresholds`); like them it is decided after training, so re-running a
  finished training fits it again.
* **Augmentation** (``augment``, default on; off: horizontal flips only): the graders' photometric and
  geometric augmentation (:mod:`synthtrial.graders.augment`), the explanation areas moved with the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from synthtrial.graders.augment import WIDE, Augmenter, draw_seeds, scaled
from synthtrial.graders.base import (WEIGHTS_FILE, GraderError, check_fine_tune_start, check_weights_out, read_rgb,
                                    train_grader)
from synthtrial.graders.dermx import (CHARACTERISTICS, LESION_TYPE, LEVEL_ROUTES, PRESENCE_FEATURES, DermX,
                                      DermXConfig, DermXNet, DermXOutputs, dice_loss, normalise_maps, presence_features,
                                      route_grades, to_tensor)
from synthtrial.run import rundir
from synthtrial.util.device import resolve_device
from synthtrial.util.progress import ProgressCallback
from synthtrial.util.training import Plan

LAMBDA_D, LAMBDA_C, LAMBDA_A, LAMBDA_N, LAMBDA_K = 1.0, 1.0, 10.0, 1.0, 1.0
#: the range of a characteristic's positive weight with ``balanced``
POS_WEIGHT_RANGE = (0.1, 10.0)
#: training images the presence models are fitted on
PRESENCE_IMAGES = 600


def characteristic_pos_weight(present: np.ndarray) -> np.ndarray:
    """Per characteristic, negatives / positives among the training images (``present``: images x
    characteristics, 0/1), clipped to :data:`POS_WEIGHT_RANGE` (a characteristic on no image gets the upper end)."""
    positives = present.sum(axis=0).astype(float)
    negatives = len(present) - positives
    ratio = np.where(positives > 0, negatives / np.maximum(positives, 1), POS_WEIGHT_RANGE[1])
    return np.clip(ratio, *POS_WEIGHT_RANGE).astype(np.float32)


TRUTHS = ("visible", "simulated")


@dataclass
class DermXData:
    images: np.ndarray      # (N, S, S, 3) uint8 at the input size
    levels: np.ndarray      # (N,) int
    present: np.ndarray     # (N, C) float 0/1
    areas: np.ndarray       # (N, S, S) uint8: bit k set where characteristic k's explanation area lies
    truth: str = "visible"  # what ``present`` and ``areas`` count (module docstring)
    counts: np.ndarray | None = None    # (N,) the simulated active-lesion count (the count head's target)
    char_counts: np.ndarray | None = None   # (N, C) lesions of each characteristic under ``truth``


def pack_areas(areas: np.ndarray) -> np.ndarray:
    """``(..., C, H, W)`` bool areas (C <= 8) as ``(..., H, W)`` uint8, bit k = area k."""
    areas = np.asarray(areas, bool)
    bits = (1 << np.arange(areas.shape[-3], dtype=np.uint16)).reshape(-1, 1, 1)
    return (areas * bits).sum(axis=-3).astype(np.uint8)


def unpack_areas(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """``(..., H, W)`` packed areas as ``(..., C, H, W)`` float 0/1."""
    bits = (1 << torch.arange(channels, device=packed.device, dtype=torch.uint8)).view(-1, 1, 1)
    return (packed.to(torch.uint8).unsqueeze(-3) & bits).bool().float()


@cache
def halo_reach() -> dict[str, float]:
    """Each lesion type's explanation reach in radii: its erythema halo's (module docstring), 1 without one."""
    from synthtrial.render.procedural import default_looks

    return {t: (look.halo_factor if look.halo_strength > 0 and look.halo_factor > 1 else 1.0)
            for t, look in default_looks().items()}


def read_instance_mask(run: Path, rel_image: str) -> np.ndarray:
    """An image's 16-bit instance mask (value = lesion_id + 1) as int64."""
    from PIL import Image

    path = run / rundir.mask_path_for(rel_image)
    try:
        with Image.open(path) as im:
            instance = np.asarray(im).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise GraderError(f"{path}: cannot read the instance mask ({exc})") from None
    if instance.ndim != 2:
        raise GraderError(f"{path}: an instance mask must be a single-channel 16-bit PNG")
    return instance


def characteristic_masks(run: Path, rel_image: str, lesions: pd.DataFrame,
                         characteristics: Sequence[str] = CHARACTERISTICS) -> np.ndarray:
    """(C, H, W) bool masks of each characteristic on one image, from its instance mask (the lesions given)."""
    return masks_of(read_instance_mask(run, rel_image), lesions, characteristics)


def masks_of(instance: np.ndarray, lesions: pd.DataFrame, characteristics: Sequence[str]) -> np.ndarray:
    """(C, H, W) bool masks of each characteristic in an instance mask (the lesions given)."""
    lookup = np.zeros(int(instance.max()) + 2, np.int64) - 1
    ids = lesions["lesion_id"].to_numpy(np.int64)
    of_type = {LESION_TYPE[c]: k for k, c in enumerate(characteristics)}
    codes = np.array([of_type.get(t, -1) for t in lesions["type"]], np.int64)
    inside = ids + 1 < len(lookup)
    lookup[ids[inside] + 1] = codes[inside]
    code = lookup[instance]
    return np.stack([code == k for k in range(len(characteristics))])


def counted_lesions(lesions: pd.DataFrame, truth: str, where: Path) -> pd.DataFrame:
    """The lesions that count under ``truth`` (module docstring)."""
    if truth not in TRUTHS:
        raise GraderError(f"--truth must be one of {', '.join(TRUTHS)}, got '{truth}'")
    if truth == "simulated":
        return lesions
    if "visible" not in lesions.columns:
        raise GraderError(f"{where / rundir.LESIONS}: has no column 'visible' (a run rendered before the visibility "
                          "measurement); render it again or use --truth simulated")
    return lesions[lesions["visible"].to_numpy(bool)]


def truth_counts(rows: pd.DataFrame, characteristics: Sequence[str], truth: str, where: Path) -> np.ndarray:
    """``(C,)`` how many lesions of each characteristic count under ``truth`` among an image's lesions ``rows``
    (:func:`image_truth` says present exactly where this is at least 1)."""
    return type_counts(counted_lesions(rows, truth, where), characteristics)


def type_counts(counted: pd.DataFrame, characteristics: Sequence[str]) -> np.ndarray:
    """``(C,)`` float32: how many of the lesions ``counted`` are of each characteristic's type."""
    by_type = counted["type"].value_counts()
    return np.array([float(by_type.get(LESION_TYPE[c], 0)) for c in characteristics], np.float32)


def image_truth(run: Path, rel_image: str, rows: pd.DataFrame, characteristics: Sequence[str],
                truth: str) -> tuple[np.ndarray, np.ndarray]:
    """``(present (C,) bool, explanation areas (C, H, W) bool)`` of one image, at its own resolution; ``rows``:
    the image's lesions."""
    counted = counted_lesions(rows, truth, run)
    present = type_counts(counted, characteristics) > 0
    instance = read_instance_mask(run, rel_image)
    masks = masks_of(instance, counted, characteristics)
    instance_area = np.bincount(instance.ravel())
    reach = halo_reach()
    for k, c in enumerate(characteristics):
        factor = reach.get(LESION_TYPE[c], 1.0)
        if factor <= 1 or not present[k]:
            continue
        canvas = masks[k].astype(np.uint8)
        for row in counted[counted["type"] == LESION_TYPE[c]].itertuples():
            pixels = instance_area[row.lesion_id + 1] if row.lesion_id + 1 < len(instance_area) else 0
            if pixels:
                radius = factor * math.sqrt(pixels / math.pi)
                # cx, cy are continuous (pixel k spans k .. k + 1); cv2 draws at pixel centres
                cv2.circle(canvas, (int(round((row.cx - 0.5) * 16)), int(round((row.cy - 0.5) * 16))),
                           int(round(radius * 16)), 1, thickness=-1, shift=4)
        masks[k] = canvas > 0
    return present, masks


def load_dermx_data(runs: Sequence[str | Path], image_size: int,
                    characteristics: Sequence[str] = CHARACTERISTICS, truth: str = "visible",
                    progress: ProgressCallback | None = None) -> DermXData:
    """Every image of ``runs`` at the input size with its level, characteristics and explanation areas
    (module docstring); ``progress(done, images, run)`` after each image."""
    images, levels, present, areas, counts, char_counts = [], [], [], [], [], []
    tables = []
    for run in map(Path, runs):
        manifest = rundir.read_manifest(run, ("image", "patient_id", "acne04_level", "lesion_count"))
        tables.append((run, manifest, rundir.read_lesions(run, set(manifest["image"]))))
    total = sum(len(m) for _, m, _ in tables)
    for run, manifest, lesions in tables:
        counted_lesions(lesions.iloc[:0], truth, run)            # refuse a run without the truth's column now
        by_image = dict(tuple(lesions.groupby("image", sort=False)))
        for rel, level, count in zip(manifest["image"], manifest["acne04_level"], manifest["lesion_count"]):
            image = read_rgb(run / rel)
            if image.shape[0] != image.shape[1]:
                raise GraderError(f"{run / rel}: DermX trains on square images (the run's --size); got "
                                  f"{image.shape[1]} x {image.shape[0]}")
            rows = by_image.get(rel, lesions.iloc[:0])
            has, area = image_truth(run, rel, rows, characteristics, truth)
            char_counts.append(truth_counts(rows, characteristics, truth, run))
            x = torch.from_numpy(np.require(image, requirements=["W"])).permute(2, 0, 1)[None].float()
            images.append(F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                                        align_corners=False).round().clamp(0, 255).byte()[0].permute(1, 2, 0).numpy())
            pooled = F.adaptive_max_pool2d(torch.from_numpy(area).float()[None], image_size)[0].numpy() > 0
            areas.append(pack_areas(pooled))
            present.append(has.astype(np.float32))
            levels.append(int(level))
            counts.append(float(count))
            if progress is not None:
                progress(len(images), total, str(run))
    return DermXData(np.stack(images), np.asarray(levels), np.asarray(present, np.float32), np.stack(areas), truth,
                     np.asarray(counts, np.float32), np.asarray(char_counts, np.float32).reshape(len(images), -1))


def training_batch(data: DermXData, idx: np.ndarray, flip: np.ndarray, image_size: int, dev: torch.device,
                   augmenter: Augmenter | None = None, seeds: np.ndarray | None = None, with_areas: bool = True):
    """Images (flipped where ``flip``, or augmented with their areas by ``augmenter``, one seed each),
    explanation areas ``(B, C, S, S)`` 0/1 (None unless ``with_areas``), levels and presence of the images
    ``idx``, on ``dev``."""
    packed = None
    if augmenter is not None and with_areas:
        moved = [augmenter.with_masks(data.images[k], data.areas[k][None], int(s)) for k, s in zip(idx, seeds)]
        imgs, packed = np.stack([m[0] for m in moved]), np.stack([m[1][0] for m in moved])
    elif augmenter is not None:
        imgs = augmenter.images(data.images[idx], seeds)
    else:
        imgs = np.where(flip[:, None, None, None], data.images[idx][:, :, ::-1], data.images[idx])
        if with_areas:
            packed = np.where(flip[:, None, None], data.areas[idx][..., ::-1], data.areas[idx])
    areas = None if packed is None else \
        unpack_areas(torch.from_numpy(np.ascontiguousarray(packed)).to(dev), data.present.shape[1])
    return (to_tensor(list(imgs), image_size, dev), areas, torch.from_numpy(data.levels[idx]).to(dev),
            torch.from_numpy(data.present[idx]).to(dev))


def train_dermx(data: DermXData, out: str | Path, *, guided: bool = False, epochs: int = 10, batch_size: int = 8,
                lr: float = 2e-3, seed: int = 0, image_size: int = 256, backbone: str = "plain",
                device: str | None = None, sources: Sequence[str] = (), restart: bool = False, force: bool = False,
                augment: bool = True, augment_strength: float = 1.0, balanced: bool = False,
                presence_from_maps: bool = False, count_head: bool = False, level_from: str = "auto",
                characteristic_counts: bool = False, live_maps: bool = False, init: str | Path | None = None,
                progress: ProgressCallback | None = None) -> DermX:
    """Train DermX (DermX+ with ``guided``) through the shared loop and save it to ``out``; resumes from
    ``out/checkpoint`` (``restart`` starts over). An ``out`` holding anything but DermX weights is refused
    unless ``force``. ``augment`` moves the masks with the graders' augmentation (else flips only), its
    photometric ranges scaled by ``augment_strength`` (:func:`synthtrial.graders.augment.scaled`); ``balanced``
    weighs each characteristic's positives by its negatives / positives ratio; ``presence_from_maps`` fits the
    presence models after training; ``count_head`` adds the lesion-count head and its loss (``dermx.py``);
    ``level_from`` chooses the level route after training; ``characteristic_counts`` adds a count head per
    characteristic, its loss and, after training, its presence thresholds; ``live_maps`` adds the live-map term
    to DermX+'s attention loss; ``init`` names weights to fine-tune (module docstring). ``progress(step, steps,
    "loss ...")`` is called after every step (``epochs * ceil(N / batch_size)`` steps)."""
    check_weights_out(out, DermX.name, force)
    check_level_from(level_from, count_head)
    check_presence_routes(characteristic_counts, presence_from_maps)
    augmentation = scaled(WIDE, augment_strength)
    dev = resolve_device(device)
    n = len(data.images)
    per_epoch = math.ceil(n / batch_size)
    settings = {"guided": guided, "epochs": epochs, "batch": batch_size, "lr": lr, "seed": seed,
                "image_size": image_size, "sources": [str(s) for s in sources], "images": n, "augment": augment,
                "augment_strength": augment_strength, "balanced_characteristics": balanced,
                "truth": data.truth, "backbone": backbone,
                "level_counts": np.bincount(data.levels, minlength=4).tolist(),
                "prevalence": [round(float(p), 4) for p in data.present.mean(axis=0)]}
    if count_head:
        if data.counts is None:
            raise GraderError("dermx count head: the training data has no lesion counts")
        settings["count_head"] = True       # recorded only when on, so earlier checkpoints still resume
    if characteristic_counts:
        if data.char_counts is None:
            raise GraderError("dermx characteristic counts: the training data has no per-characteristic counts")
        settings["characteristic_counts"] = True
    check_live_maps(live_maps, guided)
    if live_maps:
        settings["live_maps"] = True
    cfg = DermXConfig(image_size=image_size, guided=guided, backbone=backbone, count_head=count_head,
                      characteristic_counts=characteristic_counts)
    start = None
    if init is not None:
        start = fine_tune_start(init, cfg)
        settings["init"] = {"from": str(init), "weights_sha256": rundir.sha256_file(Path(init) / WEIGHTS_FILE)}
    torch.manual_seed(seed)
    net = DermXNet(cfg)
    if start is not None:
        net.load_state_dict({k: v.float() for k, v in start.model.state_dict().items()})
    else:
        start_count_heads(net, data, image_size)
    net = net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    weights = torch.tensor(np.bincount(data.levels, minlength=4) + 1.0, dtype=torch.float32)
    class_weight = (weights.sum() / (4 * weights)).to(dev)
    pos_weight = torch.from_numpy(characteristic_pos_weight(data.present)).to(dev) if balanced else None
    total = epochs * per_epoch
    augmenter = Augmenter(augmentation) if augment else None

    def step(i: int) -> dict[str, float]:
        epoch, b = divmod(i, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        torch.manual_seed(seed * 1_000_003 + i)
        idx = order[b * batch_size:(b + 1) * batch_size]
        draws = np.random.default_rng([seed, epoch, b])
        flip = draws.random(len(idx)) < 0.5
        seeds = draw_seeds(len(idx), draws) if augmenter is not None else None
        x, areas, levels, present = training_batch(data, idx, flip, image_size, dev, augmenter, seeds,
                                                   with_areas=guided)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
        feats = net.features(x)
        live = None
        if guided:
            diag, chars, attention, live = attention_loss(net, feats, areas, present, live_maps)
        else:
            diag, chars = net.heads(feats.mean(dim=(2, 3)))
            attention = torch.zeros((), device=dev)
        ce = F.cross_entropy(diag, levels, weight=class_weight)
        bce = F.binary_cross_entropy_with_logits(chars, present, pos_weight=pos_weight)
        loss = LAMBDA_D * ce + LAMBDA_C * bce + (LAMBDA_A * attention if guided else 0)
        logs = {"ce": ce.item(), "bce": bce.item(), "dice": attention.item()}
        if live is not None:
            loss = loss + LAMBDA_A * live
            logs["live"] = live.item()
        if count_head:
            target = torch.from_numpy(data.counts[idx]).to(dev)
            count_loss = F.mse_loss(torch.log1p(net.count(feats)), torch.log1p(target))
            loss = loss + LAMBDA_N * count_loss
            logs["count"] = count_loss.item()
        if characteristic_counts:
            target = torch.from_numpy(data.char_counts[idx]).to(dev)
            char_loss = characteristic_count_loss(net.characteristic_counts(feats), target, pos_weight)
            loss = loss + LAMBDA_K * char_loss
            logs["characteristic_counts"] = char_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), **logs}

    net.train()
    plan = Plan(total, step, DermX.name, settings, save_every=per_epoch, log_every=per_epoch,
                summarize=lambda done: {"epoch": done // per_epoch})
    history = train_grader(net, opt, plan, out, restart=restart, progress=progress)["history"]
    net.eval()
    record = {"settings": settings, "epoch": epochs, "loss_history": history}
    cfg = decide_after_training(cfg, net, dev, data, record, presence_from_maps, level_from)
    DermX(cfg, net, device=dev, record=record).save_pretrained(out)
    return DermX.from_pretrained(out, device=dev)


def attention_loss(net: DermXNet, feats: torch.Tensor, areas: torch.Tensor, present: torch.Tensor,
                   live_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DermX+'s attention loss from the ``cam`` features (module docstring): the Dice loss between each present
    characteristic's Grad-CAM map (scaled to max 1) and its explanation area (``(B, C, H, W)`` 0/1) max-pooled
    to the CAM grid, plus with ``live_maps`` the live-map term, computed on the maps of the features detached (it
    trains the heads' weights, the alphas: otherwise the cheapest way to raise a negative peak is to switch the
    features off there, which leaves the map at 0 for good). Returns the level and characteristic logits, the
    Dice loss and the live-map term (None without ``live_maps``)."""
    diag, chars, maps = net.heads_with_cams(feats)
    targets = F.adaptive_max_pool2d(areas, maps.shape[-2:])
    live = live_map_loss(net.heads_with_cams(feats.detach(), relu=False)[2], targets, present) if live_maps else None
    return diag, chars, dice_loss(normalise_maps(maps), targets, present), live


#: the share of a map's largest magnitude that its peak on the explanation area must reach (live-map term)
LIVE_MARGIN = 0.1


def live_map_loss(maps: torch.Tensor, targets: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The live-map term (module docstring): mean ``ReLU(LIVE_MARGIN - peak / max|map|)`` over the (image,
    characteristic) pairs marked ``present`` whose area ``targets`` (``(B, C, h, w)`` 0/1) has a cell on the
    grid; ``maps`` are the Grad-CAM maps before the ReLU. 0 when there are no such pairs."""
    inside = targets > 0
    peak = maps.masked_fill(~inside, float("-inf")).amax(dim=(-2, -1))
    scale = maps.detach().abs().amax(dim=(-2, -1)).clamp_min(1e-12)
    use = (present > 0) & inside.any(dim=-1).any(dim=-1)
    if not use.any():
        return maps.sum() * 0.0
    return F.relu(LIVE_MARGIN - peak[use] / scale[use]).mean()


#: config fields a fine-tuning start may differ in: decided after training, or a training setting
AFTER_TRAINING_FIELDS = ("presence", "count_thresholds", "level_from", "guided")


def fine_tune_start(init: str | Path, cfg: DermXConfig) -> DermX:
    """The DermX weights in ``init`` (on the CPU), refused in one line naming the fields when their network or input
    size differs from ``cfg``'s."""
    start = DermX.from_pretrained(init, device="cpu")
    check_fine_tune_start(cfg, start.config, init, "DermX", AFTER_TRAINING_FIELDS)
    return start


def start_count_heads(net: DermXNet, data: DermXData, image_size: int) -> None:
    """Each count head of ``net`` starts at its mean training count spread evenly over the CAM grid (zero weights,
    the softplus bias of :func:`density_bias`)."""
    cells = (image_size // 8) ** 2
    with torch.no_grad():
        if net.counter is not None:
            net.counter.weight.zero_()
            net.counter.bias.fill_(density_bias(float(data.counts.mean()), cells))
        if net.char_counter is not None:
            net.char_counter.weight.zero_()
            net.char_counter.bias.copy_(torch.tensor([density_bias(float(m), cells)
                                                      for m in data.char_counts.mean(axis=0)]))


def decide_after_training(cfg: DermXConfig, net: DermXNet, dev: torch.device, data: DermXData,
                          record: dict[str, Any], presence_from_maps: bool, level_from: str) -> DermXConfig:
    """The config with what is decided on :data:`PRESENCE_IMAGES` training images after training (module
    docstring): the presence models, the count thresholds, the level route; each noted in ``record``."""
    n = len(data.images)
    picks = np.linspace(0, n - 1, min(PRESENCE_IMAGES, n)).round().astype(int)    # the calibration images
    if presence_from_maps:
        cfg = replace(cfg, presence=fit_presence(DermX(cfg, net, device=dev), data.images[picks],
                                                 data.present[picks].astype(bool)))
        record["presence_from"] = f"{len(picks)} training images"
    if cfg.characteristic_counts or cfg.count_head:     # the network's outputs, read once for both decisions
        outputs = DermX(cfg, net, device=dev).outputs(list(data.images[picks]))
    if cfg.characteristic_counts:
        cfg = replace(cfg, count_thresholds=fit_count_thresholds(outputs, data.present[picks].astype(bool)))
        record["count_thresholds_from"] = f"{len(picks)} training images"
    if cfg.count_head:
        route, record["level_route"] = choose_level_route(outputs, data.levels[picks], level_from)
        cfg = replace(cfg, level_from=route)
    return cfg


def characteristic_count_loss(counts: torch.Tensor, target: torch.Tensor,
                              pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mean squared error of ``log(1 + count)`` over images and characteristics (``(B, C)`` each); with
    ``pos_weight`` (``(C,)``, ``balanced``) an image's error on a characteristic it shows weighs that
    characteristic's positive weight, as in its BCE (module docstring)."""
    error = (torch.log1p(counts) - torch.log1p(target)) ** 2
    if pos_weight is None:
        return error.mean()
    return (error * torch.where(target > 0, pos_weight.to(error.dtype), torch.ones_like(error))).mean()


def density_bias(mean_count: float, cells: int) -> float:
    """The bias of a softplus density head whose sum over ``cells`` cells is ``mean_count`` (at least 1e-3)."""
    return math.log(math.expm1(max(mean_count, 1e-3) / cells))


#: the count thresholds :func:`fit_count_thresholds` tries: 0.1 to 10 lesions, 61 steps evenly in log
COUNT_THRESHOLDS = tuple(float(t) for t in np.round(np.geomspace(0.1, 10.0, 61), 4))


def fit_count_thresholds(outputs: DermXOutputs, present: np.ndarray) -> tuple[float, ...]:
    """Per characteristic (columns of ``(N, C)`` bool ``present``), the count from :data:`COUNT_THRESHOLDS` at
    which calling it present has the best F1 on the images of ``outputs`` (:meth:`DermX.outputs`; where several
    tie, the middle one of them, the lower on an even number: away from both ends of the range that separates the
    images equally well); 0.5 (half a lesion) where the images show it on all or none of them."""
    counts = outputs.characteristic_counts
    if counts is None:
        raise GraderError("dermx: fitting count thresholds needs the characteristic count heads")
    grid = np.asarray(COUNT_THRESHOLDS)
    thresholds = []
    for k in range(present.shape[1]):
        y = present[:, k]
        if y.all() or not y.any():
            thresholds.append(0.5)
            continue
        called = counts[:, k][:, None] >= grid[None, :]          # images x thresholds
        f1 = 2 * (called & y[:, None]).sum(0) / np.maximum(1, y.sum() + called.sum(0))
        best = np.flatnonzero(f1 == f1.max())
        thresholds.append(float(grid[best[(len(best) - 1) // 2]]))
    return tuple(thresholds)


def presence_inputs(dermx: DermX, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """``(N, C, 4)`` :data:`PRESENCE_FEATURES` of input-size images under ``dermx``'s network."""
    return np.concatenate([dermx.map_features(to_tensor(list(images[start:start + batch]), dermx.config.image_size,
                                                        dermx.device))[1].cpu().numpy()
                           for start in range(0, len(images), batch)])


def fit_presence(dermx: DermX, images: np.ndarray, present: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """Per characteristic (columns of ``(N, C)`` bool ``present``), the weights and bias of its presence model on
    ``images`` (module docstring; the F1-best threshold folded into the bias); the head (logit weight 1) where
    the images show the characteristic on all or none of them."""
    from sklearn.linear_model import LogisticRegression

    x = presence_inputs(dermx, images)
    head = (1.0,) + (0.0,) * len(PRESENCE_FEATURES)
    grid = np.round(np.arange(0.02, 0.981, 0.02), 2)
    rows = []
    for k in range(present.shape[1]):
        y = present[:, k]
        if y.all() or not y.any():
            rows.append(head)
            continue
        model = LogisticRegression(max_iter=5000).fit(x[:, k], y)
        p = model.predict_proba(x[:, k])[:, 1]
        f1 = [2 * (y & (p >= t)).sum() / max(1, y.sum() + (p >= t).sum()) for t in grid]
        t = float(grid[int(np.argmax(f1))])
        bias = float(model.intercept_[0]) - math.log(t / (1 - t))
        rows.append(tuple(round(float(w), 6) for w in model.coef_[0]) + (round(bias, 6),))
    return tuple(rows)


def check_presence_routes(characteristic_counts: bool, presence_from_maps: bool) -> None:
    """Refuse two presence routes at once (the characteristic counts' thresholds and the presence models)."""
    if characteristic_counts and presence_from_maps:
        raise GraderError("--characteristic-counts and --presence-from-maps are two presence routes; give one")


def check_live_maps(live_maps: bool, guided: bool) -> None:
    """Refuse the live-map term without DermX+'s attention loss, which it is part of."""
    if live_maps and not guided:
        raise GraderError("--live-maps works on DermX+'s attention loss: add --guided")


def check_level_from(level_from: str, count_head: bool) -> None:
    """Refuse a level route that is not auto / classifier / count, or count without the count head."""
    if level_from not in ("auto", *LEVEL_ROUTES):
        raise GraderError(f"--level-from must be auto, {' or '.join(LEVEL_ROUTES)}, got '{level_from}'")
    if level_from == "count" and not count_head:
        raise GraderError("--level-from count needs the count head (--count-head)")


def choose_level_route(outputs: DermXOutputs, levels: np.ndarray,
                       wanted: str = "auto") -> tuple[str, dict[str, Any]]:
    """The level route (``wanted`` unless "auto": module docstring) of count-head weights and its record: each
    route's level accuracy, on the images of ``outputs`` (:meth:`DermX.outputs`), against ``levels``."""
    probs, _, counts, _ = outputs
    if counts is None:
        raise GraderError("dermx: choosing a level route needs the count head")
    levels = np.asarray(levels, int)
    accuracy = {r: float((route_grades(r, probs, counts)[0] == levels).mean()) for r in LEVEL_ROUTES}
    route = wanted if wanted != "auto" else ("count" if accuracy["count"] > accuracy["classifier"] else "classifier")
    return route, {"chosen": route, "asked": wanted, "images": int(len(levels)),
                   "accuracy": {k: round(v, 4) for k, v in accuracy.items()}}
