"""CUDA correctness: what only a GPU can check. Every test here is marked ``cuda`` and is skipped where
``torch.cuda.is_available()`` is False (tests/conftest.py), so CI stays green; run them on a GPU machine with
``pytest -m cuda tests/test_cuda.py`` (benchmarks/gpu_check.sh does, beside the benchmark).

Covered: the diffusion renderer in fp16 and bf16 (img2img and inpaint), its seeded generators living on the
pipeline's device, the SDXL VAE upcast to float32 around fp16 encode/decode, per-level LoRA adapter
switching, ``torch.compile`` of the UNet, LoRA fine-tuning in fp16/bf16 mixed precision, ``accelerate launch``
sharding of ``generate`` with 1 and several processes, and the autoencoder and the graders giving on CUDA the
decisions they give on the CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_sdxl import skin_scene  # noqa: E402

from synthtrial.render.diffusion import DiffusionConfig, DiffusionRenderer, inpaint_region  # noqa: E402
from synthtrial.render.procedural import LesionSpec  # noqa: E402

pytestmark = pytest.mark.cuda

SIZE = 64
HALF = ("float16", "bfloat16")


@pytest.fixture(scope="module")
def scene():
    image, skin = skin_scene(SIZE)
    lesions = [LesionSpec(1, "pustule", 18.0, 22.0, 2.0, 1.0, seed=21),
               LesionSpec(2, "papule", 46.0, 44.0, 2.5, 1.0, seed=22)]
    return image, skin, lesions


def _renderer(model, mode, dtype, **kw):
    options = dict(model=str(model), mode=mode, num_inference_steps=4, strength=0.5, device="cuda", dtype=dtype,
                   guidance_scale=5.0, mask_dilation_px=3, crop_padding_px=2, crop_size=32, feather_px=2)
    options.update(kw)
    return DiffusionRenderer(DiffusionConfig(**options))


def _lora(tiny_sdxl, folder: Path, seed: int) -> Path:
    """A random non-zero LoRA for the tiny UNet, saved as diffusers' training scripts save one."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                                init_lora_weights=False))
    folder.mkdir(parents=True)
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return folder


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_pipelines_on_cuda(tiny_sdxl, scene, dtype, monkeypatch):
    """fp16 / bf16 on CUDA: weights in that dtype on the GPU, generators on the pipeline's device, outputs seeded,
    and the inpaint mode's outside pixels bit-identical."""
    import torch

    image, skin, lesions = scene
    for mode in ("img2img", "inpaint"):
        renderer = _renderer(tiny_sdxl, mode, dtype)
        pipe = renderer.pipeline
        assert pipe.device.type == "cuda" and pipe.unet.dtype == getattr(torch, dtype)
        seen = []
        call = type(pipe).__call__

        def spy(self, *args, **kwargs):
            seen.extend(g.device.type for g in kwargs["generator"])
            return call(self, *args, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", spy)
        a = renderer(image, lesions, skin_mask=skin, seed=3, severity=2.0).image
        b = renderer(image, lesions, skin_mask=skin, seed=3, severity=2.0).image
        c = renderer(image, lesions, skin_mask=skin, seed=4, severity=2.0).image
        monkeypatch.undo()
        assert seen and set(seen) == {"cuda"}
        assert a.dtype == np.uint8 and a.shape == image.shape
        assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
        if mode == "inpaint":
            proc = renderer.procedural(image, lesions, skin_mask=skin, seed=3)
            region = inpaint_region(image, proc, skin, 3)
            assert np.array_equal(a[~region], image[~region])


def test_fp16_vae_is_upcast_for_encode_and_decode(tiny_sdxl, scene):
    """SDXL's VAE overflows in fp16: with force_upcast the pipeline runs it in float32, then casts it back."""
    import torch

    image, skin, lesions = scene
    renderer = _renderer(tiny_sdxl, "img2img", "float16")
    vae = renderer.pipeline.vae
    assert vae.config.force_upcast and vae.dtype == torch.float16
    dtypes: dict[str, list] = {"encode": [], "decode": []}
    for name in dtypes:
        original = getattr(vae, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            dtypes[_name].append(next(vae.parameters()).dtype)
            return _original(*args, **kwargs)

        setattr(vae, name, wrapped)
    out = renderer(image, lesions, skin_mask=skin, seed=1, severity=1.0).image
    assert dtypes["encode"] and set(dtypes["encode"]) == {torch.float32}
    assert dtypes["decode"] and set(dtypes["decode"]) == {torch.float32}
    assert vae.dtype == torch.float16 and out.std() > 0


def test_lora_adapters_switch_per_level_on_cuda(tiny_sdxl, scene, tmp_path):
    image, skin, lesions = scene
    layout = tmp_path / "levels"
    _lora(tiny_sdxl, layout / "acne1", seed=1)
    _lora(tiny_sdxl, layout / "acne2", seed=2)
    plain = _renderer(tiny_sdxl, "img2img", "float16")
    levels = _renderer(tiny_sdxl, "img2img", "float16", lora=str(layout))
    out = {}
    for severity in (0.0, 1.0, 2.0, 1.0):
        out.setdefault(severity, []).append(levels(image, lesions, skin_mask=skin, seed=5, severity=severity).image)
        if severity:
            assert levels.pipeline.get_active_adapters() == [f"acne{int(severity)}"]
    base = plain(image, lesions, skin_mask=skin, seed=5, severity=0.0).image
    assert out[0.0][0].tobytes() == base.tobytes()              # no acne0 adapter: LoRA layers disabled
    assert out[1.0][0].tobytes() != base.tobytes() != out[2.0][0].tobytes() != out[1.0][0].tobytes()
    assert out[1.0][0].tobytes() == out[1.0][1].tobytes()        # switching back gives the same image


def test_compiled_unet_on_cuda(tiny_sdxl, scene):
    image, skin, lesions = scene
    eager = _renderer(tiny_sdxl, "img2img", "float32")
    compiled = _renderer(tiny_sdxl, "img2img", "float32", compile=True)
    assert compiled.pipeline.unet._compiled_call_impl is not None and not compiled.notes
    a = eager(image, lesions, skin_mask=skin, seed=2, severity=2.0).image
    b = compiled(image, lesions, skin_mask=skin, seed=2, severity=2.0).image
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 3     # same model, fused kernels: rounding only


@pytest.mark.parametrize("mixed", ["fp16", "bf16"])
def test_lora_finetuning_in_mixed_precision(tiny_sdxl, tmp_path, scene, mixed):
    """finetune() on CUDA: the loss stays finite, the LoRA loads into the renderer and changes its output."""
    from PIL import Image

    from synthtrial.render.finetune import FinetuneConfig, finetune

    data = tmp_path / "data" / "acne2_x"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / f"{i}.png")
    config = FinetuneConfig(base=str(tiny_sdxl), level=2, resolution=SIZE, max_train_steps=3, checkpointing_steps=2,
                            gradient_accumulation_steps=2, mixed_precision=mixed, learning_rate=1e-3)
    losses = []
    weights = finetune(tmp_path / "data", tmp_path / "lora", config, progress=lambda s, t, loss: losses.append(loss))
    assert weights.is_file() and len(losses) == 3 and np.isfinite(losses).all()
    image, skin, lesions = scene
    with_lora = _renderer(tiny_sdxl, "img2img", "float16", lora=str(tmp_path / "lora"))
    plain = _renderer(tiny_sdxl, "img2img", "float16")
    assert with_lora(image, lesions, skin_mask=skin, seed=1, severity=2).image.tobytes() != \
        plain(image, lesions, skin_mask=skin, seed=1, severity=2).image.tobytes()


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_launch_shards_generate_on_gpus(tiny_sdxl, tmp_path, processes):
    """accelerate launch with N processes (one GPU each) writes the same run, byte for byte, as one process."""
    import torch

    pytest.importorskip("mediapipe", reason="generate builds the patients' faces with MediaPipe")
    if torch.cuda.device_count() < processes:
        pytest.skip(f"{processes} processes need {processes} GPUs; this machine has {torch.cuda.device_count()}")
    from synthtrial.run.generation import generate

    proto = tmp_path / "p.csv"
    proto.write_text("patient_id,day,treatment,severity\n" + "".join(
        f"{p},{d},Control,{2.0 - 0.3 * d}\n" for p in ("a1", "a2") for d in range(3)))
    options = {"model": str(tiny_sdxl), "num_inference_steps": 3, "device": "cuda"}
    one = generate(proto, tmp_path / "one", size=128, progress=False, backend="sdxl-inpaint", diffusion=options)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        cmd.append("--multi_gpu")
    cmd += ["-m", "synthtrial", "generate", str(proto), "--out", str(tmp_path / "many"), "--size", "128",
            "--backend", "sdxl-inpaint", "--model", str(tiny_sdxl), "--steps", "3", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = _files(tmp_path / "many")
    ours = _files(one)
    assert set(theirs) == set(ours)
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_autoencoder_decisions_match_cpu():
    """Trained on CUDA it learns; its embeddings (and PCA scores) on CUDA equal the CPU's within tolerance."""
    import torch

    from synthtrial.analyze.embed import AutoencoderConfig, embed, pca_1d, train_autoencoder

    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 32, 32, generator=g)
    images[:12] *= 0.5                                        # two groups the first component separates
    config = AutoencoderConfig(image_size=32, epochs=6, batch_size=8, lr=1e-3)
    model, losses = train_autoencoder(images, config, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    on_gpu = embed(model, images, device="cuda")
    on_cpu = embed(model, images, device="cpu")
    assert np.allclose(on_gpu, on_cpu, atol=2e-3)
    gpu_scores, _ = pca_1d(on_gpu)
    cpu_scores, _ = pca_1d(on_cpu)
    assert np.corrcoef(gpu_scores, cpu_scores)[0, 1] > 0.999
    assert set(np.argsort(gpu_scores)[:12]) == set(np.argsort(cpu_scores)[:12])   # the same images rank low


def test_graders_give_the_cpu_decisions_on_cuda(request):
    """Every grader that can be built: the same outputs on CUDA as on the CPU (numbers within 1e-3, labels equal)."""
    from synthtrial.graders.base import get_grader, image_graders

    pytest.importorskip("mediapipe", reason="the test face (and the counter's landmarks) need MediaPipe")
    face256 = request.getfixturevalue("face256")

    images = [face256.image, np.ascontiguousarray(face256.image[:, ::-1])]
    compared = 0
    for name in image_graders():       # the tracker grades a run's series: tests/test_tracker.py
        cpu = get_grader(name, device="cpu").predict(images)
        gpu = get_grader(name, device="cuda").predict(images)
        assert list(cpu.columns) == list(gpu.columns) and len(cpu) == len(gpu) == 2
        for column in cpu.columns:
            a, b = cpu[column], gpu[column]
            if pd.api.types.is_float_dtype(a):
                assert np.allclose(a, b, rtol=1e-3, atol=1e-3, equal_nan=True), (name, column)
            else:
                assert a.tolist() == b.tolist(), (name, column)
        compared += 1
    assert compared >= 1
