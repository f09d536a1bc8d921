"""DermX: fuzzy F1 and Dice against hand-computed values, packed explanation areas, the differentiable Grad-CAM
against the grad-cam package (at the input's and at the CAM's resolution), maps with the image's aspect peaking
inside the lesion masks on a trained toy case, DermX+'s attention loss falling in a few steps, characteristic
masks and explanation areas from a run's instance masks, resumable training to the same bytes, pickles
refused, the grader seam."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from synthtrial.graders.base import GraderError, get_grader
from synthtrial.grade import grade_run
from synthtrial.graders.dermx import (CHARACTERISTICS, DermX, DermXConfig, DermXNet, DermXOutputs, count_logits,
                                      dice_loss, fuzzy_f1, normalise_maps, route_grades, to_tensor)
from synthtrial.graders.dermx_eval import evaluate_dermx
from synthtrial.graders.dermx_train import (COUNT_THRESHOLDS, DermXData, choose_level_route, characteristic_masks,
                                           fit_count_thresholds, halo_reach, image_truth, load_dermx_data, pack_areas,
                                           train_dermx, training_batch, unpack_areas)
from synthtrial.run import rundir
from synthtrial.trial import scale
from synthtrial.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAPULE = CHARACTERISTICS.index("papule")


def test_fuzzy_f1_and_dice_match_hand_computed_values():
    cam = np.array([[1.0, 0.5], [0.0, 0.25]])
    mask = np.array([[1.0, 1.0], [0.0, 0.0]])
    # sum(min) = 1.5, sum(cam) = 1.75, sum(mask) = 2 -> 3 / 3.75
    assert fuzzy_f1(cam, mask) == pytest.approx(0.8)
    assert fuzzy_f1(mask, mask) == pytest.approx(1.0)
    assert np.isnan(fuzzy_f1(np.zeros((2, 2)), np.zeros((2, 2))))
    maps = torch.tensor(cam, dtype=torch.float32)[None, None]
    target = torch.tensor(mask, dtype=torch.float32)[None, None]
    # soft Dice with eps = 1: 1 - (2 * 1.5 + 1) / (1.75 + 2 + 1)
    assert dice_loss(maps, target, torch.ones(1, 1)).item() == pytest.approx(1 - 4 / 4.75)
    assert dice_loss(maps, target, torch.zeros(1, 1)).item() == 0.0


def test_packed_areas_round_trip_and_pool_to_the_cam_grid():
    areas = np.zeros((2, len(CHARACTERISTICS), 32, 32), bool)
    areas[0, PAPULE, 10:14, 20:24] = True
    areas[0, 0, :, :3] = True
    areas[1, -1, 31, 31] = True
    packed = pack_areas(areas)
    assert packed.shape == (2, 32, 32) and packed.dtype == np.uint8
    assert packed[0, 10, 20] == 1 << PAPULE and packed[0, 10, 0] == 1 and packed[1, 31, 31] == 1 << 6
    back = unpack_areas(torch.from_numpy(packed), len(CHARACTERISTICS))
    assert torch.equal(back, torch.from_numpy(areas).float())
    # max-pooled to an 8 x 8 grid of 4 px cells: the papule's 4 x 4 block touches cells (2, 5) and (3, 5)
    grid = torch.nn.functional.adaptive_max_pool2d(back, 8)
    assert grid[0, PAPULE].nonzero().tolist() == [[2, 5], [3, 5]]
    assert grid[1, -1].nonzero().tolist() == [[7, 7]]


def test_differentiable_cam_equals_the_grad_cam_package():
    from pytorch_grad_cam.utils.image import scale_cam_image

    torch.manual_seed(0)
    dermx = DermX(DermXConfig(image_size=64), device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    maps = dermx.explain(image)
    assert maps.shape == (len(CHARACTERISTICS), 48, 80)                  # the image's own aspect
    assert maps.min() >= 0 and maps.max() <= 1
    x = to_tensor([image], 64, torch.device("cpu"))
    _, _, cams = dermx.model.forward_with_cams(x, create_graph=False)
    # the package min-max scales each map, resizes it to the input, and scales it again
    ours = scale_cam_image(scale_cam_image(cams[0].detach().numpy(), target_size=(x.shape[3], x.shape[2])))
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from synthtrial.graders.dermx import CharacteristicLogits
    with GradCAM(model=CharacteristicLogits(dermx.model).eval(), target_layers=[dermx.model.cam]) as cam:
        theirs = cam(input_tensor=x.expand(len(CHARACTERISTICS), -1, -1, -1).contiguous(),
                     targets=[ClassifierOutputTarget(k) for k in range(len(CHARACTERISTICS))])
    assert np.allclose(ours, theirs, atol=1e-4)
    # at the CAM's own resolution: the package's min-max scaling, nothing resized
    grid = dermx.explain(image, grid=True)
    assert grid.shape == (len(CHARACTERISTICS), *cams.shape[-2:])
    assert np.allclose(grid, scale_cam_image(scale_cam_image(cams[0].detach().numpy())), atol=1e-4)


def _toy(n: int, side: int, seed: int) -> tuple[DermXData, list[tuple[int, int]]]:
    """Skin-coloured squares; half carry one red 'papule' disc (radius 9) at a random place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    images, present, masks, centres = [], [], [], []
    for i in range(n):
        image = (np.array([205, 160, 140]) + rng.normal(0, 6, (side, side, 3))).clip(0, 255).astype(np.uint8)
        m = np.zeros((len(CHARACTERISTICS), side, side), np.float32)
        p = np.zeros(len(CHARACTERISTICS), np.float32)
        if i % 2 == 0:
            cy, cx = rng.integers(14, side - 14, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 81
            image[disc] = (170, 40, 50)
            m[PAPULE] = disc
            p[PAPULE] = 1
            centres.append((int(cy), int(cx)))
        images.append(image), masks.append(m), present.append(p)
    levels = np.array([i % 2 for i in range(n)])
    return DermXData(np.stack(images), levels, np.stack(present), pack_areas(np.stack(masks) > 0)), centres


@pytest.fixture(scope="module")
def toy_dermx(tmp_path_factory):
    data, _ = _toy(16, 64, 0)
    folder = tmp_path_factory.mktemp("dermx") / "w"
    dermx = train_dermx(data, folder, guided=True, epochs=20, batch_size=8, lr=1e-2, seed=0, image_size=64, device="cpu")
    return dermx, folder, data


def test_grad_cam_peaks_inside_the_lesion_on_a_trained_toy_case(toy_dermx):
    dermx, _, _ = toy_dermx
    history = dermx.record["loss_history"]
    assert all(np.isfinite([h["ce"], h["bce"], h["dice"]]).all() for h in history)
    assert history[-1]["bce"] < history[0]["bce"] and history[-1]["dice"] < history[0]["dice"]
    # a wider-than-tall image with two papules, never seen in training
    rng = np.random.default_rng(7)
    image = (np.array([205, 160, 140]) + rng.normal(0, 6, (64, 128, 3))).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:64, :128]
    mask = ((yy - 20) ** 2 + (xx - 30) ** 2 <= 81) | ((yy - 44) ** 2 + (xx - 100) ** 2 <= 81)
    image[mask] = (170, 40, 50)
    maps = dermx.explain(image)
    assert maps.shape == (len(CHARACTERISTICS), 64, 128)
    assert maps[PAPULE][mask].mean() > 2 * maps[PAPULE][~mask].mean()
    assert fuzzy_f1(maps[PAPULE], mask) > fuzzy_f1(np.full(mask.shape, maps[PAPULE].mean()), mask)
    # at the CAM layer's own cells (as plausibility is scored; the resized map's maximum can fall on a cell's
    # border pixels outside the disc): the peak cell holds a papule, and each papule's cells outshine the rest
    cells = dermx.explain(image, grid=True)[PAPULE]
    pooled = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(mask[None].astype(np.float32)),
                                                     cells.shape).numpy()[0] > 0
    peak = np.unravel_index(cells.argmax(), cells.shape)
    assert pooled[peak], f"papule map peaks at cell {peak}, outside the lesions"
    for half in (slice(0, cells.shape[1] // 2), slice(cells.shape[1] // 2, None)):     # one papule in each half
        assert cells[:, half][pooled[:, half]].max() > cells[~pooled].mean() + 0.2


def test_guided_attention_loss_falls_in_a_few_steps(tmp_path):
    """DermX+'s Dice between the papule's Grad-CAM and its area falls within six steps on eight toy images;
    unguided DermX has no attention term."""
    data, _ = _toy(8, 64, 3)
    kw = dict(epochs=6, batch_size=8, lr=1e-2, seed=0, image_size=64, device="cpu", augment=False)
    dice = [h["dice"] for h in train_dermx(data, tmp_path / "plus", guided=True, **kw).record["loss_history"]]
    assert len(dice) == 6 and dice[-1] < dice[0] - 0.05, dice
    plain = train_dermx(data, tmp_path / "plain", guided=False, **kw).record["loss_history"]
    assert all(h["dice"] == 0.0 for h in plain)


def test_augmented_batches_keep_each_mask_on_its_lesion(toy_dermx, tmp_path):
    """The wide augmentation moves the characteristic masks with the image: the papule mask stays on the red
    disc (red stays the reddest part of the image under every colour change)."""
    from synthtrial.graders.augment import WIDE, Augmenter

    _, _, data = toy_dermx
    idx = np.arange(0, 16, 2)                                      # the images with a papule
    x, masks, _, _ = training_batch(data, idx, np.zeros(len(idx), bool), 64, torch.device("cpu"), Augmenter(WIDE),
                                    np.arange(len(idx)) + 5)
    assert not torch.equal(x, training_batch(data, idx, np.zeros(len(idx), bool), 64, torch.device("cpu"))[0])
    for image, mask in zip(x.numpy(), masks.numpy()):
        redness = image[0] - (image[1] + image[2]) / 2
        inside = mask[PAPULE] > 0.5
        assert inside.sum() > 100 and redness[inside].mean() > redness[~inside].mean() + 0.5 * redness.std()
    record = train_dermx(data, tmp_path / "off", epochs=1, batch_size=8, image_size=64, device="cpu",
                         augment=False).record
    assert record["settings"]["augment"] is False


def test_augment_strength_narrows_the_colour_ranges_and_is_recorded(toy_dermx, tmp_path):
    """--augment-strength (the IGA lesson: the full colour range stopped learning) scales DermX's augmentation:
    a weaker one changes the same images' colours less, the record keeps it, and out-of-range is refused."""
    from synthtrial.graders.augment import WIDE, Augmenter, scaled

    _, _, data = toy_dermx
    idx, flips, cpu = np.arange(8), np.zeros(8, bool), torch.device("cpu")
    plain = training_batch(data, idx, flips, 64, cpu)[0]
    seeds = np.arange(8) + 11
    shift = {s: (training_batch(data, idx, flips, 64, cpu, Augmenter(scaled(WIDE, s)), seeds)[0] - plain)
             .mean(dim=(2, 3)).abs().mean().item() for s in (0.2, 1.0)}
    assert shift[0.2] < 0.6 * shift[1.0], shift
    kw = dict(epochs=1, batch_size=8, image_size=64, device="cpu")
    weak = train_dermx(data, tmp_path / "weak", augment_strength=0.4, **kw)
    assert weak.record["settings"]["augment_strength"] == 0.4
    full = train_dermx(data, tmp_path / "full", **kw)
    weak_bytes = (tmp_path / "weak" / "model.safetensors").read_bytes()
    assert weak_bytes != (tmp_path / "full" / "model.safetensors").read_bytes()
    assert full.record["settings"]["augment_strength"] == 1.0
    with pytest.raises(GraderError, match="--augment-strength"):
        train_dermx(data, tmp_path / "bad", augment_strength=1.5, **kw)


def test_balanced_characteristics_weigh_positives_by_their_rarity(toy_dermx, tmp_path):
    """negatives / positives per characteristic, clipped to [0.1, 10] (hand-computed), and the BCE it weighs:
    a rare characteristic's missed positive costs more than without the weights."""
    from synthtrial.graders.dermx_train import characteristic_pos_weight

    present = np.array([[1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1]], np.float32)
    np.testing.assert_allclose(characteristic_pos_weight(present), [1 / 3, 10.0, 3.0, 0.1], rtol=1e-6)
    import dataclasses

    _, _, data = toy_dermx
    uneven = data.present.copy()
    uneven[:, PAPULE] = np.arange(len(uneven)) < 3 * len(uneven) // 4   # papules on 3/4 of the images: 1/3
    data = dataclasses.replace(data, present=uneven)
    np.testing.assert_allclose(characteristic_pos_weight(uneven)[PAPULE], 1 / 3, rtol=1e-6)
    kw = dict(epochs=1, batch_size=8, image_size=64, device="cpu", augment=False)
    plain = train_dermx(data, tmp_path / "plain", **kw).record
    weighted = train_dermx(data, tmp_path / "balanced", balanced=True, **kw).record
    assert weighted["settings"]["balanced_characteristics"] is True
    assert plain["settings"]["balanced_characteristics"] is False
    assert weighted["loss_history"][0]["bce"] != pytest.approx(plain["loss_history"][0]["bce"], rel=1e-3)


def test_training_resumes_to_the_same_bytes_and_pickles_are_refused(toy_dermx, tmp_path):
    _, folder, _ = toy_dermx
    data, _ = _toy(8, 64, 1)
    kw = dict(guided=False, epochs=2, batch_size=4, seed=1, image_size=64, device="cpu")
    train_dermx(data, tmp_path / "whole", **kw)

    def interrupt(step, total, status):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_dermx(data, tmp_path / "resumed", progress=interrupt, **kw)
    train_dermx(data, tmp_path / "resumed", **kw)
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (tmp_path / "resumed" / "model.safetensors").read_bytes()
    again = DermX.from_pretrained(folder)
    assert again.fingerprint() == DermX.from_pretrained(folder).fingerprint()
    torch.save(again.model.state_dict(), tmp_path / "whole" / "model.safetensors")
    with pytest.raises(GraderError, match="pickled"):
        DermX.from_pretrained(tmp_path / "whole")
    from synthtrial.graders.detector import LesionDetector
    with pytest.raises(GraderError, match="grader 'dermx', not 'detector'"):
        LesionDetector.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import render_small_run

    return render_small_run(tmp_path_factory, "dermx-run", "B", "hopper", [2.8, 0.4, 1.6], size=128, seed=4)


def test_characteristic_masks_follow_the_instance_masks(tiny_run):
    from PIL import Image

    manifest = rundir.read_manifest(tiny_run)
    lesions = rundir.read_lesions(tiny_run)
    rel = manifest["image"].iloc[0]
    rows = lesions[lesions["image"] == rel]
    masks = characteristic_masks(tiny_run, rel, rows)
    instance = np.asarray(Image.open(tiny_run / rundir.mask_path_for(rel))).astype(int)
    assert masks.shape == (len(CHARACTERISTICS), *instance.shape)
    assert (masks.sum(0) <= 1).all()
    for row in rows.itertuples():
        pixels = instance == row.lesion_id + 1
        if pixels.any():
            c = CHARACTERISTICS.index("erythema" if row.type == "mark" else row.type)
            assert masks[c][pixels].all()
    assert masks.any(0).sum() == (instance > 0).sum()


def test_explanation_areas_reach_the_erythema_halo(tiny_run):
    """Comedones, marks and scars: the area is the mask; papules, pustules, nodules: a disc of the halo's reach
    (2.5, 2.4, 2.0 radii) about each lesion besides its mask. Visible presence is a subset of simulated."""
    from PIL import Image

    assert halo_reach()["papule"] == 2.5 and halo_reach()["nodule"] == 2.0 and halo_reach()["open_comedo"] == 1.0
    manifest, lesions = rundir.read_manifest(tiny_run), rundir.read_lesions(tiny_run)
    checked = 0
    for rel in manifest["image"]:
        rows = lesions[lesions["image"] == rel]
        has, areas = image_truth(tiny_run, rel, rows, CHARACTERISTICS, "simulated")
        visible, _ = image_truth(tiny_run, rel, rows, CHARACTERISTICS, "visible")
        assert (visible <= has).all()
        masks = characteristic_masks(tiny_run, rel, rows)
        assert (areas >= masks).all()
        for c in ("open_comedo", "closed_comedo", "scar", "erythema"):
            assert np.array_equal(areas[CHARACTERISTICS.index(c)], masks[CHARACTERISTICS.index(c)])
        instance = np.asarray(Image.open(tiny_run / rundir.mask_path_for(rel))).astype(int)
        yy, xx = np.mgrid[:instance.shape[0], :instance.shape[1]]
        for row in rows[rows["type"] == "papule"].itertuples():
            pixels = (instance == row.lesion_id + 1).sum()
            if pixels >= 4:
                reach = 2.5 * np.sqrt(pixels / np.pi)
                ring = np.abs(np.hypot(xx + 0.5 - row.cx, yy + 0.5 - row.cy) - 0.8 * reach) < 0.5
                assert areas[PAPULE][ring].all()
                checked += 1
    assert checked > 0


def test_loaded_data_carries_levels_truth_and_areas_at_the_input_size(tiny_run):
    """Each image at 64 px with the manifest's level, the visible truth and its explanation areas max-pooled to
    64 px and packed (bit k = characteristic k)."""
    data = load_dermx_data([tiny_run], 64)
    manifest, lesions = rundir.read_manifest(tiny_run, ("image", "acne04_level")), rundir.read_lesions(tiny_run)
    assert data.images.shape == (len(manifest), 64, 64, 3) and data.truth == "visible"
    assert data.levels.tolist() == manifest["acne04_level"].tolist()
    assert data.counts.tolist() == rundir.read_manifest(tiny_run, ("lesion_count",))["lesion_count"].astype(float).tolist()
    for k, rel in enumerate(manifest["image"]):
        has, areas = image_truth(tiny_run, rel, lesions[lesions["image"] == rel], CHARACTERISTICS, "visible")
        assert data.present[k].tolist() == has.astype(float).tolist()
        pooled = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(areas).float(), 64)
        assert torch.equal(unpack_areas(torch.from_numpy(data.areas[k]), len(CHARACTERISTICS)), pooled)
    assert data.present.sum() > 0
    with pytest.raises(GraderError, match="--truth must be one of"):
        load_dermx_data([tiny_run], 64, truth="seen")


@pytest.mark.parametrize("option, value", [("--truth", "seen"), ("--backbone", "no_such_net")])
def test_bad_truth_or_backbone_is_refused_before_reading(tiny_run, tmp_path, option, value):
    result = CliRunner().invoke(app, ["graders", "train", "dermx", "--data", str(tiny_run), "--out",
                                      str(tmp_path / "w"), option, value, "-q"])
    assert result.exit_code == 2 and f"'{value}'" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_grade_evaluate_and_explain_on_a_run(tiny_run, toy_dermx, tmp_path):
    _, folder, _ = toy_dermx
    grader = get_grader("dermx", folder, device="cpu")
    grade_run(tiny_run, [grader])
    grades = rundir.read_grades(tiny_run)
    assert {"dermx_severity", "dermx_level", *(f"dermx_p_{c}" for c in CHARACTERISTICS)} <= set(grades.columns)
    assert rundir.read_grades_index(tiny_run)["dermx"]["outcomes"] == ["dermx_severity"]
    assert grades["dermx_severity"].between(0, 3).all()
    metrics = evaluate_dermx(grader, tiny_run)
    assert 0 <= metrics["characteristic_F1_macro"] <= 1 and 0 <= metrics["plausibility_F1_all_present"] <= 1
    # over the images where truth and network both say "present": none may qualify for a toy network
    assert np.isnan(metrics["plausibility_F1"]) or 0 <= metrics["plausibility_F1"] <= 1
    result = CliRunner().invoke(app, ["graders", "explain", str(tiny_run), "--weights", str(folder), "--out",
                                      str(tmp_path / "maps"), "--threshold", "0", "--limit", "1", "-q"])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "maps").rglob("*.png"))
    assert len(pngs) == len(CHARACTERISTICS)
    from PIL import Image
    assert Image.open(pngs[0]).size == (128, 128)
    result = CliRunner().invoke(app, ["graders", "train", "dermx", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--data" in result.output


def test_presence_models_fold_the_f1_threshold_into_the_bias_and_reach_predict(toy_dermx, tmp_path):
    """fit_presence: on its calibration images, "score >= 0.5" is the F1-best decision of its logistic model;
    a characteristic shown on every image keeps its head; weights without presence use the head's sigmoid;
    --presence-from-maps fits and saves them after training."""
    from dataclasses import replace

    from synthtrial.graders.dermx import PRESENCE_FEATURES, presence_features
    from synthtrial.graders.dermx_train import fit_presence, presence_inputs

    dermx, _, data = toy_dermx
    assert dermx.config.presence == ()                                      # off by default
    present = data.present.astype(bool).copy()
    present[:, 0] = True                                                    # shown on every image: the head
    rows = fit_presence(dermx, data.images, present)
    assert len(rows) == len(CHARACTERISTICS) and rows[0] == (1.0,) + (0.0,) * len(PRESENCE_FEATURES)
    x = presence_inputs(dermx, data.images)
    papule = np.asarray(rows[PAPULE])
    decided = (x[:, PAPULE] @ papule[:-1] + papule[-1]) >= 0
    f1 = 2 * (decided & present[:, PAPULE]).sum() / (decided.sum() + present[:, PAPULE].sum())
    assert f1 > 0.9                                                         # the toy's papules are plain to see
    fitted = DermX(replace(dermx.config, presence=rows), dermx.model, device="cpu")
    _, chars = fitted.probabilities(list(data.images))
    np.testing.assert_array_equal(chars[:, PAPULE] >= 0.5, decided)          # the same decision in probabilities
    _, sig = dermx.probabilities(list(data.images[:4]))
    with torch.no_grad():
        logits = dermx.model(to_tensor(list(data.images[:4]), 64, torch.device("cpu")))[1]
    np.testing.assert_allclose(sig, torch.sigmoid(logits).numpy(), rtol=1e-5)
    feats = presence_features(torch.tensor([[2.0]]), torch.tensor([[[[0.0, 1.0], [3.0, 0.0]]]]))
    np.testing.assert_allclose(feats[0, 0].numpy(), [2.0, np.log1p(3.0), np.log1p(1.0), np.log1p(1.0)], rtol=1e-6)
    with pytest.raises(GraderError, match="presence"):
        replace(dermx.config, presence=((1.0, 2.0),))
    trained = train_dermx(data, tmp_path / "maps", epochs=1, batch_size=8, image_size=64, device="cpu",
                          presence_from_maps=True)
    assert len(trained.config.presence) == len(CHARACTERISTICS)              # saved and reloaded
    assert trained.record["presence_from"] == f"{len(data.images)} training images"


def test_count_head_learns_the_count_jointly_and_reaches_predict(tmp_path):
    """With a count head the count loss falls, the grader reports a count that follows the lesions (discs drawn
    here: 0 on half the toy images, 6 on the others), and the weights reload to the same outputs; without it
    there is no count."""
    from dataclasses import replace

    data, _ = _toy(16, 64, 5)
    data = replace(data, counts=data.present[:, PAPULE] * 12.0)
    kw = dict(epochs=8, batch_size=8, lr=1e-2, seed=0, image_size=64, device="cpu", augment=False)
    dermx = train_dermx(data, tmp_path / "counts", count_head=True, **kw)
    losses = [h["count"] for h in dermx.record["loss_history"]]
    assert dermx.config.count_head and dermx.record["settings"]["count_head"] and losses[-1] < losses[0] / 2, losses
    frame = dermx.predict(list(data.images))
    with_lesion = data.present[:, PAPULE] > 0
    assert frame["count"].to_numpy()[with_lesion].mean() > frame["count"].to_numpy()[~with_lesion].mean() + 2
    again = DermX.from_pretrained(tmp_path / "counts", device="cpu").predict(list(data.images))
    pd.testing.assert_frame_equal(frame, again)
    plain = train_dermx(data, tmp_path / "plain", epochs=1, batch_size=8, image_size=64, device="cpu")
    assert "count" not in plain.predict(list(data.images[:2])).columns and "count_head" not in plain.record["settings"]
    with pytest.raises(GraderError, match="no count head"):
        plain.model.count(plain.model.features(torch.zeros(1, 3, 64, 64)))
    with pytest.raises(GraderError, match="no lesion counts"):
        train_dermx(replace(data, counts=None), tmp_path / "none", count_head=True, **kw)
    # the level route chosen after training is the one the record says, and it reached the saved config
    saved = DermX.from_pretrained(tmp_path / "counts", device="cpu").config.level_from
    assert dermx.config.level_from == dermx.record["level_route"]["chosen"] == saved
    # against levels read from the toy's counts (0 or 12: level 0 or 1) the count route is right on most images
    # and the diagnosis head, trained on the opposite levels (i % 2), on few: auto takes the count
    by_count = scale.acne04_level_from_count(data.counts)
    outputs = dermx.outputs(list(data.images))
    route, record = choose_level_route(outputs, by_count)
    assert route == "count" and record["accuracy"]["count"] >= 0.75 and record["accuracy"]["classifier"] <= 0.25, record
    assert choose_level_route(outputs, by_count, "classifier")[0] == "classifier"
    with pytest.raises(GraderError, match="needs the count head"):
        choose_level_route(outputs._replace(counts=None), by_count)
    counted = DermX(replace(dermx.config, level_from="count"), dermx.model, device="cpu").predict(list(data.images))
    np.testing.assert_array_equal(counted["level"], scale.acne04_level_from_count(np.maximum(counted["count"], 0)))
    np.testing.assert_allclose(counted["severity"], scale.severity_from_count(np.maximum(counted["count"], 0)))
    with pytest.raises(GraderError, match="needs the count head"):
        train_dermx(data, tmp_path / "route", level_from="count", **kw)
    with pytest.raises(GraderError, match="level-from must be"):
        train_dermx(data, tmp_path / "route", count_head=True, level_from="counts", **kw)


def test_level_routes_by_hand():
    """The classifier route: arg-max level and expected level; the count route: the Hayashi level of the count
    (<= 5, 6-20, 21-50, > 50) and the severity that count stands for; a bad or count-less route is refused."""
    probs = np.array([[0.1, 0.6, 0.2, 0.1], [0.0, 0.0, 0.3, 0.7]])
    counts = np.array([5.4, 51.0])
    plain = DermX(DermXConfig(image_size=64, count_head=True), device="cpu")
    level, severity = plain.grades(probs, counts)
    np.testing.assert_array_equal(level, [1, 3])
    np.testing.assert_allclose(severity, [0 * 0.1 + 1 * 0.6 + 2 * 0.2 + 3 * 0.1, 2 * 0.3 + 3 * 0.7])
    route = DermX(DermXConfig(image_size=64, count_head=True, level_from="count"), device="cpu")
    level, severity = route.grades(probs, np.array([0.0, 5.4, 6.0, 20.6, 51.0, -1.0]))
    np.testing.assert_array_equal(level, [0, 0, 1, 2, 3, 0])
    np.testing.assert_allclose(severity, scale.severity_from_count([0.0, 5.4, 6.0, 20.6, 51.0, 0.0]))
    with pytest.raises(GraderError, match="needs the counts"):
        route.grades(probs, None)
    with pytest.raises(GraderError, match="level_from must be"):
        route_grades("counts", probs, counts)
    with pytest.raises(GraderError, match="needs the count head"):
        DermXConfig(level_from="count")
    with pytest.raises(GraderError, match="level_from must be"):
        DermXConfig(count_head=True, level_from="counts")


def _toy_counts(n: int, side: int, seed: int) -> DermXData:
    """Skin-coloured squares with 0-3 small red 'papule' discs (radius 4) each, their number the papule count."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    images, counts = [], np.zeros((n, len(CHARACTERISTICS)), np.float32)
    for i in range(n):
        image = (np.array([205, 160, 140]) + rng.normal(0, 6, (side, side, 3))).clip(0, 255).astype(np.uint8)
        for _ in range(i % 4):
            cy, cx = rng.integers(6, side - 6, 2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = (170, 40, 50)
        counts[i, PAPULE] = i % 4
        images.append(image)
    present = (counts > 0).astype(np.float32)
    areas = np.zeros((n, side, side), np.uint8)
    return DermXData(np.stack(images), np.array([min(i % 4, 3) for i in range(n)]), present, areas,
                     char_counts=counts)


def test_characteristic_counts_learn_each_count_and_call_presence_at_the_fitted_threshold(tmp_path):
    """With characteristic count heads the count loss falls, the papule count follows the number of discs drawn
    (0-3), each characteristic's threshold is fitted and is where its probability crosses 0.5, and the weights
    reload to the same outputs with their count columns."""
    from dataclasses import replace

    data = _toy_counts(32, 64, 3)
    kw = dict(epochs=12, batch_size=8, lr=1e-2, seed=0, image_size=64, device="cpu", augment=False)
    dermx = train_dermx(data, tmp_path / "chars", characteristic_counts=True, **kw)
    losses = [h["characteristic_counts"] for h in dermx.record["loss_history"]]
    assert dermx.record["settings"]["characteristic_counts"] and losses[-1] < losses[0] / 2, losses
    frame = dermx.predict(list(data.images))
    papules = frame["count_papule"].to_numpy()
    drawn = data.char_counts[:, PAPULE]
    means = [papules[drawn == k].mean() for k in range(4)]
    assert all(b > a + 0.3 for a, b in zip(means, means[1:])), means
    assert np.abs(frame["count_nodule"].to_numpy()).max() < 0.5           # never drawn, never counted
    thresholds = dermx.config.count_thresholds
    assert len(thresholds) == len(CHARACTERISTICS) and thresholds[PAPULE] in COUNT_THRESHOLDS
    assert thresholds[CHARACTERISTICS.index("nodule")] == 0.5               # on no training image: half a lesion
    np.testing.assert_array_equal(frame["p_papule"].to_numpy() >= 0.5, papules >= thresholds[PAPULE])
    np.testing.assert_allclose(frame["p_papule"], papules / (papules + thresholds[PAPULE]), rtol=1e-5)
    found = frame["p_papule"].to_numpy() >= 0.5
    assert (found == (drawn > 0)).mean() >= 0.85
    again = DermX.from_pretrained(tmp_path / "chars", device="cpu").predict(list(data.images))
    pd.testing.assert_frame_equal(frame, again)
    with pytest.raises(GraderError, match="two presence routes"):
        train_dermx(data, tmp_path / "both", characteristic_counts=True, presence_from_maps=True, **kw)
    with pytest.raises(GraderError, match="per-characteristic counts"):
        train_dermx(replace(data, char_counts=None), tmp_path / "none", characteristic_counts=True, **kw)
    plain = train_dermx(data, tmp_path / "plain", epochs=1, batch_size=8, image_size=64, device="cpu")
    assert not any(c.startswith("count_") for c in plain.predict(list(data.images[:2])).columns)
    with pytest.raises(GraderError, match="no characteristic count heads"):
        plain.model.characteristic_counts(plain.model.features(torch.zeros(1, 3, 64, 64)))


def test_count_thresholds_by_hand_and_bad_ones_refused():
    """The F1-best threshold on hand-made counts; configs with thresholds but no heads, the wrong number of them,
    a non-positive one, or presence models beside them are refused."""

    counts = DermXOutputs(None, None, None, np.array([[0.0, 2.0], [0.3, 2.0], [1.2, 2.0], [2.5, 2.0]]))
    present = np.array([[False, True], [False, True], [True, True], [True, True]])
    thresholds = fit_count_thresholds(counts, present)
    # column 0: F1 1 at every grid value above 0.3 up to 1.2; the middle one of them is kept; column 1: always
    # present
    best = [t for t in COUNT_THRESHOLDS if 0.3 < t <= 1.2]
    assert thresholds[1] == 0.5 and thresholds[0] == best[(len(best) - 1) // 2] and len(best) > 5
    with pytest.raises(GraderError, match="need the characteristic count heads"):
        DermXConfig(count_thresholds=(1.0,) * 7)
    with pytest.raises(GraderError, match="one positive number per characteristic"):
        DermXConfig(characteristic_counts=True, count_thresholds=(1.0,) * 6)
    with pytest.raises(GraderError, match="one positive number per characteristic"):
        DermXConfig(characteristic_counts=True, count_thresholds=(1.0,) * 6 + (0.0,))
    with pytest.raises(GraderError, match="two presence routes"):
        DermXConfig(characteristic_counts=True, count_thresholds=(1.0,) * 7, presence=((1.0, 0, 0, 0, 0),) * 7)
    logits = count_logits(torch.tensor([[1.0, 4.0]]), (2.0, 4.0))
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), [[1 / 3, 0.5]], rtol=1e-6)


def test_characteristic_count_loss_by_hand():
    """The squared log1p error, averaged; balanced, each error on a characteristic the image shows weighs that
    characteristic's positive weight and every other error 1."""
    from synthtrial.graders.dermx_train import characteristic_count_loss

    counts = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    target = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    e = np.log(2.0) ** 2, 0.0, np.log(2.0) ** 2, np.log(3.0) ** 2
    assert characteristic_count_loss(counts, target).item() == pytest.approx(np.mean(e), rel=1e-6)
    weighted = characteristic_count_loss(counts, target, torch.tensor([10.0, 0.5])).item()
    assert weighted == pytest.approx((10 * e[0] + 0.5 * e[1] + e[2] + 0.5 * e[3]) / 4, rel=1e-6)


def test_characteristic_counts_from_the_command_line_reach_the_grades(tiny_run, tmp_path):
    """Trained by the command on a run, the characteristic counts' targets are the visible lesions of each type
    (the loaded data's counts, present exactly where at least 1), and grading the run adds a count column per
    characteristic; asking for two presence routes is refused in one line before anything is read or written."""
    data = load_dermx_data([tiny_run], 64)
    np.testing.assert_array_equal(data.char_counts >= 1, data.present > 0)
    assert data.char_counts.max() > 1
    folder = tmp_path / "w"
    result = CliRunner().invoke(app, ["graders", "train", "dermx", "--data", str(tiny_run), "--out", str(folder),
                                      "--epochs", "1", "--image-size", "64", "--characteristic-counts", "-q"])
    assert result.exit_code == 0, result.output
    grader = get_grader("dermx", folder, device="cpu")
    assert grader.config.characteristic_counts and len(grader.config.count_thresholds) == len(CHARACTERISTICS)
    grade_run(tiny_run, [grader])
    grades = rundir.read_grades(tiny_run)
    assert {f"dermx_count_{c}" for c in CHARACTERISTICS} <= set(grades.columns)
    assert (grades[[f"dermx_count_{c}" for c in CHARACTERISTICS]] >= 0).all().all()
    bad = CliRunner().invoke(app, ["graders", "train", "dermx", "--data", str(tiny_run), "--out", str(tmp_path / "b"),
                                   "--characteristic-counts", "--presence-from-maps", "-q"])
    assert bad.exit_code == 2 and "two presence routes" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
