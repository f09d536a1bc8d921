"""ImageQX's training and evaluation images: degradations of clean renders whose labels are known by construction.

:func:`plan_degradation` draws a recipe (labels + steps) from a generator, :func:`apply_degradation` applies it,
:func:`degraded_set` does both for a set of base images. Two recipes:

``"varied"`` (the default). Quality is a property of the photo, not of how far it is from its clean render, so a
face's own look, background, sharpness and tone must be no cue:

* **Every image** (acceptable or poor) first gets, with probability 0.6, a new background and clothes
  (:func:`scene`: stripes, a gradient, blocks or a coloured texture in random -- often saturated or dark --
  colours, in place of each uniform region that touches the border, :func:`background_masks`), an exposure
  x0.8-1.25 and, half the time, a white balance of x0.93-1.07 per channel (neither on a bad-light photo, whose
  exposure or cast must stay beyond its threshold); at the end, capture variation: an unsharp mask (amount
  0.3-2, a third of the images), sensor noise (sigma 1-8 grey levels, half) and JPEG (quality 40-95, half).
* **Sharpness on an absolute scale.** An acceptable photo may be softened, by a Gaussian blur of sigma at most
  0.4 % of the side or by down- and up-sampling by 1.25-2.2x (about the same effective sigma); blurry starts
  at sigma 0.8 % of the side (2x the acceptable maximum; or a motion-blur line of 3-8 %), low resolution at a
  5-10x down-sampling. The same thresholds for every face: the renders are framed alike (the face about half
  the side) and their own blur is far below 0.4 %, so a soft portrait at its native sharpness is acceptable
  and the same portrait blurred by the poor amount is poor. Measured on the grader set (256 px, variance of
  the Laplacian in the central box, medians): clean astronaut 208, clean hopper 1551 -- the held-out portrait
  is the sharper one --, and the acceptable draws of the astronaut span both (noise and sharpening raise the
  statistic, softening lowers it).
* **Poor** images get one or two of: blur (above), bad light (exposure x0.2-0.5 or x1.7-2.6, or a colour cast
  of one channel x1.35-1.7), low resolution (above), bad framing (the face pushed 25-40 % of the side
  off-centre, or a x1.7-2.3 zoom on an off-centre corner), too far away (zoomed out to 35-55 % of the side on
  a plain, slightly noisy background).

``"wide"`` is "varied" with a wider acceptable class and bad light further out (:data:`WIDE_LIGHT`), for training
on one portrait and grading another: an acceptable photo's exposure is x0.7-1.4, its white balance x0.86-1.14 per
channel (three times in four) and its saturation x0.7-1.3 (half the time); unless the photo is to be badly framed
or too far away, half the photos are zoomed x1-1.5 about a point near the face's centre (cropping the top of the
head, the shoulders or the chin, as tight portraits do) and three in ten shifted by up to 6 % of the side; bad
light is an exposure of x0.12-0.4 or x2-3, or a one-channel cast of x1.65-2.2. Measured on the grader set's
portraits: hopper's clean renders are x0.84 the astronaut's brightness and redder (R/G 1.37 against 1.16), and
tightly framed (the cap cut by the top edge) -- inside the wide acceptable range, at the edge of the varied one.

``"narrow"`` is the earlier recipe (kept by option, ``--recipe narrow``): clean renders, with an acceptable
photo carrying only sub-threshold shifts (< 4 %), exposure x0.9-1.1 and a blur of sigma < 0.3 %; blurry from
sigma 0.6 %; no backgrounds, noise, JPEG or re-sampling. Weights trained before the option existed were trained
(and are evaluated) with it.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from synthtrial.graders.base import GraderError
from synthtrial.graders.classify import resize_square

EXPLANATIONS = ("bad_framing", "bad_light", "blurry", "low_resolution", "too_far")
RECIPES = ("varied", "wide", "narrow")
#: the largest blur an acceptable "varied" photo may carry, and where "blurry" starts (Gaussian sigma / side)
SOFT_MAX, BLUR_MIN = 0.004, 0.008
SCENE_KINDS = ("stripes", "gradient", "blocks", "texture")
#: "wide": an acceptable photo's exposure, white balance (x1 +- this per channel) and saturation; bad light's
#: under-exposure, over-exposure and one-channel cast, each kept apart from the acceptable range by a margin
WIDE_LIGHT = {"exposure": (0.7, 1.4), "balance": 0.14, "saturation": (0.7, 1.3),
              "poor": ((0.12, 0.4), (2.0, 3.0), (1.65, 2.2))}


def check_recipe(recipe: str, option: str = "--recipe") -> str:
    if recipe not in RECIPES:
        raise GraderError(f"{option} must be {', '.join(RECIPES[:-1])} or {RECIPES[-1]}, got {recipe!r}")
    return recipe


def plan_degradation(rng: np.random.Generator, p_clean: float = 0.35, recipe: str = "varied") -> dict[str, Any]:
    """A recipe: ``{"labels": (5,) 0/1, "steps": [(kind, params), ...]}``; poor iff any label is 1."""
    check_recipe(recipe)
    varied, wide = recipe in ("varied", "wide"), recipe == "wide"
    labels = np.zeros(len(EXPLANATIONS), np.int64)
    clean = rng.random() < p_clean
    if not clean:
        k = 1 if rng.random() < 0.7 else 2
        chosen = sorted(rng.choice(len(EXPLANATIONS), size=k, replace=False).tolist())
        if 0 in chosen and 4 in chosen:        # off-centre and zoomed-out are drawn as one or the other
            chosen.remove(int(rng.choice([0, 4])))
        labels[chosen] = 1
    steps = capture_before(rng, light=not labels[1], wide=wide) if varied else []
    if wide and not (labels[0] or labels[4]):
        steps += framing_steps(rng)
    if clean and not wide:
        steps += mild_steps(rng, varied)
    elif not clean:
        steps += poor_steps(rng, labels, BLUR_MIN if varied else 0.006, wide=wide)
    if varied:
        steps += capture_after(rng, soften=not (labels[2] or labels[3]))
    return {"labels": labels, "steps": steps}


def capture_before(rng: np.random.Generator, light: bool = True,
                   wide: bool = False) -> list[tuple[str, dict[str, float]]]:
    """"varied" / "wide": a new background and, unless the photo is to have bad light (whose exposure and cast must
    stay beyond their thresholds), an acceptable exposure and white balance ("wide": the wider :data:`WIDE_LIGHT`
    ranges and a saturation change)."""
    steps: list[tuple[str, dict[str, float]]] = []
    if rng.random() < 0.6:
        steps.append(("scene", {"kind": float(rng.integers(len(SCENE_KINDS))), "seed": float(rng.integers(2**31))}))
    if not light:
        return steps
    (lo, hi), balance = ((0.8, 1.25), 0.07) if not wide else (WIDE_LIGHT["exposure"], WIDE_LIGHT["balance"])
    steps.append(("exposure", {"gain": float(np.exp(rng.uniform(math.log(lo), math.log(hi))))}))
    if rng.random() < 0.5 or wide and rng.random() < 0.5:
        steps.append(("balance", {f"g{c}": rng.uniform(1 - balance, 1 + balance) for c in range(3)}))
    if wide and rng.random() < 0.5:
        steps.append(("saturation", {"gain": rng.uniform(*WIDE_LIGHT["saturation"])}))
    return steps


def framing_steps(rng: np.random.Generator) -> list[tuple[str, dict[str, float]]]:
    """"wide": an acceptable framing -- a small shift, or (half the time) a x1-1.5 zoom about a point near the
    face's centre (the upper middle of the photo), which crops the top of the head, the shoulders or the chin
    as tight portraits do while the face stays central (bad framing pushes it 25-40 % of the side off-centre, or
    zooms x1.7-2.3 on a corner)."""
    r = rng.random()
    if r < 0.5:
        return [("cutoff", {"zoom": rng.uniform(1.0, 1.5), "cx": rng.uniform(0.45, 0.55), "cy": rng.uniform(0.35, 0.55)})]
    if r < 0.8:
        return [("shift", {"dx": rng.uniform(-0.06, 0.06), "dy": rng.uniform(-0.06, 0.06)})]
    return []


def capture_after(rng: np.random.Generator, soften: bool) -> list[tuple[str, dict[str, float]]]:
    """"varied": acceptable softening (unless the photo is already blurry or low resolution), sharpening, sensor
    noise, JPEG."""
    steps: list[tuple[str, dict[str, float]]] = []
    if soften and rng.random() < 0.5:
        if rng.random() < 0.5:
            steps.append(("blur", {"sigma": rng.uniform(0.0, SOFT_MAX)}))
        else:
            steps.append(("lowres", {"factor": rng.uniform(1.25, 2.2), "nearest": 0.0}))
    if rng.random() < 1 / 3:
        steps.append(("sharpen", {"amount": rng.uniform(0.3, 2.0)}))
    if rng.random() < 0.5:
        steps.append(("noise", {"sigma": rng.uniform(1.0, 8.0), "seed": float(rng.integers(2**31))}))
    if rng.random() < 0.5:
        steps.append(("jpeg", {"quality": float(rng.integers(40, 96))}))
    return steps


def mild_steps(rng: np.random.Generator, varied: bool) -> list[tuple[str, dict[str, float]]]:
    """An acceptable photo's sub-threshold shift (both recipes) and, for "narrow", exposure and blur."""
    steps: list[tuple[str, dict[str, float]]] = []
    if rng.random() < 0.5:
        steps.append(("shift", {"dx": rng.uniform(-0.04, 0.04), "dy": rng.uniform(-0.04, 0.04)}))
    if varied:
        return steps
    if rng.random() < 0.5:
        steps.append(("exposure", {"gain": rng.uniform(0.9, 1.1)}))
    if rng.random() < 0.5:
        steps.append(("blur", {"sigma": rng.uniform(0.0, 0.003)}))
    return steps


