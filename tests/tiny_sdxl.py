"""A tiny, randomly initialised Stable Diffusion XL, built from configs and saved like a hub model.

The tests drive the real loading code (``from_pretrained`` on a local folder) with it: nothing is
downloaded. The CLIP tokenizer is trained with ``tokenizers`` on a few prompts (plus every single byte
symbol, so any prompt tokenizes).
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS = [
    "photo of a person with acne0, portrait, close-up, cheek, detailed, HQ, photo, 4k",
    "photo of a person with acne1", "photo of a person with acne2", "photo of a person with acne3",
    "papule pustule nodule open comedo closed comedo severity mild moderate severe",
    "a frontal portrait photo of a face, studio light",
]


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer trained on :data:`PROMPTS`, covering every byte symbol."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=700, end_of_word_suffix="</w>", initial_alphabet=symbols,
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator([p.lower() for p in PROMPTS], trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for s in symbols:  # every symbol, with and without the end-of-word mark
        for token in (s, s + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny SDXL (unet, vae, two text encoders, two tokenizers, scheduler) to ``folder``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    tokenizer = tiny_clip_tokenizer()
    text = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu",
                projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd15(folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion 1.5 layout (one text encoder, no SDXL time embeddings) to ``folder``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77, hidden_act="gelu"))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def skin_scene(size: int = 64) -> tuple:
    """A skin-coloured test face of ``size`` px with texture and an elliptical skin mask (for the diffusion
    backends' tests, which add their own lesions)."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.array([205.0, 160.0, 135.0]) + 12 * np.sin(xx / 7.0)[..., None] + rng.normal(0, 3, (size, size, 3))
    image = np.clip(base, 0, 255).astype(np.uint8)
    c = size / 2
    skin = (xx - c) ** 2 / (26.0 * size / 64) ** 2 + (yy - c) ** 2 / (29.0 * size / 64) ** 2 < 1.0
    return image, skin

