"""Diffusion renderer: Stable Diffusion XL, either as the anchor ran it or steered by the lesion model.

Two modes, one :class:`DiffusionRenderer` with the same call as :class:`ProceduralRenderer`:

``img2img`` -- the anchor's recipe (synthetic_acne_images): ``StableDiffusionXLImg2ImgPipeline`` (what the
    anchor's ``AutoPipelineForImage2Image`` resolves to for SDXL; the auto pipelines are not used because
    importing them imports every pipeline diffusers ships, some of which warn on this torch) on
    ``stabilityai/stable-diffusion-xl-base-1.0`` with the severity level's LoRA, UniPC, strength 0.1,
    guidance 12, 30 steps, the prompt ``photo of a person with acne{N}, ...`` on the patient's base face,
    where ``N = min(round(severity), 3)`` (Python's ``round``, half to even, the anchor's rule). Unlike the
    anchor it is seeded (a ``torch.Generator`` on the pipeline's device), so the same call gives the same
    image. Lesion placement is *not* controlled -- the anchor's known failure: the returned masks are all
    False and the boxes are the lesion specs' circles clipped to the image, so in this mode a lesion table
    describes the lesions the lesion model *intended*, not what diffusion drew.

``inpaint`` -- ours: the lesions are first drawn by :class:`ProceduralRenderer` (the same call), so the
    lesion map decides where every lesion is; the inpainting region is the union of the lesions' instance
    masks and of every pixel the procedural renderer changed (their erythema halos reach beyond the
    masks), dilated by ``mask_dilation_px`` and intersected with the skin mask (:func:`inpaint_region`).
    ``StableDiffusionXLInpaintPipeline`` repaints that region of the procedural image with the prompt
    ``close-up photo of skin with acne{N}, {types}, ...`` (the lesion types present, e.g. "papules,
    pustules"), seeded. The procedural masks and boxes are returned, so the lesion table describes the
    lesions the image shows.

    Crop and paste (``inpaint_crops``, on by default; the idea of diffusers' ``padding_mask_crop``): only
    square windows around the region's clusters are diffused (:mod:`synthtrial.render.crops`: each cluster's
    box grown by ``crop_padding_px`` of context, overlapping windows merged), each at ``crop_size`` px
    (never above the whole image's working size) and pasted back. The k-th crop of an image is seeded with
    ``derive_seed(seed, "inpaint-crop", k)``. When the windows would cover as many pixels as the image, the
    whole image is diffused instead (seeded with ``seed``), so crops are never the slower path.
    The paste-back is feathered inside the region: the diffused pixels are blended over the input base
    image with an alpha rising from 0 at the region's edge to 1 ``feather_px`` pixels inside
    (:func:`~synthtrial.render.crops.feather_alpha`); every pixel outside the region is bit-identical to
    the input base image, and with ``feather_px <= mask_dilation_px`` every lesion pixel is the diffusion
    output.

Sizes: SDXL works on height/width that are multiples of ``8 * vae_scale_factor`` (64 px for SDXL). An
image (or crop) is resized (PIL Lanczos; the mask nearest-neighbour) to its working size (the nearest such
size, at least one multiple; a crop: ``crop_size`` rounded so), diffused there, and the output resized back
before compositing; one already at its working size (512, 1024) is not resampled.

Device and precision: CUDA when available, else CPU; float16 on CUDA and float32 on CPU by default
(``dtype="bfloat16"`` allowed). SDXL's VAE overflows in float16; the SDXL pipelines upcast it to float32
for encoding and decoding when its config says ``force_upcast`` (the base model's does; the decode goes
through diffusers' deprecated ``upcast_vae``, whose FutureWarning is silenced around the call), or pass an
fp16-safe VAE (the anchor used ``madebyollin/sdxl-vae-fp16-fix``) as ``vae``. ``torch.compile`` of the
UNet (in place, ``unet.compile()``) is applied only on CUDA; on CPU it is skipped with a note.
Nothing downloads unless ``model`` (or ``vae``) is a hub id that is not a
local folder; a path-like value that does not exist is an error. A pipeline built elsewhere (the
benchmark builds the full-size architecture from configs with random weights) can be passed in as
``pipeline=``; it is converted to the mode's pipeline class with ``from_pipe`` and prepared like a loaded one.

LoRA: ``lora`` is a folder holding ``pytorch_lora_weights.safetensors`` (one adapter for every level; the
severity token in the prompt selects the look) or subfolders ``acne0`` .. ``acne3`` each holding one
(one adapter per level, as the anchor trained them). Adapters are loaded once, with ``adapter_name`` per
level, and selected per call with ``set_adapters``; a level without a subfolder runs the base model with
the LoRA layers disabled.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthtrial.util.errors import SynthtrialError
from synthtrial.render.crops import Window, composite, crop_windows, cut, feather_alpha, paste_into
from synthtrial.render.base import (
    LesionSpec,
    PhotoStats,
    RenderRequest,
    RenderResult,
    check_image,
    circle_box,
    skin_weight,
)
from synthtrial.render.procedural import ProceduralConfig, ProceduralRenderer
from synthtrial.trial.scale import ALL_LESION_TYPES as LESION_TYPES
from synthtrial.util.device import resolve_device
from synthtrial.util.seeding import derive_seed
from synthtrial.util.weights import is_pickle, resolve_model

__all__ = [
    "MODES",
    "SCHEDULERS",
    "DiffusionConfig",
    "DiffusionError",
    "DiffusionRenderer",
    "build_img2img",
    "build_inpaint",
    "inpaint_region",
    "severity_level",
    "type_words",
]

MODES = ("img2img", "inpaint")
SCHEDULERS = ("unipc", "euler", "ddim")
DTYPES = ("float16", "bfloat16", "float32")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LEVELS = (0, 1, 2, 3)

#: How the inpaint prompt names each lesion type (plural, in LESION_TYPES order).
TYPE_WORDS = {
    "open_comedo": "open comedones", "closed_comedo": "closed comedones", "papule": "papules",
    "pustule": "pustules", "nodule": "nodules", "mark": "post-inflammatory marks", "scar": "atrophic scars",
}


class DiffusionError(SynthtrialError):
    """A diffusion model, LoRA or setting that cannot be used."""


@dataclass(frozen=True)
class DiffusionConfig:
    """Plain-data settings of :class:`DiffusionRenderer`; the defaults are the anchor's recipe."""

    mode: str = "img2img"        # "img2img" (the anchor's pipeline) | "inpaint" (ours)
    model: str = "stabilityai/stable-diffusion-xl-base-1.0"   # hub id or local folder (from_pretrained)
    lora: str | None = None      # folder with pytorch_lora_weights.safetensors, or subfolders acne0..acne3
    prompt: str = "photo of a person with acne{level}, portrait, close-up, cheek, detailed, HQ, photo, 4k"
    inpaint_prompt: str = "close-up photo of skin with acne{level}, {types}, detailed, HQ"
    negative_prompt: str | None = None
    strength: float = 0.1          # img2img (anchor)
    inpaint_strength: float = 0.75 # inpaint
    guidance_scale: float = 12.0
    num_inference_steps: int = 30
    scheduler: str = "unipc"       # unipc | euler | ddim (swapped in with from_config)
    mask_dilation_px: int = 6
    inpaint_crops: bool = True     # inpaint: diffuse only windows around the lesion clusters (False: whole image)
    crop_padding_px: int = 32      # context around each cluster's box, px of the input image
    crop_size: int = 512           # side each crop is diffused at (rounded to the model's size multiple)
    feather_px: int = 4            # seam: alpha rises from the region's edge to 1 over this many px
    device: str | None = None      # None -> cuda if available else cpu
    dtype: str | None = None       # None -> float16 on CUDA else float32; "bfloat16" allowed
    vae_tiling: bool = True
    vae_slicing: bool = False
    compile: bool = False          # torch.compile the UNet (CUDA only; ignored on CPU with a note)
    vae: str | None = None         # optional AutoencoderKL (hub id or folder), e.g. an fp16-safe SDXL VAE


    def __post_init__(self) -> None:
        """Values are checked when the config is built (models and LoRA folders when the renderer is)."""
        if self.mode not in MODES:
            raise DiffusionError(f"unknown diffusion mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.scheduler not in SCHEDULERS:
            raise DiffusionError(f"unknown scheduler {self.scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise DiffusionError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        strength = self.inpaint_strength if self.mode == "inpaint" else self.strength
        if not 0.0 < float(strength) <= 1.0:
            raise DiffusionError(f"{self.mode} strength must be in (0, 1], got {strength}")
        if int(self.num_inference_steps) < 1:
            raise DiffusionError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if int(int(self.num_inference_steps) * float(strength)) < 1:
            raise DiffusionError(f"{self.num_inference_steps} steps at strength {strength} run no denoising step "
                                 f"(steps x strength < 1); raise --steps or --strength")
        for name in ("mask_dilation_px", "crop_padding_px", "feather_px"):
            if int(getattr(self, name)) < 0:
                raise DiffusionError(f"{name} must be >= 0, got {getattr(self, name)}")
        if int(self.crop_size) < 8:
            raise DiffusionError(f"crop_size must be at least 8 px, got {self.crop_size}")


def severity_level(severity: float) -> int:
    """The anchor's LoRA level: ``min(round(severity), 3)`` (Python round), never below 0."""
    s = float(severity)
    if not math.isfinite(s):
        raise DiffusionError(f"severity must be a finite number, got {severity!r}")
    return max(0, min(round(s), 3))


def type_words(lesions: Sequence[LesionSpec]) -> str:
    """The lesion types present as prompt words, e.g. ``"papules, pustules"`` (``"clear skin"`` if none)."""
    present = {les.type for les in lesions}
    words = [TYPE_WORDS.get(t, t.replace("_", " ")) for t in LESION_TYPES if t in present]
    return ", ".join(words) if words else "clear skin"


def inpaint_region(base: np.ndarray, procedural: RenderResult, skin_mask: np.ndarray,
                   dilation_px: int) -> np.ndarray:
    """(H, W) bool: where the inpaint mode lets diffusion repaint.

    The union of the procedural instance masks and of the pixels the procedural renderer changed,
    dilated by ``dilation_px`` (a disc) and intersected with the skin (``skin_mask`` > 0).
    """
    import cv2

    h, w = base.shape[:2]
    region = np.any(procedural.image != base, axis=2)
    if procedural.masks.size:
        region |= procedural.masks.any(axis=0)
    d = int(dilation_px)
    if d > 0 and region.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1))
        region = cv2.dilate(region.astype(np.uint8), kernel) > 0
    return region & (skin_weight(skin_mask, (h, w)) > 0)


