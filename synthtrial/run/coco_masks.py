"""COCO shapes of the lesions in a 16-bit instance mask (``lesion_id + 1``, 0 = no lesion): each lesion's exact
pixel area and its outline as COCO polygons (outer boundaries, traced along pixel edges by
``skimage.measure.find_contours``). Used by the COCO export (:mod:`synthtrial.run.export`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthtrial.util.errors import SynthtrialError, one_line

__all__ = ["mask_shapes", "polygons"]


def mask_shapes(path: Path, width: int, height: int,
                 lesion_ids: list[int]) -> dict[int, tuple[int, list[list[float]]]]:
    """Per lesion id: (pixel area, COCO polygons) from the label map at ``path``.

    Lesions with no pixels in the map are left out (they keep their box and no segmentation).
    """
    from PIL import Image, UnidentifiedImageError
    from scipy import ndimage

    try:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16L", "I;16B", "I", "L"):
                raise SynthtrialError(f"{path}: is a {im.mode} image; a lesion mask is a 16-bit label map "
                                      "(pixel = lesion_id + 1, 0 = no lesion)")
            labels = np.asarray(im).astype(np.int64)
    except (OSError, UnidentifiedImageError) as exc:
        raise SynthtrialError(f"{path}: cannot be read as a lesion mask ({one_line(exc)})") from None
    if labels.shape != (height, width):
        raise SynthtrialError(f"{path}: is {labels.shape[1]}x{labels.shape[0]} but its image is {width}x{height}")
    if labels.min(initial=0) < 0:
        raise SynthtrialError(f"{path}: has negative labels; a lesion mask holds lesion_id + 1, 0 = no lesion")
    wanted = {lid + 1 for lid in lesion_ids}
    top = max(wanted, default=0)
    clipped = np.where(labels <= top, labels, 0)  # labels of lesions not listed cannot be exported
    boxes = ndimage.find_objects(clipped, max_label=top) if top else []
    shapes: dict[int, tuple[int, list[list[float]]]] = {}
    for lid in sorted(lesion_ids):
        box = boxes[lid] if lid < len(boxes) else None
        if box is None:
            continue
        binary = clipped[box] == lid + 1
        area = int(binary.sum())
        if not area:
            continue
        shapes[lid] = (area, polygons(binary, box[1].start, box[0].start))
    return shapes


def polygons(binary: np.ndarray, x_off: int, y_off: int) -> list[list[float]]:
    """COCO polygons (outer boundaries only) of a boolean crop whose top-left pixel is (x_off, y_off).

    Contours run along pixel edges' midpoints; in COCO's continuous coordinates (pixel (c, r) covers
    [c, c+1) x [r, r+1)) they lie inside the union of the mask's pixels. Holes are dropped (COCO polygons
    cannot express them); the area reported beside them is the exact pixel count.
    """
    from skimage import measure

    padded = np.pad(binary.astype(np.uint8), 1)
    polygons = []
    for contour in measure.find_contours(padded, 0.5, positive_orientation="high"):
        if len(contour) < 4:
            continue
        ys = contour[:, 0] - 1 + y_off + 0.5
        xs = contour[:, 1] - 1 + x_off + 0.5
        signed = 0.5 * float(np.sum(xs[:-1] * ys[1:] - xs[1:] * ys[:-1]))
        if signed >= 0:  # with positive_orientation="high", islands run this way round and holes the other
            continue
        points = np.column_stack([xs, ys])
        if (points[0] == points[-1]).all():
            points = points[:-1]
        # drop the points in the middle of a straight run: the outline keeps its exact shape (coordinates
        # are multiples of 0.5, so the test is exact)
        before = points - np.roll(points, 1, axis=0)
        after = np.roll(points, -1, axis=0) - points
        cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        dot = (before * after).sum(axis=1)
        points = points[(cross != 0) | (dot <= 0)]
        if len(points) >= 3:
            polygons.append((np.round(points.ravel(), 2) + 0.0).tolist())
    return polygons
