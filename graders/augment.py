"""Training augmentation shared by the learned graders: photometric and geometric, seeded, label-aware.

Built on ``torchvision.transforms.v2``; boxes and masks travel as ``tv_tensors`` beside the image, so every
geometric transform moves them with the lesions and no photometric one touches them.

Choices, stated once:

* **Why this wide.** The training set (``synthtrial graders dataset``) has two portraits, each with its own
  skin tone and light; a grader that may use either as a cue learns the face, not the lesions. So the
  photometric range is wide enough that each built-in portrait's mean skin colour (CIELAB) lies well inside
  the range the other's augmentations span (``tests/test_augment.py`` checks it), while keeping what makes a
  lesion visible: hue turns by at most 0.03 of a turn, so red lesions stay redder than the skin around them,
  every colour change acts on lesion and skin alike, and blur stays near a pixel.
* **Photometric** (:data:`WIDE`, each step with its probability): brightness, contrast and saturation
  (x0.65-1.35, x0.65-1.35, x0.5-1.5) and a hue turn (+-0.03, a rotation of the YIQ chroma plane: far cheaper
  than an HSV round trip) (0.8); gamma 0.7-1.4 (0.5); white balance, red x(1 + t) and blue x(1 - t) with
  t up to 0.2 (colour temperature) and green x(1 - g) with g up to 0.25 (tint) (0.8); light from one side,
  a linear ramp of up to +-20 % across half the image in a random direction (0.5); Gaussian blur, sigma
  0.1-1.2 px (0.2); Gaussian noise, sigma 0.02 (0.3); JPEG, quality 40-95 (0.3). A sharpness change
  (``sharpness_p``, off in :data:`WIDE`) is there for the detector's wider recipe, and so are skin texture and
  wrinkles (``texture_p``, ``wrinkles_p``, off in :data:`WIDE`): an older or sharper-photographed face has
  more fine structure in the skin than the portrait a grader was trained on (hopper's cheeks, measured at
  512 px: 2.3x astronaut's luminance contrast at ~1 px, 2.2x at ~2 px, 1.5x at ~4 px) and lines that are not
  lesions. :class:`SkinTexture` adds band-limited luminance noise (white noise blurred by a sigma drawn from
  ``texture_sigma``, its standard deviation uniform in 0-``texture``, the same on every channel, so it adds
  structure and no colour); :class:`Wrinkles` draws up to ``wrinkles`` thin wavy curves (1-3 px wide, 15-90 px
  long) in groups of up to six roughly parallel ones 4-12 px apart, each a dark furrow with a highlight of a
  third of its depth beside it, darkening by up to ``wrinkle_depth``. Both are in the images alone: a lesion
  under a wrinkle keeps its box, as it does on a real face.
* **Geometric**: a horizontal flip (0.5; faces are photographed upright, so no vertical flips), and with
  probability 0.7 a rotation of up to 10 degrees, a scale of x0.85-1.15 and a shift of up to 5 % of the side,
  bilinear, the uncovered border black. Masks are resampled nearest-neighbour (their values are kept).
* **Boxes** are those of round lesions: each travels as its four edge midpoints (``tv_tensors.KeyPoints``), and
  the box after the transform is centred on their mean with the distances between opposite midpoints as
  its sides, so a rotation moves and scales a lesion's box without inflating it (the enclosing box of a
  rotated box grows by up to 16 % at 10 degrees). A box whose centre leaves the image is dropped; one that
  reaches past the edge is clipped to it.
* **Label-safe** (:data:`FLIPS`): the horizontal flip alone, for ImageQX, whose labels (blurry, bad light,
  bad framing, low resolution, too far) any blur, darkening, shift or zoom could contradict; a mirror image
  keeps every one of them.
* **Seeded.** Each call takes a seed and runs under its own forked torch RNG (the global state is left as it
  was), so the same seed gives the same bytes and a training that draws the seeds from its own seeded
  stream resumes to the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from synthtrial.graders.base import GraderError

#: the largest seed a caller draws (a torch seed takes 64 bits; 31 keep it a plain int everywhere)
SEED_HIGH = 2**31 - 1


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of every transform (0 switches one off)."""

    hflip: float = 0.5
    affine_p: float = 0.7
    degrees: float = 10.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.05
    jitter_p: float = 0.8
    brightness: float = 0.35
    contrast: float = 0.35
    saturation: float = 0.5
    hue: float = 0.03
    gamma_p: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.4)
    white_balance_p: float = 0.8
    temperature: float = 0.2
    tint: float = 0.25
    light_p: float = 0.5
    light: float = 0.2
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.2)
    noise_p: float = 0.3
    noise_sigma: float = 0.02
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (40, 95)
    sharpness_p: float = 0.0
    sharpness: tuple[float, float] = (1.0, 1.0)
    texture_p: float = 0.0
    texture: float = 0.0
    texture_sigma: tuple[float, float] = (0.5, 2.0)
    wrinkles_p: float = 0.0
    wrinkles: int = 0
    wrinkle_depth: float = 0.0

    @property
    def photometric(self) -> bool:
        return any(p > 0 for p in (self.jitter_p, self.gamma_p, self.white_balance_p, self.light_p, self.blur_p,
                                   self.noise_p, self.jpeg_p, self.sharpness_p, self.texture_p, self.wrinkles_p))


