"""A careful user and an attacker, across commands: every hostile input ends in one line and exit status 2,
with nothing written or changed (issue: nothing a user gives is lost, nothing runs foreign code)."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtrial.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_exit_2(result, needle):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def png_claiming(width, height):
    """A 60-odd byte PNG whose header claims width x height pixels (a decompression bomb by its header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_image_bomb_as_face_and_in_faces_folder(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "bomb.png").write_bytes(png_claiming(20000, 20000))
    proto = tmp_path / "p.csv"
    proto.write_text("patient_id,day,treatment,severity\nq1,0,Control,1.0\n")
    one_line_exit_2(invoke("generate", proto, "--out", tmp_path / "run", "--faces", faces, "-q"),
                    "claims more pixels than this tool reads")
    shutil.copy(faces / "bomb.png", tmp_path / "bomb.png")
    proto.write_text("patient_id,day,treatment,severity,face\nq1,0,Control,1.0,bomb.png\n")
    one_line_exit_2(invoke("generate", proto, "--out", tmp_path / "run", "-q"), "claims more pixels")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["generate", "design"])
def test_unwritable_out_is_refused_first(tmp_path, command):
    target = Path("/proc/synthtrial-test/out")
    if command == "generate":
        result = invoke("generate", ROOT / "protocols" / "quick.csv", "--out", target, "-q")
    else:
        result = invoke("protocol", "design", "--preset", "quick", "--out", target / "p.csv")
    one_line_exit_2(result, "is not writable")