def poor_steps(rng: np.random.Generator, labels: np.ndarray, blur_min: float,
               wide: bool = False) -> list[tuple[str, dict[str, float]]]:
    """The steps of the drawn explanation labels (module docstring; "wide": bad light from :data:`WIDE_LIGHT`)."""
    steps: list[tuple[str, dict[str, float]]] = []
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
        dark, bright, cast = WIDE_LIGHT["poor"] if wide else ((0.2, 0.5), (1.7, 2.6), (1.35, 1.7))
        if kind == 0:
            steps.append(("exposure", {"gain": rng.uniform(*dark)}))
        elif kind == 1:
            steps.append(("exposure", {"gain": rng.uniform(*bright)}))
        else:
            steps.append(("cast", {"channel": int(rng.integers(3)), "gain": rng.uniform(*cast)}))
    if labels[2]:
        if rng.random() < 0.5:
            steps.append(("blur", {"sigma": rng.uniform(blur_min, 0.02)}))
        else:
            steps.append(("motion", {"length": rng.uniform(0.03, 0.08), "angle": rng.uniform(0, 180)}))
    if labels[3]:
        steps.append(("lowres", {"factor": rng.uniform(5, 10), "nearest": float(rng.random() < 0.5)}))
    return steps


# ------------------------------------------------------------------------------------------ applying

