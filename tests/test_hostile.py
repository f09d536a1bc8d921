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
