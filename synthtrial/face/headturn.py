"""Head turns for side views: MediaPipe's 3-D face mesh rotated about the neck and the portrait warped over it.

The landmarks (x, y in pixels, depth in pixels as MediaPipe gives it times the image width) rotate about a
vertical axis :data:`synthtrial.face.mesh.PIVOT_DEPTH_IOD` interocular distances behind the eyes and project
orthographically; the face is re-centred on its oval. The portrait is warped piecewise-affinely over the mesh
triangles (its eye and mouth openings closed by strips of extra triangles), far triangles first so nearer
surfaces cover what they hide: the near cheek widens, the far cheek foreshortens and slips behind the nose,
and every face-mesh anchor lands on its projected landmarks. Hair, ears and background follow on a ring of
control points around the face oval that moves with it, pinned at the image border. A depth buffer of the
visible surface says which anchors are out of sight.

Choices: landmarks deeper than :data:`DEPTH_CAP_IOD` behind the eyes (the mesh's outermost ring, curving
back towards the ears) are drawn in to that depth, so the turn does not stretch slivers of the frontal photo
into streaks; orthographic projection (a portrait lens at 1-2 m barely shows perspective), one rigid yaw (no
neck bend), piecewise-affine texture mapping (no inpainting of surfaces the frontal photo never saw: the side
of the head is the frontal photo's hair and ear, stretched).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from synthtrial.face.mesh import eye_depth, frame, mesh_triangles, pivot, topology

__all__ = ["HeadTurn", "head_turn"]

#: Landmarks deeper than this (interocular distances behind the eyes) are drawn in to it before the turn.
DEPTH_CAP_IOD = 0.45
#: Half-width (in oval landmarks) of the moving average that smooths the ring's displacement.
RING_SMOOTHING = 5


@dataclass(frozen=True)
class HeadTurn:
    """A yaw of the head as an image warp: where each output pixel comes from, and the turned mesh."""

    map_x: np.ndarray       # (S, S) float32 source x of each output pixel (cv2.remap)
    map_y: np.ndarray
    landmarks: np.ndarray   # (468, 2) projected landmarks
    depth: np.ndarray       # (468,) their depth after the turn
    zbuf: np.ndarray        # (S, S) float32 depth of the visible face surface; +inf off the mesh
    on_mesh: np.ndarray     # (S, S) bool: output pixels drawn from a face-mesh triangle


def _ring_points(landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Control points beyond the face (hair, ears, neck) on a ring around the oval, and on the image border."""
    oval = landmarks[topology()["oval"]]
    centre = oval.mean(axis=0)
    ring = centre + 1.45 * (oval - centre)
    margin = 0.04 * size
    ring = np.clip(ring, margin, size - margin)
    k = np.linspace(0, size, 7)
    border = np.array([(x, 0.0) for x in k] + [(x, float(size)) for x in k]
                      + [(0.0, y) for y in k[1:-1]] + [(float(size), y) for y in k[1:-1]])
    return ring, border


@functools.cache
def _hole_loops() -> tuple[tuple[int, ...], ...]:
    """The openings of the mesh (eyes, mouth) as closed loops of landmarks: boundary edges (used by one
    triangle) other than the face oval's."""
    count: dict[tuple[int, int], int] = {}
    for a, b, c in mesh_triangles():
        for e in ((a, b), (b, c), (a, c)):
            e = (int(min(e)), int(max(e)))
            count[e] = count.get(e, 0) + 1
    nxt: dict[int, list[int]] = {}
    for (a, b), n in count.items():
        if n == 1:
            nxt.setdefault(a, []).append(b)
            nxt.setdefault(b, []).append(a)
    oval = set(topology()["oval"])
    loops, seen = [], set()
    for start in sorted(nxt):
        if start in seen or start in oval:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            options = [n for n in sorted(nxt[cur]) if n != prev and (n not in seen or n == start)]
            if not options or options[0] == start:
                break
            prev, cur = cur, options[0]
            loop.append(cur)
            seen.add(cur)
        if len(loop) >= 3:
            loops.append(tuple(loop))
    return tuple(loops)


def _hole_triangles(landmarks: np.ndarray) -> np.ndarray:
    """Triangles closing the mesh's openings, as a zig-zag strip from each loop's leftmost landmark."""
    out = []
    for loop in _hole_loops():
        k = int(np.argmin(landmarks[list(loop), 0]))
        v = list(loop[k:] + loop[:k])
        i, j = 0, len(v) - 1
        while j - i >= 2:
            out.append((v[i], v[i + 1], v[j]))
            i += 1
            if j - i >= 2:
                out.append((v[i], v[j - 1], v[j]))
                j -= 1
    return np.array(out, dtype=np.int32).reshape(-1, 3)


