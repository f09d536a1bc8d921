"""ImageQX's degradation recipes: labels known by construction, blur on an absolute scale (a soft photo at its
native sharpness is acceptable, the same photo blurred by the poor amount is blurry, the same threshold for a
sharp and a soft one), new backgrounds that leave the person alone, the earlier recipe kept by option, and the
training settings shared with the IGA grader. No torch training here."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from synthtrial.graders import classify, iga_train, imageqx, imageqx_degrade as qd
from synthtrial.graders.base import GraderError

SIDE = 256


def edge_image(native_sigma: float = 0.0) -> np.ndarray:
    """A vertical dark/bright step at x = 131 (not on a re-sampling grid), pre-blurred by ``native_sigma`` x side."""
    image = np.full((SIDE, SIDE, 3), 40, np.uint8)
    image[:, 131:] = 210
    if native_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), native_sigma * SIDE)
    return image


def edge_width(image: np.ndarray) -> float:
    """10-90 % width of the step in pixels (rows averaged, measured on the middle row band)."""
    row = image[100:156].astype(float).mean(axis=(0, 2))
    lo, hi = row[:40].mean(), row[-40:].mean()
    level = (row - lo) / (hi - lo)
    return float(((level > 0.1) & (level < 0.9)).sum())


def sharpness_steps(plan: dict) -> list:
    """The steps of a plan that change sharpness by blurring or re-sampling (Gaussian blur, low resolution)."""
    return [(k, p) for k, p in plan["steps"] if k in ("blur", "lowres")]


def test_blur_is_stated_on_an_absolute_scale():
    soft, sharp = edge_image(0.002), edge_image()
    acceptable_soft, acceptable_sharp, blurry_sharp, blurry_soft = [], [], [], []
    for i in range(400):
        plan = qd.plan_degradation(np.random.default_rng([11, i]))
        steps = sharpness_steps(plan)
        only = {"labels": plan["labels"], "steps": steps}
        if not plan["labels"].any():
            assert all(p["sigma"] <= qd.SOFT_MAX for k, p in steps if k == "blur")
            assert all(p["factor"] <= 2.2 and not p["nearest"] for k, p in steps if k == "lowres")
            acceptable_soft.append(edge_width(qd.apply_degradation(soft, only, None)))
            acceptable_sharp.append(edge_width(qd.apply_degradation(sharp, only, None)))
        elif plan["labels"][2] and any(k == "blur" for k, _ in steps):
            assert all(p["sigma"] >= qd.BLUR_MIN for k, p in steps if k == "blur")
            blurry_sharp.append(edge_width(qd.apply_degradation(sharp, only, None)))
            blurry_soft.append(edge_width(qd.apply_degradation(soft, only, None)))
    assert len(acceptable_soft) > 100 and len(blurry_sharp) > 20
    # the soft photo at its native sharpness, with any acceptable softening, stays sharper than any blurry photo
    # of the sharp one: one threshold for both faces, not one relative to each render
    assert max(acceptable_soft) < min(blurry_sharp) <= min(blurry_soft)
    assert max(acceptable_sharp) <= max(acceptable_soft)
    assert sum(w > edge_width(sharp) for w in acceptable_sharp) > 0.2 * len(acceptable_sharp)   # softening is drawn


def test_acceptable_variation_stays_inside_every_bound_and_poor_outside():
    kinds, poor_gains, ok_gains = set(), [], []
    for i in range(400):
        plan = qd.plan_degradation(np.random.default_rng([12, i]))
        kinds |= {k for k, _ in plan["steps"]}
        gains = [p["gain"] for k, p in plan["steps"] if k == "exposure"]
        if not plan["labels"].any():
            assert not {"cast", "motion", "cutoff", "zoomout"} & {k for k, _ in plan["steps"]}
            assert all(abs(p["dx"]) < 0.04 and abs(p["dy"]) < 0.04 for k, p in plan["steps"] if k == "shift")
            ok_gains += gains
        elif plan["labels"][1]:
            assert "balance" not in {k for k, _ in plan["steps"]}
            poor_gains += gains              # no acceptable exposure on top of a bad one
    assert {"scene", "balance", "sharpen", "noise", "jpeg", "blur", "lowres"} <= kinds
    assert 0.8 <= min(ok_gains) and max(ok_gains) <= 1.25
    assert all(g <= 0.5 or g >= 1.7 for g in poor_gains) and poor_gains


def test_a_new_background_leaves_the_person_alone():
    image = np.full((SIDE, SIDE, 3), (200, 205, 210), np.uint8)
    image[:, :] += np.linspace(0, 20, SIDE).astype(np.uint8)[None, :, None]       # a lit, graded backdrop
    cv2.circle(image, (128, 110), 60, (190, 140, 120), -1)                         # a face
    cv2.rectangle(image, (60, 200), (196, 255), (20, 20, 30), -1)                  # dark clothes at the border
    masks = qd.background_masks(image)
    assert len(masks) == 2
    union = np.clip(sum(masks), 0, 1)
    assert union[110, 128] == 0 and union[5, 5] > 0.99 and union[240, 128] > 0.99
    changed = qd.apply_degradation(image, {"labels": None, "steps": [("scene", {"kind": 0.0, "seed": 3.0})]}, None)
    assert np.array_equal(changed[90:130, 108:148], image[90:130, 108:148])
    assert np.abs(changed[:20].astype(int) - image[:20]).mean() > 10
    busy = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)
    assert qd.background_masks(busy) == []


def test_the_earlier_recipe_stays_available():
    for i in range(200):
        plan = qd.plan_degradation(np.random.default_rng([13, i]), recipe="narrow")
        kinds = {k for k, _ in plan["steps"]}
        assert not {"scene", "balance", "sharpen", "noise", "jpeg"} & kinds
        if not plan["labels"].any():
            assert all(p["sigma"] < 0.003 for k, p in plan["steps"] if k == "blur")
            assert all(0.9 <= p["gain"] <= 1.1 for k, p in plan["steps"] if k == "exposure")
    # the labels drawn from a generator do not depend on the recipe: the same acceptable / poor split
    for i in range(50):
        a = qd.plan_degradation(np.random.default_rng([14, i]))["labels"]
        b = qd.plan_degradation(np.random.default_rng([14, i]), recipe="narrow")["labels"]
        assert np.array_equal(a, b)
    with pytest.raises(GraderError, match="--recipe must be varied, wide or narrow, got 'x'"):
        qd.plan_degradation(np.random.default_rng(0), recipe="x")
    with pytest.raises(GraderError, match="--recipe must be varied, wide or narrow"):
        imageqx.TrainSettings(recipe="x")
    assert imageqx.trained_recipe(SimpleNamespace(record={"settings": {}})) == "narrow"      # older weights
    assert imageqx.trained_recipe(SimpleNamespace(record={"settings": {"recipe": "varied"}})) == "varied"


def test_the_wide_recipe_widens_acceptable_looks_and_framing_and_keeps_a_margin_to_poor():
    light, seen = qd.WIDE_LIGHT, set()
    for i in range(400):
        rng = np.random.default_rng([15, i])
        plan = qd.plan_degradation(rng, recipe="wide")
        labels, steps = plan["labels"], plan["steps"]
        assert np.array_equal(labels, qd.plan_degradation(np.random.default_rng([15, i]))["labels"])
        kinds = [k for k, _ in steps]
        seen |= set(kinds)
        framing = [p for k, p in steps if k in ("shift", "cutoff")]
        if labels[0] or labels[4]:          # the poor framing only: no acceptable reframing on top
            assert len(framing) <= 1
        else:
            assert len(framing) <= 1
            for p in framing:
                if "zoom" in p:
                    assert 1.0 <= p["zoom"] <= 1.5 and abs(p["cx"] - 0.5) <= 0.05 and 0.35 <= p["cy"] <= 0.55
                else:
                    assert max(abs(p["dx"]), abs(p["dy"])) <= 0.06
        gains = [p["gain"] for k, p in steps if k == "exposure"]
        casts = [p["gain"] for k, p in steps if k == "cast"]
        if labels[1]:                       # bad light: beyond the acceptable range by a margin
            assert len(gains) + len(casts) == 1 and not {"balance", "saturation"} & set(kinds)
            assert all(g <= 0.4 or g >= 2.0 for g in gains) and all(g >= 1.65 for g in casts)
        else:
            assert len(gains) == 1 and light["exposure"][0] <= gains[0] <= light["exposure"][1] and not casts
            for k, p in steps:
                if k == "balance":
                    assert all(abs(p[f"g{c}"] - 1) <= light["balance"] for c in range(3))
                    assert max(p[f"g{c}"] for c in range(3)) / min(p[f"g{c}"] for c in range(3)) < 1.65
    assert {"cutoff", "shift", "balance", "saturation", "scene", "jpeg"} <= seen
    # the varied recipe is left as it was: no saturation, its own exposure range
    for i in range(100):
        plan = qd.plan_degradation(np.random.default_rng([16, i]))
        assert "saturation" not in {k for k, _ in plan["steps"]}
        assert all(0.8 <= p["gain"] <= 1.25 for k, p in plan["steps"] if k == "exposure" and not plan["labels"][1])
    grey = np.full((8, 8, 3), 100, np.uint8)
    grey[..., 0] = 160
    out = qd.apply_degradation(grey, {"labels": None, "steps": [("saturation", {"gain": 0.5})]}, None)
    assert out[0, 0].tolist() == [140, 110, 110]      # half-way to the grey mean 120


def test_degraded_sets_are_reproducible_per_seed_and_epoch():
    base = edge_image()[None].repeat(3, axis=0)
    x1, y1 = qd.degraded_set(base, seed=5, epoch=2, image_size=48)
    x2, y2 = qd.degraded_set(base, seed=5, epoch=2, image_size=48)
    x3, _ = qd.degraded_set(base, seed=5, epoch=3, image_size=48)
    assert x1.shape == (3, 48, 48, 3) and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_training_settings_share_one_declaration():
    for cls in (iga_train.TrainSettings, imageqx.TrainSettings):
        assert issubclass(cls, classify.TrainSettings)
    iga, qx = iga_train.TrainSettings(), imageqx.TrainSettings(epochs=3, lr=1e-3)
    assert (iga.epochs, iga.batch_size, iga.lr, iga.lr_final) == (20, 16, 3e-3, 1e-4)
    plan = qx.plan(10, lambda idx, gen, epoch: None)
    assert (plan.n_train, plan.epochs, plan.batch_size, plan.lr, plan.lr_final, plan.seed) == (10, 3, 32, 1e-3, 1e-4, 0)
    assert plan.validate is None
