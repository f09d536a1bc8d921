"""Run-directory exports: COCO JSON, ACNE04 label layout, imagefolder; exact, leak-free, reproducible, atomic."""

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synthtrial.util.errors import SynthtrialError
from synthtrial.run.export import CATEGORIES, EXPORT_FORMATS, FORMAT_HELP, METADATA_COLUMNS, acne04_folds, export_run

PATIENTS = ("P01", "P02", "P03")
DAYS = (1, 2)
SIZE = 64


def _box(j: int, fraction: float) -> tuple[float, float, float, float]:
    """Lesion j's box on a 4-wide grid of 15 px cells: 9 x 11 px, offset by ``fraction``."""
    x0 = 3.0 + 15 * (j % 4) + fraction
    y0 = 2.0 + 15 * (j // 4) + fraction
    return x0, y0, x0 + 9.0, y0 + 11.0


def make_run(root: Path, patients=PATIENTS, days=DAYS) -> Path:
    """A tiny complete run: 64x64 PNGs, manifest and lesions parquet, 16-bit masks on day 1, config.json.

    Day-1 masks fill each lesion's box exactly; lesion 1 of each masked image is a ring (a hole in the middle)
    and lesion 2 has no pixels at all (hidden under nothing: its label is simply absent).
    """
    run = root / "run"
    rng = np.random.default_rng(7)
    manifest, lesions = [], []
    for p, pid in enumerate(patients):
        (run / "images" / pid).mkdir(parents=True)
        for day in days:
            date = pd.Timestamp("2018-01-01") + pd.Timedelta(days=day - 1)
            stem = f"{pid}_{date:%Y%m%d}_frontal"
            rel = f"images/{pid}/{stem}.png"
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(run / rel)
            masked = day == DAYS[0]
            labels = np.zeros((SIZE, SIZE), dtype=np.int64)
            n = 3 + p + day  # 4 .. 7 lesions
            types = [CATEGORIES[(p + day + j) % len(CATEGORIES)] for j in range(n)]
            for j in range(n):
                lesion_id = 10 * p + j  # stable within a patient's series
                x0, y0, x1, y1 = _box(j, 0.0 if masked else 0.3 * (j + 1))
                lesions.append(dict(image=rel, patient_id=pid, day=day, lesion_id=lesion_id, type=types[j],
                                    x0=x0, y0=y0, x1=x1, y1=y1, cx=(x0 + x1) / 2, cy=(y0 + y1) / 2,
                                    radius_px=4.5, stage="active", age_days=day))
                if masked and j != 2:
                    labels[int(y0):int(y1), int(x0):int(x1)] = lesion_id + 1
                    if j == 1:
                        labels[int(y0) + 3:int(y1) - 3, int(x0) + 3:int(x1) - 3] = 0
            if masked:
                (run / "masks" / pid).mkdir(parents=True, exist_ok=True)
                Image.fromarray(labels.astype(np.uint16)).save(run / "masks" / pid / f"{stem}.png")
            counts = {t: types.count(t) for t in CATEGORIES}
            manifest.append(dict(
                image=rel, patient_id=pid, day=day, date=date, block=1, treatment="Baseline" if day == 1 else "Cream",
                view="frontal", severity=0.5 * p + 0.25 * day, lesion_count=n,
                **{f"n_{t}": counts[t] for t in CATEGORIES},
                acne04_level=p % 4, iga=(p + day) % 5,
                identity=json.dumps({"face": f"face{p}", "note": 'quoted "x", comma'}), seed=p, backend="test",
                sha256=hashlib.sha256((run / rel).read_bytes()).hexdigest(), width=SIZE, height=SIZE))
    frame = pd.DataFrame(manifest)
    frame["block"] = frame["block"].astype("Int64")
    frame.to_parquet(run / "manifest.parquet", index=False)
    pd.DataFrame(lesions).to_parquet(run / "lesions.parquet", index=False)
    (run / "config.json").write_text(json.dumps({"seed": 0, "backend": "test"}), encoding="utf-8")
    return run


def rewrite_manifest(run: Path, **changes) -> None:
    frame = pd.read_parquet(run / "manifest.parquet")
    for column, (row, value) in changes.items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    frame.to_parquet(run / "manifest.parquet", index=False)


def polygon_area(flat):
    x, y = np.asarray(flat[0::2]), np.asarray(flat[1::2])
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# ---------------------------------------------------------------------------------------------- coco

def test_coco_matches_the_run(tmp_path):
    run = make_run(tmp_path)
    path = export_run(run, "coco", image_root=run)  # file_name relative to the run, as the manifest has it
    assert path == run / "exports" / "coco" / "annotations.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    manifest = pd.read_parquet(run / "manifest.parquet")
    lesions = pd.read_parquet(run / "lesions.parquet")
    assert {"info", "images", "annotations", "categories"} <= set(doc)
    assert len(doc["images"]) == len(manifest) and len(doc["annotations"]) == len(lesions)
    assert [(c["id"], c["name"], c["supercategory"]) for c in doc["categories"]] == [
        (1, "open_comedo", "acne"), (2, "closed_comedo", "acne"), (3, "papule", "acne"), (4, "pustule", "acne"),
        (5, "nodule", "acne"), (6, "mark", "acne"), (7, "scar", "acne")]

    images = {im["id"]: im for im in doc["images"]}
    assert len({im["file_name"] for im in images.values()}) == len(manifest)
    by_name = manifest.set_index("image")
    for im in images.values():
        rec = by_name.loc[im["file_name"]]
        assert (run / im["file_name"]).is_file()
        assert (im["width"], im["height"]) == (SIZE, SIZE)
        assert im["patient_id"] == rec["patient_id"] and im["day"] == rec["day"]
        assert im["severity"] == rec["severity"] and im["acne04_level"] == rec["acne04_level"]
        assert im["iga"] == rec["iga"]

    truth = {(r.image, r.lesion_id): r for r in lesions.itertuples(index=False)}
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(lesions) + 1))
    segmented = 0
    for ann in doc["annotations"]:
        image = images[ann["image_id"]]
        les = truth[(image["file_name"], ann["lesion_id"])]
        assert ann["bbox"] == [les.x0, les.y0, les.x1 - les.x0, les.y1 - les.y0]
        assert ann["category_id"] == CATEGORIES.index(les.type) + 1 and ann["iscrowd"] == 0
        masked = image["day"] == DAYS[0]
        j = les.lesion_id % 10
        if not masked or j == 2:  # no mask file, or a lesion with no pixels in it
            assert "segmentation" not in ann
            assert ann["area"] == pytest.approx((les.x1 - les.x0) * (les.y1 - les.y0))
            continue
        segmented += 1
        polygons = ann["segmentation"]
        assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
        xs = np.concatenate([p[0::2] for p in polygons])
        ys = np.concatenate([p[1::2] for p in polygons])
        # the mask fills the box exactly, so the outline touches all four sides and never leaves the box
        assert xs.min() == les.x0 and xs.max() == les.x1 and ys.min() == les.y0 and ys.max() == les.y1
        if j == 1:  # the ring: one outer polygon (the hole is dropped), area = its pixels
            assert len(polygons) == 1 and ann["area"] == 9 * 11 - 3 * 5
        else:
            assert len(polygons) == 1 and ann["area"] == 9 * 11
            assert polygon_area(polygons[0]) == pytest.approx(9 * 11, abs=1.0)
    assert segmented == sum(3 + p + DAYS[0] - 1 for p in range(len(PATIENTS)))


