"""ImageQX: degradations with labels known by construction, training (loss falls, resumes), weights on disk,
verdicts with one-line reasons, portrait checks, grading a run, and the CLI. Tiny inputs, one torch thread."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from synthtrial.graders import classify, imageqx, imageqx_degrade
from synthtrial.graders.base import GraderError, get_grader, read_rgb
from synthtrial.grade import grade_run
from synthtrial.util.errors import SynthtrialError
from synthtrial.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
#: a small timm model keeps the tests fast; the default EfficientNet-B0 is built in test_default_network
TINY = imageqx.ImageQXConfig(backbone="mobilenetv3_small_050", image_size=32, dropout=0.0, min_side=64)
SETTINGS = imageqx.TrainSettings(epochs=6, batch_size=12, lr=3e-3, lr_final=1e-3, val_fraction=0, base_size=96,
                                 resample=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from synthtrial.run.generation import generate

    folder = tmp_path_factory.mktemp("qx")
    rows = ["patient_id,day,treatment,severity"] + [f"P{p},{d},Control,1.0" for p in (1, 2) for d in range(1, 7)]
    (folder / "p.csv").write_text("\n".join(rows) + "\n")
    return generate(folder / "p.csv", folder / "run", seed=0, size=128, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("qx-weights") / "w"
    return imageqx.train([tiny_run], out, config=TINY, settings=SETTINGS), out


@pytest.fixture(scope="module")
def face(tiny_run):
    return read_rgb(next((Path(tiny_run) / "images").rglob("*.png")))


def test_default_network_is_efficientnet_b0():
    config = imageqx.ImageQXConfig()
    net = imageqx.build_network(config).eval()
    assert config.backbone == "efficientnet_b0" and 4.0e6 < sum(p.numel() for p in net.parameters()) < 4.02e6
    q, e = net(torch.rand(1, 3, 64, 64))
    assert q.shape == (1, 2) and e.shape == (1, 5)
    with pytest.raises(GraderError, match="backbone 'no_such_net'"):
        imageqx.build_network(imageqx.ImageQXConfig(backbone="no_such_net"))


def test_degradations_carry_their_labels(face):
    seen = np.zeros(len(imageqx.EXPLANATIONS))
    clean = 0
    for i in range(300):
        rng = np.random.default_rng([7, i])
        recipe = imageqx_degrade.plan_degradation(rng)
        labels = recipe["labels"]
        assert labels.sum() <= 2 and not (labels[0] and labels[4])
        seen += labels
        clean += labels.sum() == 0
        if i < 40:
            out = imageqx_degrade.apply_degradation(face, recipe, rng)
            assert out.shape == face.shape and out.dtype == np.uint8
    assert (seen > 30).all() and 60 < clean < 160
    blur = imageqx_degrade.apply_degradation(face, {"labels": None, "steps": [("blur", {"sigma": 0.02})]}, None)
    assert np.abs(np.diff(blur.astype(float), axis=1)).mean() < 0.5 * np.abs(np.diff(face.astype(float), axis=1)).mean()
    dark = imageqx_degrade.apply_degradation(face, {"labels": None, "steps": [("exposure", {"gain": 0.3})]}, None)
    assert dark.mean() < 0.4 * face.mean()
    far = imageqx_degrade.apply_degradation(face, {"labels": None, "steps": [("zoomout", {"scale": 0.4, "noise": 0})]},
                                    np.random.default_rng(0))
    assert far[:20].std() < face[:20].std() + 1        # the border is now plain background
    x1, y1 = imageqx_degrade.degraded_set(face[None], seed=3, epoch=0, image_size=40)
    x2, y2 = imageqx_degrade.degraded_set(face[None], seed=3, epoch=0, image_size=40)
    assert x1.shape == (1, 40, 40, 3) and np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_training_loss_falls_and_weights_reload_bit_for_bit(trained, face, tmp_path):
    grader, out = trained
    losses = [h["loss"] for h in grader.record["history"]]
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
    first = grader.predict([face, face[:50, :50]])
    again = imageqx.ImageQX.from_pretrained(out).predict([face, face[:50, :50]])
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    assert list(first.columns) == list(imageqx.OUTPUT_COLUMNS)
    assert first.loc[1, "low_resolution"] == 1 and first.loc[1, "acceptable"] == 0     # below min_side
    grader.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    half = tmp_path / "half"
    grader.save_pretrained(half, dtype="float16")
    assert (half / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    assert np.allclose(imageqx.ImageQX.from_pretrained(half).predict([face])["p_acceptable"], first["p_acceptable"][:1],
                       atol=0.05)


def test_class_weights_follow_the_drawn_labels(trained):
    grader, _ = trained
    labels = np.stack([imageqx_degrade.plan_degradation(np.random.default_rng([SETTINGS.seed, 0, i]))["labels"]
                       for i in range(grader.record["n_train"])])     # resample=False: epoch 0's draw
    poor = labels.any(axis=1).astype(int)
    assert grader.record["quality_class_weights"] == pytest.approx(classify.class_weights(poor, 2).tolist(), abs=1e-5)
    pos = labels.sum(axis=0)
    assert grader.record["explanation_pos_weight"] == pytest.approx(((len(labels) - pos) / np.maximum(pos, 1)).tolist(),
                                                                 abs=1e-5)   # an unseen one: weight n


def test_verdicts_and_portrait_checks(trained, face, tmp_path):
    grader, _ = trained
    verdicts = grader.verdicts([face, face[:40, :40]])
    assert verdicts["reason"].map(lambda r: "\n" not in r).all()
    assert "low resolution" in verdicts.loc[1, "reason"] and verdicts.loc[1, "reason"].startswith("poor quality")
    row = {"acceptable": 1.0, "p_acceptable": 0.9, **{e: 0.0 for e in imageqx.EXPLANATIONS},
           **{f"p_{e}": 0.1 for e in imageqx.EXPLANATIONS}}
    assert imageqx.reason_of(row) == ""
    Image.fromarray(face).save(tmp_path / "ok.png")
    Image.fromarray(face[:40, :40]).save(tmp_path / "tiny.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    checked = dict(imageqx.check_portraits([tmp_path / "tiny.png", tmp_path / "broken.jpg", tmp_path / "ok.png"],
                                           grader=grader))
    assert "low resolution" in checked[tmp_path / "tiny.png"]
    assert checked[tmp_path / "broken.jpg"].startswith("cannot be read as an image")
    assert checked[tmp_path / "ok.png"] in (None, verdicts.loc[0, "reason"] or None)


def test_training_resumes_to_the_same_weights(tiny_run, tmp_path):
    settings = imageqx.TrainSettings(epochs=2, batch_size=6, val_fraction=0.5, seed=4, base_size=96)
    imageqx.train([tiny_run], tmp_path / "whole", config=TINY, settings=settings)

    def stop(done, total, status):
        if done == 2:      # 1 step per epoch (6 training images): epoch 1 is saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imageqx.train([tiny_run], tmp_path / "cut", config=TINY, settings=settings, progress=stop)
    imageqx.train([tiny_run], tmp_path / "cut", config=TINY, settings=settings)
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_pickled_checkpoint_is_refused(trained, tmp_path):
    _, out = trained
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((out / "config.json").read_text())
    torch.save({"x": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(SynthtrialError, match="pickled") as err:
        get_grader("imageqx", folder)
    assert "\n" not in str(err.value)
    config = json.loads((out / "config.json").read_text())
    config["grader"] = "iga"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraderError, match="not 'imageqx'"):
        imageqx.ImageQX.from_pretrained(folder)


def test_grade_adds_the_verdict_to_every_row(trained, tiny_run):
    grader, _ = trained
    grades = pd.read_parquet(grade_run(tiny_run, [grader]))
    assert len(grades) == 12 and {"imageqx_acceptable", "imageqx_blurry"} <= set(grades.columns)
    index = json.loads((Path(tiny_run) / "grades.json").read_text())
    assert index["graders"]["imageqx"]["outcomes"] == []


def test_cli_train_and_eval(tiny_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "w"
    result = runner.invoke(app, ["graders", "train", "imageqx", "--data", str(tiny_run), "--out", str(out),
                                 "--epochs", "1", "--image-size", "32", "--backbone", "mobilenetv3_small_050", "--base-size", "64", "--val-fraction", "0",
                                 "--weights-dtype", "float16", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["weights_dtype"] == "float16"
    result = runner.invoke(app, ["graders", "eval", "imageqx", "--data", str(tiny_run), "--weights", str(out),
                                 "--identity", "hopper", "--out", str(tmp_path / "ev"), "-q"])
    assert result.exit_code == 0, result.output
    assert "quality verdict" in result.output and "too far away" in result.output
    metrics = json.loads((tmp_path / "ev" / "imageqx_metrics.json").read_text())
    assert metrics["images"] == 6 and sum(metrics["quality"]["support"]) == 6 and metrics["recipe"] == "varied"
    assert (tmp_path / "ev" / "imageqx_confusion.png").is_file()
    result = runner.invoke(app, ["graders", "train", "imageqx", "--data", str(tiny_run), "--out", str(out),
                                 "--weights-dtype", "int8", "-q"])
    assert result.exit_code == 2 and "float32 or float16" in result.output
    result = runner.invoke(app, ["graders", "train", "imageqx", "--data", str(tiny_run), "--out", str(tmp_path / "r"),
                                 "--recipe", "broad", "-q"])
    assert result.exit_code == 2 and "--recipe must be varied, wide or narrow, got 'broad'" in result.output
    assert not (tmp_path / "r").exists()


def test_looks_change_the_colour_but_keep_every_quality_label(tiny_run, tmp_path):
    """--looks: colour, exposure and light change, within the acceptable exposure's reach; an edge stays where
    it was (or mirrored) and as sharp (no blur, shift or zoom); training with it records it."""
    import dataclasses

    from synthtrial.graders.augment import Augmenter

    looks = imageqx.LOOKS
    assert looks.affine_p == looks.blur_p == looks.noise_p == looks.jpeg_p == 0 and looks.photometric
    image = np.full((32, 32, 3), (150, 110, 90), np.uint8)
    image[:, 16:] = (220, 190, 170)
    changed = 0
    for seed in range(12):
        out = Augmenter(looks).image(image, seed).astype(float)
        steps = np.abs(np.diff(out.mean(axis=2), axis=1))
        assert (steps.argmax(axis=1) == 15).all()                # the edge (mirrored or not) between 15 and 16
        assert (steps.max(axis=1) > 5 * np.delete(steps, 15, axis=1).max(axis=1)).all()     # one sharp edge
        assert 0.6 < out.mean() / image.mean() < 1.6
        changed += np.abs(out.mean(axis=(0, 1)) - image.mean(axis=(0, 1))).max() > 2
    assert changed >= 8
    settings = dataclasses.replace(SETTINGS, epochs=1, looks=True)
    grader = imageqx.train([tiny_run], tmp_path / "w", config=TINY, settings=settings)
    assert grader.record["settings"]["looks"] is True


def test_photos_are_seeded_crops_of_other_content_and_join_the_training_part(tiny_run, tmp_path):
    a, b = imageqx.photo_bases(6, 48, seed=3), imageqx.photo_bases(6, 48, seed=3)
    assert a.shape == (6, 48, 48, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, imageqx.photo_bases(6, 48, seed=4))
    assert len({x.tobytes() for x in a}) == 6 and all(x.std() > 5 for x in a)    # six different, textured crops
    settings = imageqx.TrainSettings(epochs=1, batch_size=6, val_fraction=0, base_size=48, photos=5)
    grader = imageqx.train([tiny_run], tmp_path / "w", config=TINY, settings=settings)
    images = len(pd.read_parquet(Path(tiny_run) / "manifest.parquet"))
    assert grader.record["n_train"] == images + 5 and grader.record["settings"]["photos"] == 5
    with pytest.raises(GraderError, match="--photos must be 0-100000"):
        imageqx.TrainSettings(photos=-1)