#: the graders' augmentation (detector, DermX, IGA)
WIDE = AugmentConfig()
#: ImageQX's: a horizontal flip and nothing that could change a quality label
FLIPS = AugmentConfig(**{f.name: 0.0 for f in fields(AugmentConfig) if f.name.endswith("_p")})


def scaled(config: AugmentConfig, strength: float) -> AugmentConfig:
    """``config`` with every photometric range shrunk towards "no change" by ``strength`` (1: as given, 0: no
    colour, gamma, white-balance or light change at all); probabilities, blur, noise, JPEG and geometry stay.
    Measured on the IGA grader (256 crops, 120 steps): at WIDE's full colour range its losses did not fall,
    at 0.4 of it they did (``synthtrial graders train iga --augment-strength``)."""
    if not 0 <= strength <= 1:
        raise GraderError(f"--augment-strength (the augmentation's strength) must be in [0, 1], got {strength}")
    s = float(strength)
    return replace(config, brightness=config.brightness * s, contrast=config.contrast * s,
                   saturation=config.saturation * s, hue=config.hue * s, temperature=config.temperature * s,
                   tint=config.tint * s, light=config.light * s,
                   gamma=(1 - s * (1 - config.gamma[0]), 1 + s * (config.gamma[1] - 1)))


class ImageOnly(v2.Transform):
    """A photometric transform: ``apply(image, params)`` on images (plain tensors, float in [0, 1] unless
    said otherwise); masks, boxes and points pass untouched."""

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        return tv_tensors.wrap(self.apply(inpt.as_subclass(torch.Tensor), params), like=inpt)


class RandomGamma(ImageOnly):
    """``image ** gamma``, gamma uniform in ``gamma``."""

    def __init__(self, gamma: tuple[float, float]) -> None:
        super().__init__()
        self.gamma = gamma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gamma": float(torch.empty(1).uniform_(*self.gamma))}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return F.adjust_gamma(image, params["gamma"])


class HueShift(ImageOnly):
    """A hue rotation by up to +-``turn`` of a full turn, as a linear map in YIQ space (the chroma plane rotated
    about the luma axis; far cheaper than an HSV round trip), clipped."""

    RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

    def __init__(self, turn: float) -> None:
        super().__init__()
        self.turn = turn

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"angle": float(torch.empty(1).uniform_(-self.turn, self.turn)) * 2 * math.pi}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        c, s = math.cos(params["angle"]), math.sin(params["angle"])
        rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
        matrix = (torch.linalg.inv(self.RGB_TO_YIQ) @ rotate @ self.RGB_TO_YIQ).to(image.dtype)
        return torch.einsum("ij,...jhw->...ihw", matrix, image).clamp_(0, 1)