@pytest.fixture()
def run(quick_run_256, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(quick_run_256, copy)
    return copy


def test_export_never_overwrites_the_run_or_a_file(run, tmp_path):
    truth = (run / "truth.json").read_bytes()
    one_line_exit_2(invoke("export", run, "--format", "coco", "--out", run / "truth.json"),
                    "lies inside the run directory")
    assert (run / "truth.json").read_bytes() == truth
    existing = tmp_path / "mine.json"
    existing.write_text("{}")
    one_line_exit_2(invoke("export", run, "--format", "coco", "--out", existing), "already exists; pass --force")
    assert existing.read_text() == "{}"
    ok = invoke("export", run, "--format", "coco", "--out", existing, "--force", "-q")
    assert ok.exit_code == 0 and json.loads(existing.read_text())["images"]


def test_imagefolder_copies_unless_asked_to_link(run, tmp_path):
    out = tmp_path / "folder"
    assert invoke("export", run, "--format", "imagefolder", "--out", out, "-q").exit_code == 0
    exported = next((out / "train").rglob("*.png"))
    source = run / "images" / exported.parent.name / exported.name
    assert exported.stat().st_ino != source.stat().st_ino
    exported.write_bytes(b"edited")
    assert invoke("verify", run, "-q").exit_code == 0  # editing the export did not touch the run
    linked = tmp_path / "linked"
    assert invoke("export", run, "--format", "imagefolder", "--out", linked, "--link", "-q").exit_code == 0
    first = next((linked / "train").rglob("*.png"))
    assert first.stat().st_ino == (run / "images" / first.parent.name / first.name).stat().st_ino


@pytest.mark.parametrize("fmt", ["coco", "imagefolder"])
def test_export_of_a_truncated_image_is_refused(run, tmp_path, fmt):
    image = next((run / "images").rglob("*.png"))
    image.write_bytes(image.read_bytes()[:200])
    one_line_exit_2(invoke("export", run, "--format", fmt, "--out", tmp_path / f"x-{fmt}"),
                    "no longer matches its checksum")
    assert not (tmp_path / f"x-{fmt}").exists()


def test_generate_refuses_a_config_json_folder_and_non_utf8_config(run, tmp_path):
    bad = tmp_path / "bad"
    (bad / "config.json").mkdir(parents=True)
    one_line_exit_2(invoke("generate", ROOT / "protocols" / "quick.csv", "--out", bad, "--size", "256", "-q"),
                    "config.json is not a file")
    (run / "config.json").write_bytes(b"\xff\xfe garbage")
    one_line_exit_2(invoke("generate", ROOT / "protocols" / "quick.csv", "--out", run, "--size", "256", "-q"),
                    "other settings")


@pytest.mark.parametrize("damage, needle", [
    (lambda run: (run / "manifest.parquet").write_bytes(b""), "manifest.parquet: cannot be read as a parquet table"),
    (lambda run: (run / "manifest.parquet").write_text("image,patient_id\n"), "cannot be read as a parquet table"),
    (lambda run: (run / "truth.json").write_text("{oops"), "truth.json: is not valid JSON"),
    (lambda run: (run / "truth.json").write_text("[1]"), "truth.json: must hold the simulation truth"),
])
def test_analyze_on_damaged_run_files(run, damage, needle):
    damage(run)
    one_line_exit_2(invoke("analyze", run, "--no-autoencoder", "-q"), needle)
    assert not (run / "analysis").exists()


# ------------------------------------------------------------------- issue 19: masks, tables, names, --force

def coco_of(run, out):
    assert invoke("export", run, "--format", "coco", "--out", out, "-q").exit_code == 0
    return json.loads(Path(out).read_text())


def test_export_refuses_a_replaced_or_deleted_mask(run, tmp_path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    mask = run / pd.read_parquet(run / "manifest.parquet")["mask"][4]
    labels = np.asarray(Image.open(mask)).copy()
    labels[labels > 0] = 1  # every lesion relabelled as lesion 0: a valid 16-bit map, other annotations
    Image.fromarray(labels.astype(np.uint16)).save(mask)
    one_line_exit_2(invoke("export", run, "--format", "coco", "--out", tmp_path / "a.json"),
                    f"row 5, column 'mask_sha256': {mask.relative_to(run).as_posix()} no longer matches its checksum")
    mask.unlink()
    one_line_exit_2(invoke("export", run, "--format", "coco", "--out", tmp_path / "a.json"),
                    f"row 5, column 'mask_sha256': {mask.relative_to(run).as_posix()} is missing")
    assert not (tmp_path / "a.json").exists()


def test_export_and_verify_refuse_files_outside_the_run(run, tmp_path):
    import pandas as pd

    mask = run / pd.read_parquet(run / "manifest.parquet")["mask"][2]
    outside = tmp_path / "outside.png"
    shutil.copy(mask, outside)  # the same bytes: only where it lies is wrong
    mask.unlink()
    mask.symlink_to(outside)
    one_line_exit_2(invoke("export", run, "--format", "coco", "--out", tmp_path / "a.json"),
                    "leaves the run directory")
    verified = invoke("verify", run, "-q")
    assert verified.exit_code == 1 and "leaves the run directory" in verified.stderr
    mask.unlink()
    shutil.copy(outside, mask)
    lesions = tmp_path / "lesions.parquet"
    shutil.copy(run / "lesions.parquet", lesions)
    (run / "lesions.parquet").unlink()
    (run / "lesions.parquet").symlink_to(lesions)
    one_line_exit_2(invoke("export", run, "--format", "coco", "--out", tmp_path / "a.json"),
                    "lesions.parquet: resolves outside the run directory")
    verified = invoke("verify", run, "-q")
    assert verified.exit_code == 1 and "lesions.parquet: resolves outside the run directory" in verified.stderr
    assert not (tmp_path / "a.json").exists()


def test_export_takes_a_long_out_name(run, tmp_path):
    name = "x" * 245 + ".json"
    assert len(coco_of(run, tmp_path / name)["images"]) == 48
    folder = tmp_path / ("y" * 250)
    assert invoke("export", run, "--format", "acne04", "--out", folder, "--folds", 3, "-q").exit_code == 0
    assert (folder / "NNEW_test_0.txt").is_file() and [p.name for p in tmp_path.iterdir()
                                                       if p.name.startswith(".")] == []


@pytest.mark.parametrize("where", ["default", "out"])
def test_an_earlier_export_is_replaced_only_with_force(run, tmp_path, where):
    extra = ["--folds", 3] + ([] if where == "default" else ["--out", tmp_path / "acne"])
    folder = run / "exports" / "acne04" if where == "default" else tmp_path / "acne"
    assert invoke("export", run, "--format", "acne04", *extra, "-q").exit_code == 0
    (folder / "NNEW_test_0.txt").write_text("mine\n")
    one_line_exit_2(invoke("export", run, "--format", "acne04", *extra, "-q"),
                    "holds an earlier acne04 export; pass --force to replace it")
    assert (folder / "NNEW_test_0.txt").read_text() == "mine\n"
    assert invoke("export", run, "--format", "acne04", *extra, "--force", "-q").exit_code == 0
    assert (folder / "NNEW_test_0.txt").read_text() != "mine\n"


def test_verify_refuses_an_empty_config_and_edited_simulated_columns(run):
    import pandas as pd

    from synthtrial.run.rundir import write_table

    config = (run / "config.json").read_text()
    (run / "config.json").write_text("{}")
    verified = invoke("verify", run, "-q")
    assert verified.exit_code == 1
    assert "config.json: 'settings' is missing" in verified.stderr and "config.json: 'protocol' is missing" in \
        verified.stderr
    damaged = json.loads(config)
    damaged["settings"]["size"] = "256"
    del damaged["protocol"]["sha256"]
    (run / "config.json").write_text(json.dumps(damaged))
    text = " ".join(invoke("verify", run, "-q").stderr.split())
    assert "config.json: 'settings' -> 'size' is '256', not a whole number of pixels >= 1" in text
    assert "config.json: 'protocol' has no 'sha256' (a sha256 in hex)" in text
    (run / "config.json").write_text(config)
    manifest = pd.read_parquet(run / "manifest.parquet")
    manifest.loc[1, "severity"] = 2.9
    manifest.loc[2, "treatment"] = "Cream" if manifest.loc[2, "treatment"] != "Cream" else "Control"
    manifest.loc[3, "day"] = 99
    write_table(run / "manifest.parquet", manifest)
    text = " ".join(invoke("verify", run, "-q").stderr.split())
    assert "row 2, column 'severity': 2.9 but protocol.csv row 2 says" in text
    assert "row 3, column 'treatment'" in text
    assert "row 4: patient 'P01', day 99, view 'frontal' is not a row of protocol.csv" in text
    assert "row 4, column 'day': 99 is not a simulated day of patient 'P01' in truth.json" in text


def test_verify_reports_missing_grids(run):
    (run / "grids" / "P02.jpg").unlink()
    (run / "grids" / "P03.jpg").write_bytes(b"")
    text = " ".join(invoke("verify", run, "-q").stderr.split())
    assert "grids/P02.jpg: missing" in text and "grids/P03.jpg: is not a JPEG" in text


def test_default_export_folder_linked_outside_the_run_is_refused(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "exports").symlink_to(elsewhere, target_is_directory=True)
    one_line_exit_2(invoke("export", run, "--format", "coco", "-q"), "resolves outside the run directory")
    assert list(elsewhere.iterdir()) == []
