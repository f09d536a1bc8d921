"""Identities: base portraits, MediaPipe face-mesh landmarks, skin regions, and per-patient appearance.

A patient's series is drawn on one :class:`Face`: a square portrait at the run's size, its 468 face-mesh
landmarks, and masks of the skin where acne may appear (forehead, cheeks, nose, chin, jaw; eyes, brows,
lips and nostrils excluded). Lesions are anchored in face-mesh coordinates (a mesh triangle and
barycentric weights), so a lesion lands on the same anatomical spot every day.

Base portraits come from ``--faces DIR`` (e.g. ACNE04 level-0 images) or, by default, the public-domain
portraits shipped inside installed packages (NASA's astronaut Eileen Collins in scikit-image, Grace Hopper
in matplotlib). Patients beyond the number of base faces get a distinct, consistent appearance: a skin tone
across the six Fitzpatrick types, a little geometry (scale, aspect, roll), lighting and framing, all
recorded in the manifest as ``identity``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from synthtrial.errors import SynthtrialError
from synthtrial.seeding import derived_rng

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
BUILTIN_FACES = ("astronaut", "hopper")
REGIONS = ("forehead", "nose", "left_cheek", "right_cheek", "chin", "jaw")
#: Relative density of lesions per unit skin area, by region (acne favours cheeks, chin and forehead).
REGION_WEIGHTS = {"forehead": 1.0, "nose": 0.5, "left_cheek": 1.3, "right_cheek": 1.3, "chin": 1.2, "jaw": 0.9}
#: Skin tones of the Fitzpatrick types as CIELAB (L*, a*, b*); their individual typology angles
#: atan((L* - 50) / b*) fall in the classic ITA bands (I > 55 deg ... VI < -30 deg).
FITZPATRICK_LAB = {
    1: (75.0, 8.0, 16.0), 2: (68.0, 11.0, 18.0), 3: (63.0, 13.0, 20.0),
    4: (55.0, 14.0, 22.0), 5: (42.0, 13.0, 19.0), 6: (30.0, 10.0, 13.0),
}
#: Skin types given in turn to the patients beyond the base portraits (darker types early, so even a
#: small trial spans the range).
FITZPATRICK_CYCLE = (5, 6, 2, 3, 4, 1)
MAX_IMAGE_PIXELS = 40_000_000


class FaceError(SynthtrialError):
    """A portrait that cannot serve as a face: unreadable, no face found, bad folder."""


# ------------------------------------------------------------------------------------ mesh topology

@functools.cache
def _mesh() -> dict[str, Any]:
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
    return _mesh()["triangles"]


# ----------------------------------------------------------------------------------------- landmarks

@contextlib.contextmanager
def _quiet_native_stderr():
    """Hold back what MediaPipe's C++ core logs straight to file descriptor 2 (TFLite, absl notices)."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to hide
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LandmarkDetector:
    """MediaPipe face mesh (0.10.x legacy solutions API; the models ship inside the wheel)."""

    def __init__(self) -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with _quiet_native_stderr():
            from mediapipe.python.solutions import face_mesh

            self._mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=4, refine_landmarks=False,
                                            min_detection_confidence=0.5)

    def faces(self, image: np.ndarray) -> list[np.ndarray]:
        """(468, 2) pixel landmarks of every face found (up to 4); empty when there is none."""
        with _quiet_native_stderr():
            result = self._mesh.process(np.ascontiguousarray(image))
        if not result.multi_face_landmarks:
            return []
        h, w = image.shape[:2]
        return [np.array([(p.x * w, p.y * h) for p in f.landmark[:468]], dtype=np.float64)
                for f in result.multi_face_landmarks]

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """(468, 2) pixel landmarks of the largest face, or None when no face is found."""
        faces = self.faces(image)
        if not faces:
            return None
        return max(faces, key=lambda lm: np.ptp(lm[:, 0]) * np.ptp(lm[:, 1]))

    def close(self) -> None:
        self._mesh.close()


@functools.cache
def _detector() -> LandmarkDetector:
    return LandmarkDetector()


# ------------------------------------------------------------------------------------- base portraits

