"""The procedural renderer: lesions change only the skin they sit on, look like their type on light
and dark skin, follow the light, and come back bit-identical for the same seed."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
from skimage import color, data

from synthtrial.render.procedural import (
    LESION_TYPES,
    LesionSpec,
    PhotoStats,
    ProceduralConfig,
    ProceduralRenderer,
    RenderResult,
    photo_stats,
)

LIGHT_RGB = (225, 190, 170)
DARK_RGB = (95, 65, 50)
RENDER = ProceduralRenderer()
#: a changed pixel must lie within REACH radii (+ blur margin) of a lesion: the widest halo is 2.2
#: radii, outlines vary by up to ~25 % and stretch by ~10 %
REACH = 3.5


def synth_face(rgb, n=160, noise=2.0, seed=0):
    """A smooth skin-coloured face-like gradient with mild noise, an elliptical skin mask and a
    blue background; light comes from the right (+x) and slightly from above."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    shade = 1.0 + 0.08 * (xx - n / 2) / n - 0.03 * (yy - n / 2) / n
    r = np.hypot((xx - n / 2) / (0.42 * n), (yy - n / 2) / (0.47 * n))
    img = np.asarray(rgb, np.float64) * shade[..., None] + rng.normal(0, noise, (n, n, 3))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    mask = r < 1
    img[~mask] = (40, 60, 90)
    return img, mask


def stats_for(img, mask, light=(1.0, 0.0), blur=0.8):
    s = photo_stats(img, mask)
    return PhotoStats(light, s.noise_sigma, blur, s.skin_rgb)


def lab(img):
    return color.rgb2lab(img)


def one(kind, cx=80.5, cy=80.5, r=5.0, intensity=1.0, seed=7, lesion_id=0):
    return LesionSpec(lesion_id, kind, cx, cy, r, intensity, seed)


def ring(shape, cx, cy, r_in, r_out):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
    return (d >= r_in) & (d < r_out)


def delta_in_mask(before, after, mask):
    """Mean change of (L*, a*, b*) over the mask, and mean |dE|."""
    d = lab(after)[mask] - lab(before)[mask]
    return d.mean(axis=0), np.linalg.norm(d, axis=1).mean()


@pytest.fixture(scope="module")
def light_face():
    return synth_face(LIGHT_RGB)


@pytest.fixture(scope="module")
def dark_face():
    return synth_face(DARK_RGB, seed=1)


def scatter(mask, n=40, seed=3, margin=6):
    """n lesions of every type at random places, some of them straddling the skin mask's edge."""
    rng = np.random.default_rng(seed)
    h, w = mask.shape
    sizes = {"open_comedo": (1.5, 3), "closed_comedo": (1.5, 3), "papule": (3, 6), "pustule": (3, 6),
             "nodule": (7, 12), "mark": (3, 8), "scar": (2, 4)}
    out = []
    for i in range(n):
        kind = LESION_TYPES[i % len(LESION_TYPES)]
        out.append(LesionSpec(i, kind, float(rng.uniform(margin, w - margin)), float(rng.uniform(margin, h - margin)),
                              float(rng.uniform(*sizes[kind])), float(rng.uniform(0.3, 1.0)), int(rng.integers(1 << 40))))
    return out


# -- contract ---------------------------------------------------------------------------------------

def test_output_shapes_and_input_untouched(light_face):
    img, mask = light_face
    keep = img.copy()
    lesions = [one(t, 20.5 + 20 * i, 80.5, 4.0, seed=i, lesion_id=i) for i, t in enumerate(LESION_TYPES)]
    res = RENDER(img, lesions, skin_mask=mask, stats=stats_for(img, mask), seed=1)
    assert isinstance(res, RenderResult)
    assert res.image.shape == img.shape and res.image.dtype == np.uint8
    assert res.masks.shape == (len(lesions), *mask.shape) and res.masks.dtype == bool
    assert res.boxes.shape == (len(lesions), 4) and res.boxes.dtype == np.float64
    assert np.array_equal(img, keep)               # the input is not written
    assert not np.array_equal(res.image, img)
    assert all(res.masks[i].any() for i in range(len(lesions)))


