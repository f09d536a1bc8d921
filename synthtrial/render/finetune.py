"""LoRA fine-tuning of Stable Diffusion XL (or 1.5) on ACNE04, the anchor generator's recipe.

The anchor trained one SDXL LoRA per ACNE04 level with diffusers' ``train_dreambooth_lora_sdxl.py``
(instance prompt ``photo of a person with acne{N}``, 1024 px, batch 1, gradient accumulation 3,
gradient checkpointing, lr 1e-4 constant, Min-SNR gamma 5, fp16, 500 steps, seed 0, no prior
preservation, no text-encoder training). :class:`FinetuneConfig` defaults to that recipe;
:func:`finetune` is a compact re-implementation of it:

* LoRA (rank ``r``, alpha ``r``, gaussian init) on the UNet attention projections ``to_q/to_k/to_v/to_out.0``;
  everything else frozen. Text encoders are frozen, so every distinct prompt is encoded once up front.
* SDXL conditioning: penultimate hidden states of both text encoders concatenated, pooled embeddings of
  ``text_encoder_2``, ``add_time_ids`` = (original size, crop top-left, target size). SD 1.5 folders
  (one text encoder, no time ids) are detected from ``model_index.json`` and trained the same way.
* Epsilon or v-prediction targets per the scheduler config; Min-SNR loss weighting when ``snr_gamma``
  is set; gradient clipping at 1.0 (the script's default).
* ``level`` set: one adapter for that level (the anchor). ``level=None``: one adapter for all levels,
  the prompt template filled per image with its level (severity tokens ``acne0`` .. ``acne3``).

Every sample (image order, flip, noise, timestep, VAE sample) is drawn from a stream derived from
``(seed, micro-step)``, so a resumed run continues exactly where the interrupted one stopped.

Output in ``out_dir``: ``pytorch_lora_weights.safetensors`` (diffusers format, loadable with
``pipe.load_lora_weights(out_dir)``), ``finetune_config.json``, ``training_log.json`` (per-step loss
and lr) and ``checkpoint/``, the shared training loop's (:mod:`synthtrial.util.training`), written every
``checkpointing_steps`` and at the last step: the LoRA weights (peft keys), the optimizer, the LR
schedule, the fp16 grad scaler and every RNG state. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from synthtrial.util.atomic import write_text_atomic
from synthtrial.util.errors import SynthtrialError, one_line
from synthtrial.util.progress import ProgressCallback
from synthtrial.util.seeding import derive_seed
from synthtrial.util.training import CHECKPOINT_DIR, Plan, read_checkpoint, train_loop
from synthtrial.util.weights import check_model_folder, resolve_model

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "finetune_config.json"
LOG_FILE = "training_log.json"
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
MAX_GRAD_NORM = 1.0
#: Largest values of the size-like settings (a typo is refused before any memory or time is spent).
LIMITS = {"resolution": 4096, "train_batch_size": 4096, "gradient_accumulation_steps": 1024,
          "max_train_steps": 10_000_000, "rank": 1024, "checkpointing_steps": 10_000_000}
#: Fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"max_train_steps", "checkpointing_steps", "gradient_checkpointing"})
_LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class FinetuneConfig:
    """Training settings; the defaults are the anchor generator's recipe."""

    base: str = "stabilityai/stable-diffusion-xl-base-1.0"  # hub id or local diffusers folder
    level: int | None = None  # one ACNE04 level (one adapter per level); None = all levels, severity tokens
    instance_prompt: str = "photo of a person with acne{level}"
    resolution: int = 1024
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 3
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    snr_gamma: float | None = 5.0
    max_train_steps: int = 500
    rank: int = 4
    seed: int = 0
    mixed_precision: str | None = None  # None -> "fp16" on CUDA else "no"; "bf16" allowed
    gradient_checkpointing: bool = True
    checkpointing_steps: int = 100
    use_8bit_adam: bool = False  # needs bitsandbytes and CUDA

    def __post_init__(self) -> None:
        validate_config(self)

    def prompt_for(self, level: int) -> str:
        """The instance prompt for an image of ``level``."""
        return self.instance_prompt.replace("{level}", str(int(level)))


