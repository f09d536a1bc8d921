"""Faces: landmarks, skin regions that exclude eyes/brows/lips/nostrils, identities, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from synthtrial.face.faces import (ADULT_IPD_MM, BUILTIN_FACES, REGIONS, FaceError, Identity, face_files,
                                   face_from_request, identity_for, load_base_faces, make_face)
from synthtrial.face.mesh import mesh_triangles

LEFT_EYE = [33, 133, 159, 145]   # landmarks on the eyes and lips must never be skin
RIGHT_EYE = [362, 263, 386, 374]
LIPS = [0, 13, 14, 17, 61, 291]


def test_builtin_faces_have_468_landmarks(bases):
    assert [b.key for b in bases] == list(BUILTIN_FACES)
    for base in bases:
        h, w = base.image.shape[:2]
        assert base.landmarks.shape == (468, 2)
        assert (base.landmarks >= 0).all() and (base.landmarks[:, 0] < w).all() and (base.landmarks[:, 1] < h).all()


def test_mesh_triangles_cover_the_mesh():
    tris = mesh_triangles()
    assert tris.shape[1] == 3 and len(tris) > 800
    assert len(np.unique(tris)) == 468


def test_face_skin_and_regions(face256):
    face = face256
    assert face.image.shape == (256, 256, 3) and face.image.dtype == np.uint8
    assert 0.05 < face.skin.mean() < 0.5
    union = np.zeros_like(face.skin)
    for name in REGIONS:
        region = face.regions[name]
        assert region.any(), name
        assert not (region & union).any(), f"{name} overlaps another region"
        union |= region
    assert (union == face.skin).all()
    for i in LEFT_EYE + RIGHT_EYE + LIPS:
        x, y = np.round(face.landmarks[i]).astype(int)
        assert not face.skin[y, x], f"landmark {i} lies on skin"
    # regions sit where they should: forehead above the eyes, chin below the mouth
    ys = {name: np.nonzero(face.regions[name])[0].mean() for name in REGIONS}
    eye_y = face.landmarks[LEFT_EYE + RIGHT_EYE, 1].mean()
    mouth_y = face.landmarks[LIPS, 1].mean()
    assert ys["forehead"] < eye_y < ys["left_cheek"] < ys["chin"]
    assert ys["chin"] > mouth_y - 5
    xs_left = np.nonzero(face.regions["left_cheek"])[1].mean()
    xs_right = np.nonzero(face.regions["right_cheek"])[1].mean()
    assert xs_left < xs_right


def test_anchor_round_trip(face256):
    rng = np.random.default_rng(0)
    ys, xs = np.nonzero(face256.skin & (face256.triangle_map >= 0))
    pick = rng.choice(len(xs), 50, replace=False)
    pts = np.stack([xs[pick], ys[pick]], 1).astype(float) + 0.25
    tri, bary = face256.to_anchors(pts)
    np.testing.assert_allclose(face256.to_pixels(tri, bary), pts, atol=1e-6)
    assert np.allclose(bary.sum(1), 1) and (bary >= 0).all()


def test_side_views_move_anchors_with_the_face(face256):
    ys, xs = np.nonzero(face256.regions["left_cheek"] | face256.regions["right_cheek"])
    pick = np.linspace(0, len(xs) - 1, 6).astype(int)
    pts = np.stack([xs[pick], ys[pick]], 1).astype(float)
    tri, bary = face256.to_anchors(pts)
    left, right = face256.view("left"), face256.view("right")
    assert face256.view("frontal") is face256
    for view in (left, right):
        assert view.image.shape == face256.image.shape and view.skin.any()
        moved = view.to_pixels(tri, bary)
        assert not np.allclose(moved, face256.to_pixels(tri, bary))
        # the anchored point still lies on the view's skin (same anatomical spot) wherever it is in sight; only
        # points at the far cheek's edge turn out of sight
        seen = view.visible(tri, bary)
        assert seen.sum() >= 4
        x, y = np.round(moved[seen]).astype(int).T
        assert view.skin[y, x].mean() >= 0.75
    # "left" shows the patient's left cheek (image right): that half of the face widens, the other narrows
    def right_over_left(face):
        nose, xs = face.landmarks[1, 0], face.landmarks[:, 0]
        return (xs.max() - nose) / (nose - xs.min())

    assert right_over_left(left) > 1.1 * right_over_left(face256) > 1.21 * right_over_left(right)


def test_identities_first_bases_then_distinct_variants(bases):
    ids = [identity_for(i, bases, seed=0) for i in range(10)]
    assert ids[0] == Identity(base="astronaut") and ids[1] == Identity(base="hopper")
    assert len({i.to_json() for i in ids}) == 10
    assert [i.mirror for i in ids] == [False, False, True, True, False, False, True, True, False, False]
    assert identity_for(5, bases, seed=0) == ids[5]
    assert identity_for(5, bases, seed=1) != ids[5]
    assert "fitzpatrick" not in json.loads(ids[4].to_json())


def test_variants_keep_the_portraits_own_skin(bases):
    """No skin recolouring: a variant's skin has the portrait's colour (light and exposure aside)."""
    import cv2

    def skin_lab(face):
        lab = cv2.cvtColor(face.image.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
        return np.median(lab[face.skin], axis=0)

    base = make_face(bases[0], Identity(base="astronaut"), 256)
    for index in (2, 4, 6):
        identity = identity_for(index, bases, 0)
        variant = make_face(bases[0], identity, 256)
        d = skin_lab(variant) - skin_lab(base)
        assert abs(d[0]) < 10 and abs(d[1]) < 4 and abs(d[2]) < 5, (index, d)


def test_mirror_variant_is_the_mirror_image_with_its_own_landmarks(bases):
    plain = make_face(bases[1], Identity(base="hopper"), 256)
    mirror = make_face(bases[1], Identity(base="hopper", mirror=True), 256)
    # about the same framing of a flipped photo: pixels match the flipped plain face far better than the plain one
    flipped = np.abs(mirror.image.astype(int) - plain.image[:, ::-1].astype(int)).mean()
    unflipped = np.abs(mirror.image.astype(int) - plain.image.astype(int)).mean()
    assert flipped < 0.6 * unflipped
    # landmarks were found again on the flipped photo: the patient's left eye is still on the image's right
    assert mirror.landmarks[263, 0] > mirror.landmarks[33, 0]


def test_mm_per_px_from_the_interpupillary_distance(face256):
    assert face256.mm_per_px == pytest.approx(ADULT_IPD_MM / face256.scale)
    assert 0.2 < face256.mm_per_px < 1.5
    side = face256.view("left")
    assert side.mm_per_px == face256.mm_per_px     # the ruler of the face does not change with the view


def test_head_turn_moves_pixels_with_their_landmarks(face256):
    """The warp carries each face-mesh anchor to its projected landmarks: a dot painted at an anchor in
    the frontal photo ends up within 2 px of the anchor's position in the turned view."""
    import cv2

    from synthtrial.face.headturn import head_turn

    rng = np.random.default_rng(1)
    cheeks = face256.regions["left_cheek"] | face256.regions["right_cheek"] | face256.regions["forehead"]
    inner = cv2.erode((face256.triangle_map >= 0).astype(np.uint8), np.ones((11, 11), np.uint8)) > 0
    ys, xs = np.nonzero(cheeks & inner)   # dots wholly on the mesh (beyond it the hair ring stretches)
    pick = rng.choice(len(xs), 12, replace=False)
    pts = np.stack([xs[pick], ys[pick]], 1).astype(float) + 0.5
    tri, bary = face256.to_anchors(pts)
    for name, yaw in (("left", 25.0), ("right", 25.0), ("left", 35.0)):
        view = face256.view(name, yaw)
        warp = head_turn(face256.landmarks, face256.depth, face256.size, yaw if name == "left" else -yaw)
        moved = view.to_pixels(tri, bary)
        seen = view.visible(tri, bary)
        assert seen.sum() >= 8
        for p, q, ok in zip(pts, moved, seen):
            if not ok:
                continue
            dot = np.zeros((face256.size, face256.size), np.float32)
            cv2.circle(dot, (int(p[0] * 16 - 8), int(p[1] * 16 - 8)), 2 * 16, 1.0, -1, shift=4)
            out = cv2.remap(dot, warp.map_x, warp.map_y, cv2.INTER_LINEAR)
            yy, xx = np.nonzero(out > 0.05)
            w = out[yy, xx]
            centre = np.array([(xx + 0.5) @ w, (yy + 0.5) @ w]) / w.sum()
            assert np.hypot(*(centre - q)) < 2.0, (name, yaw, p, q, centre)