def test_coco_out_may_name_a_json_file(tmp_path):
    run = make_run(tmp_path)
    path = export_run(run, "coco", tmp_path / "train.json")
    assert path == tmp_path / "train.json" and json.loads(path.read_text())["images"]
    assert not (run / "exports").exists()


# -------------------------------------------------------------------------------------------- acne04

LINE = re.compile(r"(\S+) (\d+) (\d+)")


def test_acne04_folds_split_by_patient(tmp_path):
    run = make_run(tmp_path)
    out = export_run(run, "acne04", folds=3, seed=1)
    assert out == run / "exports" / "acne04"
    manifest = pd.read_parquet(run / "manifest.parquet")
    expected = {Path(rel).stem + ".jpg": rec for rel, rec in manifest.set_index("image").iterrows()}
    jpegs = sorted(p.name for p in (out / "JPEGImages").iterdir())
    assert jpegs == sorted(expected)
    for name in jpegs:
        with Image.open(out / "JPEGImages" / name) as im:
            assert im.format == "JPEG" and im.size == (SIZE, SIZE)
    assert sorted(p.name for p in out.iterdir()) == ["JPEGImages"] + sorted(
        f"NNEW_{side}_{k}.txt" for k in range(3) for side in ("test", "trainval"))

    test_folds_of = {}
    for k in range(3):
        sides = {}
        for side in ("trainval", "test"):
            lines = (out / f"NNEW_{side}_{k}.txt").read_text(encoding="utf-8").splitlines()
            names = []
            for line in lines:
                match = LINE.fullmatch(line)
                assert match, line
                name, grade, count = match.group(1), int(match.group(2)), int(match.group(3))
                assert (out / "JPEGImages" / name).is_file()
                assert grade == expected[name]["acne04_level"] and count == expected[name]["lesion_count"]
                names.append(name)
            sides[side] = names
        both = sides["trainval"] + sides["test"]
        assert sorted(both) == sorted(expected)  # every image exactly once
        patients = {side: {expected[n]["patient_id"] for n in names} for side, names in sides.items()}
        assert patients["test"] and not patients["test"] & patients["trainval"]
        for pid in patients["test"]:
            test_folds_of.setdefault(pid, []).append(k)
    assert sorted(test_folds_of) == sorted(PATIENTS) and all(len(v) == 1 for v in test_folds_of.values())


