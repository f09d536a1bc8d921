"""Visibility of each lesion on the image as written: its colour contrast to the skin around it and its size.

The ground truth has two levels. The simulated lesions are all the lesions the course says a face carries; the
*visible* ones are those that the written image shows. :func:`measure_visibility` measures, for every lesion
of an image, on the image's RGB pixels and its 16-bit instance mask (``lesion_id + 1``, 0 = no lesion) — so it
works the same for every backend, on exactly the bytes a grader reads:

* ``area_px``: the pixels the lesion holds in the instance mask (its rendered mask less any pixels a lesion
  drawn later covers; 0 for a lesion with an empty mask, e.g. one turned away from the camera in a side view
  or too faint to have a mask). Equal to ``lesions.parquet``'s ``mask_area`` (the rendered mask) unless
  masks overlap, as they can in a side view.
* ``contrast``: the CIE 1976 colour difference ΔE*ab (``skimage.color.deltaE_cie76``) between the mean CIELAB
  colour (D65, ``skimage.color.rgb2lab``) of the lesion's pixels and that of a ring of lesion-free skin
  around it: the pixels within :data:`RING_PX` pixels of the lesion (a dilation by a disk of that radius)
  that belong to no lesion's mask and lie on the skin, where the skin mask is known. Where that ring holds
  fewer than :data:`MIN_RING_PX` pixels (a lesion walled in by its neighbours or by the skin's edge), the ring
  is widened once to :data:`WIDE_RING_PX`; where even that holds too few, or the mask is empty, the contrast
  is unknown (NaN). ΔE76 rather than CIEDE2000 because the just-noticeable difference below is stated in it.
  The ring of an inflammatory lesion lies in its own erythema halo, so the contrast is that of the lesion
  against its immediate surround: what sets it apart as an object in the picture.
* ``signal``: ΔE76 between the mean CIELAB colour of the lesion's pixels on the written image and that of the
  same pixels on its lesion-free *reference* -- the photo the lesions were drawn onto, where the backend leaves
  that photo untouched outside the lesions' footprints (``draws_onto_photo``: the procedural renderer does;
  an img2img or inpainting backend does not, and its ``signal`` is unknown, NaN). It is what the lesion itself
  changed. The contrast alone cannot tell a lesion from the skin's texture under it: on a textured face a
  lesion that changed nothing can sit on a pale pore or beside a wrinkle and pass the contrast rule. Measured
  on the grader set's held-out Hopper split (``graders dataset --seed 0``, test_portrait, 600 images), with the
  fainter closed comedones and scars the renderer drew before 2026-12-07: by the contrast alone 39 % of closed
  comedones and 17 % of scars were visible there, against 1-3 % on the smooth astronaut portrait, and enlarged
  crops of those "visible" ones mostly show wrinkles and pores, not the lesion; their signal is median 4.1 and
  1.7. With the signal 14 % and 0 % are; papules, pustules, nodules
  and open comedones lose 1-6 points (inflammatory lesions change their pixels by a median 9-19).
* ``visible``: ``contrast >= VISIBLE_DELTA_E``, ``signal >= VISIBLE_DELTA_E`` (where it is known) and
  ``area_px >= MIN_AREA_PX``: the lesion changed its pixels, and stands out of the skin around it, by about
  twice the JND each. Thresholds:
  :data:`VISIBLE_DELTA_E` = 5.0. The just-noticeable difference of CIELAB ΔE*ab is about 2.3 (Sharma,
  *Digital Color Imaging Handbook*, 2003, after Mahy et al. 1994), but that holds for uniform patches side by
  side; skin has pores, shading and grain. Measured with these very masks and rings on the portraits before
  any lesion is drawn (protocols quick.csv and views.csv, 5,207 lesion spots), lesion-free skin already shows
  a ΔE of 1.5 (median), 5.1 (95th percentile; astronaut 3.4, Hopper 8.3): at 2.3 a quarter of spots with
  nothing drawn would pass as visible lesions, at 5.0 about one in twenty. So a visible lesion differs from
  its surround by about twice the JND, more than the skin's own texture does at 19 spots out of 20.
  :data:`MIN_AREA_PX` = 4 pixels (a 2 x 2 block): a smaller mark is one or two pixels, the scale of the
  photo's grain and demosaicing, and no detector can tell it from noise. The contrast is stored beside the
  flag, so another rule is a filter away.

``generate`` calls it where it writes each image and its mask, and stores ``area_px``, ``contrast`` and
``visible`` per lesion in ``lesions.parquet``; counting ``visible`` lesions by type gives the manifest's visible
counts (``visible_count``: active lesions, as ``lesion_count``; ``n_visible_<type>``) beside the simulated ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MIN_AREA_PX", "MIN_RING_PX", "RING_PX", "VISIBILITY_COLUMNS", "VISIBLE_DELTA_E", "WIDE_RING_PX",
           "is_visible", "measure_visibility", "visibility_rule"]

#: Least ΔE76 to the surrounding skin of a visible lesion (about twice the JND of 2.3; module docstring).
VISIBLE_DELTA_E = 5.0
#: Fewest pixels of a visible lesion's mask (a 2 x 2 block).
MIN_AREA_PX = 4
#: Width of the ring of skin a lesion is compared with (pixels around its mask).
RING_PX = 3
#: The ring's width where the first ring holds fewer than MIN_RING_PX lesion-free skin pixels.
WIDE_RING_PX = 9
#: Fewest lesion-free skin pixels a ring must hold for its mean colour to count.
MIN_RING_PX = 4
#: What :func:`measure_visibility` returns per lesion, in this order.
VISIBILITY_COLUMNS = ("area_px", "contrast", "signal", "visible")


def visibility_rule() -> dict[str, Any]:
    """The measurement's settings, as ``config.json`` records them (a run made under another rule is another
    run)."""
    return {"metric": "CIE76 delta E*ab of mean CIELAB (D65), lesion mask vs ring of lesion-free skin",
            "signal": "CIE76 delta E*ab of mean CIELAB (D65) over the lesion mask, written image vs the photo the "
                      "lesions were drawn onto (where the backend keeps it)",
            "visible_delta_e": VISIBLE_DELTA_E, "min_area_px": MIN_AREA_PX, "ring_px": RING_PX,
            "wide_ring_px": WIDE_RING_PX, "min_ring_px": MIN_RING_PX}


def is_visible(contrast: Any, area_px: Any, signal: Any = None) -> np.ndarray:
    """The visibility rule (module docstring) on arrays of contrasts (NaN: unknown, not visible), mask areas and
    signals (NaN or None: unknown, the rule stands on the contrast and area)."""
    contrast = np.asarray(contrast, dtype=np.float64)
    area = np.asarray(area_px, dtype=np.float64)
    signal = np.full(contrast.shape, np.nan) if signal is None else np.asarray(signal, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (contrast >= VISIBLE_DELTA_E) & (area >= MIN_AREA_PX) & ~(signal < VISIBLE_DELTA_E)


def measure_visibility(image: np.ndarray, instance_mask: np.ndarray,
                       lesions: pd.DataFrame | Iterable[Mapping[str, Any]] | Iterable[int], *,
                       skin: np.ndarray | None = None, reference: np.ndarray | None = None) -> pd.DataFrame:
    """Each lesion's ``area_px``, ``contrast`` and ``signal`` (ΔE76, 3 decimals; NaN when unknown) and ``visible``
    flag.

    ``image`` is (H, W, 3) uint8 RGB as written; ``instance_mask`` (H, W) integers, ``lesion_id + 1`` where a
    lesion is, 0 elsewhere; ``lesions`` a lesion table (a DataFrame or records with ``lesion_id``) or the ids
    themselves; ``skin`` (H, W) bool, where the ring may lie (None: anywhere); ``reference`` the lesion-free
    (H, W, 3) uint8 RGB photo the lesions were drawn onto (None: ``signal`` unknown). One row per lesion, in
    the order given (a DataFrame keeps its index). Pure: the same input gives the same output.
    """
    image, labels, skin = _checked(image, instance_mask, skin)
    if reference is not None:
        reference = np.asarray(reference)
        if reference.shape != image.shape or reference.dtype != np.uint8:
            raise ValueError(f"reference must be (H, W, 3) uint8 RGB like the image {image.shape}, "
                             f"got {reference.shape} {reference.dtype}")
    index, ids = _lesion_ids(lesions)
    from scipy import ndimage

    boxes = ndimage.find_objects(labels) if ids.size and labels.any() else []
    own: list[np.ndarray] = []      # flat pixel indices of each lesion's mask, and whose they are
    owner: list[np.ndarray] = []
    ring: list[np.ndarray] = []     # the same for the rings of the lesions that have one
    ring_owner: list[np.ndarray] = []
    area = np.zeros(len(ids), np.int64)
    measured = np.zeros(len(ids), bool)
    width = labels.shape[1]
    for k, lesion_id in enumerate(ids.tolist()):
        box = boxes[lesion_id] if 0 <= lesion_id < len(boxes) else None
        if box is None:
            continue
        found = _mask_and_ring(labels, skin, box, lesion_id + 1)
        if found is None:
            rows, cols = np.nonzero(labels[box] == lesion_id + 1)
            rows, cols = rows + box[0].start, cols + box[1].start
        else:
            (rows, cols), (ring_rows, ring_cols) = found
            ring.append(ring_rows * width + ring_cols), ring_owner.append(np.full(ring_rows.size, k))
            measured[k] = True
        area[k] = rows.size
        own.append(rows * width + cols), owner.append(np.full(rows.size, k))
    contrast, signal = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
    if own:
        from skimage.color import deltaE_cie76

        pixels, who = np.concatenate(own), np.concatenate(owner)
        colour = _mean_lab(image, pixels, who, len(ids))     # each lesion's mean colour, read once
        if ring:
            around = _mean_lab(image, np.concatenate(ring), np.concatenate(ring_owner), len(ids))
            contrast[measured] = deltaE_cie76(colour, around)[measured]
        if reference is not None:
            signal = deltaE_cie76(colour, _mean_lab(reference, pixels, who, len(ids)))
    contrast, signal = np.round(contrast, 3), np.round(signal, 3)
    return pd.DataFrame({"area_px": area, "contrast": contrast, "signal": signal,
                         "visible": is_visible(contrast, area, signal)}, index=index, columns=list(VISIBILITY_COLUMNS))


def _checked(image: np.ndarray, instance_mask: np.ndarray,
             skin: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    image, labels = np.asarray(image), np.asarray(instance_mask)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if labels.shape != image.shape[:2] or labels.dtype.kind not in "iu":
        raise ValueError(f"instance_mask must be (H, W) integers matching the image's {image.shape[:2]}, "
                         f"got {labels.shape} {labels.dtype}")
    if labels.dtype.kind == "i":
        if labels.size and labels.min() < 0:
            raise ValueError("instance_mask holds negative labels (lesion_id + 1, 0 = no lesion)")
        labels = labels.astype(np.int64, copy=False)
    if skin is not None:
        skin = np.asarray(skin)
        if skin.shape != labels.shape:
            raise ValueError(f"skin must be (H, W) matching the image's {labels.shape}, got {skin.shape}")
        skin = skin > 0
    return image, labels, skin


def _lesion_ids(lesions: Any) -> tuple[pd.Index, np.ndarray]:
    if isinstance(lesions, pd.DataFrame):
        ids = lesions["lesion_id"].to_numpy()
        index = lesions.index
    else:
        items = list(lesions)
        ids = np.asarray([item["lesion_id"] if isinstance(item, Mapping) else item for item in items])
        index = pd.RangeIndex(len(items))
    ids = ids.astype(np.int64) if ids.size else np.zeros(0, np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"lesion ids must be >= 0, got {int(ids.min())}")
    return index, ids


def _mask_and_ring(labels: np.ndarray, skin: np.ndarray | None, box: tuple[slice, slice],
                   label: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """The lesion's pixels and its ring's (image rows and columns); None when no ring holds enough skin."""
    import cv2

    h, w = labels.shape
    for reach in (RING_PX, WIDE_RING_PX):
        y0, y1 = max(0, box[0].start - reach), min(h, box[0].stop + reach)
        x0, x1 = max(0, box[1].start - reach), min(w, box[1].stop + reach)
        window = labels[y0:y1, x0:x1]
        mine = window == label
        grown = cv2.dilate(mine.view(np.uint8), _disk(reach)).view(bool)
        ring = grown & (window == 0)
        if skin is not None:
            ring &= skin[y0:y1, x0:x1]
        ring_rows, ring_cols = np.nonzero(ring)
        if ring_rows.size >= MIN_RING_PX:
            rows, cols = np.nonzero(mine)
            return (rows + y0, cols + x0), (ring_rows + y0, ring_cols + x0)
    return None


_DISKS: dict[int, np.ndarray] = {}


def _disk(radius: int) -> np.ndarray:
    """A disk of ``radius`` pixels (Euclidean) as a dilation kernel."""
    if radius not in _DISKS:
        yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        _DISKS[radius] = (yy * yy + xx * xx <= radius * radius).astype(np.uint8)
    return _DISKS[radius]


def _mean_lab(image: np.ndarray, flat: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """Each group's mean CIELAB colour (n, 3); NaN for an empty group."""
    from skimage.color import rgb2lab

    lab = rgb2lab(image.reshape(-1, 3)[flat][None])[0]
    counts = np.bincount(groups, minlength=n).astype(np.float64)
    sums = np.stack([np.bincount(groups, weights=lab[:, c], minlength=n) for c in range(3)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]

