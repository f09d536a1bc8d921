"""Throughput of the GPU path on random weights, beside the anchor's T4 figures.

Throughput does not depend on weight values, so the full-size Stable Diffusion XL architecture (UNet, both
CLIP text encoders, VAE) is built from the JSON configs in ``benchmarks/configs/sdxl-base-1.0`` (written from
``stabilityai/stable-diffusion-xl-base-1.0``'s published configs) with random weights: nothing is
downloaded. The tokenizers are byte-level CLIP tokenizers (no merges; prompts pad to 77 tokens as SDXL's
do), so the text encoders do the same work as with the real vocabulary. ``--tiny`` (the default on CPU,
where the full model would take hours) builds ``benchmarks/configs/sdxl-tiny`` instead, so CI runs the
script end to end in seconds; its figures say nothing about a GPU.

Tasks (``--only``), each at the batch sizes of ``--batches``, in each of ``--dtypes`` (fp16, bf16; fp32 on
CPU) and, for the UNet-bound tasks, with and without ``torch.compile`` of the UNet (``--compile off,on``):

* ``img2img`` -- :class:`~synthtrial.render.diffusion.DiffusionRenderer` in the anchor's recipe (UniPC,
  strength 0.1, 30 steps, guidance 12) at ``--size`` px (1024); T4: 5 s/image.
* ``text2img`` -- ``StableDiffusionXLPipeline``, 30 steps, guidance 12 (the face bank's call); T4: 20 s/image.
* ``inpaint`` -- the renderer's lesion inpainting at our defaults on a synthetic skin image with
  ``--lesions`` lesions, with crops (crop and paste) and on the whole image; prints the speed-up.
* ``lora`` -- :func:`synthtrial.render.finetune.finetune` itself (DreamBooth LoRA, batch 1, gradient accumulation 3,
  gradient checkpointing, fp16/bf16 mixed precision, Min-SNR) on a few random images at ``--size`` px, the
  random model saved to a temporary folder first (in /dev/shm where it fits); s per optimizer step (= 3 micro-steps, the unit of the
  anchor's "9 s/it" on a T4) and per micro-step.
* ``autoencoder`` -- :func:`synthtrial.analyze.embed.train_autoencoder` (its own bf16 autocast on CUDA),
  256 px (``--tiny``: 32), training images/s per batch size.
* ``graders`` -- every grader :func:`synthtrial.graders.base.image_graders` lists, ``predict`` on random images; a grader
  that cannot be built here (a missing package, say) is listed as skipped with the reason.

Each figure is the mean of ``--repeats`` timed calls after one warm-up call (which includes compilation
under ``--compile on``; its time is printed as ``first_s``). CUDA work is synchronised before every clock
read. ``--json PATH`` writes every row.

    python benchmarks/diffusion.py                                   # CUDA: full size; CPU: tiny
    python benchmarks/diffusion.py --only img2img,inpaint --batches 8 --dtypes bf16 --compile on
    python benchmarks/diffusion.py --tiny --batches 1 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthtrial.util.atomic import write_text_atomic  # noqa: E402
from synthtrial.util.errors import one_line  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
TASKS = ("img2img", "text2img", "inpaint", "lora", "autoencoder", "graders")
#: The anchor's T4 figures (ANCHORS.md): seconds per image, and seconds per optimizer step for LoRA training.
T4 = {"img2img": 5.0, "text2img": 20.0, "lora": 9.0}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
PROMPT = "photo of a person with acne2, portrait, close-up, cheek, detailed, HQ, photo, 4k"


# ------------------------------------------------------------------------------------------- the model

def byte_tokenizer(pad_token: str | None = None):
    """A CLIP tokenizer over single byte symbols (no merges), start/end tokens last (highest ids)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for token in (symbol, symbol + "</w>"):
            vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, **extra)


def read_config(arch: str, part: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"sdxl-{arch}" / f"{part}.json").read_text())