@dataclass(frozen=True)
class BaseFace:
    """A source portrait and its landmarks, before cropping to the run's size."""

    key: str
    source: str
    image: np.ndarray = field(repr=False)
    landmarks: np.ndarray = field(repr=False)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise FaceError(f"{path}: image is {im.width}x{im.height}, larger than this tool reads "
                                f"({MAX_IMAGE_PIXELS // 1_000_000} Mpx); downscale it first")
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError:
        raise FaceError(f"{path}: the image header claims more pixels than this tool reads "
                        f"({MAX_IMAGE_PIXELS // 1_000_000} Mpx); refusing to decode it") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FaceError(f"{path}: not a readable image ({type(exc).__name__}: {exc})".splitlines()[0]) from None


def _builtin_image(key: str) -> tuple[np.ndarray, str]:
    if key == "astronaut":
        from skimage import data

        return np.asarray(data.astronaut()), "scikit-image data.astronaut() (NASA portrait, public domain)"
    if key == "hopper":
        import matplotlib.cbook as cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as im:
            return np.asarray(im.convert("RGB")), "matplotlib sample_data/grace_hopper.jpg (US Navy, public domain)"
    raise FaceError(f"unknown built-in face '{key}'; built-in faces are {', '.join(BUILTIN_FACES)}")


def _with_landmarks(key: str, source: str, image: np.ndarray) -> BaseFace:
    if image.ndim != 3 or min(image.shape[:2]) < 64:
        raise FaceError(f"{source}: image is too small to hold a face ({image.shape[1]}x{image.shape[0]})")
    landmarks = _detector()(image)
    if landmarks is None:
        raise FaceError(f"{source}: no face found (MediaPipe face mesh); use a frontal portrait")
    return BaseFace(key=key, source=source, image=image, landmarks=landmarks)


@functools.cache
def builtin_face(key: str) -> BaseFace:
    image, source = _builtin_image(key)
    return _with_landmarks(key, source, image)


def face_files(faces_dir: str | os.PathLike[str]) -> list[Path]:
    """The portraits in ``faces_dir`` (top level only, sorted by name); errors name the folder."""
    folder = Path(faces_dir)
    if not folder.exists():
        raise FaceError(f"{folder}: no such folder (option --faces)")
    if not folder.is_dir():
        raise FaceError(f"{folder}: not a folder (option --faces takes a folder of portraits)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise FaceError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)}) (option --faces)")
    return files


def load_face_file(path: Path, key: str | None = None) -> BaseFace:
    return _with_landmarks(key or path.stem, str(path), _read_image(path))


def load_base_faces(faces_dir: str | os.PathLike[str] | None = None) -> list[BaseFace]:
    """Every base portrait: those in ``faces_dir``, or the built-in ones. Faceless images are errors."""
    if faces_dir is None:
        return [builtin_face(k) for k in BUILTIN_FACES]
    return [load_face_file(p) for p in face_files(faces_dir)]


# --------------------------------------------------------------------------------------- identities

@dataclass(frozen=True)
class Identity:
    """How a patient's face is made from a base portrait; plain data, recorded in the manifest."""

    base: str
    variant: int = 0
    fitzpatrick: int | None = None      # None keeps the portrait's own skin tone
    face_fraction: float = 0.62         # width of the face oval / width of the image
    aspect: float = 1.0                 # horizontal stretch of the face (geometry)
    roll_deg: float = 0.0
    offset: tuple[float, float] = (0.0, 0.0)   # framing: shift of the face centre, in image widths
    light_angle_deg: float = 0.0        # direction the extra light comes from
    light_strength: float = 0.0         # relative brightness change across the face
    exposure: float = 1.0
    warmth: float = 0.0                 # b* shift of the whole picture (colour temperature)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _fitzpatrick(patient_index: int, n_bases: int) -> int:
    """Each base portrait walks the cycle from its own offset, so every base meets every skin type."""
    base_index, variant = patient_index % n_bases, patient_index // n_bases
    offset = base_index * len(FITZPATRICK_CYCLE) // n_bases
    return FITZPATRICK_CYCLE[(variant - 1 + offset) % len(FITZPATRICK_CYCLE)]


