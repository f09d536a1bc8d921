"""Faces: landmarks, skin regions that exclude eyes/brows/lips/nostrils, identities, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from synthtrial.faces import (BUILTIN_FACES, FITZPATRICK_LAB, REGIONS, FaceError, Identity, face_files,
                              face_from_request, identity_for, load_base_faces, make_face, mesh_triangles)

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
        # the anchored point still lies on the view's skin (same anatomical spot), nearly everywhere
        x, y = np.round(moved).astype(int).T
        assert view.skin[y, x].mean() >= 0.8
    # "left" shows the patient's left cheek (image right): that half of the face widens, the other narrows
    def right_over_left(face):
        nose, xs = face.landmarks[1, 0], face.landmarks[:, 0]
        return (xs.max() - nose) / (nose - xs.min())

    assert right_over_left(left) > 1.1 * right_over_left(face256) > 1.21 * right_over_left(right)


def test_identities_first_bases_then_distinct_variants(bases):
    ids = [identity_for(i, bases, seed=0) for i in range(10)]
    assert ids[0] == Identity(base="astronaut") and ids[1] == Identity(base="hopper")
    assert len({i.to_json() for i in ids}) == 10
    assert {i.fitzpatrick for i in ids[2:8]} == {1, 2, 3, 4, 5, 6}
    assert identity_for(5, bases, seed=0) == ids[5]
    assert identity_for(5, bases, seed=1) != ids[5]
    json.loads(ids[4].to_json())


def test_dark_skin_variant_is_darker(bases):
    dark_index = next(i for i in range(2, 14) if identity_for(i, bases, 0).fitzpatrick == 6
                      and identity_for(i, bases, 0).base == "astronaut")
    dark = make_face(bases[0], identity_for(dark_index, bases, 0), 256)
    light = make_face(bases[0], Identity(base="astronaut"), 256)
    import cv2

    def skin_l(face):
        lab = cv2.cvtColor(face.image.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
        return np.median(lab[..., 0][face.skin])

    assert skin_l(dark) < skin_l(light) - 20
    assert abs(skin_l(dark) - FITZPATRICK_LAB[6][0]) < 15


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