def test_far_cheek_foreshortens_and_hides_behind_the_nose(face256):
    left = face256.view("left", 35.0)
    # the far cheek (patient's right: image left) narrows more than the near one
    m = face256.landmarks
    far = (m[1, 0] - m[:, 0].min(), left.landmarks[1, 0] - left.landmarks[:, 0].min())
    near = (m[:, 0].max() - m[1, 0], left.landmarks[:, 0].max() - left.landmarks[1, 0])
    assert far[1] / far[0] < 0.8 < near[1] / near[0]
    # some anchors beside the nose on the far side are out of sight; all on the near cheek are seen
    tris = mesh_triangles()
    bary = np.full((len(tris), 3), 1 / 3)
    seen = left.visible(np.arange(len(tris)), bary)
    centres = left.to_pixels(np.arange(len(tris)), bary)
    assert (~seen).sum() > 0
    near_cheek = centres[:, 0] > left.landmarks[1, 0] + 0.3 * left.scale
    assert seen[near_cheek].mean() > 0.97
    with pytest.raises(ValueError, match="yaw_deg"):
        face256.view("left", 80.0)


def test_faces_dir_errors(tmp_path, gray_image_dir):
    with pytest.raises(FaceError, match="no such folder"):
        face_files(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FaceError, match="not a folder"):
        face_files(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FaceError, match="holds no images"):
        face_files(empty)
    with pytest.raises(FaceError, match=r"wall\.png: no face found"):
        load_base_faces(gray_image_dir)
    (gray_image_dir / "wall.png").write_text("not an image")
    with pytest.raises(FaceError, match=r"wall\.png: not a readable image"):
        load_base_faces(gray_image_dir)


