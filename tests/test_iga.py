"""The IGA grader: network, class weights, training (loss falls, resumes), the count head (its loss falls, its
route to the grade, the route chosen on validation), weights on disk, view fusion of grades and counts, the
grade -> analyze path, and the CLI. Tiny runs and tiny networks built here; one torch thread."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from synthtrial.graders import classify, iga, iga_train
from synthtrial.graders.base import GraderError, get_grader, read_rgb
from synthtrial.grade import grade_run
from synthtrial.util.errors import SynthtrialError
from synthtrial.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = iga.IGAConfig(depth=8, width=8, image_size=48, stem_stride=1, dropout=0.0, count_head=False)
TINY_COUNTS = iga.IGAConfig(depth=8, width=8, image_size=48, stem_stride=1, dropout=0.0, count_head=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """2 patients (astronaut, hopper) x 3 days x 3 views at 128 px, severities spread over the IGA grades."""
    from synthtrial.run.generation import generate

    folder = tmp_path_factory.mktemp("iga")
    rows = ["patient_id,day,treatment,severity,view"]
    for p, sev in (("P1", (0.1, 1.2, 2.6)), ("P2", (2.8, 1.0, 0.2))):
        for d, s in enumerate(sev, start=1):
            rows += [f"{p},{d},{'Cream' if d == 2 else 'Control'},{s},{v}" for v in ("frontal", "left", "right")]
    (folder / "p.csv").write_text("\n".join(rows) + "\n")
    return generate(folder / "p.csv", folder / "run", seed=0, size=128, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("iga-weights") / "w"
    settings = iga_train.TrainSettings(epochs=6, batch_size=18, lr=3e-3, lr_final=1e-3, val_fraction=0, augment_p=0.0,
                                 augment=False)
    return iga_train.train([tiny_run], out, config=TINY, settings=settings), out


@pytest.fixture(scope="module")
def trained_counts(tiny_run, tmp_path_factory):
    """The tiny network with the count head, 40 steps (the count needs more than the grades' 6)."""
    out = tmp_path_factory.mktemp("iga-counts") / "w"
    settings = iga_train.TrainSettings(epochs=40, batch_size=18, lr=1e-2, lr_final=1e-3, val_fraction=0,
                                       augment_p=0.0, augment=False, grade_from="counts")
    return iga_train.train([tiny_run], out, config=TINY_COUNTS, settings=settings), out


def test_cifar_resnet_sizes_and_checks():
    paper = iga.build_network(iga.IGAConfig(depth=110, width=16, stem_stride=1, image_size=224))
    assert 1.7e6 < sum(p.numel() for p in paper.parameters()) < 1.75e6      # the paper's 1.7 M
    net = iga.build_network(TINY).eval()
    assert net(torch.rand(2, 3, 48, 48)).shape == (2, 5)
    with pytest.raises(GraderError, match="6n"):
        iga.IGAConfig(depth=21)
    with pytest.raises(GraderError, match="backbone"):
        iga.IGAConfig(backbone="vgg")


def test_class_weights_follow_labels(trained, tiny_run):
    assert classify.class_weights(np.array([0, 0, 0, 1, 2, 2]), 4).tolist() == pytest.approx([6 / 9, 2.0, 1.0, 0.0])
    grader, _ = trained
    labels = pd.read_parquet(Path(tiny_run) / "manifest.parquet")["iga"].to_numpy()
    assert grader.record["train_grade_counts"] == np.bincount(labels, minlength=5).tolist()
    assert grader.record["class_weights"] == pytest.approx(classify.class_weights(labels, 5).tolist(), abs=1e-6)


def test_training_loss_falls_and_weights_reload_bit_for_bit(trained, tiny_run, tmp_path):
    grader, out = trained
    losses = [h["loss"] for h in grader.record["history"]]
    assert losses[-1] < losses[0] * 0.8, losses
    manifest = pd.read_parquet(Path(tiny_run) / "manifest.parquet")
    images = [read_rgb(Path(tiny_run) / p) for p in manifest["image"]]
    first = grader.predict(images, manifest)
    again = iga.IGAGrader.from_pretrained(out).predict(images, manifest)
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    assert np.allclose(first[[f"p_iga{k}" for k in range(5)]].sum(axis=1), 1)
    assert first["expected_grade"].between(0, 4).all() and (first["views"] == 3).all()
    grader.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert grader.fingerprint() == iga.IGAGrader.from_pretrained(tmp_path / "copy").fingerprint()


def test_views_of_a_visit_are_fused():
    logp = np.log(np.array([[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.6, 0.1], [0.2] * 5]))
    meta = pd.DataFrame({"patient_id": ["A", "A", "B"], "day": [1, 1, 1]})
    visit = iga.visits(meta, 3)
    assert visit.tolist() == [0, 0, 1]
    fused = iga.fuse(logp, visit)
    geo = np.sqrt(np.exp(logp[0]) * np.exp(logp[1]))
    assert np.allclose(fused[0], geo / geo.sum()) and np.allclose(fused[0], fused[1])
    assert np.allclose(fused[2], 0.2)
    assert iga.visits(None, 3).tolist() == [0, 1, 2]
    frame = iga.outputs(logp, visit, np.ones(3, bool))
    assert frame["views"].tolist() == [2, 2, 1]
    assert frame.loc[2, "expected_grade"] == pytest.approx(2.0)


def test_training_resumes_to_the_same_weights(tiny_run, tmp_path):
    settings = iga_train.TrainSettings(epochs=3, batch_size=5, val_fraction=0.5, seed=1)
    whole = iga_train.train([tiny_run], tmp_path / "whole", config=TINY_COUNTS, settings=settings)

    def stop_in_epoch_three(done, total, status):
        if done == 5:      # 2 steps per epoch: epochs 1 and 2 are checkpointed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        iga_train.train([tiny_run], tmp_path / "cut", config=TINY_COUNTS, settings=settings, progress=stop_in_epoch_three)
    ckpt = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert ckpt["step"] == 4 and ckpt["history"][-1]["epoch"] == 2
    resumed = iga_train.train([tiny_run], tmp_path / "cut", config=TINY_COUNTS, settings=settings)
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert resumed.record["history"] == whole.record["history"]
    assert "val_accuracy3" in whole.record["history"][0] and whole.record["n_val"] == 9
    with pytest.raises(GraderError, match="--restart"):
        iga_train.train([tiny_run], tmp_path / "cut", config=TINY_COUNTS,
                        settings=iga_train.TrainSettings(epochs=3, val_fraction=0.5, seed=2))


@pytest.mark.parametrize("wide", [False, True], ids=["paper-augmentation", "wide-augmentation"])
def test_resume_after_epoch_one_with_dropout_and_augmentation_gives_the_same_bytes(tiny_run, tmp_path, wide):
    """Issue 19: a training killed after epoch 1 and run again ended with other weights (dropout drew from a
    global RNG that the checkpoint did not hold). The shared loop keeps every RNG state; the wide augmentation
    draws its seeds from the epoch's generator."""
    config = iga.IGAConfig(depth=8, width=8, image_size=48, stem_stride=1, dropout=0.5)
    settings = iga_train.TrainSettings(epochs=3, batch_size=9, val_fraction=0, augment_p=0.5, seed=3, augment=wide)
    iga_train.train([tiny_run], tmp_path / "whole", config=config, settings=settings)

    def stop_after_epoch_one(done, total, status):
        if done == 3:      # 2 steps per epoch: only epoch 1 is checkpointed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        iga_train.train([tiny_run], tmp_path / "cut", config=config, settings=settings, progress=stop_after_epoch_one)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    iga_train.train([tiny_run], tmp_path / "cut", config=config, settings=settings)
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    restarted = iga_train.train([tiny_run], tmp_path / "cut", config=config, settings=settings, restart=True)
    assert restarted.record["history"][0]["step"] == 2


def test_pickled_checkpoint_is_refused(trained, tmp_path):
    _, out = trained
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((out / "config.json").read_text())
    torch.save(iga.build_network(TINY).state_dict(), folder / "model.safetensors")
    with pytest.raises(SynthtrialError, match=r"pickled .* refusing") as err:
        iga.IGAGrader.from_pretrained(folder)
    assert "\n" not in str(err.value)
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "model.pt")
    with pytest.raises(GraderError, match="pickled checkpoints are never loaded"):
        get_grader("iga", folder)


