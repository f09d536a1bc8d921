"""Identities: base portraits, MediaPipe face-mesh landmarks, skin regions, and per-patient appearance.

A patient's series is drawn on one :class:`Face`: a square portrait at the run's size, its 468 face-mesh
landmarks, and masks of the skin where acne may appear (forehead, cheeks, nose, chin, jaw; eyes, brows,
lips and nostrils excluded). Lesions are anchored in face-mesh coordinates (a mesh triangle and
barycentric weights), so a lesion lands on the same anatomical spot every day.

Base portraits come from ``--faces DIR`` (e.g. ACNE04 level-0 images) or, by default, the public-domain
portraits shipped inside installed packages (NASA's astronaut Eileen Collins in scikit-image, Grace Hopper
in matplotlib). Every patient keeps the skin of the portrait they are made from: there is no skin-tone
recolouring (a recoloured face beside untouched hair, lips and background reads as paint, not as a person),
so other skin types come from ``--faces`` or the face bank. Patients beyond the number of base faces get a
distinct, consistent appearance from what stays natural in a photograph: a mirror image, geometry (scale,
aspect, roll), framing, a lighting gradient, exposure and colour temperature, all recorded in the
manifest as ``identity``.

Physical scale: a face's millimetres per pixel come from its inter-pupillary distance (the distance between
the eye centres of the mesh), taken as the adult mean :data:`ADULT_IPD_MM` (Dodgson NA, Variation and
extrema of human interpupillary distance, Proc SPIE 5291, 2004: adult mean about 63 mm).

Side views turn the head, not the picture: MediaPipe's 3-D landmarks are rotated about a vertical axis
through the neck (:func:`synthtrial.face.mesh.pivot`, behind the eyes) by the requested yaw, projected
orthographically, and the portrait is warped piecewise-affinely over the mesh triangles, far triangles first and back-facing
ones dropped, so the near cheek widens, the far cheek foreshortens and slips behind the nose, and every
face-mesh anchor lands on its projected landmarks. Hair, ears and background follow on a ring of control
points around the face oval that moves with it, pinned at the image border.
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

import cv2
import numpy as np

from synthtrial.face.headturn import head_turn
from synthtrial.face.mesh import barycentric, face_coordinates, frame, mesh_triangles, topology
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.seeding import derived_rng

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
BUILTIN_FACES = ("astronaut", "hopper")
REGIONS = ("forehead", "nose", "left_cheek", "right_cheek", "chin", "jaw")
#: Relative density of lesions per unit skin area, by region (acne favours cheeks, chin and forehead).
REGION_WEIGHTS = {"forehead": 1.0, "nose": 0.5, "left_cheek": 1.3, "right_cheek": 1.3, "chin": 1.2, "jaw": 0.9}
#: Adult mean inter-pupillary distance (mm): the ruler of every face (see the module docstring).
ADULT_IPD_MM = 63.0
#: Default head turn of the ``left`` / ``right`` views (degrees of yaw).
DEFAULT_YAW_DEG = 25.0
MAX_IMAGE_PIXELS = 40_000_000
#: Portraits enlarged by more than this factor get sharpened and grained back to a photographic look
#: (:func:`_restore_upscaled`); the amount of unsharp masking and the grain (0-255 units) it adds.
UPSCALE_RESTORE_FROM = 1.25
UNSHARP_AMOUNT = 0.6
GRAIN_SIGMA = 1.6


class FaceError(SynthtrialError):
    """A portrait that cannot serve as a face: unreadable, no face found, bad folder."""


# ----------------------------------------------------------------------------------------- landmarks

@contextlib.contextmanager
def quiet_native_stderr():
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
        with quiet_native_stderr():
            from mediapipe.python.solutions import face_mesh

            self._mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=4, refine_landmarks=False,
                                            min_detection_confidence=0.5)

    def faces3d(self, image: np.ndarray) -> list[np.ndarray]:
        """(468, 3) landmarks of every face found (up to 4): x, y in pixels and depth z in pixels (MediaPipe's
        z times the image width; larger is farther from the camera); empty when there is none."""
        with quiet_native_stderr():
            result = self._mesh.process(np.ascontiguousarray(image))
        if not result.multi_face_landmarks:
            return []
        h, w = image.shape[:2]
        return [np.array([(p.x * w, p.y * h, p.z * w) for p in f.landmark[:468]], dtype=np.float64)
                for f in result.multi_face_landmarks]

    def faces(self, image: np.ndarray) -> list[np.ndarray]:
        """(468, 2) pixel landmarks of every face found (up to 4); empty when there is none."""
        return [lm[:, :2] for lm in self.faces3d(image)]

    def landmarks3d(self, image: np.ndarray) -> np.ndarray | None:
        """(468, 3) landmarks of the largest face, or None when no face is found."""
        faces = self.faces3d(image)
        if not faces:
            return None
        return max(faces, key=lambda lm: np.ptp(lm[:, 0]) * np.ptp(lm[:, 1]))

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """(468, 2) pixel landmarks of the largest face, or None when no face is found."""
        lm = self.landmarks3d(image)
        return None if lm is None else lm[:, :2]

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
    depth: np.ndarray | None = field(default=None, repr=False)   # (468,) landmark depth, pixels


def read_image(path: Path) -> np.ndarray:
    """A portrait file as (H, W, 3) uint8 RGB; an unreadable or oversized one is a FaceError naming the file."""
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
    lm3 = _detector().landmarks3d(image)
    if lm3 is None:
        raise FaceError(f"{source}: no face found (MediaPipe face mesh); use a frontal portrait")
    return BaseFace(key=key, source=source, image=image, landmarks=lm3[:, :2].copy(), depth=lm3[:, 2].copy())


_MIRRORED: dict[tuple[str, str], BaseFace] = {}


def mirrored(base: BaseFace) -> BaseFace:
    """The portrait's mirror image, with its own landmarks (MediaPipe run again: left and right swap)."""
    key = (base.key, base.source)
    if key not in _MIRRORED:
        flipped = np.ascontiguousarray(base.image[:, ::-1])
        _MIRRORED[key] = _with_landmarks(base.key, base.source, flipped)
    return _MIRRORED[key]


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
    return _with_landmarks(key or path.stem, str(path), read_image(path))


