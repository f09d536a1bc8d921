"""benchmarks/diffusion.py and benchmarks/gpu_check.sh: the configs are SDXL's, the script runs end to end on the
tiny architecture (what CI can run), and the GPU check's CPU-runnable parts work (its dry run, its bundling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs" / "sdxl-base-1.0"


def _config(part: str) -> dict:
    return json.loads((CONFIGS / f"{part}.json").read_text())


def test_full_configs_are_sdxl_base_1_0():
    """The published architecture: its cross-checks hold and the parameter counts are SDXL's (built on the meta
    device: nothing allocated)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet, vae, te, te2 = _config("unet"), _config("vae"), _config("text_encoder"), _config("text_encoder_2")
    # the UNet attends to both text encoders' penultimate states, concatenated
    assert unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"] == 2048
    # added embedding: pooled text_encoder_2 projection + 6 time ids of addition_time_embed_dim each
    assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    assert vae["force_upcast"] and vae["scaling_factor"] == 0.13025
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8 and unet["sample_size"] * 8 == 1024
    text_keys = ("architectures", "model_type")
    with torch.device("meta"):
        counts = {
            "unet": UNet2DConditionModel.from_config(unet),
            "vae": AutoencoderKL.from_config(vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te.items() if k not in text_keys})),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(**{k: v for k, v in te2.items() if k not in text_keys})),
        }
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in counts.items()}
    assert params == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def test_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "diffusion.py"), "--tiny", "--device", "cpu", "--batches", "1",
         "--repeats", "1", "--steps", "10", "--size", "128", "--lesions", "3", "--lora-steps", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["header"]["arch"] == "tiny" and data["header"]["device"] == "cpu"
    rows = {r["task"]: r for r in data["rows"]}
    assert set(rows) == {"img2img", "text2img", "inpaint", "lora", "autoencoder", "graders"}
    img = rows["img2img"]
    assert img["dtype"] == "fp32" and img["compile"] is False and img["batch"] == 1
    assert img["speedup_vs_t4"] == pytest.approx(5.0 / img["s_per_image"])
    assert rows["text2img"]["speedup_vs_t4"] == pytest.approx(20.0 / rows["text2img"]["s_per_image"])
    inpaint = rows["inpaint"]
    assert inpaint["crops_per_image"] >= 1 and inpaint["crop_side"] == 64 and inpaint["window_area_fraction"] < 1
    assert inpaint["crop_speedup"] == pytest.approx(inpaint["whole_s_per_image"] / inpaint["s_per_image"])
    lora = rows["lora"]
    assert lora["s_per_micro_step"] * lora["gradient_accumulation"] == pytest.approx(lora["s_per_step"])
    assert lora["speedup_vs_t4"] == pytest.approx(9.0 / lora["s_per_step"]) and lora["steps_timed"] == 1
    assert rows["autoencoder"]["images_per_s"] > 0
    assert "vs the anchor's T4 (5 s/image)" in proc.stdout and "crops x" in proc.stdout


def test_benchmark_rejects_bad_lists(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "diffusion.py"), "--only", "img2img,video"],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "video" in proc.stderr


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """Without a GPU the check refuses, unless told to dry-run: then the same steps run (cuda tests all skipped,
    the tiny benchmark) and every file lands in OUT."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    env = _env(PYTHON=sys.executable, OUT=str(tmp_path / "refused"))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 3 and "no CUDA device" in (tmp_path / "refused" / "summary.txt").read_text()
    env.update(OUT=str(tmp_path / "out"), GPU_CHECK_ALLOW_CPU="1",
               GPU_CHECK_BENCH_ARGS="--only autoencoder --batches 1")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert "cuda tests: exit 0" in summary and "benchmark: exit 0" in summary and "compile: skipped" in summary
    assert "skipped" in (out / "cuda-tests.log").read_text()
    assert json.loads((out / "benchmark.json").read_text())["rows"][0]["task"] == "autoencoder"
    assert "torch" in (out / "env.txt").read_text()


def test_gpu_check_bundles_pure_python_packages(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    site = tmp_path / "site"
    proc = subprocess.run(["bash", str(script), "--bundle", str(site)], capture_output=True, text=True, timeout=300,
                          env=_env(PYTHON=sys.executable, GPU_CHECK_BUNDLE="ttach"))
    assert proc.returncode == 0, proc.stderr
    assert (site / "ttach" / "__init__.py").is_file() and not list(site.rglob("__pycache__"))
    assert [p.name for p in site.glob("ttach-*.dist-info")]
    check = subprocess.run([sys.executable, "-c", "import ttach, importlib.metadata as m; print(ttach.__file__, "
                            "m.version('ttach'))"], capture_output=True, text=True, env=_env(PYTHONPATH=str(site)))
    assert check.returncode == 0 and str(site) in check.stdout
    missing = subprocess.run(["bash", str(script), "--bundle", str(site)], capture_output=True, text=True, timeout=300,
                             env=_env(PYTHON=sys.executable, GPU_CHECK_BUNDLE="no_such_package_xyz"))
    assert missing.returncode != 0 and "no package no_such_package_xyz" in missing.stderr
