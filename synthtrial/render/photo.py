"""What a lesion must match to sit in a photo: CIELAB conversions exact to a thousandth of a grey level, and
the photo's light direction, sensor noise, sharpness and skin tone (:func:`photo_stats`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from synthtrial.render.base import PhotoStats, check_image, skin_weight

__all__ = ["DEFAULT_STATS", "lab2rgb", "photo_stats", "rgb2lab"]


# --------------------------------------------------------------------------------------------------
# Colour math: sRGB (0-1) <-> CIELAB (D65), float32, exact inverses of each other
# --------------------------------------------------------------------------------------------------
# The sRGB curve is used in its pure-power form ((v + 0.055) / 1.055) ** 2.4 and L* in its cube-root
# form; both differ from the standard only below ~4 % of full scale (never skin), and they keep the
# round trip exact to ~1e-3 of a grey level, which OpenCV's float Lab (LUT-based, ~0.4 levels) is not.

_M_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                       [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]]) / np.array([0.950456, 1.0, 1.088754])[:, None]
_RGB2XYZ = _M_RGB2XYZ.astype(np.float32)
_XYZ2RGB = np.linalg.inv(_M_RGB2XYZ).astype(np.float32)
_F2LAB = np.array([[0, 116, 0, -16], [500, -500, 0, 0], [0, 200, -200, 0]], np.float32)
_LAB2F = np.array([[1 / 116, 1 / 500, 0, 16 / 116], [1 / 116, 0, 0, 16 / 116],
                   [1 / 116, 0, -1 / 200, 16 / 116]], np.float32)


def rgb2lab(rgb: np.ndarray) -> np.ndarray:
    """float32 sRGB (0-1, ``(..., 3)``) to CIELAB (D65): the exact inverse of :func:`lab2rgb`."""
    lin = cv2.pow((rgb + np.float32(0.055)) * np.float32(1 / 1.055), 2.4)
    return cv2.transform(cv2.pow(cv2.transform(lin, _RGB2XYZ), 1 / 3), _F2LAB)


def lab2rgb(lab: np.ndarray) -> np.ndarray:
    """float32 CIELAB (D65, ``(..., 3)``) to sRGB (0-1 inside the gamut, not clipped): the exact inverse of
    :func:`rgb2lab`."""
    f = np.maximum(cv2.transform(lab, _LAB2F), 0)
    lin = np.maximum(cv2.transform(f * f * f, _XYZ2RGB), 0)
    return cv2.pow(lin, 1 / 2.4) * np.float32(1.055) - np.float32(0.055)


# --------------------------------------------------------------------------------------------------
# Photo statistics
# --------------------------------------------------------------------------------------------------

#: The statistics assumed for a photo with too little skin to measure: lit from above, clean, sharp, fair skin.
DEFAULT_STATS = PhotoStats((0.0, -1.0), 0.0, 0.0, (200.0, 160.0, 140.0))
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
_REBLUR = 2.5   # sigma of the re-blur used by the blur estimate


def photo_stats(image: np.ndarray, skin_mask: np.ndarray) -> PhotoStats:
    """Estimate light direction, sensor noise, sharpness and skin tone from the skin of a photo.

    * light: a robust plane fit of L* over skin pixels; its gradient points towards the light
      (falls back to "from above", (0, -1), when the skin is evenly lit);
    * noise: Immerkaer's Laplacian-difference residual (blind to linear shading), robust MAD over the
      eroded skin, averaged over R, G, B;
    * blur: re-blur gradient ratio at strong edges near the face (Zhuo & Sim): an edge blurred by s
      loses gradient by s / sqrt(s^2 + r^2) when re-blurred by r;
    * skin tone: per-channel median over skin.
    """
    check_image(image)
    skin = skin_weight(skin_mask, image.shape[:2]) > 0
    rows, cols = np.nonzero(skin.any(axis=1))[0], np.nonzero(skin.any(axis=0))[0]
    n_skin = int(np.count_nonzero(skin))
    if n_skin < 16:
        raise ValueError(f"skin_mask has {n_skin} skin pixels; at least 16 are needed to estimate photo stats")
    h, w = skin.shape
    # work inside the face's bounding box, grown by 10 % (edges for the blur estimate live there too)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    my, mx = (y1 - y0) // 10 + 4, (x1 - x0) // 10 + 4
    y0, y1, x0, x1 = max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)
    rgb = image[y0:y1, x0:x1].astype(np.float32)
    skin = skin[y0:y1, x0:x1]

    # a fixed, even subsample of the skin (a regular grid of ~8k points) for the medians and the fit
    step = max(1, int(math.sqrt(n_skin / 8000)))
    ys, xs = np.nonzero(skin[::step, ::step])
    ys, xs = ys * step, xs * step
    px = rgb[ys, xs]
    skin_rgb = tuple(float(np.median(px[:, c])) for c in range(3))

    # light direction: plane fit of L* over skin, three rounds of outlier rejection (brows, nostrils)
    lum = rgb2lab(np.ascontiguousarray(px[None] / 255.0))[0, :, 0].astype(np.float64)
    design = np.column_stack([np.ones(len(xs)), (xs - xs.mean()) / 100.0, (ys - ys.mean()) / 100.0])
    keep = np.ones(len(lum), bool)
    coef = np.zeros(3)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[keep], lum[keep], rcond=None)
        resid = lum - design @ coef
        keep_new = np.abs(resid) < 3 * (np.median(np.abs(resid[keep])) * 1.4826 + 1e-6)
        if keep_new.sum() < 3:
            break
        keep = keep_new
    gx, gy = coef[1] / 100.0, coef[2] / 100.0   # L* per pixel
    gnorm = math.hypot(gx, gy)
    # below ~1 L* per 1000 px the direction is noise: assume the usual light from above
    light = (gx / gnorm, gy / gnorm) if gnorm > 1e-3 else (0.0, -1.0)

    # noise: the Immerkaer kernel (norm 6) annihilates linear shading; MAD over the eroded skin
    inner = cv2.erode(skin.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    grid = inner[ys, xs]
    if grid.sum() < 16:
        grid = np.ones(len(ys), bool)
    res = cv2.filter2D(rgb, -1, _IMMERKAER, borderType=cv2.BORDER_REFLECT)[ys[grid], xs[grid]]
    noise = float(np.mean([1.4826 * np.median(np.abs(res[:, c] - np.median(res[:, c]))) / 6.0 for c in range(3)]))

    blur = _estimate_blur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), noise)
    return PhotoStats((float(light[0]), float(light[1])), noise, blur, skin_rgb)


def _estimate_blur(gray: np.ndarray, noise: float) -> float:
    """Gaussian sigma of the photo's blur from the gradient ratio at edges under a known re-blur.

    Both images are pre-smoothed a little (against noise), and edges are picked on the smoother one
    (picking them on the sharper one favours noise spikes and biases the estimate low).
    """
    if min(gray.shape) < 8:
        return 0.0

    def gradmag(img):
        gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
        gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
        return cv2.magnitude(gx, gy)

    gray = np.ascontiguousarray(gray, dtype=np.float32)
    g0 = gradmag(cv2.GaussianBlur(gray, (0, 0), _PRESMOOTH, borderType=cv2.BORDER_REFLECT))
    g1 = gradmag(cv2.GaussianBlur(gray, (0, 0), math.hypot(_PRESMOOTH, _REBLUR), borderType=cv2.BORDER_REFLECT))
    local_max = g1 >= cv2.dilate(g1, np.ones((3, 3), np.uint8))
    step = max(1, int(math.sqrt(g1.size / 20000)))
    # Sobel's gain is 8 per unit step: demand edges well above the noise
    floor = max(float(np.percentile(g1[::step, ::step], 97)), 20.0 * max(noise, 1.0))
    edges = local_max & (g1 >= floor)
    if np.count_nonzero(edges) < 10:
        return 0.0
    ratio = float(np.median(g0[edges] / g1[edges]))
    if ratio <= 1.0 + 1e-3:
        return 5.0
    # ratio = sqrt(s^2 + p^2 + o^2 + r^2) / sqrt(s^2 + p^2 + o^2), with o the Sobel/sampling blur
    s2 = _REBLUR ** 2 / (ratio ** 2 - 1.0) - _SOBEL_SIGMA2 - _PRESMOOTH ** 2
    return float(np.clip(math.sqrt(max(s2, 0.0)), 0.0, 5.0))


_SOBEL_SIGMA2 = 0.36   # calibrated: a step edge integrated over pixels reads ~0.4 px
_PRESMOOTH = 0.8