def background_masks(image: np.ndarray, tolerance: float = 32.0, regions: int = 3) -> list[np.ndarray]:
    """Up to ``regions`` ``(H, W)`` float32 masks in [0, 1] of what touches the border in a uniform colour
    (backdrop, clothes): for each of the border's commonest colours (32-level colour bins holding at least
    8 % of the border pixels, the mean of the bin), the pixels joined (4-connected) to the border within
    ``tolerance`` (RGB distance) of it, edges softened by a 1 px Gaussian; a region under 2 % of the image is
    left out (a busy background stays as it is)."""
    f = image.astype(np.float32)
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    bins = (border // 32).astype(np.int64) @ np.array([64, 8, 1])
    counts = np.bincount(bins)
    taken = np.zeros(f.shape[:2], bool)
    masks = []
    for b in np.argsort(counts)[::-1][:regions]:
        if counts[b] < 0.08 * len(border):
            break
        near = (np.linalg.norm(f - border[bins == b].mean(axis=0), axis=2) < tolerance) & ~taken
        _, lab = cv2.connectedComponents(near.astype(np.uint8), connectivity=4)
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        mask = np.isin(lab, edge[edge > 0])
        if mask.mean() >= 0.02:
            taken |= mask
            masks.append(cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0))
    return masks


def scene(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3)`` float32 background of ``kind`` (stripes, gradient, blocks, texture) in random colours."""
    colours = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "stripes":
        n = int(rng.integers(2, 5))
        band = np.floor(along / (rng.uniform(0.03, 0.25) * min(h, w))).astype(np.int64) % n
        out = colours[band]
    elif kind == "gradient":
        t = ((along - along.min()) / max(float(np.ptp(along)), 1.0))[..., None]
        out = colours[0] * (1 - t) + colours[1] * t
    elif kind == "blocks":
        out = np.empty((h, w, 3), np.float32)
        out[:] = colours[0]
        for _ in range(int(rng.integers(4, 14))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.uniform(0.05, 0.5) * w), y0 + int(rng.uniform(0.05, 0.5) * h)
            out[y0:y1, x0:x1] = rng.uniform(0, 255, size=3)
    else:
        grid = int(rng.integers(3, 33))
        small = rng.uniform(0, 255, size=(grid, grid, 3)).astype(np.float32)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(out.astype(np.float32), (0, 0), 0.7)


def apply_degradation(image: np.ndarray, recipe: dict[str, Any], rng: np.random.Generator | None) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with the recipe's steps applied in order; same shape."""
    out = image.astype(np.float32)
    for kind, p in recipe["steps"]:
        out = FILTERS.get(kind, REFRAMES.get(kind, _unknown))(out, p, rng)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _unknown(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:  # pragma: no cover
    raise GraderError("unknown degradation step")


def _border_colour(out: np.ndarray) -> np.ndarray:
    return np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]]).mean(axis=0)


