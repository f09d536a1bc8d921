"""The grader seam: grade_run writes grades.parquet + grades.json atomically and resumes; weights are
safetensors only; `synthtrial grade` and `analyze` use it end to end."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from synthtrial.util.errors import SynthtrialError

from synthtrial.graders.base import GraderError, fingerprint_of, get_grader, load_into, load_state, save_state
from synthtrial.util.device import DeviceError, resolve_device
from synthtrial.grade import grade_run


class Mean:
    """A toy grader: the mean of each image; fails on demand to simulate an interruption."""

    name = "mean"
    outcomes = ("value",)

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def fingerprint(self):
        return fingerprint_of({"grader": "mean"})

    def predict(self, images, meta=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        assert meta is not None and {"patient_id", "day", "view"} <= set(meta.columns)
        return pd.DataFrame({"value": [float(im.mean()) for im in images], "other": [1.0] * len(images)})


def test_grade_run_writes_prefixed_columns_and_resumes(quick_run_256, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(quick_run_256, run)
    with pytest.raises(KeyboardInterrupt):
        grade_run(run, [Mean(fail_after=2)], batch_size=10)
    assert not (run / "grades.parquet").exists()
    resumed = Mean()
    path = grade_run(run, [resumed], batch_size=10)
    assert resumed.calls == 3  # 48 images in chunks of 10: two chunks were kept from the interrupted run
    grades = pd.read_parquet(path)
    manifest = pd.read_parquet(run / "manifest.parquet")
    assert grades["image"].tolist() == manifest["image"].tolist()
    assert list(grades.columns) == ["image", "image_sha256", "mean_value", "mean_other"]
    first = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(run / manifest["image"][0]).convert("RGB"))
    assert grades["mean_value"][0] == pytest.approx(first.mean())
    index = json.loads((run / "grades.json").read_text())["graders"]
    assert index["mean"]["outcomes"] == ["mean_value"]
    # a second grader keeps the first one's columns
    grade_run(run, [get_grader("counter")], batch_size=64)
    both = pd.read_parquet(path)
    assert {"mean_value", "counter_count", "counter_severity"} <= set(both.columns)
    assert set(json.loads((run / "grades.json").read_text())["graders"]) == {"mean", "counter"}


def test_weights_are_safetensors_only(tmp_path):
    save_state(tmp_path / "w", {"a": torch.arange(3.0)}, {"grader": "toy", "width": 3})
    tensors, config = load_state(tmp_path / "w", kind="toy")
    assert torch.equal(tensors["a"], torch.arange(3.0)) and config["width"] == 3
    with pytest.raises(GraderError, match="not 'other'"):
        load_state(tmp_path / "w", kind="other")
    (tmp_path / "w" / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(SynthtrialError, match="pickled .* refusing to load it"):
        load_state(tmp_path / "w", kind="toy")
    (tmp_path / "w" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SynthtrialError, match="not a valid safetensors file"):
        load_state(tmp_path / "w", kind="toy")
    (tmp_path / "w" / "model.safetensors").unlink()
    torch.save({"a": torch.zeros(1)}, tmp_path / "w" / "model.bin")
    with pytest.raises(GraderError, match="model.bin: pickled checkpoints are never loaded"):
        load_state(tmp_path / "w", kind="toy")


def test_weights_that_do_not_fit_the_network_are_one_line(tmp_path):
    save_state(tmp_path / "w", torch.nn.Linear(3, 2).state_dict(), {"grader": "toy"})
    tensors, _ = load_state(tmp_path / "w", kind="toy")
    fits = torch.nn.Linear(3, 2)
    load_into(fits, tensors, tmp_path / "w", "toy network")
    assert torch.equal(fits.weight, tensors["weight"])
    with pytest.raises(GraderError) as caught:
        load_into(torch.nn.Linear(4, 2), tensors, tmp_path / "w", "toy network")
    message = str(caught.value)
    assert "model.safetensors: does not fit the toy network of its config.json" in message and "\n" not in message


def test_registry_and_devices():
    with pytest.raises(GraderError, match="unknown grader 'nope'"):
        get_grader("nope")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DeviceError, match="not a torch device"):
        resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


def test_grade_cli_and_analyze_use_the_counter(quick_run_256, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run
    from synthtrial.cli import app

    run = tmp_path / "run"
    shutil.copytree(quick_run_256, run)
    runner = CliRunner()
    bad = runner.invoke(app, ["grade", str(run), "--graders", "counter,nope", "-q"])
    assert bad.exit_code == 2 and "unknown grader 'nope'" in bad.stderr
    ok = runner.invoke(app, ["grade", str(run), "--graders", "counter", "-q"])
    assert ok.exit_code == 0, ok.output
    folder = analyze_run(run, AnalysisSettings(autoencoder=False, n_permutations=100), progress=False)
    effects = pd.read_csv(folder / "effects.csv")
    rows = effects[effects["outcome"] == "grader_counter_severity"]
    assert len(rows) and rows["estimate"].notna().any()
    assert "grader_counter_count" in set(effects["outcome"])


def test_a_fine_tuning_start_may_differ_only_in_the_free_fields():
    from dataclasses import dataclass

    from synthtrial.graders.base import check_fine_tune_start

    @dataclass
    class Config:
        side: int = 64
        threshold: float = 0.5

    check_fine_tune_start(Config(), Config(threshold=0.9), "w", "toy", free=("threshold",))
    with pytest.raises(GraderError, match=r"^--init w: its toy differs from this training's in side \(128 there, 64 here\)$"):
        check_fine_tune_start(Config(), Config(side=128, threshold=0.9), "w", "toy", free=("threshold",))