class WhiteBalance(ImageOnly):
    """A white-balance shift along both of its axes: colour temperature (red times ``1 + t``, blue times
    ``1 - t``, t uniform in +-``temperature``) and tint (green times ``1 - g``, g uniform in +-``tint``: magenta
    to green), clipped."""

    def __init__(self, temperature: float, tint: float) -> None:
        super().__init__()
        self.temperature, self.tint = temperature, tint

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"t": float(torch.empty(1).uniform_(-self.temperature, self.temperature)),
                "g": float(torch.empty(1).uniform_(-self.tint, self.tint))}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        gains = torch.tensor([1 + params["t"], 1 - params["g"], 1 - params["t"]], dtype=image.dtype)
        return (image * gains.view(3, 1, 1)).clamp_(0, 1)


class LightGradient(ImageOnly):
    """Light from one side: the image times a linear ramp ``1 + k * d``, d the signed distance from the centre
    along a random direction in half image widths and k uniform in 0-``strength``, clipped."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        draws = torch.rand(2)
        return {"k": float(draws[0]) * self.strength, "angle": float(draws[1]) * 2 * math.pi}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        h, w = image.shape[-2:]
        half = max(h, w) / 2
        ys = (torch.arange(h, dtype=image.dtype) - (h - 1) / 2) / half
        xs = (torch.arange(w, dtype=image.dtype) - (w - 1) / 2) / half
        ramp = 1 + params["k"] * (xs[None, :] * math.cos(params["angle"]) + ys[:, None] * math.sin(params["angle"]))
        return (image * ramp).clamp_(0, 1)


class RandomSharpness(ImageOnly):
    """Sharpness times a factor uniform in ``factor`` (torchvision's ``adjust_sharpness``: below 1 softer, above 1
    crisper, so skin texture and wrinkles are no cue either way)."""

    def __init__(self, factor: tuple[float, float]) -> None:
        super().__init__()
        self.factor = factor

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"factor": float(torch.empty(1).uniform_(*self.factor))}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return F.adjust_sharpness(image, params["factor"])


class SkinTexture(ImageOnly):
    """Band-limited luminance noise (see the module docstring): white noise blurred by a sigma uniform in
    ``sigma``, scaled to a standard deviation uniform in 0-``amplitude``, added to every channel alike."""

    def __init__(self, amplitude: float, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.amplitude, self.sigma = amplitude, sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        draws = torch.rand(2)
        return {"std": float(draws[0]) * self.amplitude,
                "sigma": self.sigma[0] + float(draws[1]) * (self.sigma[1] - self.sigma[0]),
                "seed": int(torch.randint(0, SEED_HIGH, ()))}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        sigma = params["sigma"]
        size = 2 * math.ceil(3 * sigma) + 1
        noise = torch.randn(1, *image.shape[-2:], generator=torch.Generator().manual_seed(params["seed"]))
        field = F.gaussian_blur(noise, [size, size], [sigma, sigma])
        field = field * (params["std"] / field.std().clamp_min(1e-8))
        return (image + field.to(image.dtype)).clamp_(0, 1)


class Wrinkles(ImageOnly):
    """Groups of roughly parallel, wavy furrows (see the module docstring), up to ``count`` curves in all, each
    darkening the image by up to ``depth`` with a highlight of a third of that just beside it."""

    def __init__(self, count: int, depth: float) -> None:
        super().__init__()
        self.count, self.depth = int(count), float(depth)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        curves = []
        for _ in range(int(torch.randint(1, max(2, self.count // 4) + 1, ()))):      # groups
            start = torch.rand(2).tolist()                                               # fractions of w, h
            g = torch.rand(5).tolist()                   # shared by the group: direction, spacing, bend, wave
            angle, gap = g[0] * 2 * math.pi, 4 + g[1] * 8
            for k in range(int(torch.randint(1, 7, ()))):
                if len(curves) == self.count:
                    break
                d = torch.rand(4).tolist()
                curves.append({"start": start, "offset": k * gap, "angle": angle + (d[0] - 0.5) * 0.15,
                               "bend": (g[2] - 0.5) * 1.5, "wave": g[3] * 0.4, "phase": g[4] * 2 * math.pi,
                               "length": 15 + d[1] * 75, "width": 1 + d[2] * 2,
                               "depth": (0.3 + 0.7 * d[3]) * self.depth})
        return {"curves": curves}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        h, w = image.shape[-2:]
        furrows, highlights = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
        t = np.linspace(0, 1, 16)
        for c in params["curves"]:
            heading = c["angle"] + c["bend"] * t + c["wave"] * np.sin(4 * math.pi * t + c["phase"])
            step = c["length"] / (len(t) - 1)
            nx, ny = -math.sin(c["angle"]), math.cos(c["angle"])                    # across the group
            x = c["start"][0] * w + nx * c["offset"] + np.concatenate([[0], np.cumsum(np.cos(heading[:-1]) * step)])
            y = c["start"][1] * h + ny * c["offset"] + np.concatenate([[0], np.cumsum(np.sin(heading[:-1]) * step)])
            line = np.stack([x, y], 1)
            width = max(1, round(c["width"]))
            for target, shift, value in ((furrows, 0.0, c["depth"]), (highlights, c["width"], c["depth"] / 3)):
                points = np.round((line + shift * np.array([nx, ny])) * 4).astype(np.int32)[None]  # 2 fraction bits
                cv2.polylines(target, points, False, value, width, cv2.LINE_AA, shift=2)
        shade = highlights - furrows
        factor = torch.from_numpy(1 + cv2.GaussianBlur(shade, (0, 0), 0.8).clip(-0.9, 0.5))
        return (image * factor.to(image.dtype)).clamp_(0, 1)


class RandomJPEG(ImageOnly):
    """A JPEG round trip (OpenCV) of a uint8 image at a quality uniform in ``quality`` (torchvision's own
    ``v2.JPEG`` goes through ``torchvision.io``, deprecated from 0.29 on)."""

    def __init__(self, quality: tuple[int, int]) -> None:
        super().__init__()
        self.quality = quality

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"quality": int(torch.randint(self.quality[0], self.quality[1] + 1, ()))}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        _, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, params["quality"]])
        decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
        return torch.from_numpy(np.ascontiguousarray(decoded)).permute(2, 0, 1)


def build_pipeline(config: AugmentConfig) -> v2.Compose:
    """The ``v2`` pipeline of ``config``: uint8 image in, uint8 image out (float in between only where a
    transform needs it)."""
    c = config
    geometric: list[Any] = [v2.RandomHorizontalFlip(c.hflip)] if c.hflip > 0 else []
    if c.affine_p > 0:
        affine = v2.RandomAffine(c.degrees, translate=(c.translate, c.translate), scale=c.scale,
                                 interpolation=v2.InterpolationMode.BILINEAR)
        geometric.append(v2.RandomApply([affine], p=c.affine_p))
    if not c.photometric:
        return v2.Compose(geometric)
    blur_kernel = 2 * math.ceil(3 * c.blur_sigma[1]) + 1
    steps = [
        (c.jitter_p, v2.Compose([v2.ColorJitter(brightness=c.brightness, contrast=c.contrast,
                                                saturation=c.saturation), HueShift(c.hue)])),
        (c.gamma_p, RandomGamma(c.gamma)),
        (c.white_balance_p, WhiteBalance(c.temperature, c.tint)),
        (c.light_p, LightGradient(c.light)),
        (c.blur_p, v2.GaussianBlur(blur_kernel, sigma=c.blur_sigma)),
        (c.sharpness_p, RandomSharpness(c.sharpness)),
        (c.wrinkles_p, Wrinkles(c.wrinkles, c.wrinkle_depth)),
        (c.texture_p, SkinTexture(c.texture, c.texture_sigma)),
        (c.noise_p, v2.GaussianNoise(sigma=c.noise_sigma, clip=True)),
    ]
    photometric = [v2.RandomApply([t], p=p) for p, t in steps if p > 0]
    tail = [v2.RandomApply([RandomJPEG(c.jpeg_quality)], p=c.jpeg_p)] if c.jpeg_p > 0 else []
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), *geometric, *photometric,
                       v2.ToDtype(torch.uint8, scale=True), *tail])


class Augmenter:
    """``config`` applied to one training sample at a time: an image alone, with boxes, or with masks."""

    def __init__(self, config: AugmentConfig = WIDE) -> None:
        self.config = config
        self.pipeline = build_pipeline(config)

    def run(self, seed: int, *inputs: Any) -> Any:
        """The pipeline on ``inputs`` under a torch RNG forked and seeded with ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.pipeline(*inputs)

    def image(self, image: np.ndarray, seed: int) -> np.ndarray:
        """An ``(H, W, 3)`` uint8 image, augmented (same shape)."""
        out = self.run(seed, _image(image))
        return _array(out)

    def images(self, images: np.ndarray, seeds: Any) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 images, each with its own seed."""
        return np.stack([self.image(im, s) for im, s in zip(images, np.asarray(seeds).tolist())]) \
            if len(images) else images

    def with_masks(self, image: np.ndarray, masks: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """An ``(H, W, 3)`` uint8 image and its ``(C, H, W)`` masks (any dtype), moved together."""
        out, moved = self.run(seed, _image(image), tv_tensors.Mask(torch.from_numpy(_writable(masks))))
        return _array(out), moved.as_subclass(torch.Tensor).numpy()

    def with_boxes(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                   seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An ``(H, W, 3)`` uint8 image with its ``(K, 4)`` x0, y0, x1, y1 boxes of round lesions and their
        labels: the boxes moved with the image (see the module docstring); dropped ones leave their label."""
        h, w = image.shape[:2]
        b = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4)
        if not len(b):
            return self.image(image, seed), np.zeros((0, 4), np.float32), np.asarray(labels)[:0]
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        mids = torch.stack([torch.stack(p, 1) for p in ((b[:, 0], cy), (b[:, 2], cy), (cx, b[:, 1]), (cx, b[:, 3]))],
                           1)
        # key points are pixel indices (pixel k spans k-0.5 .. k+0.5); box edges are continuous (pixel k: k .. k+1)
        points = tv_tensors.KeyPoints(mids.reshape(-1, 2) - 0.5, canvas_size=(h, w))
        out, points = self.run(seed, _image(image), points)
        p = points.as_subclass(torch.Tensor).reshape(-1, 4, 2) + 0.5
        centre = p.mean(dim=1)
        half_w = (p[:, 1] - p[:, 0]).norm(dim=1) / 2
        half_h = (p[:, 3] - p[:, 2]).norm(dim=1) / 2
        moved = torch.stack([centre[:, 0] - half_w, centre[:, 1] - half_h, centre[:, 0] + half_w,
                             centre[:, 1] + half_h], 1)
        keep = (centre[:, 0] >= 0) & (centre[:, 0] < w) & (centre[:, 1] >= 0) & (centre[:, 1] < h)
        moved = moved[keep]
        moved[:, 0::2] = moved[:, 0::2].clamp(0, w)
        moved[:, 1::2] = moved[:, 1::2].clamp(0, h)
        return _array(out), moved.numpy().astype(np.float32), np.asarray(labels)[keep.numpy()]


def draw_seeds(n: int, rng: np.random.Generator | torch.Generator) -> np.ndarray:
    """``n`` per-sample seeds from a training step's own seeded stream (NumPy or torch)."""
    if isinstance(rng, torch.Generator):
        return torch.randint(0, SEED_HIGH, (n,), generator=rng).numpy()
    return rng.integers(0, SEED_HIGH, n)


def _writable(array: np.ndarray) -> np.ndarray:
    """``array`` itself when it is C-contiguous and writable (torch warns on read-only arrays), else a copy."""
    return np.require(array, requirements=["C", "W"])


def _image(image: np.ndarray) -> tv_tensors.Image:
    return tv_tensors.Image(torch.from_numpy(_writable(image)).permute(2, 0, 1))


def _array(image: Any) -> np.ndarray:
    return np.ascontiguousarray(image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy())
