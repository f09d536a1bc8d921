"""The command line: help that teaches, one-line errors with exit status 2, files written once and right."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from synthtrial import __version__
from synthtrial.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.stdout
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("protocol", "scale"):
        assert word in result.stdout
    result = invoke("protocol", "design", "--help")
    assert result.exit_code == 0
    for option in ("--preset", "--washin-half-life", "--ar-phi", "--effect", "--form", "--seed"):
        assert option in result.stdout


def test_design_then_check(tmp_path):
    out = tmp_path / "quick.csv"
    result = invoke("protocol", "design", "--preset", "quick", "--seed", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.exists() and (tmp_path / "quick.truth.json").exists()
    result = invoke("protocol", "check", out)
    assert result.exit_code == 0, result.output
    assert "patients" in result.stdout and "OK" in result.stdout
    result = invoke("protocol", "check", out, "--json")
    summary = json.loads(result.stdout)
    assert summary["patients"] == 3 and summary["rows"] == 48
    assert summary["treatments"] == {"Control": 24, "Cream": 24}


def test_design_options_override_the_preset(tmp_path):
    out = tmp_path / "pairs.csv"
    result = invoke("protocol", "design", "--design", "pairs", "--arms", "Control,Gel", "--patients", 4,
                    "--blocks", 2, "--period-days", 3, "--washout-days", 1, "--effect", "Gel=-0.4",
                    "--noise-sd", 0, "--form", "anchor", "--out", out)
    assert result.exit_code == 0, result.output
    truth = json.loads((tmp_path / "pairs.truth.json").read_text())
    assert truth["design"]["design"] == "pairs" and truth["design"]["arms"] == ["Control", "Gel"]
    assert truth["population_effects"] == {"Gel": -0.4}
    assert truth["model"]["noise_sd"] == 0
    first = out.read_text().splitlines()[0]
    assert first == ",patient_id,date,block,day,treatment,AcneSeverity"


def test_design_is_byte_reproducible(tmp_path):
    for name in ("a", "b"):
        assert invoke("protocol", "design", "--seed", 4, "--out", tmp_path / f"{name}.csv").exit_code == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.truth.json").read_bytes() == (tmp_path / "b.truth.json").read_bytes()


def test_design_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "t.csv"
    assert invoke("protocol", "design", "--preset", "quick", "--out", out).exit_code == 0
    before = out.read_bytes()
    result = invoke("protocol", "design", "--preset", "quick", "--seed", 1, "--out", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert out.read_bytes() == before
    assert invoke("protocol", "design", "--preset", "quick", "--seed", 1, "--out", out, "--force").exit_code == 0
    assert out.read_bytes() != before


@pytest.mark.parametrize(("args", "needle"), [
    (["--effect", "Cream"], "--effect 'Cream' must look like ARM=NUMBER"),
    (["--effect", "Cream=lots"], "'lots' is not a number"),
    (["--effect", "Gel=-0.5"], "--effect Gel"),
    (["--ar-phi", "1.5"], "ar_phi (--ar-phi)"),
    (["--start-date", "tomorrow"], "--start-date"),
    (["--arms", "A,B", "--design", "abab", "--effect", "A=-1"], "reference arm 'A' has no effect"),
])
def test_design_errors_are_one_line_exit_2_nothing_written(tmp_path, args, needle):
    out = tmp_path / "bad.csv"
    result = invoke("protocol", "design", "--out", out, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synthtrial: error:")
    assert needle in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_check_error_is_one_line_with_file_row_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(",patient_id,date,block,day,treatment,AcneSeverity\n0,1,2018-01-01,1,1,Baseline,x\n")
    result = invoke("protocol", "check", bad)
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"synthtrial: error: {bad}: row 2, column 'AcneSeverity': "
                                     "'x' is not a number")


def test_scale_command():
    result = invoke("scale", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert rows[0]["severity"] == 0 and rows[-1]["acne04_level"] == 3
    result = invoke("scale", "1.2", "2.7")
    assert result.exit_code == 0 and "moderate" in result.stdout and "very severe" in result.stdout
    result = invoke("scale", "4")
    assert result.exit_code == 2 and "outside the scale" in result.stderr


def test_console_script_exit_status_and_stderr(tmp_path):
    """The installed entry point itself: no traceback, exit 2, one line."""
    bad = tmp_path / "semi.csv"
    bad.write_text("patient_id;day;treatment\np1;1;A\n")
    proc = subprocess.run([sys.executable, "-m", "synthtrial", "protocol", "check", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "semicolons" in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_protocols_are_valid_and_match_their_truth():
    from synthtrial.trial.protocol import read_protocol

    for name, patients, days in (("trial", 10, 140), ("quick", 3, 16)):
        path = ROOT / "protocols" / f"{name}.csv"
        frame = read_protocol(path)
        assert frame["patient_id"].nunique() == patients
        assert (frame.groupby("patient_id").size() == days).all()
        truth = json.loads((ROOT / "protocols" / f"{name}.truth.json").read_text())
        assert set(truth["patients"]) == set(frame["patient_id"])
        assert any(v != 0 for v in truth["population_effects"].values())


TINY = "patient_id,day,treatment,severity\nq1,0,Control,1.8\nq1,1,Cream,1.2\nq2,0,Control,0.6\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    proto = folder / "tiny.csv"
    proto.write_text(TINY)
    result = invoke("generate", proto, "--out", folder / "run", "--size", 160, "--quiet")
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_generate_writes_a_run(tiny_run):
    assert (tiny_run / "manifest.parquet").is_file()
    assert sorted(p.name for p in (tiny_run / "grids").iterdir()) == ["q1.jpg", "q2.jpg"]
    assert sorted(p.name for p in (tiny_run / "images" / "q1").iterdir()) == ["q1_d000_frontal.png",
                                                                              "q1_d001_frontal.png"]


def test_generate_help_lists_only_working_options():
    result = invoke("generate", "--help")
    assert result.exit_code == 0
    for option in ("--out", "--faces", "--seed", "--size", "--workers", "--naming", "--backend", "--model", "--lora"):
        assert option in result.stdout
    for backend in ("procedural", "sdxl-img2img", "sdxl-inpaint"):
        assert backend in result.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["--faces", "NOPE"], "no such folder (option --faces)"),
    (["--size", "64"], "--size"),
    (["--workers", "65"], "--workers"),
])
def test_generate_errors_are_one_line(tmp_path, args, needle):
    proto = tmp_path / "tiny.csv"
    proto.write_text(TINY)
    result = invoke("generate", proto, "--out", tmp_path / "run", "--quiet", *[a.replace("NOPE", str(tmp_path / "x"))
                                                                              for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "run" / "images").exists()


def test_generate_faceless_portrait_names_the_file(tmp_path, gray_image_dir):
    proto = tmp_path / "tiny.csv"
    proto.write_text(TINY)
    result = invoke("generate", proto, "--out", tmp_path / "run", "--faces", gray_image_dir, "--quiet")
    assert result.exit_code == 2
    assert "wall.png: no face found" in result.stderr and result.stderr.count("\n") == 1


def test_generate_bad_protocol_is_one_line(tmp_path):
    proto = tmp_path / "bad.csv"
    proto.write_text("patient_id,day,treatment\n../x,0,A\n")
    result = invoke("generate", proto, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2
    assert f"{proto}: row 2, column 'patient_id'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_export_coco(tiny_run):
    result = invoke("export", tiny_run, "--format", "coco")
    assert result.exit_code == 0, result.output
    coco = json.loads((tiny_run / "exports" / "coco" / "annotations.json").read_text())
    assert len(coco["images"]) == 3 and len(coco["annotations"]) > 10


def test_export_needs_a_run(tmp_path):
    result = invoke("export", tmp_path, "--format", "coco")
    assert result.exit_code == 2 and "manifest.parquet is missing" in result.stderr


@pytest.mark.parametrize("args", [["generate", "--size", "abc"], ["protocol", "design", "--bogus"],
                                  ["power", "--workers", "65"],
                                  ["protocol", "check"], ["export", "x", "--format", "pdf"]])
def test_usage_errors_are_one_line_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synthtrial: error:"), result.stderr


def test_power_workers_default_to_the_cpus_this_process_may_use(monkeypatch):
    import os

    from synthtrial.analyze import power
    from synthtrial.util.errors import SynthtrialError

    def report_workers(*args, workers, **kwargs):
        raise SynthtrialError(f"workers={workers}")

    monkeypatch.setattr(power, "power_study", report_workers)
    expected = max(1, min(len(os.sched_getaffinity(0)), 8))
    result = invoke("power", "--preset", "quick", "--replicates", 1, "--quiet")
    assert result.exit_code == 2 and f"workers={expected}" in result.stderr, result.output
    result = invoke("power", "--preset", "quick", "--replicates", 1, "--workers", 3, "--quiet")
    assert result.exit_code == 2 and "workers=3" in result.stderr, result.output


def test_power_command(tmp_path):
    out = tmp_path / "power"  # no suffix: .csv is added
    result = invoke("power", "--preset", "anchor", "--patients", 3, "--replicates", 2, "--method", "period",
                    "--method", "lmm", "--method", "randomization", "--outcome", "oracle", "--effect-scale", 0,
                    "--effect-scale", 1, "--out", out,
                    "--report", tmp_path / "power", "--quiet")
    assert result.exit_code == 0, result.output
    summary = __import__("pandas").read_csv(tmp_path / "power.csv")
    assert set(summary["method"]) == {"period", "lmm", "randomization"} and set(summary["outcome"]) == {"oracle"}
    assert set(summary["effect_scale"]) == {0.0, 1.0}
    assert (tmp_path / "power.estimates.csv").is_file()
    report = (tmp_path / "power.html").read_text()
    assert "Type I error" in report and "data:image/png;base64," in report
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout  # numbers are not cut
    assert "…" not in result.stdout and "Antibiotics" in result.stdout and "randomization" in result.stdout
    result = invoke("power", "--preset", "quick", "--effect", "Gel=-1")
    assert result.exit_code == 2 and "--effect Gel" in result.stderr
    result = invoke("power", "--preset", "quick", "--out", tmp_path / "missing" / "power.csv")
    assert result.exit_code == 2 and "no such directory" in result.stderr  # refused before any simulation
    result = invoke("power", "--preset", "quick", "--out", tmp_path / "power.txt")
    assert result.exit_code == 2 and "'.txt'" in result.stderr
    result = invoke("power", "--preset", "quick", "--patients", 1, "--replicates", 1, "--method", "lmm",
                    "--outcome", "oracle", "--quiet")
    assert result.exit_code == 0 and "at least 2 patients" in " ".join(result.stdout.split())


def test_analyze_command(tiny_run):
    result = invoke("analyze", tiny_run, "--no-autoencoder", "--permutations", 100, "--quiet")
    assert result.exit_code == 0, result.output
    assert "pooled effects" in result.stdout
    assert (tiny_run / "analysis" / "report.html").is_file()
    outcomes = set(pd.read_csv(tiny_run / "analysis" / "effects.csv")["outcome"])
    assert "oracle" in outcomes and "new_inflammatory" not in outcomes   # no new lesions on a first visit


@pytest.mark.parametrize("backend", ["sdxl-inpaint", "sdxl-img2img"])
def test_generate_with_diffusion_backends(tmp_path, tiny_sdxl, backend):
    import pandas as pd

    proto = tmp_path / "tiny.csv"
    proto.write_text("patient_id,day,treatment,severity\nq1,0,Control,2.2\nq1,1,Cream,1.4\n")
    base = invoke("generate", proto, "--out", tmp_path / "proc", "--size", 128, "--quiet")
    assert base.exit_code == 0, base.output
    result = invoke("generate", proto, "--out", tmp_path / "diff", "--size", 128, "--quiet", "--backend", backend,
                    "--model", tiny_sdxl, "--steps", 10 if backend == "sdxl-img2img" else 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    manifest = pd.read_parquet(tmp_path / "diff" / "manifest.parquet")
    assert set(manifest["backend"]) == {backend}
    config = json.loads((tmp_path / "diff" / "config.json").read_text())
    assert config["diffusion"]["mode"] == backend.removeprefix("sdxl-") and config["diffusion"]["model"] == str(tiny_sdxl)
    # same lesion model, so the same lesion table; different pixels
    proc = pd.read_parquet(tmp_path / "proc" / "lesions.parquet")
    diff = pd.read_parquet(tmp_path / "diff" / "lesions.parquet")
    pd.testing.assert_frame_equal(proc[["image", "lesion_id", "type", "cx", "cy"]],
                                  diff[["image", "lesion_id", "type", "cx", "cy"]])
    first = manifest["image"].iloc[0]
    assert (tmp_path / "diff" / first).read_bytes() != (tmp_path / "proc" / first).read_bytes()


def test_diffusion_options_need_a_diffusion_backend(tmp_path, tiny_sdxl):
    proto = tmp_path / "tiny.csv"
    proto.write_text(TINY)
    result = invoke("generate", proto, "--out", tmp_path / "run", "--model", "x", "--quiet")
    assert result.exit_code == 2 and "--backend" in result.stderr and result.stderr.count("\n") == 1
    # bad diffusion settings are refused before anything is written
    for args, needle in ((["--model", tmp_path / "nope"], "no such folder"),
                         (["--model", tiny_sdxl, "--steps", 4], "no denoising step")):
        result = invoke("generate", proto, "--out", tmp_path / "run", "--quiet", "--backend", "sdxl-img2img", *args)
        assert result.exit_code == 2 and needle in result.stderr and result.stderr.count("\n") == 1
        assert not (tmp_path / "run").exists()


def test_faces_generate_with_tiny_model(tmp_path, tiny_sdxl):
    out = tmp_path / "bank"
    result = invoke("faces", "generate", "--n", 1, "--model", tiny_sdxl, "--out", out, "--size", 64, "--steps", 2,
                    "--max-tries", 2)
    assert result.exit_code == 0, result.output
    assert (out / "faces.csv").is_file()  # a random tiny model draws no face: nothing kept, bookkeeping written


def test_finetune_then_generate_with_the_lora(tmp_path, tiny_sdxl):
    """The whole diffusion path through the CLI: data check, LoRA fine-tuning, rendering with the adapter."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for level in (0, 2):
        folder = tmp_path / "acne04" / f"acne{level}_1024"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.jpg")
    result = invoke("data", "check", tmp_path / "acne04")
    assert result.exit_code == 0 and "OK" in result.stdout, result.output
    result = invoke("finetune", "--data", tmp_path / "acne04", "--base", tiny_sdxl, "--level", 2, "--out",
                    tmp_path / "lora", "--image-size", 32, "--steps", 2, "--gradient-accumulation-steps", 1,
                    "--checkpointing-steps", 2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    proto = tmp_path / "p.csv"
    proto.write_text("patient_id,day,treatment,severity\nq1,0,Control,2.1\n")
    outs = []
    for name, extra in (("plain", []), ("lora", ["--lora", tmp_path / "lora"])):
        result = invoke("generate", proto, "--out", tmp_path / f"run_{name}", "--size", 128, "--quiet", "--backend",
                        "sdxl-img2img", "--model", tiny_sdxl, "--steps", 10, "--device", "cpu", *extra)
        assert result.exit_code == 0, result.output
        outs.append((tmp_path / f"run_{name}" / "images" / "q1" / "q1_d000_frontal.png").read_bytes())
    assert outs[0] != outs[1]  # the level-2 adapter changes what the model draws
    result = invoke("finetune", "--data", tmp_path / "acne04", "--base", tiny_sdxl, "--level", 5, "--out",
                    tmp_path / "x")
    assert result.exit_code == 2 and "--level" in result.stderr


@pytest.mark.parametrize("args", [("--patients", 1_000_000_000), ("--period-days", 100_000_000),
                                  ("--washout-days", 1_000_000), ("--first-day", 1_000_000_000),
                                  ("--patients", 10_000, "--period-days", 365), ("--noise-sd", "1e308"),
                                  ("--trend", "1e308"), ("--washout-days", 365, "--first-day", 35_000)])
def test_design_sizes_are_refused_in_one_line_before_any_work(tmp_path, args):
    import time

    out = tmp_path / "big.csv"
    start = time.perf_counter()
    result = invoke("protocol", "design", "--out", out, *args)
    assert time.perf_counter() - start < 5
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert args[0] in result.output or args[0].lstrip("-").replace("-", "_") in result.output
    assert not out.exists() and not (tmp_path / "big.truth.json").exists()


def test_design_help_states_the_limits():
    result = runner.invoke(app, ["protocol", "design", "--help"], terminal_width=200)
    text = " ".join(result.stdout.split())
    for limit in ("1<=x<=10000", "1<=x<=500", "1<=x<=365", "0<=x<=365", "0<=x<=36500", "3661 days",
                  "1,000,000 rows"):
        assert limit in text, limit
