"""ImageQX (Jalaboi et al.): is a photo good enough to grade, and if not, why.

An EfficientNet-B0 (timm, trained from scratch here: no pretrained weights can be downloaded) with a quality
head (acceptable / poor, softmax) and five explanation heads (bad framing, bad light, blurry, low resolution,
too far away; sigmoids); loss ``CE + 5 * BCE``, the CE class-weighted (balanced weights) and each BCE weighted
by its negatives/positives ratio.

Training images are degradations of clean generated images whose labels are known by construction
(:func:`plan_degradation` draws a recipe, :func:`apply_degradation` applies it):

* blurry -- Gaussian blur (sigma 0.6-2 % of the side) or a motion-blur line kernel (3-8 % of the side);
* bad light -- under-exposure (x0.2-0.5), over-exposure (x1.7-2.6, clipped) or a colour cast (one channel
  x1.35-1.7);
* low resolution -- down-sampled by 5-10x (area), up-sampled back (nearest or bilinear);
* bad framing -- the face pushed off-centre (shift 25-40 % of the side) or a cut-off crop (zoom x1.7-2.3 on an
  off-centre corner);
* too far away -- zoomed out to 35-55 % of the side on a plain, slightly noisy background.

Training adds horizontal flips (``AUGMENT``, :data:`synthtrial.graders.augment.FLIPS`; off with ``augment=False``):
a mirror image keeps every label, where the graders' wide augmentation (blur, darkening, shifts, zoom) would
contradict them. ``looks=True`` (``--looks``) adds :data:`LOOKS`, changes of a photo's look far inside every
label's margin, so that a portrait's own skin tone, light and colour are no cue (train on one portrait, grade
another): brightness and contrast x0.85-1.15 (an acceptable exposure is x0.9-1.1, bad light starts at x0.5
and x1.7), saturation x0.8-1.2, a hue turn of up to 0.02, gamma 0.85-1.2, white balance up to 0.08 / 0.1 and a
side light of up to +-10 %; no blur, noise, JPEG, shift or zoom (those are labels). They act on the
network's input (after the degradation), where they cost a seventh of what they would on the 256 px base.
The degradations above are the rest of ImageQX's augmentation.

A "poor" photo has one or two of these (the explanation labels say which); an "acceptable" one may carry
mild versions below every threshold (exposure x0.9-1.1, blur sigma < 0.3 %, a shift < 4 %). A photo whose
shorter side is below ``min_side`` pixels is also "low resolution" and poor by rule, whatever the network says
(it only sees the image resized to ``image_size``).

Three uses: ``synthtrial grade`` adds the verdict to every image (this class is a grader); :meth:`ImageQX.verdicts`
gives the verdict and a one-line reason per image for the generator's quality filter; :func:`check_portraits`
checks ``--faces`` portraits before use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from synthtrial.graders import classify
from synthtrial.graders.augment import FLIPS, Augmenter, draw_seeds
from synthtrial.graders.base import GraderComponent, GraderError, read_rgb
from synthtrial.util.progress import ProgressCallback

EXPLANATIONS = ("bad_framing", "bad_light", "blurry", "low_resolution", "too_far")
EXPLANATION_TEXT = {"bad_framing": "bad framing", "bad_light": "bad light", "blurry": "blurry",
                    "low_resolution": "low resolution", "too_far": "too far away"}
QUALITY_NAMES = ("acceptable", "poor")
OUTPUT_COLUMNS = ("p_acceptable", "acceptable", *(f"p_{e}" for e in EXPLANATIONS), *EXPLANATIONS)
#: weight of the explanation BCE in the loss (the paper: 5)
BCE_WEIGHT = 5.0
#: ImageQX's training augmentation: label-safe flips only (see the module docstring)
AUGMENT = FLIPS
#: ``--looks``: label-safe changes of a photo's look on top of the flips (module docstring)
LOOKS = replace(FLIPS, jitter_p=0.8, brightness=0.15, contrast=0.15, saturation=0.2, hue=0.02, gamma_p=0.5,
                gamma=(0.85, 1.2), white_balance_p=0.8, temperature=0.08, tint=0.1, light_p=0.5, light=0.1)


@dataclass(frozen=True)
class ImageQXConfig:
    backbone: str = "efficientnet_b0"    # a timm model name
    image_size: int = 96                 # input side in pixels (the whole photo, resized)
    dropout: float = 0.2
    threshold: float = 0.5               # p_acceptable at or above which a photo is acceptable
    min_side: int = 128                  # photos smaller than this are low resolution by rule

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 1024 or not 0 <= self.dropout < 1 or not 0 < self.threshold < 1:
            raise GraderError("ImageQX image size must be 16-1024, dropout in [0, 1), threshold in (0, 1)")
        if not 0 <= self.min_side <= 100_000:
            raise GraderError(f"ImageQX min_side must be 0-100000, got {self.min_side}")


def build_network(config: ImageQXConfig) -> Any:
    """``images (N, 3, S, S) in [0, 1] -> (quality logits (N, 2), explanation logits (N, 5))``."""
    import timm
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            try:
                self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0,
                                                  drop_rate=config.dropout)
            except RuntimeError as exc:
                raise GraderError(f"ImageQX backbone {config.backbone!r}: {exc}") from None
            n = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
            self.quality = nn.Linear(n, len(QUALITY_NAMES))
            self.explain = nn.Linear(n, len(EXPLANATIONS))

        def forward(self, x):
            features = self.backbone(classify.normalize(x))
            return self.quality(features), self.explain(features)

    return Net()


# ------------------------------------------------------------------------------------- degradations

def plan_degradation(rng: np.random.Generator, p_clean: float = 0.35) -> dict[str, Any]:
    """A recipe: ``{"labels": (5,) 0/1, "steps": [(kind, params), ...]}``; poor iff any label is 1."""
    steps: list[tuple[str, dict[str, float]]] = []
    labels = np.zeros(len(EXPLANATIONS), np.int64)
    if rng.random() < p_clean:
        if rng.random() < 0.5:
            steps.append(("shift", {"dx": rng.uniform(-0.04, 0.04), "dy": rng.uniform(-0.04, 0.04)}))
        if rng.random() < 0.5:
            steps.append(("exposure", {"gain": rng.uniform(0.9, 1.1)}))
        if rng.random() < 0.5:
            steps.append(("blur", {"sigma": rng.uniform(0.0, 0.003)}))
        return {"labels": labels, "steps": steps}
    k = 1 if rng.random() < 0.7 else 2
    chosen = sorted(rng.choice(len(EXPLANATIONS), size=k, replace=False).tolist())
    if 0 in chosen and 4 in chosen:        # off-centre and zoomed-out are drawn as one or the other
        chosen.remove(int(rng.choice([0, 4])))
    for c in chosen:
        labels[c] = 1
    if labels[0]:
        if rng.random() < 0.5:
            angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.25, 0.4)
            steps.append(("shift", {"dx": dist * math.cos(angle), "dy": dist * math.sin(angle)}))
        else:
            steps.append(("cutoff", {"zoom": rng.uniform(1.7, 2.3), "cx": rng.choice([0.15, 0.85]),
                                     "cy": rng.uniform(0.1, 0.9)}))
    if labels[4]:
        steps.append(("zoomout", {"scale": rng.uniform(0.35, 0.55), "noise": rng.uniform(2, 8)}))
    if labels[1]:
        kind = rng.integers(3)
        if kind == 0:
            steps.append(("exposure", {"gain": rng.uniform(0.2, 0.5)}))
        elif kind == 1:
            steps.append(("exposure", {"gain": rng.uniform(1.7, 2.6)}))
        else:
            steps.append(("cast", {"channel": int(rng.integers(3)), "gain": rng.uniform(1.35, 1.7)}))
    if labels[2]:
        if rng.random() < 0.5:
            steps.append(("blur", {"sigma": rng.uniform(0.006, 0.02)}))
        else:
            steps.append(("motion", {"length": rng.uniform(0.03, 0.08), "angle": rng.uniform(0, 180)}))
    if labels[3]:
        steps.append(("lowres", {"factor": rng.uniform(5, 10), "nearest": float(rng.random() < 0.5)}))
    return {"labels": labels, "steps": steps}


def apply_degradation(image: np.ndarray, recipe: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with the recipe's steps applied in order; same shape."""
    out = image.astype(np.float32)
    h, w = out.shape[:2]
    side = float(min(h, w))
    background = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]]).mean(axis=0)
    for kind, p in recipe["steps"]:
        if kind == "shift":
            m = np.float32([[1, 0, p["dx"] * w], [0, 1, p["dy"] * h]])
            out = cv2.warpAffine(out, m, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=background.tolist())
        elif kind == "cutoff":
            z = p["zoom"]
            cx, cy = p["cx"] * w, p["cy"] * h
            m = np.float32([[z, 0, w / 2 - z * cx], [0, z, h / 2 - z * cy]])
            out = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        elif kind == "zoomout":
            s = p["scale"]
            canvas = np.empty_like(out)
            canvas[:] = background
            noise = rng.normal(0, p["noise"], size=(h, w, 1)).astype(np.float32)
            canvas = canvas + cv2.GaussianBlur(noise, (0, 0), 3)[..., None]
            small = cv2.resize(out, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
            y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
            canvas[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
            out = canvas
        elif kind == "exposure":
            out = out * p["gain"]
        elif kind == "cast":
            out[..., p["channel"]] *= p["gain"]
        elif kind == "blur":
            sigma = p["sigma"] * side
            if sigma >= 0.3:
                out = cv2.GaussianBlur(out, (0, 0), sigma)
        elif kind == "motion":
            n = max(3, int(round(p["length"] * side)) | 1)
            kernel = np.zeros((n, n), np.float32)
            kernel[n // 2, :] = 1.0
            rot = cv2.getRotationMatrix2D((n / 2 - 0.5, n / 2 - 0.5), p["angle"], 1.0)
            kernel = cv2.warpAffine(kernel, rot, (n, n))
            out = cv2.filter2D(out, -1, kernel / max(kernel.sum(), 1e-6), borderType=cv2.BORDER_REFLECT)
        elif kind == "lowres":
            small = cv2.resize(out, (max(4, round(w / p["factor"])), max(4, round(h / p["factor"]))),
                               interpolation=cv2.INTER_AREA)
            out = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST if p["nearest"] else cv2.INTER_LINEAR)
        else:  # pragma: no cover - recipes come from plan_degradation
            raise GraderError(f"unknown degradation step {kind!r}")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def degraded_set(bases: np.ndarray, seed: int, epoch: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One degraded copy of each base image (recipe from ``(seed, epoch, i)``), resized: ``(x, labels)``."""
    xs, ys = [], []
    for i, base in enumerate(bases):
        rng = np.random.default_rng([seed, epoch, i])
        recipe = plan_degradation(rng)
        xs.append(classify.resize_square(apply_degradation(base, recipe, rng), image_size))
        ys.append(recipe["labels"])
    return np.stack(xs), np.stack(ys)


# ------------------------------------------------------------------------------------------- grader

class ImageQX(GraderComponent):
    """``ImageQX.from_pretrained(folder).verdicts(images)`` -> acceptable, p_acceptable, the five reasons, a
    text."""

    name = "imageqx"
    config_class = ImageQXConfig
    label = "ImageQX"
    outcomes: tuple[str, ...] = ()       # a photo's quality is not a trial outcome

    @classmethod
    def build(cls, config: ImageQXConfig) -> Any:
        return build_network(config)

    def probabilities(self, inputs: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(p_acceptable (N,), p_explanations (N, 5))`` for inputs already at ``image_size``."""
        import torch

        self.model.eval()
        qs, es = [], []
        with torch.inference_mode():
            for part in classify.batches_of(len(inputs), batch_size):
                q, e = self.model(classify.to_tensor(inputs[part], self.device))
                qs.append(torch.softmax(q.float(), 1)[:, 0].cpu().numpy())
                es.append(torch.sigmoid(e.float()).cpu().numpy())
        if not qs:
            return np.zeros(0), np.zeros((0, len(EXPLANATIONS)))
        return np.concatenate(qs).astype(np.float64), np.concatenate(es).astype(np.float64)

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        classify.check_images(images, "imageqx")
        inputs = np.stack([classify.resize_square(im, self.config.image_size) for im in images]) if images \
            else np.zeros((0, self.config.image_size, self.config.image_size, 3), np.uint8)
        small = np.array([min(im.shape[:2]) < self.config.min_side for im in images], dtype=bool)
        return self._frame(*self.probabilities(inputs), small)

    def _frame(self, p_ok: np.ndarray, p_exp: np.ndarray, small: np.ndarray | None = None) -> pd.DataFrame:
        flags = (p_exp >= 0.5).astype(np.float64)
        acceptable = (p_ok >= self.config.threshold).astype(np.float64)
        if small is not None and small.any():
            flags[small, EXPLANATIONS.index("low_resolution")] = 1.0
            acceptable[small] = 0.0
        data = {"p_acceptable": p_ok, "acceptable": acceptable,
                **{f"p_{e}": p_exp[:, k] for k, e in enumerate(EXPLANATIONS)},
                **{e: flags[:, k] for k, e in enumerate(EXPLANATIONS)}}
        return pd.DataFrame(data, columns=list(OUTPUT_COLUMNS)).astype("float64")

    def verdicts(self, images: Sequence[np.ndarray]) -> pd.DataFrame:
        """:meth:`predict` plus ``reason``: '' for an acceptable photo, else one line saying why not."""
        frame = self.predict(images)
        return frame.assign(reason=[reason_of(row) for row in frame.to_dict("records")])


def reason_of(row: dict[str, float]) -> str:
    """One line for a verdict row: '' when acceptable, else the reasons with their probabilities."""
    if row["acceptable"] >= 0.5:
        return ""
    named = [f"{EXPLANATION_TEXT[e]} ({row[f'p_{e}']:.2f})" for e in EXPLANATIONS if row[e] >= 0.5]
    why = ", ".join(named) if named else "no single reason stands out"
    return f"poor quality (p_acceptable {row['p_acceptable']:.2f}): {why}"


def check_portraits(paths: Sequence[str | os.PathLike[str]], grader: ImageQX | None = None,
                    device: str | None = None) -> list[tuple[Path, str | None]]:
    """``(path, None)`` for each portrait ImageQX accepts, ``(path, one-line reason)`` for each it refuses
    (unreadable files included). ``grader`` defaults to the shipped weights."""
    if grader is None:
        from synthtrial.graders.base import get_grader

        grader = get_grader("imageqx", device=device)
    results: list[tuple[Path, str | None]] = []
    for path in map(Path, paths):
        try:
            image = read_rgb(path)
        except GraderError as exc:
            results.append((path, str(exc).removeprefix(f"{path}: ")))
            continue
        reason = grader.verdicts([image])["reason"].iloc[0]
        results.append((path, reason or None))
    return results


# ---------------------------------------------------------------------------------- train / evaluate

@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    lr_final: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    base_size: int = 256            # side the clean images are brought to before they are degraded
    resample: bool = True           # new degradations every epoch (False: epoch 0's draw every time)
    augment: bool = True            # horizontal flips (AUGMENT), label-safe
    looks: bool = False             # LOOKS on top: label-safe changes of the look (module docstring)


def base_images(source: classify.Source, size: int, progress: ProgressCallback | None = None) -> np.ndarray:
    """The clean images of ``source`` brought to ``size`` (``progress`` per image)."""
    return classify.load_images(source.paths, lambda im: classify.resize_square(im, size), progress)


def train(data: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
          extra: Sequence[str | os.PathLike[str]] = (), identities: Sequence[str] | None = None,
          config: ImageQXConfig | None = None, settings: TrainSettings | None = None, device: str | None = None,
          restart: bool = False, force: bool = False, weights_dtype: str = "float32",
          read_progress: ProgressCallback | None = None, progress: ProgressCallback | None = None) -> ImageQX:
    """Train ImageQX on fresh degradations of the clean images of ``data`` (+ ``extra``) each epoch. An ``out``
    holding anything but ImageQX weights is refused unless ``force``. ``read_progress`` counts the images read
    from all sources (status: the source), ``progress`` the training steps (status: the loss)."""
    import torch

    config = config or ImageQXConfig()
    settings = settings or TrainSettings()
    grader, sources, extras = classify.start_training(ImageQX, config, settings.seed, out, data=data, extra=extra,
                                                      identities=identities, device=device,
                                                      weights_dtype=weights_dtype, force=force)
    dev = grader.device
    bases, groups, is_extra = [], [], []
    everything = [*sources, *extras]
    for k, (src, reading) in enumerate(zip(everything, classify.source_progress(everything, read_progress))):
        bases.append(base_images(src, settings.base_size, reading))
        groups.append(np.array([f"{k}:{g}" for g in src.meta["group"]]))
        is_extra.append(np.full(len(src), k >= len(sources)))
    x, g, ex = np.concatenate(bases), np.concatenate(groups), np.concatenate(is_extra)
    own = np.flatnonzero(~ex)
    strata = np.zeros(len(own), np.int64)       # the labels are drawn later: group only
    tr_own, va_own = classify.grouped_split(strata, g[own], settings.val_fraction, settings.seed)
    train_x = x[np.sort(np.concatenate([own[tr_own], np.flatnonzero(ex)]))]
    val_x, val_y = (degraded_set(x[own[va_own]], settings.seed + 1, 10_000, config.image_size)
                    if len(va_own) else (None, None))
    # every epoch's labels are known before its images are made: weights from all of them
    draws = range(settings.epochs) if settings.resample else (0,)
    all_labels = np.stack([plan_degradation(np.random.default_rng([settings.seed, e, i]))["labels"]
                           for e in draws for i in range(len(train_x))])
    poor = all_labels.any(axis=1).astype(np.int64)
    q_weights = torch.tensor(classify.class_weights(poor, 2), dtype=torch.float32, device=dev)
    pos = all_labels.sum(axis=0).astype(np.float64)
    pos_weight = torch.tensor((len(all_labels) - pos) / np.maximum(pos, 1), dtype=torch.float32, device=dev)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    flips = Augmenter(LOOKS if settings.looks else AUGMENT) if settings.augment or settings.looks else None

    def batch_loss(idx: np.ndarray, gen: Any, epoch: int) -> Any:
        draw = epoch if settings.resample else 0
        if draw not in cache:
            cache.clear()
            cache[draw] = degraded_set(train_x, settings.seed, draw, config.image_size)
        xs, ys = cache[draw]
        inputs = xs[idx] if flips is None else flips.images(xs[idx], draw_seeds(len(idx), gen))
        q, e = grader.model(classify.to_tensor(inputs, dev))
        target = torch.from_numpy(ys[idx]).to(dev)
        ce = torch.nn.functional.cross_entropy(q, target.any(dim=1).long(), weight=q_weights)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(e, target.float(), pos_weight=pos_weight)
        return ce + BCE_WEIGHT * bce

    def validate() -> dict[str, Any]:
        if val_x is None:
            return {}
        r = metrics(grader, val_x, val_y)
        return {"val_quality_macro_f1": r["quality"]["macro_f1"], "val_explanation_macro_f1": r["explanation_macro_f1"]}

    plan = classify.Fit(len(train_x), settings.epochs, settings.batch_size, settings.lr, settings.lr_final,
                        settings.seed, batch_loss, validate)
    return classify.fit_and_save(
        grader, plan, out, sources=sources, extras=extras, identities=identities, settings=settings,
        restart=restart, progress=progress, weights_dtype=weights_dtype, device=device,
        summary={"n_train": int(len(train_x)), "n_val": int(len(va_own)),
                 "quality_class_weights": [round(float(w), 6) for w in q_weights.tolist()],
                 "explanation_pos_weight": [round(float(w), 6) for w in pos_weight.tolist()]})


def metrics(grader: ImageQX, inputs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Quality report (acceptable / poor) and per-explanation binary F1 on degraded inputs with known labels."""
    from sklearn.metrics import f1_score

    p_ok, p_exp = grader.probabilities(inputs)
    frame = grader._frame(p_ok, p_exp)
    truth_poor = labels.any(axis=1).astype(np.int64)
    quality = classify.report(truth_poor, 1 - frame["acceptable"].to_numpy(np.int64), QUALITY_NAMES)
    per = {e: float(f1_score(labels[:, k], frame[e].to_numpy(np.int64), zero_division=0))
           for k, e in enumerate(EXPLANATIONS)}
    return {"quality": quality, "explanation_f1": per, "explanation_macro_f1": float(np.mean(list(per.values())))}


def evaluate(grader: ImageQX, data: str | os.PathLike[str], identities: Sequence[str] | None = None,
             seed: int = 12345, base_size: int = 256, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Degrade every image of ``data`` once (recipes from ``seed``) and score the verdicts against the truth
    (``progress`` counts the images read)."""
    source = classify.read_source(data, identities, "--data")
    bases = base_images(source, base_size, progress)
    inputs, labels = degraded_set(bases, seed, 0, grader.config.image_size)
    return {"data": source.where, "identities": list(identities or []), "images": len(source), "seed": seed,
            **metrics(grader, inputs, labels)}
