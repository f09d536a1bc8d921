"""Grades belong to their image (issue 19): each row keyed by the image's path and sha256, chunks keyed by what
they hold, never by position; a changed image is graded again, a damaged chunk is recomputed."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthtrial.graders.base import fingerprint_of, get_grader
from synthtrial.grade import PARTS_DIR, grade_run
from synthtrial.run import rundir
from synthtrial.run.generation import generate
from synthtrial.util.errors import SynthtrialError

ROOT = Path(__file__).resolve().parents[1]


class Mean:
    """A toy grader: each image's mean pixel value; counts the images it is asked to grade."""

    name = "mean"
    outcomes = ("value",)

    def __init__(self):
        self.graded = 0

    def fingerprint(self):
        return fingerprint_of({"grader": "mean"})

    def predict(self, images, meta=None):
        self.graded += len(images)
        return pd.DataFrame({"value": [float(im.mean()) for im in images]})


def cut_protocol(folder: Path) -> Path:
    """The issue's repro input: protocols/quick.csv cut to 2 patients x 6 days."""
    lines = (ROOT / "protocols" / "quick.csv").read_text().splitlines()
    keep = [lines[0]] + [l for l in lines[1:] if l.split(",")[0] in ("P01", "P02") and int(l.split(",")[1]) <= 6]
    path = folder / "cut.csv"
    path.write_text("\n".join(keep) + "\n")
    return path


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cut")
    return generate(cut_protocol(folder), folder / "R", size=128, progress=False)


@pytest.fixture()
def run(cut_run, tmp_path):
    copy = tmp_path / "R"
    shutil.copytree(cut_run, copy)
    return copy


def own_means(run: Path, grades: pd.DataFrame) -> list[float]:
    """What Mean gives each row's own image, read now."""
    return [float(np.asarray(Image.open(run / rel).convert("RGB")).mean()) for rel in grades["image"]]


def replace_image(run: Path, rel: str, *, update_manifest: bool) -> None:
    """Draw another picture over ``rel`` (a valid PNG); with ``update_manifest`` record its sha256, as a run
    re-rendered with other settings would."""
    Image.fromarray(np.full((128, 128, 3), 200, np.uint8)).save(run / rel)
    if update_manifest:
        manifest = pd.read_parquet(run / "manifest.parquet")
        manifest.loc[manifest["image"] == rel, "sha256"] = rundir.sha256_file(run / rel)
        rundir.write_table(run / "manifest.parquet", manifest)


def test_grades_carry_the_image_sha256(run):
    grades = pd.read_parquet(grade_run(run, [Mean()]))
    manifest = pd.read_parquet(run / "manifest.parquet")
    assert list(grades.columns) == ["image", "image_sha256", "mean_value"]
    assert grades["image"].tolist() == manifest["image"].tolist()
    assert grades["image_sha256"].tolist() == manifest["sha256"].tolist()


def test_another_batch_size_gives_every_image_its_grade(run, tmp_path):
    counter = get_grader("counter")
    grade_run(run, [counter], batch_size=5)
    second = pd.read_parquet(grade_run(run, [counter], batch_size=2))
    assert len(second) == 12 and second["image"].notna().all() and second["counter_count"].notna().all()
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns(".grades", "grades.*"))
    assert second.equals(pd.read_parquet(grade_run(fresh, [counter], batch_size=64)))
    assert len(list((run / PARTS_DIR).glob("counter-*/*.parquet"))) == 6  # the batch-5 chunks were dropped


def test_reordered_manifest_keeps_each_grade_with_its_image(run):
    grade_run(run, [Mean()], batch_size=4)
    manifest = pd.read_parquet(run / "manifest.parquet")
    rundir.write_table(run / "manifest.parquet", manifest.iloc[::-1].reset_index(drop=True))
    again = Mean()
    grades = pd.read_parquet(grade_run(run, [again], batch_size=4))
    assert again.graded == 0  # the same visits in the same chunks: nothing graded twice
    assert grades["image"].tolist() == manifest["image"].tolist()[::-1]
    assert grades["mean_value"].tolist() == pytest.approx(own_means(run, grades))


def test_a_dropped_manifest_row_shifts_no_grade(run):
    grade_run(run, [Mean()], batch_size=4)
    manifest = pd.read_parquet(run / "manifest.parquet")
    rundir.write_table(run / "manifest.parquet", manifest.drop(index=2).reset_index(drop=True))
    grades = pd.read_parquet(grade_run(run, [Mean()], batch_size=4))
    assert len(grades) == 11 and manifest["image"][2] not in set(grades["image"])
    assert grades["mean_value"].tolist() == pytest.approx(own_means(run, grades))