def test_no_lesions_returns_a_copy(light_face):
    img, mask = light_face
    res = RENDER(img, [], skin_mask=mask)
    assert np.array_equal(res.image, img) and res.image is not img
    assert res.masks.shape == (0, *mask.shape) and res.boxes.shape == (0, 4)


def test_changes_stay_on_skin_and_near_lesions(light_face):
    img, mask = light_face
    lesions = scatter(mask, n=50)
    blur = 1.2
    res = RENDER(img, lesions, skin_mask=mask, stats=stats_for(img, mask, light=(0.6, -0.8), blur=blur), seed=5)
    changed = (res.image != img).any(axis=2)
    assert changed.sum() > 500                       # lesions were drawn
    assert not (changed & ~mask).any()              # nothing off the skin, not even halo or grain
    # every changed pixel is near some lesion: the footprint is bounded
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    near = np.zeros_like(mask)
    for les in lesions:
        reach = REACH * les.radius_px + math.ceil(3 * blur) + 1.5
        near |= np.hypot(xx + 0.5 - les.cx, yy + 0.5 - les.cy) <= reach
    assert not (changed & ~near).any()
    assert (~near & mask).any()                      # and there is untouched skin left to compare
    assert np.array_equal(res.image[~near], img[~near])
    assert np.array_equal(res.image[~mask], img[~mask])


def test_footprint_of_a_single_lesion_is_tight(light_face):
    # a comedo (no halo) changes only pixels within ~2 radii of it, a papule's halo reaches further
    img, mask = light_face
    st = stats_for(img, mask, blur=0.5)
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    d = np.hypot(xx + 0.5 - 80.5, yy + 0.5 - 80.5)
    reach = {}
    for kind in ("open_comedo", "papule"):
        res = RENDER(img, [one(kind, r=4.0)], skin_mask=mask, stats=st)
        changed = (res.image != img).any(axis=2)
        reach[kind] = d[changed].max() / 4.0
    assert reach["open_comedo"] < 2.2
    assert 1.6 < reach["papule"] < REACH
    assert reach["papule"] > reach["open_comedo"] + 0.25


def test_masks_are_bodies_on_skin_and_boxes_are_tight(light_face):
    img, mask = light_face
    lesions = scatter(mask, n=40, seed=11)
    res = RENDER(img, lesions, skin_mask=mask, stats=stats_for(img, mask))
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    n_nonempty = 0
    for les, m, box in zip(lesions, res.masks, res.boxes):
        assert not (m & ~mask).any()
        if not m.any():
            continue
        n_nonempty += 1
        d = np.hypot(xx + 0.5 - les.cx, yy + 0.5 - les.cy)[m]
        assert d.max() <= 1.6 * les.radius_px + 1.0          # the body, not the halo
        rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        assert 0 <= box[0] < box[2] <= mask.shape[1] and 0 <= box[1] < box[3] <= mask.shape[0]
    assert n_nonempty >= 30


def test_mask_area_matches_the_radius(light_face):
    img, mask = light_face
    for kind in ("papule", "nodule", "mark"):
        res = RENDER(img, [one(kind, r=8.0)], skin_mask=mask, stats=stats_for(img, mask))
        area = res.masks[0].sum()
        assert 0.6 * math.pi * 64 < area < 1.6 * math.pi * 64, (kind, area)


