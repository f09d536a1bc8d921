"""ImageQX (Jalaboi et al.): is a photo good enough to grade, and if not, why.

An EfficientNet-B0 (timm, trained from scratch here: no pretrained weights can be downloaded) with a quality
head (acceptable / poor, softmax) and five explanation heads (bad framing, bad light, blurry, low resolution,
too far away; sigmoids); loss ``CE + 5 * BCE``, the CE class-weighted (balanced weights) and each BCE weighted
by its negatives/positives ratio.

Training images are degradations of clean generated images whose labels are known by construction
(:mod:`synthtrial.graders.imageqx_degrade`: ``plan_degradation`` draws a recipe, ``apply_degradation`` applies
it). The default recipe, "varied", draws a new background, exposure, white balance, softening, sharpening,
sensor noise and JPEG within the acceptable bounds on every image and states blur on an absolute scale, so that
a portrait's own look, background and sharpness are no cue (train on one portrait, grade another); "wide"
(``--recipe wide``) widens the acceptable looks and framings further; "narrow" (``--recipe narrow``) is the
earlier one: clean renders with barely any acceptable variation. ``photos`` (``--photos N``) mixes N crops of
scikit-image's bundled photographs (scenes, objects, textures; no face) into the training part, degraded by the
same recipe, so that what is learnt is the degradation on any content and not the look of the one portrait a
cross-portrait training has (:func:`photo_bases`). A "poor" photo
has one or two of: blurry (Gaussian or motion blur), bad light (under- / over-exposure, a colour cast), low
resolution (5-10x down-sampling), bad framing (off-centre, cut off), too far away (zoomed out).

Training adds horizontal flips (``AUGMENT``, :data:`synthtrial.graders.augment.FLIPS`; off with ``augment=False``):
a mirror image keeps every label, where the graders' wide augmentation (blur, darkening, shifts, zoom) would
contradict them. ``looks=True`` (``--looks``) adds :data:`LOOKS`, changes of a photo's look far inside every
label's margin, so that a portrait's own skin tone, light and colour are no cue (train on one portrait, grade
another): brightness and contrast x0.85-1.15 (bad light starts at x0.5 and x1.7), saturation x0.8-1.2, a hue
turn of up to 0.02, gamma 0.85-1.2, white balance up to 0.08 / 0.1 and a side light of up to +-10 %; no blur,
noise, JPEG, shift or zoom (the recipe draws those, each within its label's bounds). They act on the
network's input (after the degradation), where they cost a seventh of what they would on the 256 px base.
The degradations above are the rest of ImageQX's augmentation.

A photo whose shorter side is below ``min_side`` pixels is also "low resolution" and poor by rule, whatever the
network says (it only sees the image resized to ``image_size``).

Three uses: ``synthtrial grade`` adds the verdict to every image (this class is a grader); :meth:`ImageQX.verdicts`
gives the verdict and a one-line reason per image for the generator's quality filter; :func:`check_portraits`
checks ``--faces`` portraits before use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.graders import classify
from synthtrial.graders.augment import FLIPS, Augmenter, draw_seeds
from synthtrial.graders.base import GraderComponent, GraderError, read_rgb
from synthtrial.graders.imageqx_degrade import EXPLANATIONS, check_recipe, degraded_set, plan_degradation
from synthtrial.util.progress import ProgressCallback

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
class TrainSettings(classify.TrainSettings):
    base_size: int = 256            # side the clean images are brought to before they are degraded
    resample: bool = True           # new degradations every epoch (False: epoch 0's draw every time)
    augment: bool = True            # horizontal flips (AUGMENT), label-safe
    looks: bool = False             # LOOKS on top: label-safe changes of the look (module docstring)
    recipe: str = "varied"          # the degradation recipe (imageqx_degrade): "varied", "wide" or "narrow"
    photos: int = 0                 # PHOTOS crops mixed into the training part (photo_bases)

    def __post_init__(self) -> None:
        check_recipe(self.recipe)
        if not 0 <= self.photos <= 100_000:
            raise GraderError(f"--photos must be 0-100000, got {self.photos}")


def trained_recipe(grader: ImageQX) -> str:
    """The degradation recipe ``grader`` was trained with ("narrow" for weights older than the option)."""
    return str(grader.record.get("settings", {}).get("recipe", "narrow"))


#: scikit-image's bundled photographs (no download): scenes, objects, textures, none a face; ``photo_bases``
PHOTOS = ("chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera", "brick",
          "grass", "gravel", "moon", "coins")


def photo_bases(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` clean training images of other content than a face (``--photos``): square crops (40-100 % of the
    shorter side, anywhere, mirrored half the time) of :data:`PHOTOS`, grey ones tinted, brought to ``size``.
    They teach what a degradation looks like on any content, so that the verdict does not rest on the one
    portrait of the training set: their labels come from the same recipes."""
    from skimage import data as images

    photos = []
    for name in PHOTOS:
        photo = np.asarray(getattr(images, name)())
        photos.append(np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3])
    rng = np.random.default_rng([seed, 7])
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[y:y + side, x:x + side].astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if np.ptp(crop.reshape(-1, 3).mean(axis=0)) < 1e-6:            # a grey photo: a random tint
            crop = crop * rng.uniform(0.75, 1.0, size=3).astype(np.float32)
        out[i] = classify.resize_square(np.clip(crop + 0.5, 0, 255).astype(np.uint8), size)
    return out


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
    if settings.photos:
        train_x = np.concatenate([train_x, photo_bases(settings.photos, settings.base_size, settings.seed)])
    val_x, val_y = (degraded_set(x[own[va_own]], settings.seed + 1, 10_000, config.image_size, settings.recipe)
                    if len(va_own) else (None, None))
    # every epoch's labels are known before its images are made: weights from all of them
    draws = range(settings.epochs) if settings.resample else (0,)
    all_labels = np.stack([plan_degradation(np.random.default_rng([settings.seed, e, i]),
                                            recipe=settings.recipe)["labels"]
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
            cache[draw] = degraded_set(train_x, settings.seed, draw, config.image_size, settings.recipe)
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

    plan = settings.plan(len(train_x), batch_loss, validate)
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
             seed: int = 12345, base_size: int = 256, recipe: str | None = None,
             progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Degrade every image of ``data`` once (recipes from ``seed``; ``recipe`` defaults to the one the grader
    was trained with) and score the verdicts against the truth (``progress`` counts the images read)."""
    recipe = check_recipe(recipe) if recipe is not None else trained_recipe(grader)
    source = classify.read_source(data, identities, "--data")
    bases = base_images(source, base_size, progress)
    inputs, labels = degraded_set(bases, seed, 0, grader.config.image_size, recipe)
    return {"data": source.where, "identities": list(identities or []), "images": len(source), "seed": seed,
            "recipe": recipe, **metrics(grader, inputs, labels)}