def test_identity_filter_and_acne04_labels(tiny_run, tmp_path):
    src = classify.read_source(tiny_run, ["hopper"])
    assert set(src.meta["base"]) == {"hopper"} and len(src) == 9
    with pytest.raises(GraderError, match="identity 'nobody'"):
        classify.read_source(tiny_run, ["nobody"])
    root = tmp_path / "acne04"
    (root / "JPEGImages").mkdir(parents=True)
    image = read_rgb(Path(tiny_run) / src.meta["image"].iloc[0])
    from PIL import Image

    lines = []
    for i, (level, count) in enumerate([(0, 2), (1, 12), (3, 60)]):
        Image.fromarray(image).save(root / "JPEGImages" / f"levle{level}_{i}.jpg")
        lines.append(f"levle{level}_{i}.jpg {level} {count}")
    (root / "NNEW_trainval_0.txt").write_text("\n".join(lines) + "\n")
    acne = classify.read_source(root)
    assert acne.kind == "acne04" and acne.meta.sort_values("acne04_level")["iga"].tolist() == [0, 2, 4]   # counts 2, 12, 60 -> s 0.18, 0.73, 3.0


def test_grade_resumes_and_analyze_takes_the_expected_grade(trained, tmp_path):
    from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run
    from synthtrial.run.generation import generate

    grader, _ = trained
    run = generate(Path(__file__).resolve().parents[1] / "protocols" / "quick.csv", tmp_path / "quick", seed=0,
                   size=128, progress=False)
    calls = []

    class Flaky:
        name, outcomes = grader.name, grader.outcomes

        def fingerprint(self):
            return grader.fingerprint()

        def predict(self, images, meta=None):
            calls.append(len(images))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return grader.predict(images, meta)

    with pytest.raises(KeyboardInterrupt):
        grade_run(run, [Flaky()], batch_size=20)
    path = grade_run(run, [Flaky()], batch_size=20)
    manifest = pd.read_parquet(Path(run) / "manifest.parquet")
    assert calls[0] + sum(calls[2:]) == len(manifest) and calls[1] == calls[2]   # chunk 1 not graded again
    fresh = tmp_path / "fresh"
    import shutil

    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns(".grades", "grades.*"))
    assert pd.read_parquet(grade_run(fresh, [grader], batch_size=64)).equals(pd.read_parquet(path))
    folder = analyze_run(run, AnalysisSettings(autoencoder=False, n_permutations=100), progress=False)
    effects = pd.read_csv(folder / "effects.csv")
    assert "grader_iga_expected_grade" in set(effects["outcome"])