def identity_for(patient_index: int, bases: Sequence[BaseFace], seed: int) -> Identity:
    """The identity of the ``patient_index``-th patient (0-based).

    The first patients get the base portraits as they are; later ones cycle through the bases with a
    drawn appearance, so no two patients share one.
    """
    base = bases[patient_index % len(bases)]
    variant = patient_index // len(bases)
    if variant == 0:
        return Identity(base=base.key)
    rng = derived_rng("identity", seed, base.key, variant)
    return Identity(
        base=base.key,
        variant=variant,
        fitzpatrick=_fitzpatrick(patient_index, len(bases)),
        face_fraction=round(float(rng.uniform(0.55, 0.7)), 4),
        aspect=round(float(rng.uniform(0.93, 1.07)), 4),
        roll_deg=round(float(rng.uniform(-5, 5)), 3),
        offset=(round(float(rng.uniform(-0.04, 0.04)), 4), round(float(rng.uniform(-0.04, 0.04)), 4)),
        light_angle_deg=round(float(rng.uniform(0, 360)), 2),
        light_strength=round(float(rng.uniform(0.05, 0.2)), 4),
        exposure=round(float(rng.uniform(0.9, 1.1)), 4),
        warmth=round(float(rng.uniform(-4, 4)), 3),
    )


# --------------------------------------------------------------------------------------------- faces