def check_model(value: str, what: str) -> None:
    """A local model folder (no pickle-only weights, no custom code) or a reachable hub id; one-line errors."""
    resolve_model(value, what)


def _lora_layout(folder: str) -> dict[int | None, Path]:
    """{None: file} for one shared adapter, or {level: file} for per-level subfolders acne0..acne3."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DiffusionError(f"LoRA {folder}: no such folder")
    if (path / LORA_WEIGHTS).is_file():
        if is_pickle(path / LORA_WEIGHTS):
            raise DiffusionError(f"LoRA {path / LORA_WEIGHTS}: is a pickle named .safetensors; refusing to load it")
        return {None: path / LORA_WEIGHTS}
    found = {lv: path / f"acne{lv}" / LORA_WEIGHTS for lv in LEVELS if (path / f"acne{lv}" / LORA_WEIGHTS).is_file()}
    if not found:
        raise DiffusionError(f"LoRA {folder}: holds no {LORA_WEIGHTS} (neither in the folder nor in "
                             f"subfolders acne0..acne3)")
    for file in found.values():
        if is_pickle(file):
            raise DiffusionError(f"LoRA {file}: is a pickle named .safetensors; refusing to load it")
    return found


class DiffusionRenderer:
    """``DiffusionRenderer(DiffusionConfig(...), procedural=ProceduralRenderer(...)).render_batch(requests)``.

    ``procedural`` draws the lesion map of the inpaint mode; pass the one the run uses, so the lesion
    table of ``--backend sdxl-inpaint`` equals the procedural backend's.

    Loads the pipeline lazily on the first call (one pipeline object; LoRA adapters loaded once) and
    keeps it. ``notes`` collects what the renderer decided on its own (e.g. compile ignored on CPU).
    """

    def __init__(self, config: DiffusionConfig | None = None, procedural: ProceduralRenderer | None = None,
                 pipeline: Any = None):
        self.config = cfg = config if config is not None else DiffusionConfig()
        if pipeline is None:  # a pipeline built elsewhere needs no model to load
            check_model(cfg.model, "model")
            if cfg.vae is not None:
                check_model(cfg.vae, "VAE")
        self._lora = _lora_layout(cfg.lora) if cfg.lora is not None else None
        self._pipe: Any = None
        self._given = pipeline   # a pipeline built by the caller (converted and prepared on first use)
        #: draws the lesion map the inpaint mode repaints; passed in configured, a default only when none is
        self.procedural = procedural if procedural is not None else ProceduralRenderer()
        self.notes: list[str] = []

    # -- loading ----------------------------------------------------------------------------------

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline (loaded on first use)."""
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    def _device_dtype(self):
        import torch

        cfg = self.config
        device = resolve_device(cfg.device)   # None: CUDA when available; a bad name is one line naming --device
        name = cfg.dtype or ("float16" if device.type == "cuda" else "float32")
        return device, getattr(torch, name)

    def _load(self) -> Any:
        from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        cfg = self.config
        device, dtype = self._device_dtype()
        cls = StableDiffusionXLInpaintPipeline if cfg.mode == "inpaint" else StableDiffusionXLImg2ImgPipeline
        if self._given is not None:
            pipe = self._given if isinstance(self._given, cls) else cls.from_pipe(self._given)
            return self._prepare(pipe, device)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.vae is not None:
            try:
                kwargs["vae"] = AutoencoderKL.from_pretrained(cfg.vae, dtype=dtype, use_safetensors=True)
            except (OSError, ValueError, EnvironmentError) as exc:
                raise DiffusionError(f"VAE {cfg.vae}: cannot be loaded ({type(exc).__name__}: {exc})"
                                     .splitlines()[0]) from None
        try:
            pipe = cls.from_pretrained(cfg.model, use_safetensors=True, **kwargs)
        except (OSError, ValueError, KeyError, EnvironmentError) as exc:
            raise DiffusionError(f"model {cfg.model}: not a loadable diffusers SDXL model "
                                 f"({type(exc).__name__}: {exc})".splitlines()[0]) from None
        return self._prepare(pipe, device)

    def _prepare(self, pipe: Any, device: Any) -> Any:
        """Scheduler, LoRA adapters, device, VAE tiling/slicing and compile, as configured."""
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

        cfg = self.config
        scheduler_cls = {"unipc": UniPCMultistepScheduler, "euler": EulerDiscreteScheduler,
                         "ddim": DDIMScheduler}[cfg.scheduler]
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        if self._lora is not None:
            for level, file in self._lora.items():
                name = "acne" if level is None else f"acne{level}"
                try:
                    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
                except (OSError, ValueError, KeyError, RuntimeError) as exc:
                    raise DiffusionError(f"LoRA {file}: cannot be loaded into {cfg.model} "
                                         f"({type(exc).__name__}: {exc})".splitlines()[0]) from None
        pipe = pipe.to(device)
        if cfg.vae_tiling:
            pipe.vae.enable_tiling()
        if cfg.vae_slicing:
            pipe.vae.enable_slicing()
        if cfg.compile:
            if device.type == "cuda":
                pipe.unet.compile()   # in place (nn.Module.compile): the UNet keeps its class, so LoRA calls work
            else:
                self.notes.append("compile=True ignored: torch.compile of the UNet is used on CUDA only")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _select_lora(self, pipe: Any, level: int) -> None:
        if self._lora is None:
            return
        name = "acne" if None in self._lora else (f"acne{level}" if level in self._lora else None)
        if name is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters([name])

    # -- rendering --------------------------------------------------------------------------------

    def _multiple(self) -> int:
        """Height and width the pipeline takes are multiples of this (64 px for SDXL)."""
        return 8 * int(self.pipeline.vae_scale_factor)

    def _size(self, h: int, w: int) -> tuple[int, int]:
        m = self._multiple()
        return max(m, int(round(h / m)) * m), max(m, int(round(w / m)) * m)

    def _run(self, images: list[np.ndarray], prompts: list[str], seeds: list[int], level: int,
             size: tuple[int, int], masks: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Run the pipeline on a batch (lists of equal length) at working ``size`` (h, w).

        Each image (and mask) is resized to ``size`` where it differs; each output is resized back to its
        own input's size. Returns uint8 images.
        """
        import torch
        from PIL import Image

        cfg = self.config
        pipe = self.pipeline
        self._select_lora(pipe, level)
        ph, pw = size
        pil = [Image.fromarray(im) if im.shape[:2] == (ph, pw) else Image.fromarray(im).resize((pw, ph), Image.LANCZOS)
               for im in images]
        generators = [torch.Generator(device=pipe.device).manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = dict(
            prompt=prompts, image=pil, height=ph, width=pw, guidance_scale=float(cfg.guidance_scale),
            num_inference_steps=int(cfg.num_inference_steps), generator=generators, output_type="np")
        if cfg.negative_prompt is not None:
            kwargs["negative_prompt"] = [cfg.negative_prompt] * len(prompts)
        if masks is not None:
            mask_pil = [Image.fromarray(m.astype(np.uint8) * 255) for m in masks]
            mask_pil = [m if m.size == (pw, ph) else m.resize((pw, ph), Image.NEAREST) for m in mask_pil]
            kwargs.update(mask_image=mask_pil, strength=float(cfg.inpaint_strength))
        else:
            kwargs.update(strength=float(cfg.strength))
        with torch.inference_mode(), warnings.catch_warnings():
            # fp16 + force_upcast: the SDXL pipelines decode through their own (deprecated) upcast_vae(), which
            # is the float32 decode wanted here; its FutureWarning would come once per call
            warnings.filterwarnings("ignore", message=r".*upcast_vae", category=FutureWarning)
            out = pipe(**kwargs).images
        result = []
        for arr, src in zip(np.asarray(out), images, strict=True):
            im = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            h, w = src.shape[:2]
            if (ph, pw) != (h, w):
                im = np.asarray(Image.fromarray(im).resize((w, h), Image.LANCZOS))
            result.append(np.ascontiguousarray(im))
        return result

    def inpaint_pieces(self, image: np.ndarray, region: np.ndarray, seed: int
                       ) -> list[tuple[Window | None, np.ndarray, np.ndarray, int, tuple[int, int]]]:
        """What the inpaint mode diffuses for one image: ``(window, pixels, mask, seed, working size)`` each.

        The crops around the region's clusters (``window`` set), or the whole image (``window`` None) when
        crops are off, their windows would cover at least as many pixels as the image, or diffusing every crop
        at its working size would cost as much as diffusing the whole image.
        """
        cfg = self.config
        h, w = image.shape[:2]
        whole_size = self._size(h, w)
        whole = [(None, image, region, int(seed), whole_size)]
        if not cfg.inpaint_crops:
            return whole
        windows = crop_windows(region, int(cfg.crop_padding_px))
        if sum(win.side ** 2 for win in windows) >= h * w:
            return whole
        m = self._multiple()
        side = max(m, int(round(min(int(cfg.crop_size), max(whole_size)) / m)) * m)
        if len(windows) * side * side >= whole_size[0] * whole_size[1]:
            return whole  # each crop is diffused at `side`: many clusters cost more than the whole image
        return [(win, cut(image, win), cut(region, win), derive_seed(seed, "inpaint-crop", k) % 2 ** 63, (side, side))
                for k, win in enumerate(windows)]

    def __call__(self, image: np.ndarray, lesions: Sequence[LesionSpec], *, skin_mask: np.ndarray,
                 stats: PhotoStats | None = None, seed: int = 0, severity: float = 0.0) -> RenderResult:
        """Render one day: ``image`` (H, W, 3) uint8 RGB, the day's lesions, the skin mask, the seed.

        ``severity`` (0-3, continuous) picks the prompt level and LoRA (``min(round(severity), 3)``).
        Returns the image with one mask and box per lesion (all-False masks in img2img mode).
        """
        return self.render_batch([RenderRequest(image=image, lesions=lesions, skin_mask=skin_mask, stats=stats,
                                                seed=seed, severity=severity)])[0]

    def render_batch(self, requests: Sequence[RenderRequest]) -> list[RenderResult]:
        """Render several days at once: one pipeline call per prompt level (LoRA adapter) and working size.

        In inpaint mode the pieces of a call are the crops (or whole images) of every request. Every piece
        keeps its own seeded generator, so a request's result depends on its own seed and on which
        requests share its call; callers that need the same bytes on a re-run keep the batches the same
        (``synthtrial generate`` does).
        """
        cfg = self.config
        results: list[RenderResult | None] = [None] * len(requests)
        pending: dict[tuple, list[tuple[int, Window | None, np.ndarray, str, int, np.ndarray | None]]] = {}
        finish: dict[int, Any] = {}
        for i, req in enumerate(requests):
            image = req.image
            check_image(image)
            image = np.ascontiguousarray(image)
            h, w = image.shape[:2]
            skin_mask = req.skin_mask
            skin_weight(skin_mask, (h, w))
            lesions = list(req.lesions)
            seed = int(req.seed)
            level = severity_level(float(req.severity))
            if cfg.mode == "img2img":
                for j, les in enumerate(lesions):
                    if not isinstance(les, LesionSpec):
                        raise ValueError(f"lesion {j} must be a LesionSpec, got {type(les).__name__}")
                prompt = cfg.prompt.format(level=level, types=type_words(lesions))
                masks = np.zeros((len(lesions), h, w), bool)
                boxes = np.array([circle_box(les, w, h) for les in lesions], np.float64).reshape(len(lesions), 4)
                finish[i] = (None, masks, boxes, image, image.copy())
                pending.setdefault((level, *self._size(h, w)), []).append((i, None, image, prompt, seed, None))
                continue
            proc = self.procedural(image, lesions, skin_mask=skin_mask, stats=req.stats, seed=seed)
            region = inpaint_region(image, proc, skin_mask, cfg.mask_dilation_px)
            if not region.any():
                results[i] = RenderResult(proc.image, proc.masks, proc.boxes)
                continue
            prompt = cfg.inpaint_prompt.format(level=level, types=type_words(lesions))
            finish[i] = (feather_alpha(region, int(cfg.feather_px)), proc.masks, proc.boxes, image, proc.image.copy())
            for window, pixels, mask, piece_seed, size in self.inpaint_pieces(proc.image, region, seed):
                pending.setdefault((level, *size), []).append((i, window, pixels, prompt, piece_seed, mask))
        for (level, ph, pw), group in pending.items():
            masks_in = None if cfg.mode == "img2img" else [g[5] for g in group]
            outs = self._run([g[2] for g in group], [g[3] for g in group], [g[4] for g in group], level,
                             (ph, pw), masks=masks_in)
            for (i, window, *_), out in zip(group, outs, strict=True):
                canvas = finish[i][4]
                if window is None:
                    canvas[...] = out
                else:
                    paste_into(canvas, out, window)
        for i, (alpha, masks, boxes, base, canvas) in finish.items():
            # inpaint: feathered paste inside the region; outside it the base image, bit for bit
            image = canvas if alpha is None else composite(base, canvas, alpha)
            results[i] = RenderResult(image, masks, boxes)
        return results  # type: ignore[return-value]


def _build(mode: str, procedural_config: ProceduralConfig, options: dict[str, Any]) -> DiffusionRenderer:
    try:
        config = DiffusionConfig(mode=mode, **options)
    except TypeError as exc:
        raise DiffusionError(f"diffusion options: {exc}") from None
    return DiffusionRenderer(config, procedural=ProceduralRenderer(procedural_config))


def build_img2img(procedural_config: ProceduralConfig, options: dict[str, Any]) -> DiffusionRenderer:
    """The registry's builder for ``--backend sdxl-img2img``."""
    return _build("img2img", procedural_config, options)


def build_inpaint(procedural_config: ProceduralConfig, options: dict[str, Any]) -> DiffusionRenderer:
    """The registry's builder for ``--backend sdxl-inpaint``: the run's procedural renderer draws the map."""
    return _build("inpaint", procedural_config, options)
