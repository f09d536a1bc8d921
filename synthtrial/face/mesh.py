"""The face mesh as geometry: MediaPipe's 468-landmark topology, the face frame, the inter-ocular distance and
the pivot a head turns about. Faces, head turns and the lesion counter all measure a face through this module.

Choices: the topology (triangles, the face oval, eyes, brows, lips) is recovered from MediaPipe's published
connection lists, once per process. An eye's centre is the mean of its contour landmarks (``eyes="contour"``,
the face frame's definition) or the midpoint of its two corners (``eyes="corners"``, the lesion counter's
definition since its thresholds were chosen; both are kept so neither changes its numbers). The head turns
about a vertical axis :data:`PIVOT_DEPTH_IOD` inter-ocular distances behind the eyes (about 8 cm, the neck).
Points of one image are carried onto another image of the same face through the mesh (:func:`mesh_coordinates`:
piecewise affine, triangle by triangle), so a head turn or a framing change moves them with the skin; a point
off the mesh falls back on the face frame (a similarity: shift, scale and roll only).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np

__all__ = ["EYE_CORNERS", "PIVOT_DEPTH_IOD", "barycentric", "eye_centres", "eye_depth", "face_coordinates",
           "frame", "in_frame", "interocular", "mesh_coordinates", "mesh_triangles", "pivot", "topology"]

#: Depth of the head's vertical turning axis behind the eyes, in interocular distances (about 8 cm).
PIVOT_DEPTH_IOD = 1.25
#: The corners of each eye in the mesh (subject's left: 263 outer, 362 inner; right: 33 outer, 133 inner).
EYE_CORNERS = {"left": (263, 362), "right": (33, 133)}

EyeCentre = Literal["contour", "corners"]


@functools.cache
def topology() -> dict[str, Any]:
    """The mesh's parts: ``triangles`` (T, 3), the face ``oval`` as an ordered polygon, and the landmark
    indices of ``left_eye``, ``right_eye``, ``left_brow``, ``right_brow`` and ``lips``."""
    from mediapipe.python.solutions import face_mesh_connections as conn

    edges = sorted(tuple(sorted(e)) for e in conn.FACEMESH_TESSELATION)
    adj: dict[int, set[int]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    tris = sorted({tuple(sorted((a, b, c))) for a, b in edges for c in adj[a] & adj[b]})

    def ring(connections) -> list[int]:
        """Order a closed loop of edges into a polygon."""
        nxt: dict[int, list[int]] = {}
        for a, b in connections:
            nxt.setdefault(a, []).append(b)
            nxt.setdefault(b, []).append(a)
        start = min(nxt)
        order, prev, cur = [start], None, start
        while True:
            options = [n for n in sorted(nxt[cur]) if n != prev]
            if not options or options[0] == start:
                break
            prev, cur = cur, options[0]
            order.append(cur)
        return order

    def points(connections) -> list[int]:
        return sorted({i for e in connections for i in e})

    return {
        "triangles": np.array(tris, dtype=np.int32),
        "oval": ring(conn.FACEMESH_FACE_OVAL),
        "left_eye": points(conn.FACEMESH_LEFT_EYE),
        "right_eye": points(conn.FACEMESH_RIGHT_EYE),
        "left_brow": points(conn.FACEMESH_LEFT_EYEBROW),
        "right_brow": points(conn.FACEMESH_RIGHT_EYEBROW),
        "lips": points(conn.FACEMESH_LIPS),
    }


def mesh_triangles() -> np.ndarray:
    """(T, 3) landmark indices of the face-mesh triangles (recovered from MediaPipe's tessellation)."""
    return topology()["triangles"]


def eye_centres(landmarks: np.ndarray, eyes: EyeCentre = "contour") -> tuple[np.ndarray, np.ndarray]:
    """The (left, right) eye centres of (468, 2+) landmarks: contour means, or corner midpoints."""
    if eyes == "corners":
        (la, lb), (ra, rb) = EYE_CORNERS["left"], EYE_CORNERS["right"]
        return (landmarks[la] + landmarks[lb]) / 2, (landmarks[ra] + landmarks[rb]) / 2
    if eyes != "contour":
        raise ValueError(f"eyes must be 'contour' or 'corners', got {eyes!r}")
    m = topology()
    return landmarks[m["left_eye"]].mean(axis=0), landmarks[m["right_eye"]].mean(axis=0)


def interocular(landmarks: np.ndarray, eyes: EyeCentre = "contour") -> float:
    """The distance between the eye centres (pixels), the ruler of every face-relative length."""
    left, right = eye_centres(landmarks[:, :2], eyes)
    return float(np.hypot(*(left - right)))


def frame(landmarks: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Face frame: origin between the eye centres, scale = interocular distance, rows = x/y unit axes."""
    left, right = eye_centres(landmarks)
    origin = (left + right) / 2
    ex = left - right
    iod = float(np.hypot(*ex))
    ex = ex / max(iod, 1e-9)
    if ex[0] < 0:
        ex = -ex
    ey = np.array([-ex[1], ex[0]])
    if ey[1] < 0:
        ey = -ey
    return origin, iod, np.stack([ex, ey])


def face_coordinates(landmarks: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's position in the face frame (x across, y down; unit = interocular distance)."""
    origin, iod, axes = frame(landmarks)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    dx, dy = xx - origin[0], yy - origin[1]
    return (dx * axes[0, 0] + dy * axes[0, 1]) / iod, (dx * axes[1, 0] + dy * axes[1, 1]) / iod


def in_frame(points: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Pixel points (N, 2) in the face frame of ``landmarks`` (x across, y down; unit = interocular distance):
    :func:`face_coordinates` for chosen points."""
    origin, iod, axes = frame(landmarks)
    return (np.atleast_2d(np.asarray(points, dtype=np.float64)) - origin) @ axes.T / iod


def mesh_coordinates(points: np.ndarray, landmarks: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel points (N, 2) of an image with face-mesh ``landmarks`` (468, 2), carried onto the ``reference``
    mesh (468, 2) of the same face and given in the reference's face frame (:func:`in_frame`).

    A point inside a mesh triangle keeps its barycentric weights in that triangle of the reference (where
    triangles overlap, as on a turned cheek, the one it lies deepest in); a point on no triangle is placed by the
    face frame alone. Returns the positions (N, 2) and whether each was placed through the mesh (N,).
    """
    pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
    placed = in_frame(pts, landmarks)
    on_mesh = np.zeros(len(pts), dtype=bool)
    if not len(pts):
        return placed.reshape(0, 2), on_mesh
    tris = mesh_triangles()
    weights = barycentric(pts, np.asarray(landmarks, dtype=np.float64)[:, :2][tris])   # (N, T, 3)
    depth = weights.min(axis=2)                                                           # > 0 inside
    best = depth.argmax(axis=1)
    on_mesh = depth[np.arange(len(pts)), best] >= 0
    ref = in_frame(np.asarray(reference, dtype=np.float64)[:, :2], reference)[tris[best]]  # (N, 3, 2)
    through_mesh = np.einsum("nk,nkd->nd", weights[np.arange(len(pts)), best], ref)
    return np.where(on_mesh[:, None], through_mesh, placed), on_mesh


def eye_depth(depth: np.ndarray) -> float:
    """Mean depth of the eye landmarks (pixels; larger is farther from the camera)."""
    m = topology()
    return float(np.mean(depth[m["left_eye"] + m["right_eye"]]))


def pivot(landmarks: np.ndarray, depth: np.ndarray) -> tuple[float, float]:
    """(x, depth) in pixels of the vertical axis the head turns about: under the point between the eyes,
    :data:`PIVOT_DEPTH_IOD` interocular distances behind them."""
    origin, iod, _ = frame(landmarks)
    return float(origin[0]), eye_depth(depth) + PIVOT_DEPTH_IOD * iod


def barycentric(pts: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Barycentric weights (N, T, 3) of points (N, 2) in triangles (T, 3, 2)."""
    a, b, c = corners[None, :, 0], corners[None, :, 1], corners[None, :, 2]
    p = pts[:, None, :]
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    den = np.where(np.abs(den) < 1e-12, 1e-12, den)
    w1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / den
    w2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / den
    return np.stack([1 - w1 - w2, w1, w2], axis=-1)