def head_turn(landmarks: np.ndarray, depth: np.ndarray, size: int, yaw_deg: float) -> HeadTurn:
    """The warp of a ``size`` x ``size`` portrait that turns its head by ``yaw_deg`` (> 0: towards image-left).

    Landmarks (x, y, depth in pixels) rotate about the vertical axis of :func:`synthtrial.face.mesh.pivot`
    (behind the eyes) and project orthographically; the face is re-centred on its oval. Output pixels
    are filled triangle by triangle (affine per triangle: the warp is continuous across shared edges), the
    area around the face first, then the mesh (its eye and mouth openings closed) from far to near, so
    nearer surfaces cover what they hide.
    """
    from scipy.spatial import Delaunay

    m = topology()
    tris = np.vstack([mesh_triangles(), _hole_triangles(landmarks)])
    iod = frame(landmarks)[1]
    eye_z = eye_depth(depth)
    pivot_x, pivot_z = pivot(landmarks, depth)
    # the mesh's outermost ring curves steeply back towards the ears; turned, those slivers of the frontal
    # photo would be stretched several-fold into streaks. Capping the depth keeps them at the cheek's
    # slope and leaves the stretch to the hair and background beyond the face.
    depth = np.minimum(depth, eye_z + DEPTH_CAP_IOD * iod)
    t = math.radians(yaw_deg)
    dx, dz = landmarks[:, 0] - pivot_x, depth - pivot_z
    new_x = pivot_x + dx * math.cos(t) + dz * math.sin(t)
    new_z = pivot_z - dx * math.sin(t) + dz * math.cos(t)
    new_x -= float(np.mean(new_x[m["oval"]] - landmarks[m["oval"], 0]))   # keep the face in frame
    new = np.column_stack([new_x, landmarks[:, 1]])

    # the surroundings: ring points move as the oval point they extend, border points stay
    ring, border = _ring_points(landmarks, size)
    # (their displacement is the oval's, smoothed along the ring so hair and ears do not kink where the
    # forehead and the cheeks move differently)
    disp = new[m["oval"]] - landmarks[m["oval"]]
    k = RING_SMOOTHING
    padded = np.concatenate([disp[-k:], disp, disp[:k]])
    kernel = np.ones(2 * k + 1) / (2 * k + 1)
    smooth = np.column_stack([np.convolve(padded[:, i], kernel, mode="valid") for i in range(2)])
    ring_new = ring + smooth
    ring_new = np.clip(ring_new, 0.02 * size, 0.98 * size)
    src_out = np.vstack([landmarks[m["oval"]], ring, border])
    dst_out = np.vstack([new[m["oval"]], ring_new, border])
    outer = Delaunay(dst_out).simplices

    order = np.argsort(-new_z[tris].mean(axis=1), kind="stable")   # far first: painter's algorithm

    index = np.full((size, size), -1, np.int32)
    n_out = len(outer)
    for k, simplex in enumerate(outer):
        cv2.fillConvexPoly(index, np.round((dst_out[simplex] - 0.5) * 16).astype(np.int32), k,
                           lineType=cv2.LINE_8, shift=4)
    for k in order:   # pixel (i, j) has its centre at (j + 0.5, i + 0.5); OpenCV's at (j, i)
        cv2.fillConvexPoly(index, np.round((new[tris[k]] - 0.5) * 16).astype(np.int32), n_out + int(k),
                           lineType=cv2.LINE_8, shift=4)
    # per-triangle affine maps from output to source coordinates
    def affines(dst_tri: np.ndarray, src_tri: np.ndarray) -> np.ndarray:
        d = np.concatenate([dst_tri, np.ones((*dst_tri.shape[:2], 1))], axis=2)     # (K, 3, 3)
        det_ok = np.abs(np.linalg.det(d)) > 1e-9
        d = np.where(det_ok[:, None, None], d, np.eye(3)[None])
        return np.linalg.solve(d, src_tri).transpose(0, 2, 1)                         # (K, 2, 3)

    maps = np.concatenate([affines(dst_out[outer], src_out[outer]), affines(new[tris], landmarks[tris])])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    sel = np.where(index >= 0, index, 0)
    a = maps[sel]                                                            # (S, S, 2, 3)
    sx = a[..., 0, 0] * xx + a[..., 0, 1] * yy + a[..., 0, 2]
    sy = a[..., 1, 0] * xx + a[..., 1, 1] * yy + a[..., 1, 2]
    sx = np.where(index >= 0, sx, xx)
    sy = np.where(index >= 0, sy, yy)
    # the visible surface's depth: each mesh pixel's depth on the plane of its triangle
    on_mesh = index >= n_out
    zmaps = affines(new[tris], new_z[tris][..., None])[:, 0]                  # (T, 3): z = a x + b y + c
    z = zmaps[np.where(on_mesh, index - n_out, 0)]
    zbuf = np.where(on_mesh, z[..., 0] * xx + z[..., 1] * yy + z[..., 2], np.inf).astype(np.float32)
    return HeadTurn(map_x=(sx - 0.5).astype(np.float32), map_y=(sy - 0.5).astype(np.float32), landmarks=new,
                    depth=new_z, zbuf=zbuf, on_mesh=on_mesh)
