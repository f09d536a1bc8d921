"""Crop-and-paste geometry of the inpaint backend: windows, mirroring, feathered composite."""

from __future__ import annotations

import numpy as np
import pytest

from synthtrial.render.crops import Window, composite, crop_windows, cut, feather_alpha, paste_into


def _covered(region: np.ndarray, windows: list[Window]) -> np.ndarray:
    h, w = region.shape
    cover = np.zeros((h, w), int)
    for win in windows:
        rows, cols, _, _ = win.inside(h, w)
        cover[rows, cols] += 1
    return cover


def test_far_clusters_get_their_own_windows_near_ones_merge():
    region = np.zeros((200, 300), bool)
    region[20:30, 20:26] = True       # cluster A
    region[150:160, 250:262] = True   # cluster B, far away
    region[24:28, 40:44] = True       # close to A: its padded window overlaps A's
    windows = crop_windows(region, padding_px=8)
    assert len(windows) == 2
    assert windows == sorted(windows, key=lambda w: (w.y0, w.x0))
    cover = _covered(region, windows)
    assert (cover[region] == 1).all()          # every region pixel in exactly one window
    assert cover.max() == 1                     # windows are disjoint
    a, b = windows
    assert a.side == (44 - 20) + 16 and b.side == 12 + 16   # longer edge + 2 * padding
    assert crop_windows(np.zeros((10, 10), bool), 4) == []


def test_windows_shift_inside_the_image_and_mirror_when_too_big():
    region = np.zeros((40, 100), bool)
    region[0:4, 96:100] = True                 # corner cluster
    (win,) = crop_windows(region, padding_px=6)
    assert (win.y0, win.x0, win.side) == (0, 84, 16)   # shifted inside, not centred past the corner
    region = np.zeros((40, 100), bool)
    region[5:35, 10:60] = True                 # wider than the image is tall once padded
    (win,) = crop_windows(region, padding_px=10)
    assert win.side == 70 and win.side > 40 and win.x0 >= 0
    image = np.arange(40 * 100 * 3, dtype=np.int64).reshape(40, 100, 3) % 251
    crop = cut(image.astype(np.uint8), win)
    assert crop.shape == (70, 70, 3)
    rows, cols, wrows, wcols = win.inside(40, 100)
    assert np.array_equal(crop[wrows, wcols], image[rows, cols])
    assert np.array_equal(crop[wrows.start - 1], crop[wrows.start])   # mirrored beyond the top border
    canvas = np.zeros_like(image, dtype=np.uint8)
    paste_into(canvas, crop, win)
    assert np.array_equal(canvas[rows, cols], image[rows, cols]) and not canvas[:, :cols.start].any()


def test_feather_alpha_and_composite():
    region = np.zeros((40, 40), bool)
    region[5:35, 5:35] = True
    alpha = feather_alpha(region, 4)
    assert alpha.dtype == np.float32 and (alpha[~region] == 0).all()
    assert alpha[20, 20] == 1.0 and 0 < alpha[5, 20] < 0.5      # edge pixel: 1/4 of the way in
    assert np.all(np.diff(alpha[20, 5:21]) >= 0)                 # rises monotonically inwards
    assert np.array_equal(feather_alpha(region, 0), region.astype(np.float32))
    edge = np.zeros((20, 20), bool)
    edge[:, :10] = True                                          # touches the border: no seam there
    assert feather_alpha(edge, 3)[10, 0] == 1.0
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    out = composite(base, other, alpha)
    assert np.array_equal(out[~region], base[~region])
    assert np.array_equal(out[alpha == 1], other[alpha == 1])
    mid = (alpha > 0) & (alpha < 1)
    lo, hi = np.minimum(base, other)[mid], np.maximum(base, other)[mid]
    assert ((out[mid] >= lo) & (out[mid] <= hi)).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="padding_px"):
        crop_windows(np.zeros((4, 4), bool), -1)
    with pytest.raises(ValueError, match="2-D"):
        crop_windows(np.zeros((4, 4, 1), bool), 1)
    with pytest.raises(ValueError, match="feather_px"):
        feather_alpha(np.zeros((4, 4), bool), -2)
