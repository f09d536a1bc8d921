"""The graders' augmentation (synthtrial.graders.augment): boxes and masks follow the lesions, the same seed gives
the same bytes, ImageQX's flips keep its labels, and the colour range makes skin tone no cue."""

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from synthtrial.graders.augment import FLIPS, WIDE, AugmentConfig, Augmenter, draw_seeds, scaled
from synthtrial.graders.base import GraderError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEOMETRIC = dataclasses.replace(FLIPS, affine_p=1.0)          # flips, rotation, scale, shift; no colour
PHOTOMETRIC = dataclasses.replace(WIDE, hflip=0.0, affine_p=0.0)


def blob_box(image: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(image[..., 0] > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_a_flipped_square_keeps_its_box_exactly():
    image = np.zeros((96, 128, 3), np.uint8)
    image[20:34, 10:24] = 255
    box = np.array([[10, 20, 24, 34]], np.float32)
    flip = Augmenter(dataclasses.replace(FLIPS, hflip=1.0))
    out, boxes, labels = flip.with_boxes(image, box, np.array([3]), seed=0)
    assert np.array_equal(out, image[:, ::-1])
    np.testing.assert_allclose(boxes[0], [104, 20, 118, 34])
    np.testing.assert_allclose(boxes[0], blob_box(out))
    assert labels.tolist() == [3]


@pytest.mark.parametrize("seed", range(6))
def test_boxes_stay_on_a_rotated_scaled_shifted_lesion(seed):
    image = np.zeros((160, 160, 3), np.uint8)
    cv2.circle(image, (60, 90), 9, (255, 255, 255), -1)              # a round lesion, box 51..70 x 81..100
    image[20:32, 110:122] = 255                                        # and a square
    boxes = np.array([[51, 81, 70, 100], [110, 20, 122, 32]], np.float32)
    out, moved, labels = Augmenter(GEOMETRIC).with_boxes(image, boxes, np.array([1, 2]), seed=seed)
    assert labels.tolist() == [1, 2]
    disc = out.copy()
    disc[:, :, :] = 0
    x0, y0, x1, y1 = moved[0]
    disc[max(0, int(y0) - 3):int(y1) + 3, max(0, int(x0) - 3):int(x1) + 3] = \
        out[max(0, int(y0) - 3):int(y1) + 3, max(0, int(x0) - 3):int(x1) + 3]
    np.testing.assert_allclose(moved[0], blob_box(disc), atol=1.0)     # the disc's box, not an inflated one
    ys, xs = np.nonzero(out[..., 0] > 127)
    square = (xs > moved[1, 0] - 3) & (xs < moved[1, 2] + 3) & (ys > moved[1, 1] - 3) & (ys < moved[1, 3] + 3)
    np.testing.assert_allclose([xs[square].mean(), ys[square].mean()],
                               [(moved[1, 0] + moved[1, 2]) / 2, (moved[1, 1] + moved[1, 3]) / 2], atol=1.0)


def test_a_box_whose_lesion_leaves_the_image_is_dropped_and_an_empty_list_passes():
    config = AugmentConfig(**{**dataclasses.asdict(FLIPS), "hflip": 0.0, "affine_p": 1.0, "degrees": 0.0,
                              "scale": (1.0, 1.0), "translate": 0.3})
    image = np.zeros((100, 100, 3), np.uint8)
    edge = np.array([[0, 40, 6, 46], [47, 47, 53, 53]], np.float32)
    kept = [len(Augmenter(config).with_boxes(image, edge, np.array([0, 1]), seed=s)[1]) for s in range(20)]
    assert min(kept) == 1 and max(kept) == 2
    out, boxes, labels = Augmenter().with_boxes(image, np.zeros((0, 4)), np.zeros(0, np.int64), seed=1)
    assert out.shape == image.shape and boxes.shape == (0, 4) and labels.shape == (0,)


def test_masks_follow_the_image_and_keep_their_values():
    image = np.zeros((128, 128, 3), np.uint8)
    image[40:70, 50:80] = 255
    masks = np.zeros((2, 128, 128), np.float32)
    masks[0, 40:70, 50:80] = 1.0
    masks[1, 40:70, 50:80] = 0.25
    for seed in range(4):
        out, moved = Augmenter(GEOMETRIC).with_masks(image, masks, seed)
        bright, inside = out[..., 0] > 127, moved[0] > 0.5
        assert (bright & inside).sum() / (bright | inside).sum() > 0.9
        assert set(np.unique(moved[1]).tolist()) <= {0.0, 0.25}          # nearest: no new values
    out, same = Augmenter(PHOTOMETRIC).with_masks(image, masks, 3)
    assert np.array_equal(same, masks) and not np.array_equal(out, image)   # colour moves images only


def test_same_seed_same_bytes_other_seed_other_bytes_and_the_global_rng_untouched(face256):
    image = face256.image
    augment = Augmenter()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = augment.image(image, 11)
    assert torch.equal(torch.rand(3), expected)
    assert np.array_equal(first, augment.image(image, 11))
    assert first.shape == image.shape and first.dtype == np.uint8
    assert not np.array_equal(first, augment.image(image, 12))
    assert np.array_equal(draw_seeds(4, np.random.default_rng(1)), draw_seeds(4, np.random.default_rng(1)))
    torch_seeds = [draw_seeds(4, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert np.array_equal(*torch_seeds)
    batch = augment.images(np.stack([image, image]), [11, 12])
    assert np.array_equal(batch[0], first)


def test_imageqx_flips_are_label_safe(face256):
    from synthtrial.graders import imageqx, imageqx_degrade

    assert imageqx.AUGMENT == FLIPS and not FLIPS.photometric and FLIPS.affine_p == 0
    rng = np.random.default_rng(0)
    steps = [("blur", {"sigma": 0.01}), ("exposure", {"gain": 0.3})]
    degraded = imageqx_degrade.apply_degradation(face256.image, {"labels": None, "steps": steps}, rng)
    flips = Augmenter(FLIPS)
    seen = set()
    for seed in range(12):
        out = flips.image(degraded, seed)
        mirrored = np.array_equal(out, degraded[:, ::-1])
        assert mirrored or np.array_equal(out, degraded)        # nothing but a mirror image: no blur, no darkening
        seen.add(mirrored)
    assert seen == {True, False}


def test_photometric_range_covers_the_other_portraits_skin(bases):
    """Skin tone is no cue: each built-in portrait's mean skin colour (CIELAB) lies between the 5th and 95th
    percentile of the other's augmented skin colours, channel by channel."""
    from synthtrial.face.faces import identity_for, make_face

    faces = [make_face(base, identity_for(i, bases, 0), 128) for i, base in enumerate(bases)]

    def skin_lab(image, skin):
        return cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(float)[skin].mean(axis=0)

    photometric = Augmenter(PHOTOMETRIC)
    for face, other in ((faces[0], faces[1]), (faces[1], faces[0])):
        spread = np.array([skin_lab(photometric.image(face.image, s), face.skin) for s in range(150)])
        low, high = np.percentile(spread, [5, 95], axis=0)
        target = skin_lab(other.image, other.skin)
        assert ((low < target) & (target < high)).all(), (face.identity.base, low, target, high)


def test_detector_crops_keep_their_boxes_on_the_lesions_under_augmentation():
    """The detector's masked crops after the augmentation: every box still frames a lesion (a bright disc)."""
    from synthtrial.graders.detector_train import DetectionData, masked_batch

    image = np.zeros((128, 128, 3), np.uint8)
    centres = [(30, 40), (70, 90), (100, 30), (60, 60)]
    for cx, cy in centres:
        cv2.circle(image, (cx, cy), 6, (255, 255, 255), -1)
    boxes = np.array([[cx - 6, cy - 6, cx + 7, cy + 7] for cx, cy in centres], np.float32)
    data = DetectionData([image], [boxes], [np.arange(4)], ("a", "b", "c", "d"), ["x"], np.array([4.0]))
    seen = 0
    for step in range(8):
        crops, targets = masked_batch(data, 96, 2, np.random.default_rng(step), torch.device("cpu"),
                                      Augmenter(GEOMETRIC))
        for crop, target in zip(crops, targets):
            gray = crop.numpy().mean(axis=0)
            for x0, y0, x1, y1 in target["boxes"].numpy():
                inside = gray[int(y0) + 2:int(y1) - 1, int(x0) + 2:int(x1) - 1]
                assert inside.mean() > 0.5, (step, x0, y0)          # the disc is under its box
                seen += 1
    assert seen > 10


def test_scaled_shrinks_the_colour_ranges_and_keeps_geometry(face256):
    image = face256.image
    none, half = scaled(WIDE, 0.0), scaled(WIDE, 0.5)
    assert scaled(WIDE, 1.0) == WIDE
    assert half.saturation == pytest.approx(WIDE.saturation / 2) and half.hue == pytest.approx(WIDE.hue / 2)
    assert half.gamma == pytest.approx(((1 + WIDE.gamma[0]) / 2, (1 + WIDE.gamma[1]) / 2))
    assert (none.degrees, none.scale, none.jitter_p, none.blur_sigma) == (WIDE.degrees, WIDE.scale, WIDE.jitter_p,
                                                                          WIDE.blur_sigma)
    with pytest.raises(GraderError, match="--augment-strength"):
        scaled(WIDE, 1.5)
    # at strength 0 with geometry, blur, noise and JPEG off, the colour steps change nothing at all
    still = dataclasses.replace(none, hflip=0.0, affine_p=0.0, blur_p=0.0, noise_p=0.0, jpeg_p=0.0)
    out = Augmenter(still).image(image, 3)
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1
    wide = Augmenter(dataclasses.replace(WIDE, hflip=0.0, affine_p=0.0, blur_p=0.0, noise_p=0.0, jpeg_p=0.0))
    assert np.abs(wide.image(image, 3).astype(int) - image.astype(int)).mean() > 2


def test_skin_texture_adds_grey_structure_of_the_drawn_scale_and_amplitude():
    """SkinTexture on a flat grey image: the same change on every channel (structure, no colour), a standard
    deviation within the drawn range, and coarser grain at a larger sigma."""
    from synthtrial.graders.augment import SkinTexture

    flat = torch.full((3, 96, 96), 0.5)
    fine, coarse = SkinTexture(0.04, (0.5, 0.5)), SkinTexture(0.04, (2.0, 2.0))
    params = {"std": 0.04, "sigma": 0.5, "seed": 7}
    out = fine.apply(flat.clone(), params) - 0.5
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])
    assert float(out.std()) == pytest.approx(0.04, rel=0.05)
    smooth = coarse.apply(flat.clone(), {**params, "sigma": 2.0}) - 0.5
    neighbour = [float(torch.corrcoef(torch.stack([o[0, :, :-1].flatten(), o[0, :, 1:].flatten()]))[0, 1])
                 for o in (out, smooth)]
    assert neighbour[1] > neighbour[0] + 0.3                     # neighbours alike at 2 px, far less at 0.5 px
    assert SkinTexture(0.04, (0.5, 2.0)).make_params([])["std"] <= 0.04


def test_wrinkles_darken_thin_lines_and_leave_the_lesion_boxes():
    """Wrinkles on a flat image: a few percent of the pixels darkened (thin furrows), a fainter highlight beside
    them, nothing else touched; through ``with_boxes`` the boxes stay exactly where they were."""
    config = dataclasses.replace(FLIPS, hflip=0.0, wrinkles_p=1.0, wrinkles=12, wrinkle_depth=0.3)
    image = np.full((128, 128, 3), 128, np.uint8)
    out = Augmenter(config).image(image, 5).astype(int) - 128
    darker, lighter = (out[..., 0] < -2).mean(), (out[..., 0] > 2).mean()
    assert 0.005 < darker < 0.3 and lighter < darker               # thin lines, highlights fainter
    assert out.min() >= -0.3 * 128 * 1.05 - 1                     # never deeper than the depth
    assert (out[..., 0] == out[..., 1]).all()                      # the same factor on every channel
    boxes = np.array([[10, 10, 20, 20], [60, 70, 75, 84]], np.float32)
    _, moved, labels = Augmenter(config).with_boxes(image, boxes, np.array([1, 2]), 5)
    np.testing.assert_array_equal(moved, boxes)
    np.testing.assert_array_equal(labels, [1, 2])
    same = Augmenter(config).image(image, 5).astype(int) - 128
    np.testing.assert_array_equal(out, same)
