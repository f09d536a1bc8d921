"""Training and evaluation of DermX (``synthtrial.graders.dermx``) on synthtrial runs, whose masks are pixel-exact.

Choices, stated once:

* **Data.** Every image of the runs, resized to ``image_size`` (longer side), with its ACNE04 level
  (manifest ``acne04_level``), which characteristics are present (a lesion of that type drawn on it) and one
  mask per characteristic from the 16-bit instance mask (``masks/...png``, value = lesion_id + 1; the type
  of each id from ``lesions.parquet``), area-averaged to the input size. Everything is held in memory.
* **Optimisation.** AdamW (lr 2e-3, weight decay 1e-4, cosine decay over the run), batch 8, 10 epochs; every
  epoch's order and every step's dropout and augmentation come from ``(seed, epoch, step)``. The shared loop
  (:mod:`synthtrial.util.training`) writes a checkpoint after every epoch, so a resumed run ends with the
  same bytes.
* **Augmentation** (``augment``, default on; ``--no-augment``: horizontal flips only): the graders' photometric
  and geometric augmentation (:mod:`synthtrial.graders.augment`), the characteristic masks moved with the image.
* **Evaluation**: characteristic F1 (threshold 0.5; macro over the characteristics present in the run, and
  micro), level accuracy, severity MAE against the simulated severity, and explanation plausibility: mean
  fuzzy F1 of the Grad-CAM map (``DermX.explain``, image resolution) against the exact mask, over every
  (image, characteristic present) pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from synthtrial.graders.augment import WIDE, Augmenter, draw_seeds
from synthtrial.graders.base import GraderError, check_weights_out, read_rgb, train_grader
from synthtrial.graders.dermx import (CHARACTERISTICS, LESION_TYPE, DermX, DermXConfig, DermXNet, dice_loss, fuzzy_f1,
                                      normalise_maps, to_tensor)
from synthtrial.run import rundir
from synthtrial.util.device import resolve_device
from synthtrial.util.progress import ProgressCallback
from synthtrial.util.training import Plan
LAMBDA_D, LAMBDA_C, LAMBDA_A = 1.0, 1.0, 10.0


@dataclass
class DermXData:
    images: np.ndarray      # (N, S, S, 3) uint8 at the input size
    levels: np.ndarray      # (N,) int
    present: np.ndarray     # (N, C) float 0/1
    masks: np.ndarray       # (N, C, S, S) float32 in [0, 1] (area fraction of each pixel covered)


def characteristic_masks(run: Path, rel_image: str, lesions: pd.DataFrame,
                         characteristics: Sequence[str] = CHARACTERISTICS) -> np.ndarray:
    """(C, H, W) bool masks of each characteristic on one image, from its instance mask."""
    from PIL import Image

    path = run / rundir.mask_path_for(rel_image)
    try:
        with Image.open(path) as im:
            instance = np.asarray(im).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise GraderError(f"{path}: cannot read the instance mask ({exc})") from None
    if instance.ndim != 2:
        raise GraderError(f"{path}: an instance mask must be a single-channel 16-bit PNG")
    lookup = np.zeros(int(instance.max()) + 2, np.int64) - 1
    ids = lesions["lesion_id"].to_numpy(np.int64)
    of_type = {LESION_TYPE[c]: k for k, c in enumerate(characteristics)}
    codes = np.array([of_type.get(t, -1) for t in lesions["type"]], np.int64)
    inside = ids + 1 < len(lookup)
    lookup[ids[inside] + 1] = codes[inside]
    code = lookup[instance]
    return np.stack([code == k for k in range(len(characteristics))])


def load_dermx_data(runs: Sequence[str | Path], image_size: int,
                    characteristics: Sequence[str] = CHARACTERISTICS) -> DermXData:
    images, levels, present, masks = [], [], [], []
    for run in runs:
        run = Path(run)
        manifest = rundir.read_manifest(run, ("image", "patient_id", "acne04_level"))
        lesions = rundir.read_lesions(run, set(manifest["image"]))
        by_image = dict(tuple(lesions.groupby("image", sort=False)))
        for rel, level in zip(manifest["image"], manifest["acne04_level"]):
            rows = by_image.get(rel, lesions.iloc[:0])
            image = read_rgb(run / rel)
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            m = torch.from_numpy(characteristic_masks(run, rel, rows, characteristics)).float()[None]
            size = (image_size, image_size) if image.shape[0] == image.shape[1] else None
            if size is None:
                raise GraderError(f"{run / rel}: DermX trains on square images (the run's --size); got "
                                  f"{image.shape[1]} x {image.shape[0]}")
            images.append(F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
                          .round().clamp(0, 255).byte()[0].permute(1, 2, 0).numpy())
            masks.append(F.adaptive_avg_pool2d(m, size)[0].numpy() if m.shape[-1] != image_size else m[0].numpy())
            present.append([float(LESION_TYPE[c] in set(rows["type"])) for c in characteristics])
            levels.append(int(level))
    return DermXData(np.stack(images), np.asarray(levels), np.asarray(present, np.float32),
                     np.stack(masks).astype(np.float32))


def fuzzy_targets(masks: torch.Tensor, cell: int) -> torch.Tensor:
    """DermX+'s fuzzy maps: masks blurred with a Gaussian of sigma = half a CAM cell, each scaled to max 1."""
    sigma = max(0.5, cell / 2)
    radius = int(math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=masks.dtype, device=masks.device)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    b, c, h, w = masks.shape
    flat = masks.reshape(b * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    flat = flat.reshape(b, c, h, w)
    return flat / flat.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def training_batch(data: DermXData, idx: np.ndarray, flip: np.ndarray, image_size: int, dev: torch.device,
           augmenter: Augmenter | None = None, seeds: np.ndarray | None = None):
    """Images (flipped where ``flip``, or augmented with their masks by ``augmenter``, one seed each), masks,
    levels and presence of the images ``idx``, on ``dev``."""
    if augmenter is not None:
        moved = [augmenter.with_masks(data.images[k], data.masks[k], int(s)) for k, s in zip(idx, seeds)]
        imgs, masks_np = np.stack([m[0] for m in moved]), np.stack([m[1] for m in moved])
    else:
        imgs = np.where(flip[:, None, None, None], data.images[idx][:, :, ::-1], data.images[idx])
        masks_np = np.where(flip[:, None, None, None], data.masks[idx][..., ::-1], data.masks[idx])
    masks = torch.from_numpy(np.ascontiguousarray(masks_np)).to(dev)
    return (to_tensor(list(imgs), image_size, dev), masks, torch.from_numpy(data.levels[idx]).to(dev),
            torch.from_numpy(data.present[idx]).to(dev))


def train_dermx(data: DermXData, out: str | Path, *, guided: bool = False, epochs: int = 10, batch_size: int = 8,
                lr: float = 2e-3, seed: int = 0, image_size: int = 256, device: str | None = None,
                sources: Sequence[str] = (), restart: bool = False, force: bool = False, augment: bool = True,
                progress: ProgressCallback | None = None) -> DermX:
    """Train DermX (DermX+ with ``guided``) through the shared loop and save it to ``out``; resumes from
    ``out/checkpoint`` (``restart`` starts over). An ``out`` holding anything but DermX weights is refused
    unless ``force``. ``augment`` moves the masks with the graders' augmentation (else flips only).
    ``progress(step, steps, "loss ...")`` is called after every step
    (``epochs * ceil(N / batch_size)`` steps)."""
    check_weights_out(out, DermX.name, force)
    dev = resolve_device(device)
    n = len(data.images)
    per_epoch = math.ceil(n / batch_size)
    settings = {"guided": guided, "epochs": epochs, "batch": batch_size, "lr": lr, "seed": seed,
                "image_size": image_size, "sources": [str(s) for s in sources], "images": n, "augment": augment}
    cfg = DermXConfig(image_size=image_size, guided=guided)
    torch.manual_seed(seed)
    net = DermXNet(cfg).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    weights = torch.tensor(np.bincount(data.levels, minlength=4) + 1.0, dtype=torch.float32)
    class_weight = (weights.sum() / (4 * weights)).to(dev)
    total = epochs * per_epoch
    augmenter = Augmenter(WIDE) if augment else None

    def step(i: int) -> dict[str, float]:
        epoch, b = divmod(i, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        torch.manual_seed(seed * 1_000_003 + i)
        idx = order[b * batch_size:(b + 1) * batch_size]
        draws = np.random.default_rng([seed, epoch, b])
        flip = draws.random(len(idx)) < 0.5
        seeds = draw_seeds(len(idx), draws) if augmenter is not None else None
        x, masks, levels, present = training_batch(data, idx, flip, image_size, dev, augmenter, seeds)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
        if guided:
            diag, chars, cams = net.forward_with_cams(x)
            maps = F.interpolate(normalise_maps(cams), size=masks.shape[-2:], mode="bilinear", align_corners=False)
            attention = dice_loss(maps, fuzzy_targets(masks, image_size // cams.shape[-1]), present)
        else:
            diag, chars = net(x)
            attention = torch.zeros((), device=dev)
        ce = F.cross_entropy(diag, levels, weight=class_weight)
        bce = F.binary_cross_entropy_with_logits(chars, present)
        loss = LAMBDA_D * ce + LAMBDA_C * bce + (LAMBDA_A * attention if guided else 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "ce": ce.item(), "bce": bce.item(), "dice": attention.item()}

    net.train()
    plan = Plan(total, step, DermX.name, settings, save_every=per_epoch, log_every=per_epoch,
                summarize=lambda done: {"epoch": done // per_epoch})
    history = train_grader(net, opt, plan, out, restart=restart, progress=progress)["history"]
    net.eval()
    DermX(cfg, net, device=dev, record={"settings": settings, "epoch": epochs, "loss_history": history}) \
        .save_pretrained(out)
    return DermX.from_pretrained(out, device=dev)


def evaluate_dermx(dermx: DermX, run: str | Path, *, plausibility: bool = True,
                   progress: ProgressCallback | None = None) -> dict[str, float]:
    """Characteristic F1 (macro, micro), level accuracy, severity MAE and explanation plausibility on a run;
    ``progress(done, images, "")`` after each image."""
    from sklearn.metrics import f1_score

    run = Path(run)
    chars = dermx.config.characteristics
    manifest = rundir.read_manifest(run, ("image", "patient_id", "acne04_level", "severity"))
    lesions = rundir.read_lesions(run, set(manifest["image"]))
    by_image = dict(tuple(lesions.groupby("image", sort=False)))
    truth, probs, levels, severity, plaus = [], [], [], [], []
    for k, rel in enumerate(manifest["image"], start=1):
        image = read_rgb(run / rel)
        rows = by_image.get(rel, lesions.iloc[:0])
        present = [LESION_TYPE[c] in set(rows["type"]) for c in chars]
        level_p, char_p = dermx.probabilities([image])
        truth.append(present), probs.append(char_p[0])
        levels.append(int(level_p[0].argmax())), severity.append(float(level_p[0] @ np.arange(4)))
        if plausibility and any(present):
            maps = dermx.explain(image)
            masks = characteristic_masks(run, rel, rows, chars)
            plaus.extend(fuzzy_f1(maps[c], masks[c]) for c in range(len(chars)) if present[c])
        if progress is not None:
            progress(k, len(manifest), "")
    y, p = np.asarray(truth, int), (np.asarray(probs) >= 0.5).astype(int)
    used = [c for c in range(len(chars)) if y[:, c].any()]
    return {"characteristic_F1_macro": float(f1_score(y[:, used], p[:, used], average="macro", zero_division=0)),
            "characteristic_F1_micro": float(f1_score(y, p, average="micro", zero_division=0)),
            **{f"F1_{chars[c]}": float(f1_score(y[:, c], p[:, c], zero_division=0)) for c in used},
            "level_accuracy": float((np.asarray(levels) == manifest["acne04_level"].to_numpy(int)).mean()),
            "severity_MAE": float(np.abs(np.asarray(severity) - manifest["severity"].to_numpy(float)).mean()),
            "plausibility_F1": float(np.nanmean(plaus)) if plaus else float("nan"),
            "images": float(len(manifest))}
