"""The run-directory contract: validated readers with one-line errors, the lock, and `verify`."""

import shutil

import pandas as pd
import pytest

from synthtrial.run import rundir
from synthtrial.run.rundir import RunError
from synthtrial.run.verify import verify


@pytest.fixture()
def run(quick_run_256, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(quick_run_256, copy)
    return copy


def test_a_finished_run_verifies(run):
    assert verify(run) == []
    manifest, lesions = rundir.read_run(run)
    assert list(manifest.columns) == list(rundir.MANIFEST_COLUMNS)
    assert list(lesions.columns) == list(rundir.LESION_COLUMNS)


def test_verify_finds_changed_missing_and_unlisted_files(run):
    manifest = pd.read_parquet(run / "manifest.parquet")
    changed = run / manifest["image"][3]
    data = bytearray(changed.read_bytes())
    data[50] ^= 1
    changed.write_bytes(bytes(data))
    (run / manifest["mask"][7]).unlink()
    (run / manifest["image"][9]).unlink()  # a manifest row without its image
    shutil.copy(run / manifest["image"][0], run / "images" / "P01" / "stray.png")
    problems = verify(run)
    text = "\n".join(problems)
    assert f"{manifest['image'][3]}: bytes differ from the manifest's sha256 (row 4)" in text
    assert f"{manifest['mask'][7]}: missing (manifest row 8)" in text
    assert f"{manifest['image'][9]}: missing (manifest row 10)" in text
    assert "images/P01/stray.png: not listed in manifest.parquet" in text
    assert len(problems) == 4


def test_verify_checks_tables_against_each_other_and_the_config(run):
    manifest = pd.read_parquet(run / "manifest.parquet")
    manifest.loc[2, "lesion_count"] += 1
    manifest.loc[5, "backend"] = "sdxl-img2img"
    rundir.write_table(run / "manifest.parquet", manifest)
    text = "\n".join(verify(run))
    assert "row 3, column 'lesion_count'" in text and "column 'backend'" in text


@pytest.mark.parametrize("content, message", [
    (b"", "cannot be read as a parquet table"),
    (b"PAR1garbage", "cannot be read as a parquet table"),
    (b"patient_id,day\n", "cannot be read as a parquet table"),
])
def test_damaged_manifest_is_one_line(run, content, message):
    (run / "manifest.parquet").write_bytes(content)
    with pytest.raises(RunError, match=message) as info:
        rundir.read_manifest(run)
    assert "\n" not in str(info.value) and "manifest.parquet" in str(info.value)


def test_truncated_manifest_and_bad_json(run):
    data = (run / "manifest.parquet").read_bytes()
    (run / "manifest.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="manifest.parquet: cannot be read as a parquet table"):
        rundir.read_run(run)
    (run / "truth.json").write_text("{not json")
    with pytest.raises(RunError, match="truth.json: is not valid JSON"):
        rundir.read_truth(run)
    (run / "truth.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="truth.json: must hold the simulation truth .* not a JSON list"):
        rundir.read_truth(run)
    (run / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(RunError, match="config.json: is not UTF-8 text"):
        rundir.read_config(run)


def test_paths_in_the_manifest_stay_inside_the_run(run):
    manifest = pd.read_parquet(run / "manifest.parquet")
    for bad, message in (("../outside.png", "leaves the run directory"), ("/etc/passwd", "is absolute"),
                         ("images\\P01\\x.png", "'/'-separated")):
        broken = manifest.copy()
        broken.loc[0, "image"] = bad
        rundir.write_table(run / "manifest.parquet", broken)
        with pytest.raises(RunError, match=message):
            rundir.read_manifest(run)


def test_lock_refuses_a_second_holder(tmp_path):
    with rundir.locked(tmp_path / "new"):
        assert (tmp_path / "new" / ".lock").exists()
        with pytest.raises(RunError, match="another synthtrial process is grading"):
            with rundir.locked(tmp_path / "new", what="grading"):
                pass
    with rundir.locked(tmp_path / "new"):
        pass


def test_lock_names_an_option_only_when_told(tmp_path):
    """generate chose the run with --out and says so; grade and analyze take it as an argument (the default)."""
    with rundir.locked(tmp_path / "new"):
        with pytest.raises(RunError) as by_argument:
            with rundir.locked(tmp_path / "new", what="analysing"):
                pass
        with pytest.raises(RunError, match="wait for it to finish or choose another --out$"):
            with rundir.locked(tmp_path / "new", option="--out"):
                pass
    assert str(by_argument.value).endswith("analysing this run; wait for it to finish")


def test_verify_command_exit_status(run):
    from typer.testing import CliRunner

    from synthtrial.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(run), "-q"])
    assert ok.exit_code == 0 and "every file matches" in " ".join(ok.stdout.split())
    (run / pd.read_parquet(run / "manifest.parquet")["image"][0]).unlink()
    bad = runner.invoke(app, ["verify", str(run), "-q"])
    assert bad.exit_code == 1 and "missing (manifest row 1)" in bad.stderr and "1 problem" in bad.stderr


def test_verify_checks_the_visible_counts_and_flags(run):
    """The manifest's visible counts against lesions.parquet's visible flags, and each flag against the rule."""
    manifest, lesions = rundir.read_run(run)
    assert (manifest["visible_count"] <= manifest["lesion_count"]).all() and manifest["visible_count"].sum() > 0
    broken = pd.read_parquet(run / "manifest.parquet")
    broken.loc[1, "visible_count"] += 1
    broken.loc[4, "n_visible_mark"] += 2
    rundir.write_table(run / "manifest.parquet", broken)
    table = pd.read_parquet(run / "lesions.parquet")
    hidden = int(table.index[~table["visible"] & (table["area_px"] >= 4) & table["contrast"].notna()][0])
    table.loc[hidden, "visible"] = True  # a lesion the rule calls hidden
    rundir.write_table(run / "lesions.parquet", table)
    text = "\n".join(verify(run))
    assert "row 2, column 'visible_count'" in text and "row 5, column 'n_visible_mark'" in text
    assert f"lesions.parquet: row {hidden + 1}, column 'visible': True but contrast" in text
    table.loc[hidden, "visible"] = False
    seen = int(table.index[table["visible"]][0])
    table.loc[seen, "signal"] = 1.0  # it changed its pixels by less than the rule asks
    rundir.write_table(run / "lesions.parquet", table)
    assert (f"lesions.parquet: row {seen + 1}, column 'visible': True but contrast"
            in (text := "\n".join(verify(run)))) and "and signal 1.0 make it False" in text
    table["visible"] = table["visible"].astype(object)
    rundir.write_table(run / "lesions.parquet", table.drop(columns="contrast"))
    assert "lesions.parquet: missing column 'contrast' (the visibility measurement)" in "\n".join(verify(run))


@pytest.mark.parametrize("damage, message", [
    ("nan box", "row 2, column 'x0': nan is not a finite number"),
    ("flipped box", "row 1, column 'y1': less than y0"),
    ("no score", "missing column 'score'"),
    ("no image", "row 1, column 'image': nan is not a path"),
])
def test_a_damaged_grade_table_is_one_line(run, damage, message):
    assert rundir.read_grade_table(run, rundir.DETECTIONS) is None
    table = pd.DataFrame({"image": ["images/a.png", "images/b.png"], "image_sha256": ["0" * 64] * 2,
                          "x0": [1.0, 2.0], "y0": [1.0, 1.0], "x1": [3.0, 4.0], "y1": [3.0, 3.0],
                          "class": ["papule", "nodule"], "score": [0.9, 0.8], "counted": [True, False]})
    if damage == "nan box":
        table.loc[1, "x0"] = float("nan")
    elif damage == "flipped box":
        table.loc[0, "y1"] = 0.0
    elif damage == "no score":
        table = table.drop(columns="score")
    else:
        table["image"] = table["image"].astype(object)
        table.loc[0, "image"] = None
    rundir.write_table(run / rundir.DETECTIONS, table)
    with pytest.raises(RunError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        rundir.read_grade_table(run, rundir.DETECTIONS)
    assert str(caught.value).startswith(str(run / rundir.DETECTIONS)) and "\n" not in str(caught.value)