def load_base_faces(faces_dir: str | os.PathLike[str] | None = None,
                    exclude: Sequence[str] = ()) -> list[BaseFace]:
    """Every base portrait: those in ``faces_dir`` (less the file names in ``exclude``), or the built-in ones.
    Faceless images are errors."""
    if faces_dir is None:
        return [builtin_face(k) for k in BUILTIN_FACES]
    return [load_face_file(p) for p in face_files(faces_dir) if p.name not in set(exclude)]


# --------------------------------------------------------------------------------------- identities

@dataclass(frozen=True)
class Identity:
    """How a patient's face is made from a base portrait; plain data, recorded in the manifest."""

    base: str
    variant: int = 0
    mirror: bool = False                # the portrait's mirror image (a different-looking, natural face)
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


def identity_for(patient_index: int, bases: Sequence[BaseFace], seed: int) -> Identity:
    """The identity of the ``patient_index``-th patient (0-based).

    The first patients get the base portraits as they are; later ones cycle through the bases with a
    drawn appearance, so no two patients share one: odd variants are mirror images, and every variant has
    its own geometry, framing and light. The skin stays the portrait's own.
    """
    base = bases[patient_index % len(bases)]
    variant = patient_index // len(bases)
    if variant == 0:
        return Identity(base=base.key)
    rng = derived_rng("identity", seed, base.key, variant)
    return Identity(
        base=base.key,
        variant=variant,
        mirror=bool(variant % 2),
        face_fraction=round(float(rng.uniform(0.55, 0.7)), 4),
        aspect=round(float(rng.uniform(0.93, 1.07)), 4),
        roll_deg=round(float(rng.uniform(-5, 5)), 3),
        offset=(round(float(rng.uniform(-0.04, 0.04)), 4), round(float(rng.uniform(-0.04, 0.04)), 4)),
        light_angle_deg=round(float(rng.uniform(0, 360)), 2),
        light_strength=round(float(rng.uniform(0.04, 0.14)), 4),
        exposure=round(float(rng.uniform(0.92, 1.08)), 4),
        warmth=round(float(rng.uniform(-3, 3)), 3),
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
    depth: np.ndarray | None = field(default=None, repr=False)   # (468,) landmark depth, pixels (far > near)
    view_name: str = "frontal"
    yaw_deg: float = 0.0
    frontal_iod: float | None = None       # a side view keeps the frontal face's ruler
    zbuf: np.ndarray | None = field(default=None, repr=False)  # (S, S) depth of the visible surface (side views)

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    @functools.cached_property
    def scale(self) -> float:
        """Interocular distance in pixels: lesion sizes are given in this unit. A side view keeps the
        frontal face's (a lesion does not shrink when the head turns; only its outline would foreshorten)."""
        return float(self.frontal_iod) if self.frontal_iod is not None else float(frame(self.landmarks)[1])

    @property
    def mm_per_px(self) -> float:
        """Millimetres per pixel at the face, from the inter-pupillary distance (:data:`ADULT_IPD_MM`)."""
        return ADULT_IPD_MM / self.scale

    def visible(self, triangles: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """Whether each face-mesh anchor can be seen in this view (always, frontally): its point is not
        behind the visible surface (the far cheek behind the nose) and lies on the face's pixels."""
        tri = np.asarray(triangles, dtype=np.int64)
        if self.zbuf is None or self.depth is None:
            return np.ones(tri.shape, bool)
        pts = self.to_pixels(tri, bary)
        z = np.einsum("nk,nk->n", np.asarray(bary, np.float64), self.depth[mesh_triangles()[tri]])
        xi = np.clip(np.floor(pts[:, 0]).astype(int), 0, self.size - 1)
        yi = np.clip(np.floor(pts[:, 1]).astype(int), 0, self.size - 1)
        return z <= self.zbuf[yi, xi] + 0.05 * self.scale

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

    def view(self, name: str, yaw_deg: float = DEFAULT_YAW_DEG) -> Face:
        """The same face with the head turned: ``left`` shows the patient's left cheek, ``right`` the right.

        The 3-D face mesh is rotated by ``yaw_deg`` and the portrait warped over its triangles (see the module
        docstring); landmarks, skin and regions move with it, so lesions anchored in face-mesh coordinates stay
        on their anatomical spot. A face without depth (built by hand) cannot turn.
        """
        if name == "frontal":
            return self
        if name not in ("left", "right"):
            raise ValueError(f"unknown view '{name}'")
        if not 0 < yaw_deg < 60:
            raise ValueError(f"yaw_deg must be between 0 and 60 degrees, got {yaw_deg}")
        if self.depth is None:
            raise ValueError("this face has no landmark depth; build it with make_face to turn it")
        warp = head_turn(self.landmarks, self.depth, self.size, yaw_deg if name == "left" else -yaw_deg)
        image = cv2.remap(self.image, warp.map_x, warp.map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)

        def move(mask: np.ndarray) -> np.ndarray:
            return cv2.remap(mask.astype(np.uint8), warp.map_x, warp.map_y, cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)

        # skin only where a face triangle shows (a hidden one's pixels are another surface's)
        skin = move(self.skin) & warp.on_mesh
        return Face(identity=self.identity, image=image, landmarks=warp.landmarks, skin=skin,
                    regions={k_: move(v) & skin for k_, v in self.regions.items()}, source=self.source,
                    depth=warp.depth, view_name=name, yaw_deg=float(yaw_deg), frontal_iod=self.scale,
                    zbuf=warp.zbuf)

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
        bary_all = barycentric(pts, corners)                          # (N, T, 3)
        inside = (bary_all >= -1e-9).all(axis=2)
        # the triangle that contains the point (the rasterised one when several share an edge)
        contains_hint = inside[np.arange(len(pts)), hint]
        tri = np.where(contains_hint, hint, np.where(inside.any(axis=1), inside.argmax(axis=1), hint))
        bary = np.clip(bary_all[np.arange(len(pts)), tri], 0, None)
        bary /= bary.sum(axis=1, keepdims=True)
        return tri, bary


def skin_regions(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Skin mask and region masks of a face image from its landmarks.

    Inside the face oval; minus eyes, brows, lips and the nostrils (each grown by a margin); minus pixels
    whose colour is far from the face's own skin (hair, glasses, beard, shadows).
    """
    h, w = image.shape[:2]
    m = topology()
    origin, iod, axes = frame(landmarks)
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
    if identity.mirror:
        base = mirrored(base)
    lm = base.landmarks
    oval = lm[topology()["oval"]]
    centre = (oval.min(axis=0) + oval.max(axis=0)) / 2
    width = float(np.ptp(oval[:, 0]))
    origin, _, axes = frame(lm)
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
    if s > UPSCALE_RESTORE_FROM:
        image = _restore_upscaled(image, s, identity)
    landmarks = lm @ affine[:, :2].T + affine[:, 2]
    # depth scales with the picture (the aspect stretch is a face-width change: depth follows the mean)
    depth = None if base.depth is None else base.depth * s * math.sqrt(identity.aspect)
    image = _restyle(image, identity)
    skin, regions = skin_regions(image, landmarks)
    if skin.sum() < 0.01 * size * size:
        raise FaceError(f"{base.source}: too little visible skin on the face to draw lesions on")
    return Face(identity=identity, image=image, landmarks=landmarks, skin=skin, regions=regions,
                source=base.source, depth=depth)


def _restore_upscaled(image: np.ndarray, factor: float, identity: Identity) -> np.ndarray:
    """An upscaled portrait made to look photographed at its new size: a mild unsharp mask at the scale of
    the upscaling (edges as crisp as a lens of that resolution would give, without halos) and fresh,
    seeded sensor grain (an upscale is too clean). Only structure the photo holds is sharpened; no detail is
    invented, so a 3x upscale stays softer than a real 512-pixel photo."""
    img = image.astype(np.float32)
    soft = cv2.GaussianBlur(img, (0, 0), 0.45 * factor)
    img = img + UNSHARP_AMOUNT * (img - soft)
    rng = derived_rng("grain", identity.to_json(), image.shape[0])
    luma = rng.standard_normal(image.shape[:2], dtype=np.float32)
    chroma = rng.standard_normal(image.shape, dtype=np.float32)
    img += GRAIN_SIGMA * (0.8 * luma[..., None] + 0.45 * chroma)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _restyle(image: np.ndarray, identity: Identity) -> np.ndarray:
    """Lighting gradient, exposure and colour temperature of an identity variant, applied to the whole
    picture alike (as a different lamp or camera setting would), never to the skin alone."""
    if identity.light_strength == 0 and identity.exposure == 1.0 and identity.warmth == 0:
        return image
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)  # L 0-100, a/b signed
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
