"""The COCO export loads where it is written: pycocotools reads the JSON from another working directory and
every image opens at the JSON's folder joined with its file_name (or at --image-root); each annotation says
its lesion's stage, --active-only drops marks and scars, and one rule replaces an existing export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.run.export import CATEGORIES, REPLACE_RULE, export_run
from test_export import make_run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

LOAD = """
import json, os, sys
from pycocotools.coco import COCO
from PIL import Image
path, root = sys.argv[1], sys.argv[2]
coco = COCO(path)
opened = 0
for image in coco.loadImgs(coco.getImgIds()):
    with Image.open(os.path.join(root, image["file_name"])) as im:
        assert im.size == (image["width"], image["height"])
        opened += 1
print(json.dumps({"opened": opened, "annotations": len(coco.getAnnIds())}))
"""


def load_elsewhere(json_path: Path, root: str, cwd: Path) -> dict:
    """pycocotools in a fresh process whose working directory is neither the run's nor the JSON's."""
    proc = subprocess.run([sys.executable, "-c", LOAD, str(json_path), root], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def with_stages(run: Path) -> pd.DataFrame:
    """Give the tiny run's lesions the phases generate writes: marks and scars are residual."""
    lesions = pd.read_parquet(run / "lesions.parquet")
    phases = ["onset", "active", "resolving"]
    lesions["stage"] = [("residual" if t in ("mark", "scar") else phases[i % 3])
                        for i, t in enumerate(lesions["type"])]
    lesions.to_parquet(run / "lesions.parquet", index=False)
    return lesions


@pytest.mark.parametrize("where", ["default", "folder", "file"])
def test_coco_loads_from_another_cwd_and_every_image_opens(tmp_path, where):
    run = make_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = {"default": None, "folder": tmp_path / "exports" / "coco", "file": tmp_path / "deep" / "er" / "t.json"}
    if where == "file":
        out[where].parent.mkdir(parents=True)
    path = export_run(run, "coco", out[where])
    doc = json.loads(path.read_text())
    assert doc["info"]["image_root"] == "."
    assert all(not Path(im["file_name"]).is_absolute() for im in doc["images"])
    result = load_elsewhere(path, str(path.parent), elsewhere)
    assert result == {"opened": 6, "annotations": len(pd.read_parquet(run / "lesions.parquet"))}


def test_image_root_sets_what_file_name_is_relative_to(tmp_path):
    run = make_run(tmp_path)
    path = export_run(run, "coco", tmp_path / "a.json", image_root=run)
    doc = json.loads(path.read_text())
    manifest = pd.read_parquet(run / "manifest.parquet")
    assert sorted(im["file_name"] for im in doc["images"]) == sorted(manifest["image"])  # the run's own paths
    assert doc["info"]["image_root"] == "run"   # the root, relative to the JSON's folder
    assert load_elsewhere(path, str(run), tmp_path)["opened"] == 6
    with pytest.raises(Exception, match="no such folder .*--image-root"):
        export_run(run, "coco", tmp_path / "b.json", image_root=tmp_path / "missing")
    with pytest.raises(Exception, match="--image-root applies to --format coco"):
        export_run(run, "acne04", tmp_path / "acne", image_root=run)


def test_every_annotation_has_its_stage_and_active_only_drops_marks_and_scars(tmp_path):
    run = make_run(tmp_path)
    lesions = with_stages(run)
    residual = lesions["type"].isin(["mark", "scar"])
    assert residual.any() and (~residual).any()
    full = json.loads(export_run(run, "coco").read_text())
    stages = [a["attributes"]["stage"] for a in full["annotations"]]
    assert len(stages) == len(lesions) and sorted(stages) == sorted(lesions["stage"])
    names = {c["id"]: c["name"] for c in full["categories"]}
    assert all((a["attributes"]["stage"] == "residual") == (names[a["category_id"]] in ("mark", "scar"))
               for a in full["annotations"])
    result = runner.invoke(app, ["export", str(run), "--format", "coco", "--active-only", "--out",
                                 str(tmp_path / "active.json"), "-q"])
    assert result.exit_code == 0, result.output
    active = json.loads((tmp_path / "active.json").read_text())
    assert len(active["annotations"]) == int((~residual).sum())
    assert {a["attributes"]["stage"] for a in active["annotations"]} == {"onset", "active", "resolving"}
    assert all(names[a["category_id"]] in CATEGORIES[:5] for a in active["annotations"])
    assert active["info"]["lesions"] == "active"


@pytest.mark.parametrize("fmt", ["coco", "acne04", "imagefolder"])
def test_one_rule_for_an_existing_export_default_path_and_out_alike(tmp_path, fmt):
    run = make_run(tmp_path)
    for out in ([], ["--out", str(tmp_path / ("x.json" if fmt == "coco" else "x"))]):
        command = ["export", str(run), "--format", fmt, "--folds", "2", "-q", *out]
        assert runner.invoke(app, command).exit_code == 0
        again = runner.invoke(app, command)
        assert again.exit_code == 2 and "pass --force to replace it" in again.stderr
        assert again.stderr.count("\n") == 1
        assert runner.invoke(app, [*command, "--force"]).exit_code == 0
    help_text = " ".join(runner.invoke(app, ["export", "--help"], terminal_width=200).output.split())
    assert REPLACE_RULE in help_text