def test_empty_masks_get_the_clipped_spec_circle(light_face):
    img, mask = light_face
    lesions = [
        one("papule", cx=3.0, cy=4.0, r=6.0, lesion_id=0),             # background corner, off skin
        one("nodule", cx=-20.0, cy=50.0, r=8.0, lesion_id=1),          # entirely outside the image
        one("papule", intensity=0.0, lesion_id=2),                    # invisible
        one("papule", intensity=0.05, lesion_id=3),                   # too faint for a mask
    ]
    res = RENDER(img, lesions, skin_mask=mask, stats=stats_for(img, mask))
    assert not res.masks.any()
    np.testing.assert_allclose(res.boxes[0], [0.0, 0.0, 9.0, 10.0])
    np.testing.assert_allclose(res.boxes[1], [0.0, 42.0, 0.0, 58.0])
    np.testing.assert_allclose(res.boxes[2], [75.5, 75.5, 85.5, 85.5])
    changed = (res.image != img).any(axis=2)
    assert not changed[:40, :40].any()                                # the off-skin lesion drew nothing
    # intensity 0 draws nothing; 0.05 is barely there
    alone = RENDER(img, [lesions[2]], skin_mask=mask, stats=stats_for(img, mask))
    assert np.array_equal(alone.image, img)
    faint = RENDER(img, [lesions[3]], skin_mask=mask, stats=stats_for(img, mask))
    assert np.abs(faint.image.astype(int) - img).max() <= 6


def test_skin_mask_forms_and_image_views(light_face):
    # bool, 0/255 uint8 and 0/1 float masks mean the same; float weights below 1 draw fainter;
    # a strided view of an image renders like the image itself
    img, mask = light_face
    st = stats_for(img, mask)
    lesions = [one("papule"), one("pustule", cx=110.5, seed=2, lesion_id=1)]
    ref = RENDER(img, lesions, skin_mask=mask, stats=st, seed=1)
    for form in (mask.astype(np.uint8) * 255, mask.astype(np.float32)):
        res = RENDER(img, lesions, skin_mask=form, stats=st, seed=1)
        assert np.array_equal(res.image, ref.image) and np.array_equal(res.masks, ref.masks)
    soft = RENDER(img, lesions, skin_mask=mask * 0.5, stats=st, seed=1)
    assert np.abs(soft.image.astype(int) - img).sum() < 0.7 * np.abs(ref.image.astype(int) - img).sum()
    assert np.array_equal(soft.masks, ref.masks)
    big = np.zeros((2 * img.shape[0], 2 * img.shape[1], 3), np.uint8)
    big[::2, ::2] = img
    view = RENDER(big[::2, ::2], lesions, skin_mask=mask, stats=st, seed=1)
    assert np.array_equal(view.image, ref.image)


def test_a_lesion_on_the_mask_edge_is_cut_by_the_skin(light_face):
    img, mask = light_face
    # the mask's right edge crosses y = 80 at x ~ 147
    res = RENDER(img, [one("nodule", cx=146.0, cy=80.5, r=10.0)], skin_mask=mask, stats=stats_for(img, mask))
    changed = (res.image != img).any(axis=2)
    assert changed.any() and not (changed & ~mask).any()
    assert res.masks[0].any() and not (res.masks[0] & ~mask).any()


# -- appearance -------------------------------------------------------------------------------------

def _type_change(img, mask, kind, r=5.0, light=(1.0, 0.0), seed=0):
    res = RENDER(img, [one(kind, r=r)], skin_mask=mask, stats=stats_for(img, mask, light=light), seed=seed)
    return res, delta_in_mask(img, res.image, res.masks[0])


@pytest.mark.parametrize("kind", ["papule", "pustule", "nodule"])
def test_inflamed_lesions_are_redder_than_their_surroundings(light_face, kind):
    img, mask = light_face
    r = 8.0 if kind == "nodule" else 5.0
    res, _ = _type_change(img, mask, kind, r=r)
    out = lab(res.image)
    inside = out[res.masks[0], 1].mean()
    around = out[ring(mask.shape, 80.5, 80.5, 4.0 * r, 5.0 * r) & mask, 1].mean()
    assert inside - around > 8.0


def test_open_comedo_is_a_dark_dot(light_face, dark_face):
    for img, mask in (light_face, dark_face):
        res, (d, _) = _type_change(img, mask, "open_comedo", r=2.5)
        assert d[0] < -6.0
        before, after = lab(img)[79:82, 79:82, 0].mean(), lab(res.image)[79:82, 79:82, 0].mean()
        assert after < 0.7 * before          # a plug much darker than the skin, light or dark


