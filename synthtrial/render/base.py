"""The renderer interface: what every backend takes (:class:`RenderRequest`) and gives (:class:`RenderResult`),
one protocol (:class:`Renderer`), and the registry from which ``generate --backend`` and the run's recorded
config are derived.

A backend is built from plain-data settings by its registry entry; components it needs (the diffusion
backends' procedural lesion map, say) are passed in already configured, and a default is built only when
none is given, as torchvision's detectors take their heads.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["BACKENDS", "BackendSpec", "LesionSpec", "PhotoStats", "RenderRequest", "RenderResult", "Renderer",
           "backend_names", "check_image", "circle_box", "get_backend", "skin_weight"]


@dataclass(frozen=True)
class LesionSpec:
    """One lesion as drawn on one image."""

    lesion_id: int
    type: str            # one of LESION_TYPES ("mark" = post-inflammatory erythema/hyperpigmentation, flat; "scar" = atrophic pit)
    cx: float            # centre, pixels (x to the right, y down)
    cy: float
    radius_px: float     # radius of the lesion body; inflamed types also get an erythema halo beyond it
    intensity: float = 1.0   # 0-1: phase of its life (growing / resolving lesions are fainter and smaller)
    seed: int = 0        # stable per lesion across days, so its irregular shape stays the same every day


@dataclass(frozen=True)
class PhotoStats:
    """What a lesion must match to sit in this photo: light, noise, sharpness, skin tone."""

    light_direction: tuple[float, float]   # unit 2-D vector in image coords pointing TOWARDS the light
    noise_sigma: float                      # std of the sensor noise on skin, in 0-255 units
    blur_sigma: float                       # Gaussian sigma (px) that matches the photo's sharpness
    skin_rgb: tuple[float, float, float]    # median skin colour


@dataclass
class RenderResult:
    """The rendered image with one instance mask and box per lesion, in the order given."""

    image: np.ndarray    # (H, W, 3) uint8 RGB
    masks: np.ndarray    # (N, H, W) bool instance masks, in the order the lesions were given
    boxes: np.ndarray    # (N, 4) float64 x0, y0, x1, y1 (tight around each mask; clipped to the image)


@dataclass(frozen=True)
class RenderRequest:
    """One image to render: the face photo (in its view), its skin, the day's lesions and the seeds."""

    image: np.ndarray                  # (H, W, 3) uint8 RGB face photo
    lesions: Sequence[LesionSpec]
    skin_mask: np.ndarray              # (H, W) bool / integer (skin > 0) / float weights in [0, 1]
    stats: PhotoStats | None = None    # one PhotoStats for a whole series: every day under the same light
    seed: int = 0                      # the image's seed (grain, diffusion noise)
    severity: float = 0.0              # latent severity of the day (diffusion backends pick a level from it)


@runtime_checkable
class Renderer(Protocol):
    """Every backend: ``render_batch(requests) -> list[RenderResult]``, one result per request, in order.

    The masks and boxes of a result are the lesions' ground truth on that image; a backend that cannot
    control lesion placement (img2img) returns the lesion map it was asked for and says so in its spec.
    """

    def render_batch(self, requests: Sequence[RenderRequest]) -> list[RenderResult]: ...


@dataclass(frozen=True)
class BackendSpec:
    """A registry entry: the name users type, where the builder lives, and what the backend does."""

    name: str
    builder: str                       # "module:function"; ``function(procedural_config, options) -> Renderer``
    summary: str
    placement_exact: bool = True       # masks are exact ground truth of what is drawn
    options: tuple[str, ...] = field(default_factory=tuple)   # generate options it accepts

    def build(self, procedural_config: Any, options: dict[str, Any] | None = None) -> Renderer:
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)(procedural_config, dict(options or {}))


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("procedural", "synthtrial.render.procedural:build_backend",
                "the fast CPU lesion renderer"),
    BackendSpec("sdxl-img2img", "synthtrial.render.diffusion:build_img2img",
                "the anchor's SDXL img2img with per-level LoRA (lesion placement not controlled)",
                placement_exact=False, options=("model", "lora", "diffusion")),
    BackendSpec("sdxl-inpaint", "synthtrial.render.diffusion:build_inpaint",
                "the procedural lesion map, repainted by SDXL inpainting inside the dilated lesion masks only",
                options=("model", "lora", "diffusion")),
)}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def get_backend(name: str) -> BackendSpec:
    from synthtrial.util.errors import SynthtrialError

    if name not in BACKENDS:
        raise SynthtrialError(f"--backend must be one of {', '.join(BACKENDS)}, got '{name}'")
    return BACKENDS[name]


# ------------------------------------------------------------------------------------- shared checks

def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a NumPy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")


def skin_weight(skin_mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Skin mask as float32 weights in [0, 1]; bool / integer masks mean skin where > 0."""
    if not isinstance(skin_mask, np.ndarray):
        raise ValueError(f"skin_mask must be a NumPy array, got {type(skin_mask).__name__}")
    if skin_mask.shape != shape:
        raise ValueError(f"skin_mask shape {skin_mask.shape} does not match the image's {shape}")
    if skin_mask.dtype == bool or skin_mask.dtype.kind in "iu":
        return (skin_mask > 0).astype(np.float32)
    if skin_mask.dtype.kind == "f":
        if not np.isfinite(skin_mask).all():
            raise ValueError("skin_mask contains non-finite values")
        return np.clip(skin_mask, 0, 1).astype(np.float32)
    raise ValueError(f"skin_mask must be bool, integer or float, got dtype {skin_mask.dtype}")


def circle_box(les: LesionSpec, w: int, h: int) -> tuple[float, float, float, float]:
    """The spec circle's box clipped to the image: the box of a lesion whose mask is empty."""
    r, cx, cy = float(les.radius_px), float(les.cx), float(les.cy)
    return (min(max(cx - r, 0.0), w), min(max(cy - r, 0.0), h), min(max(cx + r, 0.0), w), min(max(cy + r, 0.0), h))