def _shift(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    h, w = out.shape[:2]
    m = np.float32([[1, 0, p["dx"] * w], [0, 1, p["dy"] * h]])
    return cv2.warpAffine(out, m, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=_border_colour(out).tolist())


def _cutoff(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    h, w = out.shape[:2]
    z, cx, cy = p["zoom"], p["cx"] * w, p["cy"] * h
    m = np.float32([[z, 0, w / 2 - z * cx], [0, z, h / 2 - z * cy]])
    return cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _zoomout(out: np.ndarray, p: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    h, w = out.shape[:2]
    canvas = np.empty_like(out)
    canvas[:] = _border_colour(out)
    noise = rng.normal(0, p["noise"], size=(h, w, 1)).astype(np.float32)
    canvas = canvas + cv2.GaussianBlur(noise, (0, 0), 3)[..., None]
    small = cv2.resize(out, (max(1, round(w * p["scale"])), max(1, round(h * p["scale"]))),
                       interpolation=cv2.INTER_AREA)
    y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    canvas[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    return canvas


def _scene(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    draw = np.random.default_rng(int(p["seed"]))
    for j, mask in enumerate(background_masks(out)):
        back = scene(SCENE_KINDS[(int(p["kind"]) + j) % len(SCENE_KINDS)], *out.shape[:2], draw)
        out = out * (1 - mask[..., None]) + back * mask[..., None]
    return out


def _blur(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    sigma = p["sigma"] * min(out.shape[:2])
    return cv2.GaussianBlur(out, (0, 0), sigma) if sigma >= 0.3 else out


def _motion(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    n = max(3, int(round(p["length"] * min(out.shape[:2]))) | 1)
    kernel = np.zeros((n, n), np.float32)
    kernel[n // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D((n / 2 - 0.5, n / 2 - 0.5), p["angle"], 1.0)
    kernel = cv2.warpAffine(kernel, rot, (n, n))
    return cv2.filter2D(out, -1, kernel / max(kernel.sum(), 1e-6), borderType=cv2.BORDER_REFLECT)


def _lowres(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    h, w = out.shape[:2]
    small = cv2.resize(out, (max(4, round(w / p["factor"])), max(4, round(h / p["factor"]))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST if p["nearest"] else cv2.INTER_LINEAR)


def _cast(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    out = out.copy()
    out[..., int(p["channel"])] *= p["gain"]
    return out


def _saturation(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    grey = out.mean(axis=2, keepdims=True)
    return grey + p["gain"] * (out - grey)


def _sharpen(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    return out + p["amount"] * (out - cv2.GaussianBlur(out, (0, 0), 1.0))


def _noise(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    return out + np.random.default_rng(int(p["seed"])).normal(0, p["sigma"], size=out.shape).astype(np.float32)


def _jpeg(out: np.ndarray, p: dict[str, float], rng: Any) -> np.ndarray:
    rgb = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(p["quality"])])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32)     # OpenCV codes BGR


#: steps that keep the framing
FILTERS = {"scene": _scene, "exposure": lambda out, p, rng: out * p["gain"], "cast": _cast,
           "balance": lambda out, p, rng: out * np.float32([p["g0"], p["g1"], p["g2"]]),
           "saturation": _saturation, "blur": _blur, "motion": _motion, "lowres": _lowres, "sharpen": _sharpen,
           "noise": _noise, "jpeg": _jpeg}
#: steps that move or scale the picture
REFRAMES = {"shift": _shift, "cutoff": _cutoff, "zoomout": _zoomout}


def degraded_set(bases: np.ndarray, seed: int, epoch: int, image_size: int,
                 recipe: str = "varied") -> tuple[np.ndarray, np.ndarray]:
    """One degraded copy of each base image (recipe from ``(seed, epoch, i)``), resized: ``(x, labels)``."""
    xs, ys = [], []
    for i, base in enumerate(bases):
        rng = np.random.default_rng([seed, epoch, i])
        plan = plan_degradation(rng, recipe=recipe)
        xs.append(resize_square(apply_degradation(base, plan, rng), image_size))
        ys.append(plan["labels"])
    return np.stack(xs), np.stack(ys)