def test_closed_comedo_is_a_pale_bump(light_face, dark_face):
    for img, mask in (light_face, dark_face):
        res, (d, de) = _type_change(img, mask, "closed_comedo", r=3.0)
        centre = (lab(res.image) - lab(img))[79:82, 79:82].reshape(-1, 3).mean(axis=0)
        assert centre[0] > 2.0 and d[1] < 0.5        # a paler centre, not redder
        assert de > 2.0


def test_pustule_head_is_lighter_and_yellower_than_a_papule(light_face, dark_face):
    for img, mask in (light_face, dark_face):
        centre = {}
        for kind in ("papule", "pustule"):
            res, _ = _type_change(img, mask, kind, r=5.0)
            centre[kind] = lab(res.image)[78:83, 78:83].reshape(-1, 3).mean(axis=0)
        assert centre["pustule"][0] > centre["papule"][0] + 8
        assert centre["pustule"][2] > centre["papule"][2] + 3


def test_nodule_is_deeper_than_a_papule(light_face):
    img, mask = light_face
    centre = {}
    for kind in ("papule", "nodule"):
        res, _ = _type_change(img, mask, kind, r=8.0)
        centre[kind] = (lab(res.image) - lab(img))[78:83, 78:83].reshape(-1, 3).mean(axis=0)
    assert centre["nodule"][0] < centre["papule"][0] - 1.5      # darker
    assert centre["nodule"][2] < centre["papule"][2] - 1.5      # bluer: purple-red
    assert centre["nodule"][1] > 10.0


def _half_means(res, img, light_dir):
    """Mean L* change over the body half towards the light and the half away from it."""
    mask = res.masks[0]
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    along = (xx + 0.5 - 80.5) * light_dir[0] + (yy + 0.5 - 80.5) * light_dir[1]
    dl = lab(res.image)[..., 0] - lab(img)[..., 0]
    return dl[mask & (along > 1)].mean(), dl[mask & (along < -1)].mean()


@pytest.mark.parametrize("light", [(1.0, 0.0), (-1.0, 0.0), (0.0, -1.0), (0.6, 0.8)])
def test_raised_lesions_are_lit_on_the_side_of_the_light(light_face, light):
    img, mask = light_face
    for kind in ("papule", "closed_comedo", "nodule"):
        res, _ = _type_change(img, mask, kind, r=7.0, light=light)
        lit, far = _half_means(res, img, light)
        assert lit > far + 3.0, (kind, lit, far)


def test_scars_are_shaded_the_other_way(light_face):
    img, mask = light_face
    for light in ((1.0, 0.0), (0.0, 1.0)):
        res, _ = _type_change(img, mask, "scar", r=5.0, light=light)
        lit, far = _half_means(res, img, light)
        assert far > lit + 3.0


def test_marks_are_flat(light_face):
    img, mask = light_face
    left, _ = _type_change(img, mask, "mark", r=6.0, light=(-1.0, 0.0))
    right, _ = _type_change(img, mask, "mark", r=6.0, light=(1.0, 0.0))
    assert np.array_equal(left.image, right.image)          # the light does not matter
    papule_l, _ = _type_change(img, mask, "papule", r=6.0, light=(-1.0, 0.0))
    papule_r, _ = _type_change(img, mask, "papule", r=6.0, light=(1.0, 0.0))
    assert not np.array_equal(papule_l.image, papule_r.image)


def test_marks_are_pink_on_light_skin_and_brown_on_dark_skin(light_face, dark_face):
    _, (d_light, _) = _type_change(*light_face, "mark", r=6.0)
    _, (d_dark, _) = _type_change(*dark_face, "mark", r=6.0)
    assert d_light[1] > 5.0 and d_light[1] > 2 * abs(d_light[2])        # redder, not yellower
    assert d_dark[0] < -5.0 and d_dark[2] > d_dark[1]                    # darker and browner
    assert d_light[1] > d_dark[1] + 3.0