def build_sdxl(arch: str, device: Any, dtype: Any, seed: int = 0):
    """``StableDiffusionXLPipeline`` of the ``arch`` ("base-1.0" or "tiny") configs, random weights, on ``device``.

    The weights are created on ``device`` directly (a 2.6 G-parameter UNet initialises in seconds on a GPU).
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = byte_tokenizer(), byte_tokenizer(pad_token="!")

    def text_config(part: str) -> CLIPTextConfig:
        cfg = {k: v for k, v in read_config(arch, part).items() if k not in ("architectures", "model_type")}
        # the byte tokenizer's special ids (the released vocabulary's are 49406/49407: also the highest)
        cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        return CLIPTextConfig(**cfg)

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(read_config(arch, "unet"))
        vae = AutoencoderKL.from_config(read_config(arch, "vae"))
        text_encoder = CLIPTextModel(text_config("text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config("text_encoder_2"))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    scheduler = EulerDiscreteScheduler.from_config(read_config(arch, "scheduler"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameters(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


# ------------------------------------------------------------------------------------------- timing

def timed(fn: Callable[[], Any], device: Any, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of ``repeats`` further calls), CUDA synchronised."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return first, float(np.mean(times)) if times else first


def scene(size: int, lesions: int, seed: int = 0):
    """A synthetic skin image (size x size), its skin mask (an ellipse) and ``lesions`` lesion specs on it."""
    from synthtrial.render.base import LesionSpec

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.array([205.0, 160.0, 135.0]) + 12 * np.sin(xx / (size / 9.0))[..., None] + rng.normal(0, 3, (size, size, 3))
    image = np.clip(base, 0, 255).astype(np.uint8)
    c = size / 2
    skin = (xx - c) ** 2 / (0.42 * size) ** 2 + (yy - c) ** 2 / (0.46 * size) ** 2 < 1.0
    types = ("papule", "pustule", "open_comedo", "closed_comedo", "mark")
    specs = []
    while len(specs) < lesions:
        x, y = rng.uniform(0.15 * size, 0.85 * size, 2)
        if skin[int(y), int(x)]:
            specs.append(LesionSpec(len(specs) + 1, types[len(specs) % len(types)], float(x), float(y),
                                    float(rng.uniform(1.5, 4.0) * size / 512), 1.0, seed=len(specs) + 1))
    return image, skin, specs


# ------------------------------------------------------------------------------------------- tasks

def row(task: str, **fields: Any) -> dict[str, Any]:
    out = {"task": task, **fields}
    anchor = T4.get(task)
    per = fields.get("s_per_step" if task == "lora" else "s_per_image")
    if anchor is not None and per:
        out["t4_anchor_s"] = anchor
        out["speedup_vs_t4"] = anchor / per
    return out


def run_renderer_tasks(args, pipe, device, dtype_name: str, compiled: bool, batches: list[int]) -> list[dict]:
    from synthtrial.render.base import RenderRequest
    from synthtrial.render.diffusion import DiffusionConfig, DiffusionRenderer

    rows = []
    common = dict(device=str(device), dtype=DTYPES[dtype_name], compile=False, num_inference_steps=args.steps,
                  crop_size=args.crop_size, crop_padding_px=args.crop_padding)
    image, skin, lesions = scene(args.size, args.lesions)
    tags = dict(dtype=dtype_name, compile=compiled, size=args.size)
    if "img2img" in args.only:
        renderer = DiffusionRenderer(DiffusionConfig(mode="img2img", **common), pipeline=pipe)
        for b in batches:
            reqs = [RenderRequest(image=image, lesions=lesions, skin_mask=skin, seed=s, severity=2.0) for s in range(b)]
            first, mean = timed(lambda: renderer.render_batch(reqs), device, args.repeats)
            rows.append(row("img2img", batch=b, s_per_image=mean / b, images_per_s=b / mean, first_s=first, **tags))
    if "text2img" in args.only:
        import torch

        for b in batches:
            def call() -> None:
                gens = [torch.Generator(device=device).manual_seed(s) for s in range(b)]
                with torch.inference_mode():
                    pipe(prompt=[PROMPT] * b, height=args.size, width=args.size, num_inference_steps=args.steps,
                         guidance_scale=12.0, generator=gens, output_type="np")
            first, mean = timed(call, device, args.repeats)
            rows.append(row("text2img", batch=b, s_per_image=mean / b, images_per_s=b / mean, first_s=first, **tags))
    if "inpaint" in args.only:
        crops = DiffusionRenderer(DiffusionConfig(mode="inpaint", **common), pipeline=pipe)
        whole = DiffusionRenderer(DiffusionConfig(mode="inpaint", inpaint_crops=False, **common), pipeline=pipe)
        proc = crops.procedural(image, lesions, skin_mask=skin, seed=0)
        from synthtrial.render.diffusion import inpaint_region

        region = inpaint_region(image, proc, skin, crops.config.mask_dilation_px)
        pieces = crops.inpaint_pieces(proc.image, region, 0)
        windows = [p[0] for p in pieces if p[0] is not None]
        geometry = dict(crops_per_image=len(windows), crop_side=pieces[0][4][0] if windows else None,
                        window_area_fraction=sum(w.side ** 2 for w in windows) / args.size ** 2,
                        region_fraction=float(region.mean()))
        for b in batches:
            reqs = [RenderRequest(image=image, lesions=lesions, skin_mask=skin, seed=s, severity=2.0) for s in range(b)]
            _, t_crop = timed(lambda: crops.render_batch(reqs), device, args.repeats)
            _, t_whole = timed(lambda: whole.render_batch(reqs), device, args.repeats)
            rows.append(row("inpaint", batch=b, s_per_image=t_crop / b, images_per_s=b / t_crop,
                            whole_s_per_image=t_whole / b, crop_speedup=t_whole / t_crop, lesions=len(lesions),
                            **geometry, **tags))
    return rows


def run_lora(args, pipe, device, dtype_name: str) -> list[dict]:
    """finetune() on the random model (saved first) and a few random images; s per optimizer step."""
    from PIL import Image

    from synthtrial.render.finetune import FinetuneConfig, finetune

    mixed = {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}[dtype_name]
    # the full model is ~7 GB in half precision: written to and read from memory (/dev/shm) where it fits
    shm = Path("/dev/shm")
    in_memory = shm.is_dir() and shutil.disk_usage(shm).free > 4 * sum(parameters(pipe).values()) + 2e9
    with tempfile.TemporaryDirectory(dir=shm if in_memory else None) as tmp:
        tmp = Path(tmp)
        pipe.save_pretrained(tmp / "model", safe_serialization=True)
        data = tmp / "data" / "acne2_bench"
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(data / f"{i}.jpg")
        stamps: list[float] = []
        config = FinetuneConfig(base=str(tmp / "model"), level=2, resolution=args.size,
                                max_train_steps=args.lora_steps + 1, checkpointing_steps=10 ** 6, mixed_precision=mixed)
        start = time.perf_counter()
        finetune(tmp / "data", tmp / "lora", config, progress=lambda step, total, loss: stamps.append(time.perf_counter()))
        # the first optimizer step carries loading and warm-up; the rest are the steady state
        per_step = float(np.mean(np.diff(stamps))) if len(stamps) > 1 else stamps[0] - start
    accum = config.gradient_accumulation_steps
    return [row("lora", batch=config.train_batch_size, dtype=dtype_name, compile=False, size=args.size,
                s_per_step=per_step, s_per_micro_step=per_step / accum, gradient_accumulation=accum,
                first_s=stamps[0] - start, steps_timed=len(stamps) - 1)]


def run_autoencoder(args, device, batches: list[int]) -> list[dict]:
    import torch

    from synthtrial.analyze.embed import AutoencoderConfig, train_autoencoder

    size = 32 if args.tiny else 256
    rows = []
    for b in batches:
        images = torch.rand(4 * b, 3, size, size, generator=torch.Generator().manual_seed(0))
        config = AutoencoderConfig(image_size=size, batch_size=b, epochs=1)
        first, mean = timed(lambda: train_autoencoder(images, config, device=device), device, args.repeats)
        rows.append(row("autoencoder", batch=b, size=size, images_per_s=len(images) / mean, s_per_epoch=mean,
                        first_s=first, dtype="bf16 autocast" if device.type == "cuda" else "fp32", compile=False))
    return rows


def run_graders(args, device, batches: list[int]) -> list[dict]:
    from synthtrial.graders.base import get_grader, image_graders

    size = 64 if args.tiny else 512
    rng = np.random.default_rng(0)
    rows = []
    for name in image_graders():
        try:
            grader = get_grader(name, device=str(device))
        except Exception as exc:  # noqa: BLE001 - a grader that cannot be built here is reported, not fatal
            rows.append(row("graders", grader=name, skipped=one_line(exc)))
            continue
        for b in batches:
            images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(b)]
            first, mean = timed(lambda: grader.predict(images), device, args.repeats)
            rows.append(row("graders", grader=name, batch=b, size=size, images_per_s=b / mean, first_s=first))
    return rows


# ------------------------------------------------------------------------------------------- main

def _list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed or ())}, got {text!r}")
    return items


def _batches(text: str) -> list[int]:
    try:
        values = [int(t) for t in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,4,8, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def format_row(r: dict[str, Any]) -> str:
    keys = [k for k in ("grader", "dtype", "compile", "batch", "size") if k in r]
    head = f"{r['task']:<11} " + " ".join(f"{k}={r[k]}" for k in keys)
    if "skipped" in r:
        return f"{head}  skipped: {r['skipped']}"
    figures = []
    for key, fmt in (("s_per_image", "{:.3f} s/image"), ("images_per_s", "{:.2f} images/s"),
                     ("s_per_step", "{:.3f} s/step"), ("s_per_micro_step", "{:.3f} s/micro-step"),
                     ("s_per_epoch", "{:.3f} s/epoch"), ("whole_s_per_image", "whole image {:.3f} s/image"),
                     ("crop_speedup", "crops x{:.2f} faster"), ("crops_per_image", "{} crops/image"),
                     ("first_s", "first call {:.1f} s")):
        if r.get(key) is not None:
            figures.append(fmt.format(r[key]))
    if "speedup_vs_t4" in r:
        unit = "s/step" if r["task"] == "lora" else "s/image"
        figures.append(f"x{r['speedup_vs_t4']:.2f} vs the anchor's T4 ({r['t4_anchor_s']:g} {unit})")
    return f"{head}  " + ", ".join(figures)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--tiny", action="store_true", default=None,
                        help="the tiny architecture (default on CPU; CI runs it) instead of the full SDXL")
    parser.add_argument("--only", type=lambda t: _list(t, TASKS), default=list(TASKS),
                        help=f"comma-separated tasks among {', '.join(TASKS)} (default: all)")
    parser.add_argument("--batches", type=_batches, default=[1, 4, 8], help="batch sizes (default 1,4,8)")
    parser.add_argument("--dtypes", type=lambda t: _list(t, tuple(DTYPES)), default=None,
                        help="fp16,bf16 (default on CUDA); fp32 (the only choice on CPU)")
    parser.add_argument("--compile", type=lambda t: _list(t, ("off", "on")), default=["off", "on"],
                        help="torch.compile of the UNet: off,on (default); ignored on CPU")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 1024; --tiny: 64)")
    parser.add_argument("--steps", type=int, default=30, help="num_inference_steps (default 30, the anchor's)")
    parser.add_argument("--lesions", type=int, default=20, help="lesions on the inpainting test image (default 20)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="side inpainting crops are diffused at (default: --size / 2, the renderer's 512 at 1024)")
    parser.add_argument("--crop-padding", type=int, default=None,
                        help="context px around each lesion cluster (default: --size / 32, the renderer's 32 at 1024)")
    parser.add_argument("--lora-steps", type=int, default=3, help="optimizer steps timed for LoRA (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="write every row to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny is None:
        args.tiny = device.type != "cuda"
    if args.size is None:
        args.size = 64 if args.tiny else 1024
    if args.crop_size is None:
        args.crop_size = max(8, args.size // 2)
    if args.crop_padding is None:
        args.crop_padding = args.size // 32
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()      # per-call dtype-cast notes of the pipelines
    transformers_logging.set_verbosity_error()   # prompt truncation notes (the byte tokenizer's prompts are long)
    dtypes = args.dtypes or (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    if device.type != "cuda":
        dtypes = ["fp32"]   # half-precision SDXL on CPU is neither supported well nor meaningful
    compiles = [c == "on" for c in args.compile] if device.type == "cuda" else [False]
    arch = "tiny" if args.tiny else "base-1.0"
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "arch": arch,
              "torch": torch.__version__, "size": args.size, "steps": args.steps,
              "crop_size": args.crop_size, "crop_padding": args.crop_padding}
    print("# " + ", ".join(f"{k}: {v}" for k, v in header.items()), flush=True)

    rows: list[dict[str, Any]] = []

    def emit(new: list[dict]) -> None:
        for r in new:
            r.setdefault("arch", arch)
            r.setdefault("device", header["device"])
            print(format_row(r), flush=True)
        rows.extend(new)

    pipe_tasks = [t for t in ("img2img", "text2img", "inpaint", "lora") if t in args.only]
    for dtype_name in dtypes:
        if not pipe_tasks:
            break
        pipe = build_sdxl(arch, device, getattr(torch, DTYPES[dtype_name]))
        counts = parameters(pipe)
        print(f"# SDXL {arch} {dtype_name}: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()), flush=True)
        if "lora" in args.only:
            emit(run_lora(args, pipe, device, dtype_name))
        for compiled in compiles:
            if compiled:
                pipe.unet.compile()   # what DiffusionConfig(compile=True) does on CUDA
            emit(run_renderer_tasks(args, pipe, device, dtype_name, compiled, args.batches))
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "autoencoder" in args.only:
        emit(run_autoencoder(args, device, args.batches))
    if "graders" in args.only:
        emit(run_graders(args, device, args.batches))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
