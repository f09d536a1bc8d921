"""The lesion atlas: every lesion type at every stage of its life on light, medium and dark skin, magnified,
with a millimetre scale bar -- the figure a dermatologist checks first (``synthtrial atlas``).

Each tile is a square of skin :data:`FIELD_MM` millimetres across with one lesion in its centre, drawn by the
same renderer and settings as ``generate`` (:func:`synthtrial.render.procedural.render_config`), at the lesion model's
sizes (:data:`synthtrial.lesions.course.DIAMETER_MM`, a typical diameter per type) and at the intensity and size the
lesion model gives each stage: onset (growing), active (full), resolving (fading), residual (what it
leaves: a post-inflammatory mark after a papule or pustule, an atrophic scar in a fading mark after a
nodule; comedones clear without a mark).

Choices: the skin is a synthetic swatch, not a photograph -- a base colour of the Fitzpatrick type's
typical CIELAB values (light ~ II, medium ~ IV, dark ~ VI; Chardon A et al., Skin colour typology and
suntanning pathways, Int J Cosmet Sci 1991;13:191-208, for the ITA bands), low-frequency mottling, follicular
pores about 0.5 mm apart and sensor grain, lit from the upper left. A swatch is all skin, so its colour is
the skin's own, not a recolouring of a portrait; the atlas shows how lesions look on each skin, not a
patient. It is magnified: :data:`MM_PER_PX` = 0.08 mm per pixel (about 5x a 512-pixel face photo).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from synthtrial.util.atomic import write_bytes_atomic
from synthtrial.util.errors import SynthtrialError
from synthtrial.lesions.course import ACTIVE_TYPES, MARK_SPREAD, drawn_radius
from synthtrial.render.base import LesionSpec, PhotoStats
from synthtrial.util.seeding import derived_rng

__all__ = ["AtlasError", "STAGES", "SKINS", "Atlas", "render_atlas", "write_atlas"]

STAGES = ("onset", "active", "resolving", "residual")
#: Skin swatches as CIELAB (L*, a*, b*): light ~ Fitzpatrick II, medium ~ IV, dark ~ VI.
SKINS = {"light": (70.0, 11.0, 16.0), "medium": (54.0, 14.0, 22.0), "dark": (32.0, 10.0, 13.0)}
#: The diameter (mm) each type is shown at: typical, inside the lesion model's range.
ATLAS_DIAMETER_MM = {"open_comedo": 1.5, "closed_comedo": 2.0, "papule": 3.5, "pustule": 3.5, "nodule": 7.0}
#: Intensity of each stage (the lesion model's growth and fading ramps at their midpoints).
STAGE_INTENSITY = {"onset": 0.5, "active": 1.0, "resolving": 0.35}
MM_PER_PX = 0.08
FIELD_MM = 12.8
LABELS = {"open_comedo": "open comedo", "closed_comedo": "closed comedo", "papule": "papule",
          "pustule": "pustule", "nodule": "nodule"}
LIGHT = (-0.6, -0.8)   # towards the light: upper left
SCALE_BAR_MM = 5.0


class AtlasError(SynthtrialError):
    """The atlas cannot be written (bad output path or format)."""


@dataclass
class Atlas:
    """The atlas picture and one row per tile: skin, type, stage, what is drawn, and its size."""

    image: np.ndarray      # (H, W, 3) uint8 RGB
    cells: pd.DataFrame    # skin, type, stage, drawn (types drawn, "+"-joined; "" when clear), diameter_mm,
                           # radius_px, x, y (the tile's top-left corner in the picture), changed_px


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def skin_swatch(skin: str, size: int, seed: int = 0, mm_per_px: float = MM_PER_PX) -> np.ndarray:
    """A square of synthetic skin (uint8 RGB): base colour, mottling, pores, grain, a gentle light gradient."""
    base = np.array(SKINS[skin], np.float32)
    rng = derived_rng("atlas-skin", skin, size, seed)
    lab = np.empty((size, size, 3), np.float32)
    lab[:] = base

    def smooth_noise(sigma_mm: float) -> np.ndarray:
        n = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma_mm / mm_per_px)
        return n / max(float(n.std()), 1e-6)

    mottle = smooth_noise(1.5) * 0.7 + smooth_noise(0.4) * 0.35
    scale = base[0] / 70.0                       # darker skin: smaller absolute lightness variation
    lab[..., 0] += 1.6 * scale * mottle
    lab[..., 1] += 0.8 * smooth_noise(1.0)
    # follicular openings: small soft dark dots on a jittered grid ~0.5 mm apart
    pores = np.zeros((size, size), np.float32)
    step = 0.5 / mm_per_px
    k = int(size / step) + 2
    centres = (np.stack(np.meshgrid(np.arange(k), np.arange(k)), -1).reshape(-1, 2) + 0.5) * step
    centres += rng.uniform(-0.5, 0.5, centres.shape) * step
    depth = rng.uniform(0.2, 1.0, len(centres)) * (rng.random(len(centres)) < 0.7)
    for (x, y), d in zip(centres, depth):
        xi, yi = int(x), int(y)
        if 0 <= xi < size and 0 <= yi < size:
            pores[yi, xi] += d
    pores = cv2.GaussianBlur(pores, (0, 0), 0.05 / mm_per_px) * (2 * math.pi * (0.05 / mm_per_px) ** 2)
    lab[..., 0] -= 5.0 * scale * pores
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) - size / 2) / size
    lab[..., 0] += 2.5 * scale * (LIGHT[0] * xx + LIGHT[1] * yy)   # brighter towards the light
    rgb = _lab_to_rgb(lab).astype(np.float32)
    rgb += 1.5 * (0.8 * rng.standard_normal((size, size, 1)) + 0.45 * rng.standard_normal((size, size, 3)))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _cell_lesions(kind: str, stage: str, px: float, mm_per_px: float, seed: int) -> list[LesionSpec]:
    d = ATLAS_DIAMETER_MM[kind]
    c = px / 2

    def spec(i: int, t: str, diameter: float, intensity: float) -> LesionSpec:
        radius_mm = drawn_radius(t, diameter, intensity) * _ipd_mm()
        return LesionSpec(i, t, c, c, radius_mm / mm_per_px, intensity, seed)

    if stage in STAGE_INTENSITY:
        return [spec(0, kind, d, STAGE_INTENSITY[stage])]
    if kind in ("papule", "pustule"):
        return [spec(0, "mark", MARK_SPREAD * d, 0.8)]
    if kind == "nodule":
        return [spec(0, "mark", MARK_SPREAD * d, 0.45), spec(1, "scar", min(0.6 * d, 4.0), 1.0)]
    return []   # comedones clear without a mark


def _ipd_mm() -> float:
    from synthtrial.face.faces import ADULT_IPD_MM

    return ADULT_IPD_MM


def render_atlas(seed: int = 0, mm_per_px: float = MM_PER_PX, field_mm: float = FIELD_MM) -> Atlas:
    """Render the atlas: one block per skin (columns: stages; rows: lesion types), labelled, with scale bars."""
    from PIL import Image, ImageDraw, ImageFont

    from synthtrial.render.procedural import ProceduralRenderer, render_config

    if not 0.005 <= mm_per_px <= 0.5:
        raise AtlasError(f"mm_per_px must be between 0.005 and 0.5, got {mm_per_px}")
    tile = int(round(field_mm / mm_per_px))
    if not 48 <= tile <= 1024:
        raise AtlasError(f"a tile of {field_mm} mm at {mm_per_px} mm/px is {tile} px; keep it between 48 and 1024")
    renderer = ProceduralRenderer(render_config())
    gap, left, top, head, foot = 6, 118, 28, 40, 40
    block_w = len(STAGES) * tile + (len(STAGES) - 1) * gap
    width = left + len(SKINS) * block_w + (len(SKINS) - 1) * 3 * gap + gap
    height = top + head + len(ACTIVE_TYPES) * tile + (len(ACTIVE_TYPES) - 1) * gap + foot
    sheet = np.full((height, width, 3), 255, np.uint8)
    rows = []
    mask = np.ones((tile, tile), bool)
    for b, skin in enumerate(SKINS):
        bx = left + b * (block_w + 3 * gap)
        for r, kind in enumerate(ACTIVE_TYPES):
            swatch = skin_swatch(skin, tile, seed=seed * 31 + r, mm_per_px=mm_per_px)
            for c, stage in enumerate(STAGES):
                lesion_seed = int(derived_rng("atlas-lesion", seed, kind).integers(1 << 31))
                specs = _cell_lesions(kind, stage, tile, mm_per_px, lesion_seed)
                stats = PhotoStats(LIGHT, 1.5, 0.7, tuple(float(v) for v in swatch[tile // 2, tile // 2]))
                result = renderer(swatch, specs, skin_mask=mask, stats=stats, seed=seed)
                x, y = bx + c * (tile + gap), top + head + r * (tile + gap)
                sheet[y:y + tile, x:x + tile] = result.image
                rows.append({"skin": skin, "type": kind, "stage": stage,
                             "drawn": "+".join(s.type for s in specs),
                             "diameter_mm": ATLAS_DIAMETER_MM[kind] if specs else 0.0,
                             "radius_px": max((s.radius_px for s in specs), default=0.0), "x": x, "y": y,
                             "changed_px": int((result.image != swatch).any(axis=2).sum())})

    im = Image.fromarray(sheet)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    draw.text((left, 6), f"synthtrial lesion atlas: {field_mm:g} mm of skin per tile ({mm_per_px:g} mm/pixel); "
              "rows: lesion type at its typical diameter; columns: stage of its life", fill=(0, 0, 0), font=font)
    for b, skin in enumerate(SKINS):
        bx = left + b * (block_w + 3 * gap)
        draw.text((bx, top + 2), f"{skin} skin", fill=(0, 0, 0), font=font)
        for c, stage in enumerate(STAGES):
            draw.text((bx + c * (tile + gap) + 4, top + head - 16), stage, fill=(60, 60, 60), font=small)
        # scale bar under the block
        bar = SCALE_BAR_MM / mm_per_px
        y = height - foot + 14
        draw.rectangle((bx, y, bx + bar, y + 5), fill=(0, 0, 0))
        draw.text((bx + bar + 8, y - 5), f"{SCALE_BAR_MM:g} mm", fill=(0, 0, 0), font=small)
    for r, kind in enumerate(ACTIVE_TYPES):
        y = top + head + r * (tile + gap) + tile // 2 - 14
        draw.text((6, y), LABELS[kind], fill=(0, 0, 0), font=font)
        draw.text((6, y + 16), f"{ATLAS_DIAMETER_MM[kind]:g} mm", fill=(90, 90, 90), font=small)
        residue = {"papule": "mark", "pustule": "mark", "nodule": "scar + mark"}.get(kind, "clears")
        draw.text((6, y + 30), f"residual: {residue}", fill=(90, 90, 90), font=small)
    return Atlas(np.asarray(im), pd.DataFrame(rows))


def write_atlas(out: str | Path, seed: int = 0, mm_per_px: float = MM_PER_PX) -> Atlas:
    """Render the atlas and write it to ``out`` (.png or .jpg/.jpeg), atomically."""
    from PIL import Image

    path = Path(out)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    if fmt is None:
        raise AtlasError(f"{path}: the atlas is written as .png, .jpg or .jpeg (option --out)")
    if path.exists() and not path.is_file():
        raise AtlasError(f"{path} exists and is not a file (option --out)")
    if not path.parent.exists() and path.parent != Path(""):
        raise AtlasError(f"{path.parent}: no such folder (option --out)")
    atlas = render_atlas(seed=seed, mm_per_px=mm_per_px)
    buf = io.BytesIO()
    options = {"optimize": True} if fmt == "PNG" else {"quality": 90}
    Image.fromarray(atlas.image).save(buf, format=fmt, **options)
    write_bytes_atomic(path, buf.getvalue())
    return atlas