@pytest.mark.parametrize("kind", LESION_TYPES)
def test_every_type_is_visible_on_dark_skin(dark_face, kind):
    img, mask = dark_face
    r = {"nodule": 9.0, "mark": 6.0, "open_comedo": 2.5, "closed_comedo": 3.0, "scar": 3.5}.get(kind, 5.0)
    res, (_, de) = _type_change(img, mask, kind, r=r)
    assert res.masks[0].sum() >= 9
    assert de > 2.5, de


def test_erythema_on_dark_skin_is_duskier_than_on_light_skin(light_face, dark_face):
    _, (d_light, _) = _type_change(*light_face, "papule", r=6.0)
    _, (d_dark, _) = _type_change(*dark_face, "papule", r=6.0)
    assert d_light[1] > 10.0 and d_dark[1] > 2.0        # redder on both
    assert d_dark[1] < d_light[1] - 5.0                 # but much less red on dark skin
    assert d_dark[0] < -3.0 and d_dark[2] < d_light[2]  # and darker, bluer (violaceous)


def test_intensity_fades_and_shrinks(light_face):
    img, mask = light_face
    full = RENDER(img, [one("papule", r=6.0, intensity=1.0)], skin_mask=mask, stats=stats_for(img, mask))
    weak = RENDER(img, [one("papule", r=6.0, intensity=0.3)], skin_mask=mask, stats=stats_for(img, mask))
    _, de_full = delta_in_mask(img, full.image, full.masks[0])
    _, de_weak = delta_in_mask(img, weak.image, full.masks[0])
    assert de_weak < 0.6 * de_full
    assert 0 < weak.masks[0].sum() < full.masks[0].sum()


# -- determinism ------------------------------------------------------------------------------------

def test_same_inputs_give_the_same_bytes(light_face):
    img, mask = light_face
    lesions = scatter(mask, n=30, seed=4)
    a = ProceduralRenderer()(img, lesions, skin_mask=mask, seed=9)
    b = ProceduralRenderer()(img.copy(), list(lesions), skin_mask=mask.copy(), seed=9)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.boxes, b.boxes)


def test_seed_changes_only_the_grain(light_face):
    img, mask = light_face
    lesions = [one("open_comedo", r=3.0), one("nodule", cx=50.5, cy=60.5, r=9.0, seed=3, lesion_id=1)]
    st = stats_for(img, mask)
    assert st.noise_sigma > 1.0
    a = RENDER(img, lesions, skin_mask=mask, stats=st, seed=1)
    b = RENDER(img, lesions, skin_mask=mask, stats=st, seed=2)
    diff = (a.image != b.image).any(axis=2)
    assert diff.sum() >= 10                                  # the grain differs...
    changed = (a.image != img).any(axis=2) | (b.image != img).any(axis=2)
    assert not (diff & ~changed).any()                      # ...only where lesions are
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.boxes, b.boxes)
    # with a noiseless photo there is no grain, so the seed does not matter
    clean = dataclasses.replace(st, noise_sigma=0.0)
    c = RENDER(img, lesions, skin_mask=mask, stats=clean, seed=1)
    d = RENDER(img, lesions, skin_mask=mask, stats=clean, seed=2)
    assert np.array_equal(c.image, d.image)


def test_grain_restores_the_noise_level_inside_a_dark_plug():
    # darkening shrinks the photo's own noise; fresh grain brings the plugs back to the photo's level
    img, mask = synth_face(LIGHT_RGB, n=200, noise=6.0, seed=2)
    st = PhotoStats((1.0, 0.0), 6.0, 0.5, LIGHT_RGB)
    centres = [(60.5, 60.5), (140.5, 60.5), (60.5, 140.5), (140.5, 140.5)]
    plugs = [one("open_comedo", cx=x, cy=y, r=22.0, seed=i, lesion_id=i) for i, (x, y) in enumerate(centres)]
    grainy = RENDER(img, plugs, skin_mask=mask, stats=st, seed=0).image
    clean = RENDER(img, plugs, skin_mask=mask, stats=dataclasses.replace(st, noise_sigma=0.0)).image
    cores = np.zeros_like(mask)
    for x, y in centres:
        cores[int(y) - 8:int(y) + 9, int(x) - 8:int(x) + 9] = True
    assert lab(grainy)[cores, 0].mean() < 40                       # it is dark in there
    before = photo_stats(img, cores).noise_sigma
    assert before == pytest.approx(6.0, rel=0.1)
    assert photo_stats(clean, cores).noise_sigma < 0.9 * before
    assert photo_stats(grainy, cores).noise_sigma == pytest.approx(before, rel=0.08)