def validate_config(config: FinetuneConfig) -> None:
    """Raise a one-line :class:`SynthtrialError` for a bad config value."""
    def bad(name: str, why: str) -> SynthtrialError:
        return SynthtrialError(f"finetune config: {name}={getattr(config, name)!r} {why}")

    def positive_int(name: str) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(name, "must be a positive integer")

    if not isinstance(config.base, str) or not config.base.strip():
        raise bad("base", "must name a hub id or a local model folder")
    if config.level is not None and (isinstance(config.level, bool) or not isinstance(config.level, int)
                                     or config.level < 0):
        raise bad("level", "must be None or an ACNE04 level (0-3)")
    if not isinstance(config.instance_prompt, str) or not config.instance_prompt.strip():
        raise bad("instance_prompt", "must be a non-empty prompt")
    if config.level is None and "{level}" not in config.instance_prompt:
        raise bad("instance_prompt", "must contain '{level}' when training one adapter for all levels")
    for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "rank",
                 "checkpointing_steps"):
        positive_int(name)
        if getattr(config, name) > LIMITS[name]:
            raise bad(name, f"must be at most {LIMITS[name]:,}")
    if config.resolution % 8:
        raise bad("resolution", "must be a multiple of 8")
    if not isinstance(config.learning_rate, (int, float)) or not math.isfinite(config.learning_rate) \
            or config.learning_rate <= 0:
        raise bad("learning_rate", "must be a positive number")
    if config.lr_scheduler not in _LR_SCHEDULERS:
        raise bad("lr_scheduler", f"must be one of {', '.join(_LR_SCHEDULERS)}")
    if config.snr_gamma is not None and (not isinstance(config.snr_gamma, (int, float))
                                         or not math.isfinite(config.snr_gamma) or config.snr_gamma <= 0):
        raise bad("snr_gamma", "must be None or a positive number")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise bad("seed", "must be a non-negative integer")
    if config.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise bad("mixed_precision", "must be None, 'no', 'fp16' or 'bf16'")


def training_examples(data_dir: str | Path, config: FinetuneConfig) -> list[tuple[Path, int, str]]:
    """``(image, level, prompt)`` for every image the run trains on (filtered to ``config.level``)."""
    from synthtrial.data.acne04 import scan_acne04

    items = scan_acne04(data_dir)
    if config.level is not None:
        items = [it for it in items if it.level == config.level]
        if not items:
            raise SynthtrialError(f"{data_dir}: no ACNE04 images of level {config.level} to fine-tune on")
    if not items:
        raise SynthtrialError(f"{data_dir}: no ACNE04 images to fine-tune on")
    return [(Path(it.path), int(it.level), config.prompt_for(it.level)) for it in items]


# ------------------------------------------------------------------------------------------- base model

def _model_index(base: str) -> dict:
    """``model_index.json`` of a local folder or a hub id; a one-line error otherwise (pickle-only weights,
    custom code, an unreachable hub: :mod:`synthtrial.util.weights`)."""
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SynthtrialError(f"base model {base}: is not a folder (a diffusers model folder or a hub id)")
        check_model_folder(path, "base model")
        index = path / "model_index.json"
        if not index.is_file():
            raise SynthtrialError(f"base model folder {base}: no model_index.json (not a diffusers model folder)")
        try:
            return json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise SynthtrialError(f"base model folder {base}: unreadable model_index.json ({exc})") from None
    resolve_model(base, "base model")
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(base))
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        raise SynthtrialError(f"base model {base}: no local folder of that name, and the hub id could not be "
                              f"loaded ({one_line(exc)})") from None