@dataclass
class Face:
    """A patient's face at the run's size: the image lesions are drawn on, and where skin is."""

    identity: Identity
    image: np.ndarray = field(repr=False)          # (S, S, 3) uint8 RGB
    landmarks: np.ndarray = field(repr=False)      # (468, 2) pixel coordinates in ``image``
    skin: np.ndarray = field(repr=False)           # (S, S) bool: where lesions may be drawn
    regions: dict[str, np.ndarray] = field(repr=False)   # region name -> (S, S) bool, subsets of skin
    source: str = ""

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    @functools.cached_property
    def scale(self) -> float:
        """Interocular distance in pixels: lesion sizes are given in this unit."""
        return float(_frame(self.landmarks)[1])

    @functools.cached_property
    def triangle_map(self) -> np.ndarray:
        """(S, S) int32: index of the mesh triangle under each skin pixel, -1 elsewhere."""
        tri_map = np.full(self.skin.shape, -1, dtype=np.int32)
        tris = mesh_triangles()
        pts = np.round(self.landmarks[tris] * 16).astype(np.int32)  # 4 fractional bits
        for i, poly in enumerate(pts):
            cv2.fillConvexPoly(tri_map, poly, int(i), lineType=cv2.LINE_8, shift=4)
        tri_map[~self.skin] = -1
        return tri_map

    @functools.cached_property
    def region_map(self) -> np.ndarray:
        """(S, S) int8: index into :data:`REGIONS` of each skin pixel, -1 elsewhere."""
        out = np.full(self.skin.shape, -1, dtype=np.int8)
        for i, name in enumerate(REGIONS):
            out[self.regions[name]] = i
        return out

    def view(self, name: str, yaw_deg: float = 25.0) -> Face:
        """The same face seen from a side: ``left`` shows the patient's left cheek, ``right`` the right.

        A perspective turn of the portrait about the vertical axis through the face centre; landmarks and
        masks move with it, so lesions anchored in face-mesh coordinates stay on the same spot.
        """
        if name == "frontal":
            return self
        if name not in ("left", "right"):
            raise ValueError(f"unknown view '{name}'")
        size = self.size
        # the patient's left cheek is on the image's right; showing it turns the face towards image-left
        theta = math.radians(yaw_deg if name == "left" else -yaw_deg)
        focal = 1.5 * size
        origin, _, _ = _frame(self.landmarks)
        cx, cy = origin
        k = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1.0]])
        rot = np.array([[math.cos(theta), 0, math.sin(theta)], [0, 1, 0], [-math.sin(theta), 0, math.cos(theta)]])
        # the picture plane sits at depth `focal` (so it maps to itself unturned) and turns about its centre
        plane = np.column_stack([rot[:, 0], rot[:, 1], -rot[:, 0] * cx - rot[:, 1] * cy + np.array([0, 0, focal])])
        h = k @ plane
        image = cv2.warpPerspective(self.image, h, (size, size), flags=cv2.INTER_CUBIC,
                                    borderMode=cv2.BORDER_REFLECT101)
        pts = np.hstack([self.landmarks, np.ones((len(self.landmarks), 1))]) @ h.T
        landmarks = pts[:, :2] / pts[:, 2:3]

        def warp(mask: np.ndarray) -> np.ndarray:
            return cv2.warpPerspective(mask.astype(np.uint8), h, (size, size), flags=cv2.INTER_NEAREST,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)

        return Face(identity=self.identity, image=image, landmarks=landmarks, skin=warp(self.skin),
                    regions={k_: warp(v) for k_, v in self.regions.items()}, source=self.source)

    def to_pixels(self, triangles: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """Pixel positions (N, 2) of face-mesh anchors (triangle indices (N,), barycentric weights (N, 3))."""
        corners = self.landmarks[mesh_triangles()[np.asarray(triangles)]]  # (N, 3, 2)
        return np.einsum("nk,nkd->nd", np.asarray(bary, dtype=np.float64), corners)

    def to_anchors(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face-mesh anchors of pixel positions on skin: (triangle indices, barycentric weights)."""
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        xi = np.clip(np.round(pts[:, 0]).astype(int), 0, self.size - 1)
        yi = np.clip(np.round(pts[:, 1]).astype(int), 0, self.size - 1)
        hint = self.triangle_map[yi, xi]
        if (hint < 0).any():
            raise ValueError("a point lies outside the face-mesh skin")
        corners = self.landmarks[mesh_triangles()]                     # (T, 3, 2)
        bary_all = _barycentric(pts, corners)                          # (N, T, 3)
        inside = (bary_all >= -1e-9).all(axis=2)
        # the triangle that contains the point (the rasterised one when several share an edge)
        contains_hint = inside[np.arange(len(pts)), hint]
        tri = np.where(contains_hint, hint, np.where(inside.any(axis=1), inside.argmax(axis=1), hint))
        bary = np.clip(bary_all[np.arange(len(pts)), tri], 0, None)
        bary /= bary.sum(axis=1, keepdims=True)
        return tri, bary


def _barycentric(pts: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Barycentric weights (N, T, 3) of points (N, 2) in triangles (T, 3, 2)."""
    a, b, c = corners[None, :, 0], corners[None, :, 1], corners[None, :, 2]
    p = pts[:, None, :]
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    den = np.where(np.abs(den) < 1e-12, 1e-12, den)
    w1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / den
    w2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / den
    return np.stack([1 - w1 - w2, w1, w2], axis=-1)


def _frame(landmarks: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Face frame: origin between the eye centres, scale = interocular distance, rows = x/y unit axes."""
    m = _mesh()
    left = landmarks[m["left_eye"]].mean(axis=0)
    right = landmarks[m["right_eye"]].mean(axis=0)
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
    origin, iod, axes = _frame(landmarks)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    dx, dy = xx - origin[0], yy - origin[1]
    return (dx * axes[0, 0] + dy * axes[0, 1]) / iod, (dx * axes[1, 0] + dy * axes[1, 1]) / iod


def skin_regions(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Skin mask and region masks of a face image from its landmarks.

    Inside the face oval; minus eyes, brows, lips and the nostrils (each grown by a margin); minus pixels
    whose colour is far from the face's own skin (hair, glasses, beard, shadows).
    """
    h, w = image.shape[:2]
    m = _mesh()
    origin, iod, axes = _frame(landmarks)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(landmarks[m["oval"]] * 16).astype(np.int32)], 1, shift=4)
    inside = mask.astype(bool)

    exclude = np.zeros((h, w), np.uint8)
    for part, margin in (("left_eye", 0.12), ("right_eye", 0.12), ("left_brow", 0.06), ("right_brow", 0.06),
                         ("lips", 0.06)):
        hull = cv2.convexHull(np.round(landmarks[m[part]] * 16).astype(np.int32))
        part_mask = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(part_mask, hull, 1, shift=4)
        k = max(1, int(round(margin * iod)))
        part_mask = cv2.dilate(part_mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
        exclude |= part_mask
    fx, fy = face_coordinates(landmarks, (h, w))
    nostrils = (np.abs(fx) < 0.4) & (fy > 0.5) & (fy < 0.82)
    geometric = inside & ~exclude.astype(bool) & ~nostrils

    # colour: keep pixels near the face's typical skin colour (Lab distance, lightness weighted down)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    core = geometric & (np.abs(fx) > 0.3) & (np.abs(fx) < 0.8) & (fy > 0.2) & (fy < 0.7)
    if core.sum() < 20:
        core = geometric
    ref = np.median(lab[core], axis=0)
    spread = np.median(np.abs(lab[core] - ref), axis=0) * 1.4826 + 1.0
    dist = np.sqrt(((lab[..., 0] - ref[0]) / (3.5 * spread[0] + 25)) ** 2
                   + ((lab[..., 1] - ref[1]) / (3.5 * spread[1] + 6)) ** 2
                   + ((lab[..., 2] - ref[2]) / (3.5 * spread[2] + 6)) ** 2)
    skin = geometric & (dist < 1.0)
    k = max(1, int(round(0.03 * iod)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
    skin = cv2.morphologyEx(skin.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    skin = cv2.morphologyEx(skin, cv2.MORPH_CLOSE, kernel).astype(bool) & geometric

    forehead = fy < -0.25
    nose = ~forehead & (np.abs(fx) < 0.25) & (fy < 0.55)
    chin = ~forehead & ~nose & (np.abs(fx) < 0.45) & (fy >= 0.55)
    jaw = ~forehead & ~nose & ~chin & (fy >= 1.0)
    cheeks = ~forehead & ~nose & ~chin & ~jaw
    regions = {
        "forehead": skin & forehead, "nose": skin & nose,
        "left_cheek": skin & cheeks & (fx < 0), "right_cheek": skin & cheeks & (fx >= 0),
        "chin": skin & chin, "jaw": skin & jaw,
    }
    return skin, regions


def make_face(base: BaseFace, identity: Identity, size: int = 512) -> Face:
    """Crop, frame and restyle a base portrait into a patient's face at ``size`` x ``size`` pixels."""
    if identity.base != base.key:
        raise ValueError(f"identity is for base '{identity.base}', not '{base.key}'")
    lm = base.landmarks
    oval = lm[_mesh()["oval"]]
    centre = (oval.min(axis=0) + oval.max(axis=0)) / 2
    width = float(np.ptp(oval[:, 0]))
    origin, _, axes = _frame(lm)
    base_roll = math.degrees(math.atan2(axes[0, 1], axes[0, 0]))
    s = identity.face_fraction * size / max(width, 1.0)
    angle = math.radians(base_roll + identity.roll_deg)
    ca, sa = math.cos(angle), math.sin(angle)
    # rotate about the face centre (undoing the portrait's own roll), stretch x, scale, then frame
    rot = np.array([[ca, sa], [-sa, ca]])
    linear = s * np.diag([identity.aspect, 1.0]) @ rot
    target = np.array([size / 2 + identity.offset[0] * size, size / 2 + identity.offset[1] * size])
    affine = np.hstack([linear, (target - linear @ centre)[:, None]])
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    image = cv2.warpAffine(base.image, affine, (size, size), flags=interp, borderMode=cv2.BORDER_REFLECT101)
    landmarks = lm @ affine[:, :2].T + affine[:, 2]
    image = _restyle(image, landmarks, identity)
    skin, regions = skin_regions(image, landmarks)
    if skin.sum() < 0.01 * size * size:
        raise FaceError(f"{base.source}: too little visible skin on the face to draw lesions on")
    return Face(identity=identity, image=image, landmarks=landmarks, skin=skin, regions=regions,
                source=base.source)


def _restyle(image: np.ndarray, landmarks: np.ndarray, identity: Identity) -> np.ndarray:
    """Skin tone (Fitzpatrick type), lighting, exposure and warmth of an identity variant."""
    if (identity.fitzpatrick is None and identity.light_strength == 0 and identity.exposure == 1.0
            and identity.warmth == 0):
        return image
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)  # L 0-100, a/b signed
    if identity.fitzpatrick is not None:
        skin, _ = skin_regions(image, landmarks)
        ref = np.median(lab[skin], axis=0) if skin.any() else lab.reshape(-1, 3).mean(axis=0)
        target = np.array(FITZPATRICK_LAB[identity.fitzpatrick], dtype=np.float32)
        weight = _tone_weight(lab, landmarks, ref)[..., None]
        styled = lab.copy()
        styled[..., 0] = lab[..., 0] * (target[0] / max(ref[0], 1.0))
        styled[..., 1] = lab[..., 1] + (target[1] - ref[1])
        styled[..., 2] = lab[..., 2] + (target[2] - ref[2])
        lab = weight * styled + (1 - weight) * lab
    h, w = image.shape[:2]
    if identity.light_strength:
        a = math.radians(identity.light_angle_deg)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = ((xx / w - 0.5) * math.cos(a) + (yy / h - 0.5) * math.sin(a)) * 2
        lab[..., 0] *= 1 + identity.light_strength * ramp / 2
    lab[..., 0] *= identity.exposure
    lab[..., 2] += identity.warmth
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


#: Inner lip contour (the mouth opening: teeth, tongue), from MediaPipe's lip landmarks.
INNER_LIPS = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)


def _tone_weight(lab: np.ndarray, landmarks: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """How much each pixel takes a new skin tone (0-1).

    Inside the face every skin pixel does, highlights and shadows included (a colour test alone would
    leave pale blotches); the eyes and the mouth opening keep their colour and the lips take half. Beyond
    the face, skin-coloured pixels (neck, ears) follow by chroma, so there is no seam at the jaw line.
    """
    h, w = lab.shape[:2]
    m = _mesh()
    _, iod, _ = _frame(landmarks)

    def hull(indices, grow: float) -> np.ndarray:
        out = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(out, cv2.convexHull(np.round(landmarks[list(indices)] * 16).astype(np.int32)), 1, shift=4)
        if grow:
            k = max(1, int(round(grow * iod)))
            out = cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
        return out.astype(np.float32)

    face = np.zeros((h, w), np.uint8)
    cv2.fillPoly(face, [np.round(landmarks[m["oval"]] * 16).astype(np.int32)], 1, shift=4)
    spatial = face.astype(np.float32)
    spatial = np.minimum(spatial, 1 - 0.5 * hull(m["lips"], 0.0))
    spatial = np.minimum(spatial, 1 - hull(INNER_LIPS, 0.0))
    keep = np.maximum(hull(m["left_eye"], 0.02), hull(m["right_eye"], 0.02))
    spatial = np.minimum(spatial, 1 - keep)
    chroma = np.hypot(lab[..., 1] - ref[1], lab[..., 2] - ref[2])
    light = np.clip(1 - np.maximum(ref[0] - 45 - lab[..., 0], lab[..., 0] - ref[0] - 35) / 10, 0, 1)
    colour = np.exp(-0.5 * (chroma / 12) ** 2) * light * (1 - keep) * (1 - hull(INNER_LIPS, 0.0))
    weight = np.maximum(spatial, colour).astype(np.float32)
    return cv2.GaussianBlur(weight, (0, 0), max(1.0, 0.02 * iod))


def face_from_request(value: str, faces_dir: str | os.PathLike[str] | None, protocol_dir: Path | None,
                      patient_id: str) -> BaseFace:
    """The base portrait a protocol's ``face`` column asks for.

    ``value`` is a base key (a built-in face name, or a file name or stem in ``faces_dir``) or an image path
    relative to the protocol's folder. Errors name the patient and the column.
    """
    if faces_dir is None:
        if value in BUILTIN_FACES:
            return builtin_face(value)
        keys = list(BUILTIN_FACES)
    else:
        files = face_files(faces_dir)
        for path in files:
            if value in (path.name, path.stem):
                return load_face_file(path)
        keys = [p.stem for p in files]
    path = Path(value)
    hint = f"neither a face key ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}) nor an image path " \
           "relative to the protocol's folder (column 'face')"
    if protocol_dir is None or path.is_absolute() or ".." in path.parts:
        raise FaceError(f"patient '{patient_id}': face '{value}' is {hint}")
    full = protocol_dir / path
    if not full.is_file():
        raise FaceError(f"patient '{patient_id}': face '{value}' is {hint}; {full} does not exist")
    return load_face_file(full, key=path.as_posix())