def test_stacked_dark_plugs_on_very_dark_skin_stay_finite():
    # nine overlapping open comedones on near-black skin push L* below -16; the grain's darkening ratio
    # must clamp at 0 (black) instead of becoming NaN and casting to uint8 with a RuntimeWarning
    rgb = (10, 8, 6)
    img, mask = synth_face(rgb, n=120, noise=4.0, seed=2)
    st = PhotoStats((1.0, 0.0), 4.0, 0.5, rgb)
    plugs = [one("open_comedo", cx=60.5 + i % 3, cy=60.5 + i // 3, r=6.0, seed=i, lesion_id=i) for i in range(9)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = RENDER(img, plugs, skin_mask=mask, stats=st, seed=0).image
    assert out[58:63, 58:63].mean() < 8                 # the plugs' core is black (plus grain)
    assert (out != img).any()


def test_a_lesion_keeps_its_shape_when_it_moves(light_face):
    # same seed, shifted by whole pixels (another day): the same mask, shifted
    img, mask = light_face
    st = stats_for(img, mask)
    a = RENDER(img, [one("mark", cx=70.5, cy=75.5, r=7.0, seed=42)], skin_mask=mask, stats=st).masks[0]
    b = RENDER(img, [one("mark", cx=83.5, cy=81.5, r=7.0, seed=42)], skin_mask=mask, stats=st).masks[0]
    c = RENDER(img, [one("mark", cx=70.5, cy=75.5, r=7.0, seed=43)], skin_mask=mask, stats=st).masks[0]
    assert np.array_equal(np.roll(a, (6, 13), axis=(0, 1)), b)
    assert not np.array_equal(a, c)                              # another seed, another outline


def test_outlines_are_irregular(light_face):
    img, mask = light_face
    res = RENDER(img, [one("mark", r=10.0, seed=s, lesion_id=s) for s in range(1)], skin_mask=mask,
                 stats=stats_for(img, mask))
    m = res.masks[0]
    yy, xx = np.nonzero(m)
    ang = np.arctan2(yy + 0.5 - 80.5, xx + 0.5 - 80.5)
    dist = np.hypot(yy + 0.5 - 80.5, xx + 0.5 - 80.5)
    edge = [dist[(ang >= a) & (ang < a + np.pi / 8)].max() for a in np.linspace(-np.pi, np.pi, 16, endpoint=False)]
    assert max(edge) / min(edge) > 1.08                          # not a disc


# -- photo statistics -------------------------------------------------------------------------------

@pytest.mark.parametrize("angle_deg", [0, 135, 250])
def test_photo_stats_recover_light_direction_and_noise(angle_deg):
    n = 200
    rng = np.random.default_rng(angle_deg)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    u = np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))])
    shade = 1.0 + 0.25 * ((xx - n / 2) * u[0] + (yy - n / 2) * u[1]) / n
    img = np.clip(np.asarray((200, 160, 140), float) * shade[..., None] + rng.normal(0, 4.0, (n, n, 3)), 0, 255)
    img = np.rint(img).astype(np.uint8)
    mask = np.hypot(xx - n / 2, yy - n / 2) < 0.45 * n
    img[~mask] = (20, 200, 30)          # a background that must not count
    st = photo_stats(img, mask)
    assert math.hypot(*st.light_direction) == pytest.approx(1.0)
    assert math.degrees(math.acos(np.clip(np.dot(st.light_direction, u), -1, 1))) < 8.0
    assert st.noise_sigma == pytest.approx(4.0, rel=0.25)
    assert st.skin_rgb == pytest.approx((200, 160, 140), abs=8)