def test_faces_dir_and_face_requests(tmp_path, bases):
    folder = tmp_path / "faces"
    folder.mkdir()
    Image.fromarray(bases[1].image).save(folder / "grace.jpg")
    loaded = load_base_faces(folder)
    assert [b.key for b in loaded] == ["grace"]
    assert face_from_request("grace", folder, None, "p1").key == "grace"
    assert face_from_request("grace.jpg", folder, None, "p1").key == "grace"
    assert face_from_request("astronaut", None, None, "p1").key == "astronaut"
    assert face_from_request("faces/grace.jpg", None, tmp_path, "p1").key == "faces/grace.jpg"
    with pytest.raises(FaceError, match="patient 'p1': face 'nobody'.*column 'face'"):
        face_from_request("nobody", None, tmp_path, "p1")
    with pytest.raises(FaceError, match="patient 'p2'"):
        face_from_request("../faces/grace.jpg", None, tmp_path / "faces", "p2")


# ------------------------------------------------------------------------------------------ the mesh module

def test_mesh_measures_the_face_one_way(bases):
    """The frame's scale is the inter-ocular distance; the counter's corner-based distance is the same ruler
    measured between eye corners (close to, but not the same as, the contour's)."""
    from synthtrial.face.mesh import EYE_CORNERS, eye_centres, frame, interocular

    for base in bases:
        lm = base.landmarks
        origin, iod, axes = frame(lm)
        assert interocular(lm) == iod
        left, right = eye_centres(lm)
        assert np.allclose(origin, (left + right) / 2) and np.allclose(axes @ axes.T, np.eye(2))
        corners = interocular(lm, eyes="corners")
        (la, lb), (ra, rb) = EYE_CORNERS["left"], EYE_CORNERS["right"]
        assert corners == float(np.hypot(*((lm[la] + lm[lb]) / 2 - (lm[ra] + lm[rb]) / 2)))
        assert corners != iod and abs(corners / iod - 1) < 0.1
    with pytest.raises(ValueError, match="eyes must be"):
        interocular(bases[0].landmarks, eyes="pupils")


def test_pivot_is_behind_the_eyes(face256):
    from synthtrial.face.mesh import PIVOT_DEPTH_IOD, eye_depth, frame, pivot

    x, z = pivot(face256.landmarks, face256.depth)
    origin, iod, _ = frame(face256.landmarks)
    assert x == float(origin[0])
    assert z == eye_depth(face256.depth) + PIVOT_DEPTH_IOD * iod and z > eye_depth(face256.depth)