def test_a_changed_image_is_graded_again(run):
    grade_run(run, [Mean()], batch_size=4)
    rel = pd.read_parquet(run / "manifest.parquet")["image"][7]
    replace_image(run, rel, update_manifest=True)
    again = Mean()
    grades = pd.read_parquet(grade_run(run, [again], batch_size=4))
    assert again.graded == 4  # only the chunk holding the changed image
    assert grades.loc[grades["image"] == rel, "mean_value"].item() == pytest.approx(200.0)
    assert grades["mean_value"].tolist() == pytest.approx(own_means(run, grades))


def test_a_damaged_image_is_refused_then_healed_and_graded(run, cut_run):
    grade_run(run, [Mean()], batch_size=4)
    truth = pd.read_parquet(run / "grades.parquet")
    shutil.rmtree(run / PARTS_DIR)
    rel = pd.read_parquet(run / "manifest.parquet")["image"][3]
    replace_image(run, rel, update_manifest=False)
    with pytest.raises(SynthtrialError, match=f"row 4, column 'sha256': {rel} no longer matches its checksum"):
        grade_run(run, [Mean()], batch_size=4)
    generate(cut_run.parent / "cut.csv", run, size=128, progress=False)  # heals the image
    assert pd.read_parquet(grade_run(run, [Mean()], batch_size=4)).equals(truth)


def test_a_damaged_chunk_is_graded_again(run):
    first = pd.read_parquet(grade_run(run, [Mean()], batch_size=4))
    parts = sorted((run / PARTS_DIR).glob("mean-*/*.parquet"))
    parts[0].write_bytes(parts[0].read_bytes()[:40])
    parts[1].write_bytes(rundir.parquet_bytes(pd.read_parquet(parts[2])))  # another chunk's grades under its name
    again = Mean()
    assert pd.read_parquet(grade_run(run, [again], batch_size=4)).equals(first)
    assert again.graded == 8


def test_other_graders_keep_grades_only_for_unchanged_images(run):
    grade_run(run, [Mean()], batch_size=4)
    rel = pd.read_parquet(run / "manifest.parquet")["image"][5]
    replace_image(run, rel, update_manifest=True)
    grades = pd.read_parquet(grade_run(run, [get_grader("counter")], batch_size=4))
    changed = grades["image"] == rel
    assert grades.loc[changed, "mean_value"].isna().all()
    # (the counter finds no face on a flat grey picture: its NaN there is its own answer)
    assert grades.loc[~changed, ["mean_value", "counter_count"]].notna().all().all()


def test_grade_errors_name_the_run_not_an_option_grade_lacks(run):
    from synthtrial.cli import app

    runner = CliRunner()
    with rundir.locked(run):
        busy = runner.invoke(app, ["grade", str(run), "--graders", "counter", "-q"])
    assert busy.exit_code == 2 and "another synthtrial process is grading this run" in busy.stderr
    assert "--out" not in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
    (run / ".lock").unlink()
    (run / ".lock").mkdir()  # cannot be opened for writing, as on a read-only run
    blocked = runner.invoke(app, ["grade", str(run), "--graders", "counter", "-q"])
    assert blocked.exit_code == 2 and "cannot be written" in blocked.stderr and "--out" not in blocked.stderr
    assert "(the run directory given)" in blocked.stderr and not (run / "grades.parquet").exists()


def test_grade_refuses_a_device_that_is_not_one(run):
    from synthtrial.cli import app

    result = CliRunner().invoke(app, ["grade", str(run), "--graders", "counter", "--device", "not a device!!", "-q"])
    assert result.exit_code == 2 and "--device 'not a device!!' is not a torch device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (run / "grades.parquet").exists()


def test_grade_writes_nothing_through_a_link_out_of_the_run(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / PARTS_DIR).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SynthtrialError, match="resolves outside the run directory"):
        grade_run(run, [Mean()])
    assert list(elsewhere.iterdir()) == [] and not (run / "grades.parquet").exists()


class Spots(Mean):
    """A toy detecting grader: per image one counted box whose x0 is the image's mean pixel value."""

    name = "spots"

    def fingerprint(self):
        return fingerprint_of({"grader": "spots"})

    def predict(self, images, meta=None):
        return self.predict_detections(images, meta)[0]

    def predict_detections(self, images, meta=None):
        values = self.predict_values(images)
        detections = pd.DataFrame({"index": range(len(images)), "x0": values, "y0": 1.0, "x1": [v + 4 for v in values],
                                   "y1": 5.0, "class": "papule", "score": 0.9, "counted": True})
        return pd.DataFrame({"value": values}), detections

    def predict_values(self, images):
        return Mean.predict(self, images)["value"].tolist()


