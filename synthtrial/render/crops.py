"""Crop-and-paste for lesion inpainting: square windows around clusters of the inpaint region, and the seam.

The idea is diffusers' ``padding_mask_crop`` (crop around the mask with some context, diffuse the crop at the
pipeline's size, paste it back), made to fit a batch renderer and several lesion clusters per face:

* :func:`crop_windows` -- the region's connected components (8-connected) give boxes; each box is grown into
  a square window (side = its longer edge + ``2 * padding_px``, centred on it, then shifted inside the
  image where it fits). Windows that overlap are merged (the square around the union of their boxes),
  until none overlaps, so every region pixel lies in exactly one window and paste order never matters.
  Windows come sorted by (top, left): the k-th crop of an image is the same on every run.
* :func:`cut` -- a window's pixels; a window larger than the image in one dimension (a cluster wider than a
  narrow image) is filled beyond the border by mirroring (``np.pad(mode="symmetric")``), and only its
  in-image part is pasted back.
* :func:`feather_alpha` / :func:`composite` -- the seam: alpha is the Euclidean distance inside the region
  to its border divided by ``feather_px``, clipped to [0, 1] (0 outside the region, rising over the region's
  outer ``feather_px`` pixels). ``composite`` blends base and diffused images with it in float32 and
  rounds: where alpha is 0 the base pixel comes back bit-identical, where alpha is 1 the diffused pixel.
  With ``feather_px`` no larger than the mask dilation, every lesion pixel gets alpha 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Window", "composite", "crop_windows", "cut", "feather_alpha", "paste_into"]


@dataclass(frozen=True)
class Window:
    """A square window of an image: rows ``y0 .. y0 + side``, columns ``x0 .. x0 + side`` (may pass the border)."""

    y0: int
    x0: int
    side: int

    def inside(self, h: int, w: int) -> tuple[slice, slice, slice, slice]:
        """(image rows, image cols, window rows, window cols) of the part of the window inside an (h, w) image."""
        iy0, ix0 = max(self.y0, 0), max(self.x0, 0)
        iy1, ix1 = min(self.y0 + self.side, h), min(self.x0 + self.side, w)
        return (slice(iy0, iy1), slice(ix0, ix1),
                slice(iy0 - self.y0, iy1 - self.y0), slice(ix0 - self.x0, ix1 - self.x0))


def _window(box: tuple[int, int, int, int], padding: int, h: int, w: int) -> Window:
    """The square window around ``box`` = (y0, x0, y1, x1) (exclusive ends), padded, shifted inside if it fits."""
    y0, x0, y1, x1 = box
    side = max(y1 - y0, x1 - x0) + 2 * padding
    top = (y0 + y1 - side) // 2
    left = (x0 + x1 - side) // 2
    if side <= h:
        top = min(max(top, 0), h - side)
    if side <= w:
        left = min(max(left, 0), w - side)
    return Window(int(top), int(left), int(side))


def _overlap(a: Window, b: Window) -> bool:
    return (a.y0 < b.y0 + b.side and b.y0 < a.y0 + a.side and
            a.x0 < b.x0 + b.side and b.x0 < a.x0 + a.side)


def crop_windows(region: np.ndarray, padding_px: int) -> list[Window]:
    """Disjoint square windows covering every True pixel of ``region`` (H, W) bool, sorted by (top, left)."""
    import cv2

    if region.ndim != 2:
        raise ValueError(f"region must be 2-D, got shape {region.shape}")
    if int(padding_px) < 0:
        raise ValueError(f"padding_px must be >= 0, got {padding_px}")
    h, w = region.shape
    n, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    boxes = [(int(s[cv2.CC_STAT_TOP]), int(s[cv2.CC_STAT_LEFT]),
              int(s[cv2.CC_STAT_TOP] + s[cv2.CC_STAT_HEIGHT]), int(s[cv2.CC_STAT_LEFT] + s[cv2.CC_STAT_WIDTH]))
             for s in stats[1:n]]
    merged = True
    while merged:
        merged = False
        windows = [_window(b, int(padding_px), h, w) for b in boxes]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if _overlap(windows[i], windows[j]):
                    a, b = boxes[i], boxes[j]
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return sorted((_window(b, int(padding_px), h, w) for b in boxes), key=lambda win: (win.y0, win.x0))


def cut(image: np.ndarray, window: Window) -> np.ndarray:
    """The window's pixels of ``image`` (H, W[, C]); beyond the border the image is mirrored."""
    h, w = image.shape[:2]
    rows, cols, _, _ = window.inside(h, w)
    part = image[rows, cols]
    pads = [(rows.start - window.y0, window.y0 + window.side - rows.stop),
            (cols.start - window.x0, window.x0 + window.side - cols.stop)] + [(0, 0)] * (image.ndim - 2)
    if any(p for pair in pads for p in pair):
        part = np.pad(part, pads, mode="symmetric")
    return np.ascontiguousarray(part)


def paste_into(canvas: np.ndarray, crop: np.ndarray, window: Window) -> None:
    """Write the in-image part of ``crop`` (side, side, C) into ``canvas`` (H, W, C) in place."""
    h, w = canvas.shape[:2]
    rows, cols, wrows, wcols = window.inside(h, w)
    canvas[rows, cols] = crop[wrows, wcols]


def feather_alpha(region: np.ndarray, feather_px: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: 0 outside ``region``, rising to 1 over the region's outer ``feather_px`` pixels."""
    import cv2

    if int(feather_px) < 0:
        raise ValueError(f"feather_px must be >= 0, got {feather_px}")
    if int(feather_px) == 0 or not region.any():
        return region.astype(np.float32)
    # distance of each region pixel to the nearest pixel outside it (1 on the region's edge); pixels beyond
    # the image border count as inside, so a region touching the border is not feathered there
    padded = np.pad(region.astype(np.uint8), 1, mode="edge")
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    return np.clip(dist / float(feather_px), 0.0, 1.0).astype(np.float32) * region


def composite(base: np.ndarray, diffused: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``base + alpha * (diffused - base)`` as uint8; bit-identical to ``base`` where alpha is 0."""
    b = base.astype(np.float32)
    out = b + alpha[:, :, None] * (diffused.astype(np.float32) - b)
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