def test_fold_assignment_is_seeded_round_robin():
    patients = [f"P{i:02d}" for i in range(1, 11)]
    folds = acne04_folds(patients, folds=5, seed=3)
    assert folds == acne04_folds(list(reversed(patients)), folds=5, seed=3)
    assert sorted(np.bincount(list(folds.values()))) == [2] * 5
    assert any(acne04_folds(patients, folds=5, seed=s) != folds for s in range(4, 10))


# --------------------------------------------------------------------------------------- imagefolder

def test_imagefolder_metadata(tmp_path):
    run = make_run(tmp_path)
    out = export_run(run, "imagefolder")
    assert out == run / "exports" / "imagefolder"
    manifest = pd.read_parquet(run / "manifest.parquet").set_index("image")
    with open(out / "train" / "metadata.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["file_name", *METADATA_COLUMNS]
        rows = list(reader)
    assert len(rows) == len(manifest)
    for row in rows:
        pid, name = row["file_name"].split("/")
        source = run / "images" / pid / name
        assert (out / "train" / row["file_name"]).read_bytes() == source.read_bytes()
        rec = manifest.loc[f"images/{pid}/{name}"]
        assert row["patient_id"] == pid == rec["patient_id"]
        assert int(row["day"]) == rec["day"] and float(row["severity"]) == rec["severity"]
        assert row["date"] == f"{rec['date']:%Y-%m-%d}" and row["treatment"] == rec["treatment"]
        assert int(row["n_papule"]) == rec["n_papule"] and int(row["lesion_count"]) == rec["lesion_count"]
        assert json.loads(row["identity"]) == json.loads(rec["identity"])


# ----------------------------------------------------------------------------------------- same bytes

def test_exports_are_reproducible(tmp_path):
    run = make_run(tmp_path)

    def snapshot(force=False):
        export_run(run, "coco", force=force)
        export_run(run, "acne04", folds=3, force=force)
        export_run(run, "imagefolder", force=force)
        files = sorted(p for p in (run / "exports").rglob("*") if p.is_file())
        return {p.relative_to(run).as_posix(): p.read_bytes() for p in files}

    first = snapshot()
    assert "exports/coco/annotations.json" in first and "exports/acne04/NNEW_test_0.txt" in first
    assert "exports/imagefolder/train/metadata.csv" in first
    second = snapshot(force=True)  # replaces the earlier exports in place
    assert second == first
    leftovers = [p.name for p in (run / "exports").iterdir() if p.name.startswith(".")]
    assert leftovers == []


# --------------------------------------------------------------------------------------------- errors

def test_unknown_format_lists_the_formats(tmp_path):
    with pytest.raises(SynthtrialError, match="unknown export format 'yolo'.*coco, acne04, imagefolder"):
        export_run(tmp_path, "yolo")
    assert EXPORT_FORMATS == ("coco", "acne04", "imagefolder") and set(FORMAT_HELP) == set(EXPORT_FORMATS)


def test_incomplete_run_directory(tmp_path):
    with pytest.raises(SynthtrialError, match="no such run directory"):
        export_run(tmp_path / "nowhere", "coco")
    run = tmp_path / "run"
    run.mkdir()
    (run / "lesions.parquet").write_bytes(b"")
    (run / "config.json").write_text("{}")
    with pytest.raises(SynthtrialError) as info:
        export_run(run, "acne04")
    message = str(info.value)
    assert str(run) in message and "manifest.parquet is missing" in message and "synthtrial generate" in message
    assert "\n" not in message and not (run / "exports").exists()


def test_fewer_patients_than_folds(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(SynthtrialError, match="3 patients cannot be split into 5 folds"):
        export_run(run, "acne04")
    with pytest.raises(SynthtrialError, match="--folds"):
        export_run(run, "acne04", folds=1)
    assert not (run / "exports").exists()


@pytest.mark.parametrize("bad", ["../outside.png", "images/../../outside.png", "/etc/passwd", "images/P01/none.png"])
def test_manifest_paths_are_checked(tmp_path, bad):
    run = make_run(tmp_path)
    (tmp_path / "outside.png").write_bytes((run / "images/P01/P01_20180101_frontal.png").read_bytes())
    rewrite_manifest(run, image=(3, bad))
    for fmt in EXPORT_FORMATS:
        with pytest.raises(SynthtrialError) as info:
            export_run(run, fmt, folds=3)
        assert "row 4, column 'image'" in str(info.value) and repr(bad) in str(info.value)
    assert not (run / "exports").exists()


def test_a_failed_export_leaves_the_previous_one(tmp_path):
    run = make_run(tmp_path)
    out = export_run(run, "acne04", folds=3)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (run / "images/P02/P02_20180102_frontal.png").write_bytes(b"not a png")
    with pytest.raises(SynthtrialError, match="P02_20180102_frontal.png no longer matches its checksum"):
        export_run(run, "acne04", folds=3, force=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["acne04"]


def test_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path):
    run = make_run(tmp_path)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep me")
    with pytest.raises(SynthtrialError, match="is not a synthtrial imagefolder export"):
        export_run(run, "imagefolder", keep)
    assert (keep / "notes.txt").read_text() == "keep me"
    with pytest.raises(SynthtrialError, match="would replace the run directory"):
        export_run(run, "coco", run)


# ------------------------------------------------------------------------------------------- visibility

def add_visibility(run: Path) -> pd.DataFrame:
    """The visibility columns generate writes: every third lesion hidden (contrast NaN for the first), and the
    manifest's visible_count of the visible active lesions."""
    lesions = pd.read_parquet(run / "lesions.parquet")
    lesions["visible"] = [j % 3 != 0 for j in range(len(lesions))]
    lesions["contrast"] = [float("nan") if j == 0 else 2.0 + (j % 3) * 4 for j in range(len(lesions))]
    lesions["signal"] = [float("nan") if j == 1 else 3.0 + (j % 3) * 4 for j in range(len(lesions))]
    lesions.to_parquet(run / "lesions.parquet", index=False)
    manifest = pd.read_parquet(run / "manifest.parquet")
    active = lesions[lesions["visible"] & lesions["type"].isin(CATEGORIES[:5])].groupby("image").size()
    manifest["visible_count"] = [int(active.get(image, 0)) for image in manifest["image"]]
    manifest.to_parquet(run / "manifest.parquet", index=False)
    return lesions


def test_coco_carries_stage_visibility_and_contrast_and_filters_on_them(tmp_path):
    run = make_run(tmp_path)
    lesions = add_visibility(run)
    full = json.loads(export_run(run, "coco", image_root=run).read_text())
    assert full["info"]["lesions"] == "all" and len(full["annotations"]) == len(lesions)
    first = full["annotations"][0]["attributes"]
    assert set(first) == {"stage", "visible", "contrast", "signal"} and first["stage"] == "active"
    by_key = {(r.image, r.lesion_id): r for r in lesions.itertuples(index=False)}
    files = {im["id"]: im["file_name"] for im in full["images"]}
    for ann in full["annotations"]:
        les = by_key[(files[ann["image_id"]], ann["lesion_id"])]
        assert ann["attributes"]["visible"] == les.visible
        assert (ann["attributes"]["contrast"] is None) == math.isnan(les.contrast)
        assert ann["attributes"]["signal"] == (None if math.isnan(les.signal) else les.signal)

    visible = json.loads(export_run(run, "coco", tmp_path / "v.json", visible_only=True).read_text())
    assert visible["info"]["lesions"] == "visible"
    assert len(visible["annotations"]) == int(lesions["visible"].sum()) > 0
    assert all(a["attributes"]["visible"] for a in visible["annotations"])
    both = json.loads(export_run(run, "coco", tmp_path / "b.json", visible_only=True, active_only=True).read_text())
    wanted = lesions["visible"] & lesions["type"].isin(CATEGORIES[:5])
    assert both["info"]["lesions"] == "visible active" and len(both["annotations"]) == int(wanted.sum()) > 0
    assert all(a["category_id"] <= 5 for a in both["annotations"])
    active = json.loads(export_run(run, "coco", tmp_path / "a.json", active_only=True).read_text())
    assert len(active["annotations"]) == int(lesions["type"].isin(CATEGORIES[:5]).sum())


def test_acne04_counts_are_the_simulated_ones_unless_visible_only(tmp_path):
    from synthtrial.trial.scale import acne04_level_from_count

    run = make_run(tmp_path)
    add_visibility(run)
    manifest = pd.read_parquet(run / "manifest.parquet").set_index("image")
    stem = {Path(image).stem + ".jpg": image for image in manifest.index}

    def lines(out):
        return [line.split() for k in range(3) for line in (out / f"NNEW_test_{k}.txt").read_text().splitlines()]

    simulated = lines(export_run(run, "acne04", tmp_path / "s", folds=3))
    assert all(int(c) == manifest.loc[stem[n], "lesion_count"] and int(g) == manifest.loc[stem[n], "acne04_level"]
               for n, g, c in simulated)
    visible = lines(export_run(run, "acne04", tmp_path / "v", folds=3, visible_only=True))
    assert len(visible) == len(manifest)
    for name, grade, count in visible:
        assert int(count) == manifest.loc[stem[name], "visible_count"]
        assert int(grade) == acne04_level_from_count(int(count))
    assert any(int(c) != manifest.loc[stem[n], "lesion_count"] for n, _, c in visible)


def test_visibility_options_are_checked(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(SynthtrialError, match="lesions.parquet: has no column 'visible'.*--visible-only"):
        export_run(run, "coco", visible_only=True)
    with pytest.raises(SynthtrialError, match="--active-only applies to --format coco, not acne04"):
        export_run(run, "acne04", folds=3, active_only=True)
    with pytest.raises(SynthtrialError, match="--visible-only applies to --format coco or acne04, not imagefolder"):
        export_run(run, "imagefolder", visible_only=True)
    lesions = pd.read_parquet(run / "lesions.parquet")
    lesions["visible"] = ["yes"] * len(lesions)
    lesions.to_parquet(run / "lesions.parquet", index=False)
    with pytest.raises(SynthtrialError, match="row 1, column 'visible': 'yes' is not true or false"):
        export_run(run, "coco")
    assert not (run / "exports").exists()


def test_export_command_visibility_options(tmp_path):
    from typer.testing import CliRunner

    from synthtrial.cli import app

    run = make_run(tmp_path)
    refused = CliRunner().invoke(app, ["export", str(run), "-f", "coco", "--visible-only", "-q"])
    assert refused.exit_code == 2 and "has no column 'visible'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    add_visibility(run)
    done = CliRunner().invoke(app, ["export", str(run), "-f", "coco", "--visible-only", "--active-only", "-q"])
    assert done.exit_code == 0, done.output
    doc = json.loads((run / "exports" / "coco" / "annotations.json").read_text())
    assert doc["info"]["lesions"] == "visible active"