def test_detections_are_kept_by_image_and_sha256_and_resumed(run):
    grade_run(run, [Spots()], batch_size=4)
    manifest = pd.read_parquet(run / "manifest.parquet")
    found = rundir.read_grade_table(run, rundir.DETECTIONS)
    assert list(found.columns) == list(rundir.GRADE_TABLES[rundir.DETECTIONS])
    assert sorted(found["image"]) == sorted(manifest["image"])
    assert dict(zip(found["image"], found["image_sha256"])) == dict(zip(manifest["image"], manifest["sha256"]))
    assert found["x0"].tolist() == pytest.approx(own_means(run, found))
    assert rundir.read_grades_index(run)["spots"]["tables"] == [rundir.DETECTIONS]
    before = (run / rundir.DETECTIONS).read_bytes()
    again = Spots()
    grade_run(run, [again], batch_size=4)
    assert again.graded == 0 and (run / rundir.DETECTIONS).read_bytes() == before
    # a chunk whose detections were lost is graded again, and only that one
    parts = sorted((run / PARTS_DIR).glob("spots-*/*.detections.parquet"))
    assert len(parts) == 3
    parts[1].unlink()
    again = Spots()
    grade_run(run, [again], batch_size=4)
    assert again.graded == 4 and (run / rundir.DETECTIONS).read_bytes() == before


def test_detections_follow_their_images(run):
    grade_run(run, [Spots()], batch_size=4)
    rel = pd.read_parquet(run / "manifest.parquet")["image"][5]
    replace_image(run, rel, update_manifest=True)
    grade_run(run, [Mean()], batch_size=4)   # another grader: the detections of the changed image go
    found = rundir.read_grade_table(run, rundir.DETECTIONS)
    assert rel not in set(found["image"]) and len(found) == 11
    assert "spots" in rundir.read_grades_index(run)
    grade_run(run, [Spots()], batch_size=4)
    found = rundir.read_grade_table(run, rundir.DETECTIONS)
    assert found.loc[found["image"] == rel, "x0"].item() == pytest.approx(200.0) and len(found) == 12


def test_two_detecting_graders_in_one_call_are_refused(run):
    class Other(Spots):
        name = "other"

    with pytest.raises(SynthtrialError, match="both keep detections"):
        grade_run(run, [Spots(), Other()])
    assert not (run / "grades.parquet").exists()


class Half(Mean):
    """Another toy grader (half the mean), so a call grades with two."""

    name = "half"

    def fingerprint(self):
        return fingerprint_of({"grader": "half"})

    def predict(self, images, meta=None):
        return super().predict(images, meta).assign(value=lambda d: d["value"] / 2)


def test_progress_counts_images_per_grader(run):
    """Issue 22: the bar's total is the run's images, one grader at a time (its name the status), starting at
    the images already saved, so each grader's ETA is at its own rate."""
    n = len(pd.read_parquet(run / "manifest.parquet"))
    calls = []
    grade_run(run, [Mean(), Half()], batch_size=4, progress=lambda *a: calls.append(a))
    assert [c[2] for c in calls] == ["mean"] * (1 + -(-n // 4)) + ["half"] * (1 + -(-n // 4))
    for name in ("mean", "half"):
        mine = [c for c in calls if c[2] == name]
        assert {c[1] for c in mine} == {n}                      # total = images, not graders x images
        assert mine[0][0] == 0 and mine[-1][0] == n
        assert [c[0] for c in mine] == sorted(c[0] for c in mine)
    again = []
    grade_run(run, [Mean(), Half()], batch_size=4, progress=lambda *a: again.append(a))
    assert again == [(n, n, "mean"), (n, n, "half")]          # resumed: done before anything is timed


def test_the_cli_opens_one_bar_per_grader():
    from synthtrial.util.progress import StageBars

    events = []

    class FakeBar:
        def __init__(self, what, total, *, unit, enabled):
            self.what = what
            events.append(("open", what, total, unit))

        def __enter__(self):
            return lambda done, total, status: events.append(("update", self.what, done, total))

        def __exit__(self, *exc):
            events.append(("close", self.what))

    with StageBars("grading", unit="images", bar=FakeBar) as update:
        for name in ("counter", "iga"):
            for done in (0, 24, 48):
                update(done, 48, name)
    assert events == [("open", "grading counter", 48, "images"), ("update", "grading counter", 0, 48),
                      ("update", "grading counter", 24, 48), ("update", "grading counter", 48, 48),
                      ("close", "grading counter"), ("open", "grading iga", 48, "images"),
                      ("update", "grading iga", 0, 48), ("update", "grading iga", 24, 48),
                      ("update", "grading iga", 48, 48), ("close", "grading iga")]