def _model_kind(base: str, index: dict) -> str:
    name = str(index.get("_class_name", ""))
    if "text_encoder_2" in index or "XL" in name:
        if not {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"} <= set(index):
            raise SynthtrialError(f"base model {base}: an SDXL model_index.json lacking a component")
        return "sdxl"
    if name.startswith("StableDiffusion") and not name.startswith("StableDiffusion3") or \
            {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index):
        return "sd"
    raise SynthtrialError(f"base model {base}: {name or 'unknown pipeline'} is not Stable Diffusion XL or 1.x")


def _load(cls, base: str, subfolder: str, **kwargs):
    """A component of the base model: tokenizers without remote code, models from safetensors only."""
    if subfolder.startswith("tokenizer"):
        kwargs["trust_remote_code"] = False
    elif subfolder != "scheduler":
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(base, subfolder=subfolder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - loading errors come as OSError/ValueError/EnvironmentError/...
        raise SynthtrialError(f"base model {base}: cannot load {subfolder} ({one_line(exc)})") from None


# ----------------------------------------------------------------------------------------- images

def _load_image(path: Path, resolution: int, flip: bool):
    """``(CHW float tensor in [-1, 1], (orig_h, orig_w), (crop_top, crop_left))``."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise SynthtrialError(f"{path}: cannot read image ({one_line(exc)})") from None
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = ImageOps.mirror(im)
        left = nw - left - resolution
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()), (h, w), (top, left)


def _sample_index(seed: int, index: int, n: int) -> int:
    """The ``index``-th sample of a stream of seeded per-epoch permutations of ``n`` items."""
    import numpy as np

    epoch, pos = divmod(index, n)
    return int(np.random.default_rng(derive_seed(seed, "finetune-order", epoch)).permutation(n)[pos])


# ------------------------------------------------------------------------------------------- record

def resume_record(config: FinetuneConfig) -> dict:
    """What a checkpoint must match to be resumed: the config, less the fields that may change."""
    return {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}


# ----------------------------------------------------------------------------------------- training

def finetune(data_dir: Path, out_dir: Path, config: FinetuneConfig, *, restart: bool = False,
             progress: ProgressCallback | None = None) -> Path:
    """Train a LoRA on the ACNE04 images in ``data_dir``; return ``out_dir/pytorch_lora_weights.safetensors``.

    Resumes from ``out_dir/checkpoint`` (the shared training loop's, :mod:`synthtrial.util.training`) when
    the config matches it (only ``max_train_steps``, ``checkpointing_steps`` and ``gradient_checkpointing``
    may change), else raises; ``restart`` starts over.
    ``progress(step, max_train_steps, status)`` is called after every optimizer step (status: the loss).
    """
    validate_config(config)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    examples = training_examples(data_dir, config)
    index = _model_index(config.base)
    kind = _model_kind(config.base, index)
    if not restart:  # refuse another run's checkpoint before the base model is loaded
        read_checkpoint(out_dir / CHECKPOINT_DIR, "lora", resume_record(config))

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    cuda = torch.cuda.is_available()
    mixed = config.mixed_precision or ("fp16" if cuda else "no")
    if mixed == "fp16" and not cuda:
        raise SynthtrialError("finetune config: mixed_precision='fp16' needs CUDA; use 'no' or 'bf16' on CPU")
    if config.use_8bit_adam:
        if not cuda:
            raise SynthtrialError("finetune config: use_8bit_adam needs CUDA (bitsandbytes)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SynthtrialError("finetune config: use_8bit_adam needs the bitsandbytes package") from None

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                                  mixed_precision=mixed)
        return _train(accelerator, examples, out_dir, config, kind, data_dir, restart, progress)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _encode_prompts(prompts: list[str], tokenizers, encoders, kind: str, device, dtype) -> dict:
    import torch

    out = {}
    with torch.no_grad():
        for prompt in prompts:
            hidden, pooled = [], None
            for tokenizer, encoder in zip(tokenizers, encoders):
                ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(device)
                result = encoder(ids, output_hidden_states=(kind == "sdxl"), return_dict=True)
                if kind == "sdxl":
                    hidden.append(result.hidden_states[-2])
                    pooled = getattr(result, "text_embeds", None)  # text_encoder_2 (with projection)
                else:
                    hidden.append(result.last_hidden_state)
            out[prompt] = (torch.cat(hidden, dim=-1).to(dtype)[0], None if pooled is None else pooled.to(dtype)[0])
    return out


@dataclass
class _Frozen:
    """The frozen parts of the base model, on the device: VAE, UNet, noise scheduler, prompt embeddings."""

    kind: str
    device: Any
    weight_dtype: Any
    vae_dtype: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    embeds: dict
    prediction_type: str


def _load_frozen(accelerator, examples, config: FinetuneConfig, kind: str) -> _Frozen:
    """Load the base model's components (safetensors only, no remote code), encode the prompts once, and put
    the VAE (fp32 where the model asks to upcast it) and the UNet on the accelerator's device."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    base = config.base
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    tokenizers = [_load(AutoTokenizer, base, "tokenizer")]
    encoders = [_load(CLIPTextModel, base, "text_encoder")]
    if kind == "sdxl":
        tokenizers.append(_load(AutoTokenizer, base, "tokenizer_2"))
        encoders.append(_load(CLIPTextModelWithProjection, base, "text_encoder_2"))
    noise_scheduler = _load(DDPMScheduler, base, "scheduler")
    vae = _load(AutoencoderKL, base, "vae")
    unet = _load(UNet2DConditionModel, base, "unet", torch_dtype=weight_dtype)
    for model in (*encoders, vae, unet):
        model.requires_grad_(False)
    for encoder in encoders:
        encoder.to(device, dtype=weight_dtype)
    prompts = sorted({prompt for _, _, prompt in examples})
    embeds = _encode_prompts(prompts, tokenizers, encoders, kind, device, weight_dtype)
    del encoders, tokenizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The SDXL VAE overflows in fp16 (force_upcast): keep it fp32 as the reference script does.
    vae_dtype = torch.float32 if getattr(vae.config, "force_upcast", True) else weight_dtype
    vae.to(device) if vae_dtype == torch.float32 else vae.to(device, dtype=vae_dtype)
    unet.to(device)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if config.resolution % vae_scale:
        raise SynthtrialError(f"finetune config: resolution={config.resolution} must be a multiple of "
                              f"the VAE scale factor {vae_scale}")
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise SynthtrialError(f"base model {base}: prediction type {prediction_type!r} is not supported")
    return _Frozen(kind, device, weight_dtype, vae_dtype, vae, unet, noise_scheduler, embeds, prediction_type)


@dataclass
class _Trainable:
    """The LoRA-wrapped UNet (prepared by accelerate), its parameters, optimizer, schedule and grad scaler."""

    unet: Any
    params: list
    optimizer: Any
    lr_scheduler: Any
    scaler: Any


def _prepare_lora(accelerator, frozen: _Frozen, config: FinetuneConfig) -> _Trainable:
    """Add the LoRA adapter to the UNet, build the optimizer and learning-rate schedule, and hand them to
    accelerate (a checkpoint's states are put back by the training loop)."""
    import torch
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = frozen.unet
    torch.manual_seed(config.seed)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                target_modules=TARGET_MODULES))
    cast_training_params(unet, dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]

    if config.use_8bit_adam:
        import bitsandbytes as bnb
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(params, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=config.max_train_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    return _Trainable(unet, params, optimizer, lr_scheduler, getattr(accelerator, "scaler", None))


def _micro_step(accelerator, frozen: _Frozen, train: _Trainable, examples, config: FinetuneConfig,
                micro: int) -> float:
    """One micro-batch: draw its images (seeded by its index, so a resumed run sees the same batches), noise
    them at random timesteps, and take the (Min-SNR weighted) denoising loss's gradient; the optimizer steps
    when accelerate's accumulation says so. Returns the micro-batch loss."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    res, bsz, n = config.resolution, config.train_batch_size, len(examples)
    device, kind, scheduler = frozen.device, frozen.kind, frozen.noise_scheduler
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "finetune-micro", micro) % 2 ** 63)
    pixels, times, hidden, pooled = [], [], [], []
    for b in range(bsz):
        sample = micro * bsz + b
        path, _, prompt = examples[_sample_index(config.seed, sample, n)]
        flip = bool(derive_seed(config.seed, "finetune-flip", sample) & 1)
        image, original, crop = _load_image(path, res, flip)
        pixels.append(image)
        times.append([*original, *crop, res, res])
        hidden.append(frozen.embeds[prompt][0])
        pooled.append(frozen.embeds[prompt][1])
    with accelerator.accumulate(train.unet):
        with torch.no_grad():
            pix = torch.stack(pixels).to(device, dtype=frozen.vae_dtype)
            latents = frozen.vae.encode(pix).latent_dist.sample(generator=gen)
            shift = getattr(frozen.vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * frozen.vae.config.scaling_factor).to(frozen.weight_dtype)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(device, dtype=latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=gen).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        kwargs = {}
        if kind == "sdxl":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.stack(pooled),
                "time_ids": torch.tensor(times, device=device, dtype=frozen.weight_dtype)}
        pred = train.unet(noisy, timesteps, torch.stack(hidden), return_dict=False, **kwargs)[0]
        target = noise if frozen.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        if config.snr_gamma is None:
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        else:  # Min-SNR weighting (Hang et al. 2023), as in diffusers' scripts
            snr = compute_snr(scheduler, timesteps)
            weights = torch.clamp(snr, max=float(config.snr_gamma))
            weights = weights / snr if frozen.prediction_type == "epsilon" else weights / (snr + 1)
            loss = F.mse_loss(pred.float(), target.float(), reduction="none")
            loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(train.params, MAX_GRAD_NORM)
        train.optimizer.step()
        train.lr_scheduler.step()
        train.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach().float().item())


def _train(accelerator, examples, out_dir: Path, config: FinetuneConfig, kind: str, data_dir: Path,
           restart: bool, progress: ProgressCallback | None) -> Path:
    """Load, prepare the LoRA, then run the shared training loop (one step: ``gradient_accumulation_steps``
    micro-batches) until ``max_train_steps``, checkpointing as configured."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    frozen = _load_frozen(accelerator, examples, config, kind)
    train = _prepare_lora(accelerator, frozen, config)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / CONFIG_FILE, json.dumps({
        "config": asdict(config), "data_dir": str(data_dir.resolve()), "model_type": kind,
        "num_images": len(examples), "prompts": {str(lvl): p for _, lvl, p in sorted(examples, key=lambda e: e[1])},
        "target_modules": TARGET_MODULES, "max_grad_norm": MAX_GRAD_NORM}, indent=1) + "\n")

    def lora_state() -> dict:
        return get_peft_model_state_dict(accelerator.unwrap_model(train.unet))

    def set_lora(state) -> None:
        result = set_peft_model_state_dict(accelerator.unwrap_model(train.unet), dict(state), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise SynthtrialError(f"{out_dir / CHECKPOINT_DIR}: LoRA weights do not fit the base model {config.base}")

    def step(i: int) -> dict:
        acc = config.gradient_accumulation_steps
        losses = [_micro_step(accelerator, frozen, train, examples, config, i * acc + k) for k in range(acc)]
        return {"loss": sum(losses) / len(losses), "lr": float(train.lr_scheduler.get_last_lr()[0])}

    train.unet.train()
    plan = Plan(config.max_train_steps, step, "lora", resume_record(config), save_every=config.checkpointing_steps,
                stateful={"lr_scheduler": train.lr_scheduler, "scaler": train.scaler}, get_model=lora_state,
                set_model=set_lora)
    result = train_loop(train.unet, train.optimizer, plan, out_dir, restart=restart, progress=progress)
    write_text_atomic(out_dir / LOG_FILE, json.dumps({
        "model_type": kind, "resumed_from": result["resumed_from"], "steps": result["history"]}) + "\n")
    layers = convert_state_dict_to_diffusers(lora_state())
    pipeline_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True)
    return out_dir / LORA_WEIGHTS