def test_photo_stats_recover_blur():
    import cv2

    n, ss = 160, 4
    rng = np.random.default_rng(0)
    hi = np.full((n * ss, n * ss), 150.0)
    yy, xx = np.mgrid[:n * ss, :n * ss] / ss
    for _ in range(12):
        cx, cy, r = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(12, 35)
        hi[np.hypot(xx - cx, yy - cy) < r] = rng.uniform(60, 230)
    mask = np.zeros((n, n), bool)
    mask[10:150, 10:150] = True
    found = {}
    for sigma in (0.0, 1.0, 2.0):
        b = cv2.GaussianBlur(hi, (0, 0), sigma * ss) if sigma else hi
        low = b.reshape(n, ss, n, ss).mean(axis=(1, 3)) + rng.normal(0, 1.0, (n, n))
        img = np.repeat(np.clip(np.rint(low), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        found[sigma] = photo_stats(img, mask).blur_sigma
    assert found[0.0] < 0.7
    assert found[1.0] == pytest.approx(1.0, rel=0.25)
    assert found[2.0] == pytest.approx(2.0, rel=0.25)


def test_photo_stats_fall_back_to_light_from_above_on_flat_skin():
    img = np.full((64, 64, 3), 180, np.uint8)
    st = photo_stats(img, np.ones((64, 64), bool))
    assert st.light_direction == (0.0, -1.0)
    assert st.noise_sigma == 0.0 and st.blur_sigma == 0.0


# -- a real portrait --------------------------------------------------------------------------------

def test_real_portrait():
    img = data.astronaut()
    mask = np.zeros(img.shape[:2], bool)
    mask[95:135, 185:265] = True          # cheeks and nose, under the eyes
    mask[140:175, 195:255] = True         # chin and jaw, below the mouth
    rng = np.random.default_rng(0)
    lesions = [LesionSpec(i, LESION_TYPES[i % 7], float(rng.uniform(190, 260)), float(rng.uniform(98, 172)),
                          float(rng.uniform(1.0, 2.5)), 1.0, i) for i in range(20)]
    res = RENDER(img, lesions, skin_mask=mask, seed=0)
    changed = (res.image != img).any(axis=2)
    assert changed.any() and not (changed & ~mask).any()
    assert np.array_equal(res.image[~mask], img[~mask])
    assert not (res.masks & ~mask).any()
    st = photo_stats(img, mask)
    assert 0.0 <= st.blur_sigma < 3.0 and 0.0 < st.noise_sigma < 10.0
    assert 120 < st.skin_rgb[0] < 255


# -- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    (lambda img, m, les: (img.astype(np.float32), m, les), "uint8"),
    (lambda img, m, les: (img[..., 0], m, les), "shape"),
    (lambda img, m, les: (np.dstack([img, img[..., :1]]), m, les), "shape"),
    (lambda img, m, les: (img, m[:-1], les), "skin_mask shape"),
    (lambda img, m, les: (img, m, [dataclasses.replace(les[0], type="blackhead")]), "unknown lesion type"),
    (lambda img, m, les: (img, m, [dataclasses.replace(les[0], cx=float("nan"))]), "cx must be finite"),
    (lambda img, m, les: (img, m, [dataclasses.replace(les[0], cy=float("inf"))]), "cy must be finite"),
    (lambda img, m, les: (img, m, [dataclasses.replace(les[0], radius_px=-1.0)]), "radius_px must be >= 0"),
    (lambda img, m, les: (img, m, [dataclasses.replace(les[0], intensity=1.5)]), "intensity"),
    (lambda img, m, les: (img, m, [dataclasses.replace(les[0], seed=1.5)]), "seed must be an integer"),
    (lambda img, m, les: (img, m, [(1, "papule", 3.0, 4.0, 2.0)]), "LesionSpec"),
])
def test_bad_input_is_refused(light_face, change, message):
    img, mask = light_face
    bad_img, bad_mask, bad_lesions = change(img, mask, [one("papule")])
    with pytest.raises(ValueError, match=message):
        RENDER(bad_img, bad_lesions, skin_mask=bad_mask)