def test_cli_train_and_eval(tiny_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "w"
    result = runner.invoke(app, ["graders", "train", "iga", "--data", str(tiny_run), "--out", str(out),
                                 "--epochs", "1", "--depth", "8", "--image-size", "32", "--val-fraction", "0",
                                 "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and "wrote" in result.output
    result = runner.invoke(app, ["graders", "eval", "iga", "--data", str(tiny_run), "--weights", str(out),
                                 "--identity", "hopper", "--out", str(tmp_path / "ev"), "-q"])
    assert result.exit_code == 0, result.output
    assert "3-class view" in result.output and "accuracy" in result.output
    metrics = json.loads((tmp_path / "ev" / "iga_metrics.json").read_text())
    assert metrics["visits"] == 3 and sum(metrics["groups"]["support"]) == 3
    assert (tmp_path / "ev" / "iga_confusion.png").read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["graders", "train", "iga", "--data", str(tmp_path / "nothing"), "--out",
                                 str(out), "-q"])
    assert result.exit_code == 2 and re.search(r"--data .*nothing: no such folder", result.output)
    result = runner.invoke(app, ["graders", "eval", "iga", "--data", str(tiny_run), "--weights", str(tmp_path)])
    assert result.exit_code == 2 and "no model.safetensors" in result.output


def test_timm_backbone_takes_the_users_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    config = iga.IGAConfig(backbone="timm:mobilenetv3_small_050", image_size=32)
    net = iga.build_network(config).eval()
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in iga.build_network(config).backbone.state_dict().items()}
    save_file(state, tmp_path / "bb.safetensors")
    iga_train.load_backbone(net, tmp_path / "bb.safetensors")
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in state.items())
    torch.save(state, tmp_path / "pickled.safetensors")
    with pytest.raises(SynthtrialError, match="pickled"):
        iga_train.load_backbone(net, tmp_path / "pickled.safetensors")
    with pytest.raises(GraderError, match="timm backbone"):
        iga_train.load_backbone(iga.build_network(TINY), tmp_path / "bb.safetensors")


