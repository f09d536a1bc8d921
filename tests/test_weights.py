"""Safetensors only, never foreign code: pickles, pickle-only model folders, custom code and an offline hub
are refused with one line."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.util.weights import WeightsError, check_model_folder, load_safetensors, resolve_model


def test_safetensors_loads_and_pickles_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    assert torch.equal(load_safetensors(tmp_path / "ok.safetensors")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2)}, tmp_path / "fake.safetensors")
    with pytest.raises(WeightsError, match="fake.safetensors: is a pickled .* refusing to load it"):
        load_safetensors(tmp_path / "fake.safetensors")
    # a safetensors header of 0x0d80 bytes starts with 0x80, the first byte of a pickle: still safetensors
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (0x0D80 - len(header))
    (tmp_path / "long.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    assert load_safetensors(tmp_path / "long.safetensors")["w"].tolist() == [0.0, 0.0]
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:20])
    with pytest.raises(WeightsError, match="cut.safetensors: is not a valid safetensors file"):
        load_safetensors(tmp_path / "cut.safetensors")


@pytest.fixture()
def model_copy(tiny_sdxl, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl, folder)
    return folder


def test_a_model_with_pickled_weights_only_is_refused(model_copy, tmp_path):
    from diffusers import UNet2DConditionModel

    assert check_model_folder(model_copy) == model_copy
    unet = UNet2DConditionModel.from_pretrained(model_copy / "unet")
    shutil.rmtree(model_copy / "unet")
    unet.save_pretrained(model_copy / "unet", safe_serialization=False)
    assert (model_copy / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(WeightsError, match="unet holds only pickled weights"):
        check_model_folder(model_copy)
    proto = tmp_path / "p.csv"
    proto.write_text("patient_id,day,treatment,severity\nz1,0,Control,1.0\n")
    result = CliRunner().invoke(app, ["generate", str(proto), "--out", str(tmp_path / "run"), "--backend",
                                      "sdxl-inpaint", "--model", str(model_copy), "--size", "128", "-q"])
    assert result.exit_code == 2 and "holds only pickled weights" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_custom_code_is_refused_without_a_prompt(model_copy, tmp_path):
    config = model_copy / "tokenizer" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config.write_text(json.dumps(data))
    (model_copy / "tokenizer" / "evil.py").write_text("raise SystemExit('foreign code ran')\n")
    acne = tmp_path / "acne"
    (acne / "acne0_1024").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 150, 130)).save(acne / "acne0_1024" / "a.png")
    result = CliRunner().invoke(app, ["finetune", "--data", str(acne), "--base", str(model_copy), "--out",
                                      str(tmp_path / "lora"), "--steps", "1"], input="y\n")
    assert result.exit_code == 2, result.output
    assert "names custom code (auto_map)" in result.stderr and "foreign code ran" not in result.output


def test_hub_ids_fail_fast_when_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="not a local folder, and the hub is offline"):
        resolve_model("org/name", "base model")
    with pytest.raises(WeightsError, match="no such folder"):
        resolve_model("./missing", "model")
