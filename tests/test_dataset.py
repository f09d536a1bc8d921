"""The grader training set (``synthtrial graders dataset``): stratified severities, one portrait per split with
its identity variants, three views, marks; every split a verified run; resume heals to the same bytes; another
recipe, bad options and a foreign --out refused in one line before any write."""

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.run.dataset import (LEVEL_SEVERITY, SPLITS, VISIT_DAYS, Recipe, RunError, protocol_frame, splits,
                                    visit_severities)
from synthtrial.trial import scale

runner = CliRunner()
TINY = ["--images", "12", "--size", "128", "--visits", "2", "-q"]


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "set"
    result = runner.invoke(app, ["graders", "dataset", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_severities_are_stratified_over_the_hayashi_levels():
    sev = visit_severities(4000, np.random.default_rng(1))
    levels = np.digitize(sev, [b for _, b in LEVEL_SEVERITY[:-1]], right=True)
    assert np.bincount(levels, minlength=4).tolist() == [1000] * 4           # dealt in turn: equal shares
    assert sev.min() >= 0 and sev.max() <= 3
    inner = np.abs(sev - np.round(sev - 0.5) - 0.5) > 1e-6                      # off the exact boundaries
    assert (scale.acne04_level(sev)[inner] == levels[inner]).all()
    iga = np.bincount(scale.expected_iga(sev), minlength=5) / len(sev)
    assert (iga > 0.05).all()                                                   # every IGA grade represented


def test_protocol_has_visits_views_and_one_patient_per_visit_block():
    recipe = Recipe(images=60, visits_per_patient=8)
    train, test_seed, test_portrait = splits(recipe)
    assert (train.portrait, test_seed.portrait, test_portrait.portrait) == ("astronaut", "astronaut", "hopper")
    assert len({train.seed, test_seed.seed, test_portrait.seed}) == 3 and train.seed == 0
    assert recipe.test_images == 12
    frame = protocol_frame(train, recipe)
    assert len(frame) == 60 and set(frame["view"]) == {"frontal", "left", "right"}
    days = frame.drop_duplicates(["patient_id", "day"]).groupby("patient_id")["day"].apply(list).tolist()
    assert days == [list(range(0, 8 * VISIT_DAYS, VISIT_DAYS))] * 2 + [list(range(0, 4 * VISIT_DAYS, VISIT_DAYS))]
    assert frame.groupby(["patient_id", "day"])["severity"].nunique().max() == 1   # the views share the visit
    assert protocol_frame(train, recipe).equals(frame)                               # seeded
    assert not protocol_frame(test_seed, recipe)["severity"].equals(frame["severity"][:12])


def test_both_portraits_alternate_in_train_and_test_seed_and_no_test_portrait_is_made(tmp_path):
    from synthtrial.run import rundir

    assert [(s.name, s.portrait) for s in splits(Recipe(images=6, train_portrait="both"))] == \
        [("train", "both"), ("test_seed", "both")]
    out = tmp_path / "both"
    result = runner.invoke(app, ["graders", "dataset", "--out", str(out), "--images", "6", "--size", "128",
                                 "--visits", "1", "--train-portrait", "both", "-q"])
    assert result.exit_code == 0, result.output
    manifest = rundir.read_manifest(out / "train", ("image", "patient_id", "identity"))
    assert [json.loads(v)["base"] for v in manifest.drop_duplicates("patient_id")["identity"]] == \
        ["astronaut", "hopper"]
    record = json.loads((out / "dataset.json").read_text())
    assert set(record["splits"]) == {"train", "test_seed"} and not (out / "test_portrait").exists()
    assert record["splits"]["train"]["identity_variants"] == 2


def test_recipe_refuses_bad_values():
    with pytest.raises(RunError, match="--images must be a multiple of 3"):
        Recipe(images=10)
    with pytest.raises(RunError, match="--train-portrait"):
        Recipe(train_portrait="lena")
    with pytest.raises(RunError, match="--size"):
        Recipe(images=12, size=64)


def test_tiny_set_renders_three_verified_runs_with_the_recipe(tiny):
    from synthtrial.face.faces import builtin_face
    from synthtrial.run import rundir
    from synthtrial.run.verify import verify
    from PIL import Image

    out, output = tiny
    record = json.loads((out / "dataset.json").read_text())
    assert record["complete"] and record["recipe"]["images"] == 12 and set(record["splits"]) == set(SPLITS)
    for name in SPLITS:
        assert verify(out / name) == []
        summary = record["splits"][name]
        manifest = rundir.read_manifest(out / name, ("image", "identity", "view", "acne04_level", "iga", "n_mark"))
        bases = {json.loads(v)["base"] for v in manifest["identity"]}
        assert bases == {summary["portrait"]}
        assert summary["images"] == len(manifest) and sum(summary["level"]) == len(manifest)
        assert summary["level"] == np.bincount(manifest["acne04_level"], minlength=4).tolist()
        assert summary["iga"] == np.bincount(manifest["iga"], minlength=5).tolist()
        assert summary["views"] == {"frontal": summary["images"] // 3, "left": summary["images"] // 3,
                                    "right": summary["images"] // 3}
        assert f"{name}: portrait {summary['portrait']}" in output
    train = record["splits"]["train"]
    assert train["patients"] == 2 and train["identity_variants"] == 2       # the plain portrait and a variant
    assert train["level"] == [3, 3, 3, 3]                                     # stratified (frontal level = target)
    assert train["images_with_marks"] > 0
    assert record["splits"]["test_portrait"]["portrait"] == "hopper"
    portrait = np.asarray(Image.open(out / "portraits" / "astronaut" / "astronaut.png"))
    assert np.array_equal(portrait, builtin_face("astronaut").image)
    assert "level 0/1/2/3" in output and "3/3/3/3" in output


def test_rerun_heals_to_the_same_bytes_and_the_same_seed_gives_the_same_bytes(tiny, tmp_path):
    out, _ = tiny
    before = digests(out)
    image = next((out / "train" / "images").rglob("*.png"))
    image.write_bytes(image.read_bytes()[:100])                               # damaged
    next((out / "test_portrait" / "masks").rglob("*.png")).unlink()            # lost
    (out / "dataset.json").unlink()
    assert runner.invoke(app, ["graders", "dataset", "--out", str(out), *TINY]).exit_code == 0
    assert digests(out) == before
    again = tmp_path / "set"                       # from scratch elsewhere
    assert runner.invoke(app, ["graders", "dataset", "--out", str(again), *TINY]).exit_code == 0
    same = [k for k in before if k.startswith(tuple(f"{s}/{d}" for s in SPLITS for d in ("images", "masks")))
            or k.endswith(("lesions.parquet", "protocol.csv")) or k.startswith(("protocols/", "portraits/"))]
    assert len(same) > 40 and {k: digests(again)[k] for k in same} == {k: before[k] for k in same}


def test_another_recipe_bad_options_and_a_foreign_out_are_refused_before_any_write(tiny, tmp_path):
    out, _ = tiny
    before = digests(out)
    result = runner.invoke(app, ["graders", "dataset", "--out", str(out), *TINY, "--seed", "1"])
    assert result.exit_code == 2 and "another recipe" in result.output and "--out" in result.output
    assert digests(out) == before
    for argv, needle in ((["--images", "10"], "--images must be a multiple of 3"),
                         (["--train-portrait", "lena"], "--train-portrait"),
                         (["--images", "0"], "--images")):
        result = runner.invoke(app, ["graders", "dataset", "--out", str(tmp_path / "new"), *argv])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "new").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["graders", "dataset", "--out", str(foreign), *TINY])
    assert result.exit_code == 2 and "not empty" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