# ---------------------------------------------------------------------------------------- count head

def test_count_head_learns_the_counts(trained_counts, tiny_run, tmp_path):
    """40 steps on the tiny run: the loss (cross-entropy + count) falls, the count head ranks the images' true
    inflammatory counts and sits far closer to them than where training started (the head calibrated to the
    counts' geometric mean); the grades come from the counts as asked, and the weights reload bit for bit."""
    grader, out = trained_counts
    losses = [h["loss"] for h in grader.record["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    source = classify.read_source(tiny_run)
    crops, _ = iga_train.prepare_source(grader, source)
    truth = iga_train.count_targets(source, "simulated")
    torch.manual_seed(0)      # what training starts from (start_training seeds torch with settings.seed 0)
    start = iga.IGAGrader(TINY_COUNTS)
    iga_train.calibrate_count_head(start, crops[:32], truth)

    def error(g):
        return float(np.mean(np.abs(np.log1p(g.heads(crops)[1][:, 0]) - np.log1p(truth[:, 0]))))

    assert error(grader) < 0.5 * error(start), (error(grader), error(start))
    from scipy.stats import spearmanr

    assert spearmanr(grader.heads(crops)[1][:, 0], truth[:, 0]).statistic > 0.6
    assert grader.outcomes == ("expected_grade", "inflammatory_count") and grader.config.grade_from == "counts"
    images = [read_rgb(p) for p in source.paths]
    frame = grader.predict(images, source.meta)
    assert set(iga.COUNT_COLUMNS) <= set(frame.columns) and (frame["grade"] == frame["count_grade"]).all()
    assert (frame["count_grade"] == iga.grade_from_counts(frame[["inflammatory_count", "nodule_count"]].to_numpy())).all()
    again = iga.IGAGrader.from_pretrained(out)
    pd.testing.assert_frame_equal(frame, again.predict(images, source.meta), check_exact=True)
    grader.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_count_targets_come_from_the_manifest(tiny_run):
    source = classify.read_source(tiny_run, ["hopper"])
    manifest = pd.read_parquet(Path(tiny_run) / "manifest.parquet").set_index("image").loc[source.meta["image"]]
    simulated = iga_train.count_targets(source, "simulated")
    assert simulated[:, 0].tolist() == (manifest["n_papule"] + manifest["n_pustule"] + manifest["n_nodule"]).tolist()
    assert simulated[:, 1].tolist() == manifest["n_nodule"].tolist()
    visible = iga_train.count_targets(source, "visible")
    assert visible[:, 0].tolist() == (manifest["n_visible_papule"] + manifest["n_visible_pustule"]
                                      + manifest["n_visible_nodule"]).tolist()
    assert (visible <= simulated).all()


def test_counts_are_fused_per_visit_and_give_the_iga():
    """Hand-computed: views counting 4 and 16 inflammatory lesions fuse to sqrt(5 * 17) - 1 = 8.22 (IGA 2, the
    3-class view's middle class); one nodule lifts a visit to IGA 3 whatever its count."""
    logp = np.log(np.full((3, 5), 0.2))
    counts = np.array([[4.0, 0.0], [16.0, 0.0], [1.0, 1.0]])
    visit = np.array([0, 0, 1])
    frame = iga.outputs(logp, visit, np.ones(3, bool), counts)
    assert frame["inflammatory_count"].tolist() == pytest.approx([np.sqrt(85) - 1] * 2 + [1.0])
    assert frame["count_grade"].tolist() == [2, 2, 3] and frame["count_group"].tolist() == [1, 1, 2]
    assert frame["grade"].tolist() == [0, 0, 0]          # the classifier's route (uniform: the first grade)
    by_counts = iga.outputs(logp, visit, np.ones(3, bool), counts, "counts")
    assert by_counts["grade"].tolist() == [2, 2, 3] and by_counts["group"].tolist() == [1, 1, 2]
    assert list(iga.outputs(logp, visit, np.ones(3, bool)).columns) == list(iga.OUTPUT_COLUMNS)


def test_grade_route_is_chosen_on_validation():
    history = [{"val_balanced3": 0.5, "val_balanced3_counts": 0.9}]
    assert iga_train.choose_route("auto", history, True) == "counts"
    assert iga_train.choose_route("auto", [{"val_balanced3": 0.9, "val_balanced3_counts": 0.5}], True) == "classifier"
    assert iga_train.choose_route("auto", history, False) == "classifier"
    assert iga_train.choose_route("auto", [{"loss": 1.0}], True) == "classifier"      # no validation
    assert iga_train.choose_route("classifier", history, True) == "classifier"
    assert iga_train.balanced_accuracy({"recall": [1.0, 0.5, 0.0], "support": [2, 2, 0]}) == pytest.approx(0.75)


def test_auto_route_is_saved_and_evaluated(tiny_run, tmp_path):
    settings = iga_train.TrainSettings(epochs=2, batch_size=9, val_fraction=0.5, seed=1, augment=False,
                                       augment_p=0.0)
    grader = iga_train.train([tiny_run], tmp_path / "w", config=TINY_COUNTS, settings=settings)
    last = grader.record["history"][-1]
    assert {"val_balanced3", "val_balanced3_counts", "val_recall3_counts"} <= set(last)
    expected = "counts" if last["val_balanced3_counts"] > last["val_balanced3"] else "classifier"
    assert grader.config.grade_from == expected
    assert json.loads((tmp_path / "w" / "config.json").read_text())["grade_from"] == expected
    result = iga_train.evaluate(grader, tiny_run)
    assert set(result["routes"]) == {"classifier", "counts"} and result["grade_from"] == expected
    assert result["groups"] == result["routes"][expected]
    assert {"mae", "spearman"} <= set(result["counts"]) and sum(result["visible"]["support"]) == result["visits"]


def test_paper_settings_and_config_errors(tmp_path):
    paper = iga.IGAConfig(depth=110, width=16, image_size=224, stem_stride=1, count_head=False)
    net = iga.build_network(paper)
    assert net.counter is None and 1.7e6 < sum(p.numel() for p in net.parameters()) < 1.75e6
    small = iga.build_network(iga.IGAConfig(width=4, depth=8, image_size=64)).eval()
    logits, counts = small.both(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 5) and counts.shape == (2, 2) and (counts > 0).all()
    assert small.stem[3].stride == (2, 2)       # stride 4: two stride-2 convolutions
    with pytest.raises(GraderError, match="stem stride 1, 2 or 4"):
        iga.IGAConfig(stem_stride=3)
    with pytest.raises(GraderError, match="needs the count head"):
        iga.IGAConfig(count_head=False, grade_from="counts")
    with pytest.raises(GraderError, match="grade_from"):
        iga.IGAConfig(grade_from="votes")
    with pytest.raises(GraderError, match="--count-target"):
        iga_train.TrainSettings(count_target="all")
    with pytest.raises(GraderError, match="--grade-from"):
        iga_train.TrainSettings(grade_from="best")
    runner = CliRunner()
    for args, message in ((["--stem-stride", "3"], "stem stride 1, 2 or 4"),
                          (["--no-count-head", "--grade-from", "counts"], "needs the count head"),
                          (["--count-target", "all"], "--count-target")):
        result = runner.invoke(app, ["graders", "train", "iga", "--data", str(tmp_path), "--out",
                                     str(tmp_path / "w"), "-q", *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "w").exists()


def test_weights_without_count_head_still_load_and_the_shipped_ones_count(tmp_path):
    plain = iga.IGAGrader(iga.IGAConfig(depth=8, width=4, image_size=32, stem_stride=1, count_head=False))
    plain.save_pretrained(tmp_path / "plain")
    loaded = iga.IGAGrader.from_pretrained(tmp_path / "plain")
    assert not loaded.config.count_head and loaded.outcomes == ("expected_grade",)
    frame = loaded.predict([np.full((96, 96, 3), 180, np.uint8)])
    assert list(frame.columns) == list(iga.OUTPUT_COLUMNS)
    shipped = iga.IGAGrader.default()
    assert shipped.config.count_head and "inflammatory_count" in shipped.outcomes
    assert set(iga.COUNT_COLUMNS) <= set(shipped.predict([np.full((96, 96, 3), 180, np.uint8)]).columns)
