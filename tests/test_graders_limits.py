"""Issue 19 in the graders, each case with its own hostile input: a training --out that holds someone else's
config.json, sizes beyond the limits (options and weight configs), NaN / infinite weights and settings, and a
device that is not one. Every refusal is one line (exit status 2 on the command line) before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.graders.base import DEFAULT_WEIGHTS_DIR, GraderError, check_weights_out, get_grader
from synthtrial.graders.detector import DetectorConfig
from synthtrial.util.device import DeviceError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAIN = (["graders", "train", "iga"], ["graders", "train", "imageqx"], ["graders", "train", "detector"],
         ["graders", "train", "dermx"])


def _one_line_refusal(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _copy_weights(name, tmp_path, **changes):
    folder = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(DEFAULT_WEIGHTS_DIR / name, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))        # NaN and Infinity as Python's json writes them
    return folder


def test_an_out_holding_a_run_or_another_config_is_refused_without_force(tmp_path):
    run = tmp_path / "R2"                      # a run: its config.json and manifest
    run.mkdir()
    (run / "config.json").write_text('{"seed": 0, "size": 128}\n')
    (run / "manifest.parquet").write_bytes(b"PAR1")
    other = tmp_path / "W"                     # another grader's weights
    other.mkdir()
    (other / "config.json").write_text('{"grader": "dermx"}\n')
    plain = tmp_path / "P"                     # any folder with a config.json
    plain.mkdir()
    (plain / "config.json").write_text("[1, 2]\n")
    before = {f: (f / "config.json").read_bytes() for f in (run, other, plain)}
    runner = CliRunner()
    for command in TRAIN:
        result = runner.invoke(app, [*command, "--data", str(tmp_path / "R"), "--out", str(run), "-q"])
        _one_line_refusal(result, f"--out {run}", "run directory", "--force")
    result = runner.invoke(app, ["graders", "train", "iga", "--data", str(tmp_path / "R"), "--out", str(other)])
    _one_line_refusal(result, "is not 'iga' weights", "--force")
    result = runner.invoke(app, ["graders", "train", "detector", "--data", str(tmp_path / "R"), "--out", str(plain)])
    _one_line_refusal(result, "is not 'detector' weights", "--force")
    assert {f: (f / "config.json").read_bytes() for f in before} == before and not (run / "checkpoint").exists()
    # --force lets the user overwrite on purpose; a folder of the same grader's weights is retrained into
    assert check_weights_out(run, "iga", force=True) == run
    assert check_weights_out(DEFAULT_WEIGHTS_DIR / "iga", "iga") == DEFAULT_WEIGHTS_DIR / "iga"
    with pytest.raises(GraderError, match="is a file"):
        check_weights_out(run / "config.json", "iga", force=True)


def _option_entries(help_text: str) -> list[str]:
    """Each option of a --help as one string: its first line with its wrapped continuation lines."""
    entries: list[str] = []
    for line in help_text.splitlines():
        if line.lstrip().startswith("-"):
            entries.append(line.strip())
        elif entries and line.startswith(" " * 8) and line.strip():
            entries[-1] += " " + line.strip()
    return entries


@pytest.mark.parametrize("argv, needle", [
    (["graders", "train", "detector", "--image-side", "1000000"], "--image-side"),
    (["graders", "train", "detector", "--tile", "100000"], "--tile"),
    (["graders", "train", "detector", "--steps", "1000000000"], "--steps"),
    (["graders", "train", "detector", "--batch-size", "1000000"], "--batch-size"),
    (["graders", "train", "dermx", "--image-size", "100000"], "--image-size"),
    (["graders", "train", "dermx", "--epochs", "1000000000"], "--epochs"),
    (["graders", "train", "iga", "--image-size", "5000"], "--image-size"),
    (["graders", "train", "iga", "--width", "100000"], "--width"),
    (["graders", "train", "imageqx", "--batch-size", "1000000"], "--batch-size"),
    (["finetune", "--image-size", "100000", "--base", "x"], "--image-size"),
    (["finetune", "--rank", "100000", "--base", "x"], "--rank"),
])
def test_size_options_have_stated_limits_refused_before_any_work(argv, needle, tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(app, [argv[0], *argv[1:3 if argv[0] == "graders" else 1], "--help"],
                              env={"COLUMNS": "250"}).output
    assert any(needle in entry and "<=x<=" in entry for entry in _option_entries(help_text)), help_text
    result = runner.invoke(app, [*argv, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    _one_line_refusal(result, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, field, value, needle", [
    ("detector", "image_side", 10_000_000, "image_side must be 32-4096"),
    ("detector", "infer_tile", 1e7, "infer_tile must be of type int, got 10000000.0"),
    ("detector", "tile", 256.5, "tile must be of type int"),
    ("detector", "count_threshold", float("nan"), "count_threshold must be finite"),
    ("detector", "count_threshold", 7.0, "count_threshold must be a score in [0, 1]"),
    ("detector", "nwd_constant", float("inf"), "nwd_constant must be finite"),
    ("dermx", "image_size", 10_000_000, "image_size must be a multiple of 16 from 64 to 2048"),
    ("iga", "image_size", 10_000_000, "image size 16-1024"),
    ("iga", "dropout", float("nan"), "dropout must be finite"),
    ("imageqx", "threshold", float("-inf"), "threshold must be finite"),
    ("iga", "no_such_setting", 1, "unknown setting"),
])
def test_weight_configs_beyond_limits_or_not_finite_are_refused_at_load(name, field, value, needle, tmp_path):
    folder = _copy_weights(name, tmp_path, **{field: value})
    with pytest.raises(GraderError) as err:
        get_grader(name, folder, device="cpu")
    message = str(err.value)
    assert needle in message and str(folder / "config.json") in message and "\n" not in message


def test_non_finite_tensors_are_refused_at_load(tmp_path):
    folder = _copy_weights("iga", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(GraderError, match=f"tensor {key} holds NaN or infinite values"):
        get_grader("iga", folder, device="cpu")
    with pytest.raises(GraderError, match="count_threshold must be a score"):
        DetectorConfig(count_threshold=float("nan"))


def test_every_grader_resolves_its_device(tmp_path):
    for name in ("counter", "iga"):
        with pytest.raises(DeviceError, match="'not a device!!' is not a torch device"):
            get_grader(name, device="not a device!!")
    result = CliRunner().invoke(app, ["grade", str(tmp_path), "--graders", "counter", "--device", "not a device!!"])
    _one_line_refusal(result, "--device 'not a device!!' is not a torch device")
    assert get_grader("counter", device="cpu").device.type == "cpu"
    assert torch.device("cpu") == get_grader("iga", device="cpu").device