def test_bad_stats_and_config_are_refused(light_face):
    img, mask = light_face
    with pytest.raises(ValueError, match="stats"):
        RENDER(img, [one("papule")], skin_mask=mask, stats=PhotoStats((float("nan"), 0.0), 1.0, 1.0, LIGHT_RGB))
    with pytest.raises(ValueError, match="stats"):
        RENDER(img, [one("papule")], skin_mask=mask, stats=PhotoStats((1.0, 0.0), -1.0, 1.0, LIGHT_RGB))
    with pytest.raises(ValueError, match="seed"):
        RENDER(img, [one("papule")], skin_mask=mask, seed="x")
    with pytest.raises(ValueError, match="no look"):
        ProceduralRenderer(ProceduralConfig(looks={}))
    with pytest.raises(ValueError, match="erythema_saturation"):
        ProceduralRenderer(ProceduralConfig(erythema_saturation=0.0))
    with pytest.raises(ValueError, match="skin pixels"):
        photo_stats(img, np.zeros(mask.shape, bool))


# -- realism: merged erythema, variation within a type ----------------------------------------------

def test_erythema_of_neighbouring_lesions_merges_instead_of_stacking(light_face):
    """Between two close papules the blush is stronger than either alone gives there, but weaker than
    their sum: overlapping halos saturate into one confluent patch."""
    img, mask = light_face
    st = stats_for(img, mask, blur=0.5)
    a, b = one("papule", cx=74.5, r=4.0, seed=1, lesion_id=0), one("papule", cx=86.5, r=4.0, seed=2, lesion_id=1)
    mid = (slice(78, 83), slice(78, 83))

    def redness(lesions):
        res = RENDER(img, lesions, skin_mask=mask, stats=st, seed=0)
        return (lab(res.image) - lab(img))[mid][..., 1].mean()

    ra, rb, both = redness([a]), redness([b]), redness([a, b])
    assert ra > 1.0 and rb > 1.0
    assert both > max(ra, rb) + 0.5
    assert both < ra + rb - 0.3


def test_lesions_of_a_type_vary_in_colour(light_face):
    img, mask = light_face
    st = stats_for(img, mask)
    reds = []
    for seed in range(8):
        res = RENDER(img, [one("papule", r=5.0, seed=seed)], skin_mask=mask, stats=st, seed=0)
        reds.append(delta_in_mask(img, res.image, res.masks[0])[0][1])
    assert np.std(reds) > 1.0 and min(reds) > 5.0


def test_closed_comedones_and_scars_change_their_pixels_enough_to_be_seen():
    """The 2026-12-07 retune (``default_looks``): a closed comedo at its typical 2 mm (radius 2.4 px at the
    trial's 0.42 mm/px) changes its own pixels past the visibility threshold, and a scar past the just-noticeable
    difference; with the earlier looks both stayed below it (closed comedo median 3.5 ΔE, scar 1.6)."""
    from synthtrial.render.procedural import render_config
    from synthtrial.render.visibility import VISIBLE_DELTA_E, measure_visibility

    photo = np.clip(np.random.default_rng(0).normal((200, 160, 140), 6, (96, 96, 3)), 0, 255).astype(np.uint8)
    renderer = ProceduralRenderer(render_config())
    for kind, radius, floor in (("closed_comedo", 2.4, VISIBLE_DELTA_E), ("scar", 2.7, 2.3)):
        signals = []
        for seed in range(8):
            spec = LesionSpec(lesion_id=0, type=kind, cx=48.0, cy=48.0, radius_px=radius, intensity=1.0, seed=seed)
            result = renderer(photo, [spec], skin_mask=np.ones((96, 96), bool), seed=1)
            out = measure_visibility(result.image, result.masks[0].astype(np.uint16), [0], reference=photo)
            signals.append(out.loc[0, "signal"])
        assert np.median(signals) > floor, (kind, signals)
