"""LoRA fine-tuning on a tiny random SDXL (built from configs, nothing downloaded)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

import torch

from synthtrial.util.errors import SynthtrialError  # noqa: E402
from synthtrial.render.finetune import FinetuneConfig, finetune, training_examples, validate_config  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def acne_dir(tmp_path_factory):
    """Per-level folders acne{N}_1024/ with tiny JPEGs: 3 of level 1, 2 of level 2, 1 of level 0."""
    from PIL import Image

    root = tmp_path_factory.mktemp("acne04")
    rng = np.random.default_rng(0)
    for level, count in ((0, 1), (1, 3), (2, 2)):
        folder = root / f"acne{level}_1024"
        folder.mkdir()
        for i in range(count):
            h, w = (48, 40) if i % 2 else (40, 56)  # not square: exercises resize + centre crop
            base = np.full((h, w, 3), 60 + 60 * level, np.uint8)
            noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(folder / f"levle{level}_{i}.jpg", quality=95)
    return root


def small(tiny_sdxl, **kw) -> FinetuneConfig:
    defaults = dict(base=str(tiny_sdxl), level=1, resolution=32, gradient_accumulation_steps=1, max_train_steps=6,
                    checkpointing_steps=3, learning_rate=1e-3, rank=4, seed=0)
    defaults.update(kw)
    return FinetuneConfig(**defaults)


def _unet_output(unet):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    hidden = torch.randn(1, 77, 64, generator=gen)
    cond = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), hidden, added_cond_kwargs=cond).sample


@pytest.fixture(scope="module")
def trained(tiny_sdxl, acne_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    calls = []
    weights = finetune(acne_dir, out, small(tiny_sdxl), progress=lambda s, t, status: calls.append((s, t, status)))
    return out, weights, calls


def test_defaults_are_the_anchor_recipe():
    c = FinetuneConfig()
    assert (c.resolution, c.train_batch_size, c.gradient_accumulation_steps, c.learning_rate, c.lr_scheduler,
            c.snr_gamma, c.max_train_steps, c.rank, c.seed, c.gradient_checkpointing) == \
        (1024, 1, 3, 1e-4, "constant", 5.0, 500, 4, 0, True)
    assert c.prompt_for(2) == "photo of a person with acne2"


@pytest.mark.parametrize("change", [dict(rank=0), dict(resolution=30), dict(learning_rate=-1.0),
                                    dict(lr_scheduler="warp"), dict(snr_gamma=0.0), dict(mixed_precision="fp8"),
                                    dict(level=None, instance_prompt="photo of acne"), dict(max_train_steps=0),
                                    dict(resolution=1_000_000), dict(rank=100_000), dict(train_batch_size=10**9),
                                    dict(learning_rate=float("nan")), dict(snr_gamma=float("inf"))])
def test_bad_config_values_are_refused(change):
    with pytest.raises(SynthtrialError, match="finetune config") as err:
        validate_config(replace(FinetuneConfig(), **change))
    assert "\n" not in str(err.value)


def test_training_runs_saves_and_logs(trained, tiny_sdxl):
    out, weights, calls = trained
    assert weights == out / "pytorch_lora_weights.safetensors" and weights.is_file()
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5, 6] and all(c[1] == 6 for c in calls)
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log["steps"]] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in log["steps"])
    saved = json.loads((out / "finetune_config.json").read_text())
    assert saved["config"]["level"] == 1 and saved["num_images"] == 3 and saved["model_type"] == "sdxl"
    assert saved["prompts"] == {"1": "photo of a person with acne1"}
    ck = out / "checkpoint"   # the shared training loop's checkpoint, last written at step 6
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "state.json"}
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 6 and [e["step"] for e in state["history"]] == [1, 2, 3, 4, 5, 6]
    assert state["rng"]["numpy"] and "lr_scheduler" in state["stateful"]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))


def test_lora_weights_change_from_init_and_alter_the_unet(trained, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    out, weights, _ = trained
    state = load_file(str(weights))
    assert state and all(k.startswith("unet.") for k in state)
    ups = [v for k, v in state.items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(torch.isfinite(v).all() for v in state.values())
    assert any(v.abs().max() > 0 for v in ups)  # gaussian init leaves B (up) at zero: training moved it
    assert any(("to_q" in k) for k in state) and any(("to_out.0" in k) for k in state)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    before = _unet_output(pipe.unet)
    pipe.load_lora_weights(str(out))
    after = _unet_output(pipe.unet)
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after, atol=1e-6)


def test_resume_continues_from_checkpoint_like_an_uninterrupted_run(trained, tiny_sdxl, acne_dir, tmp_path):
    """Interrupted after step 4 (checkpoint at 3), resumed: steps 4-6 repeat the first run, the same LoRA bytes;
    then more steps continue from the checkpoint at 6."""
    out, _, _ = trained
    resumed = tmp_path / "resumed"

    def stop_at_four(step, total, status):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(acne_dir, resumed, small(tiny_sdxl), progress=stop_at_four)
    calls = []
    finetune(acne_dir, resumed, small(tiny_sdxl), progress=lambda s, t, status: calls.append((s, t)))
    assert calls == [(4, 6), (5, 6), (6, 6)]  # starts at the checkpoint step
    log = json.loads((resumed / "training_log.json").read_text())
    assert [e["step"] for e in log["steps"]] == list(range(1, 7)) and log["resumed_from"] == 3
    first = json.loads((out / "training_log.json").read_text())["steps"]
    assert log["steps"] == first          # losses and learning rates of every step, exactly
    assert (resumed / "pytorch_lora_weights.safetensors").read_bytes() == \
        (out / "pytorch_lora_weights.safetensors").read_bytes()
    calls.clear()
    finetune(acne_dir, resumed, small(tiny_sdxl, max_train_steps=7, gradient_checkpointing=False),
             progress=lambda s, t, status: calls.append((s, t)))
    assert calls == [(7, 7)]
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["step"] == 7


def test_config_mismatch_on_resume_raises(trained, tiny_sdxl, acne_dir):
    out, _, _ = trained
    with pytest.raises(SynthtrialError, match="other settings.*learning_rate"):
        finetune(acne_dir, out, small(tiny_sdxl, learning_rate=5e-4, max_train_steps=9))


def test_overfitting_one_image_lowers_the_loss(tiny_sdxl, tmp_path):
    from PIL import Image

    root = tmp_path / "one"
    (root / "acne3_1024").mkdir(parents=True)
    yy, xx = np.mgrid[0:32, 0:32]
    img = np.stack([(xx * 8) % 256, (yy * 8) % 256, ((xx + yy) * 4) % 256], -1).astype(np.uint8)
    Image.fromarray(img).save(root / "acne3_1024" / "a.jpg", quality=95)
    config = small(tiny_sdxl, level=3, max_train_steps=30, checkpointing_steps=100, learning_rate=1e-2,
                   snr_gamma=None, rank=8, gradient_checkpointing=False)
    finetune(root, tmp_path / "out", config)
    losses = [e["loss"] for e in json.loads((tmp_path / "out" / "training_log.json").read_text())["steps"]]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_per_level_filtering(acne_dir, tiny_sdxl):
    examples = training_examples(acne_dir, small(tiny_sdxl, level=2))
    assert len(examples) == 2 and {lvl for _, lvl, _ in examples} == {2}
    assert {p for _, _, p in examples} == {"photo of a person with acne2"}
    with pytest.raises(SynthtrialError, match="no ACNE04 images of level 3"):
        training_examples(acne_dir, small(tiny_sdxl, level=3))


def test_single_adapter_mode_prompts_per_level(acne_dir, tiny_sdxl, tmp_path):
    config = small(tiny_sdxl, level=None, max_train_steps=2, checkpointing_steps=5, gradient_accumulation_steps=2,
                   instance_prompt="photo of a person with acne{level}, cheek")
    examples = training_examples(acne_dir, config)
    assert len(examples) == 6
    assert {(lvl, p) for _, lvl, p in examples} == {(lvl, f"photo of a person with acne{lvl}, cheek")
                                                    for lvl in (0, 1, 2)}
    finetune(acne_dir, tmp_path / "all", replace(config, gradient_checkpointing=False))
    saved = json.loads((tmp_path / "all" / "finetune_config.json").read_text())
    assert saved["prompts"] == {str(lvl): f"photo of a person with acne{lvl}, cheek" for lvl in (0, 1, 2)}
    assert saved["num_images"] == 6
    log = json.loads((tmp_path / "all" / "training_log.json").read_text())["steps"]
    assert [e["step"] for e in log] == [1, 2]


def test_base_model_and_data_errors(acne_dir, tmp_path, tiny_sdxl):
    with pytest.raises(SynthtrialError, match="does not exist.*nothing is downloaded"):
        finetune(acne_dir, tmp_path / "o", small(tiny_sdxl, base=str(tmp_path / "missing" / "model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthtrialError, match="no model_index.json"):
        finetune(acne_dir, tmp_path / "o", small(tiny_sdxl, base=str(tmp_path / "empty")))
    with pytest.raises(SynthtrialError):
        finetune(tmp_path / "no_data", tmp_path / "o", small(tiny_sdxl))
    if not torch.cuda.is_available():
        with pytest.raises(SynthtrialError, match="8bit|8-bit|CUDA"):
            finetune(acne_dir, tmp_path / "o", small(tiny_sdxl, use_8bit_adam=True))


def test_sd15_layout_trains_and_its_lora_loads(acne_dir, tmp_path):
    """SD 1.5 (one text encoder, no SDXL time embeddings) is detected from the folder and trained the same way."""
    from diffusers import StableDiffusionPipeline
    from tiny_sdxl import build_tiny_sd15

    base = build_tiny_sd15(tmp_path / "sd15")
    out = tmp_path / "lora15"
    weights = finetune(acne_dir, out, small(base, max_train_steps=2, checkpointing_steps=2))
    assert weights.is_file() and json.loads((out / "finetune_config.json").read_text())["model_type"] == "sd"
    pipe = StableDiffusionPipeline.from_pretrained(base)
    gen = torch.Generator().manual_seed(1)
    sample, hidden = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        before = pipe.unet(sample, torch.tensor([500]), hidden).sample
        pipe.load_lora_weights(out)
        after = pipe.unet(sample, torch.tensor([500]), hidden).sample
    assert not torch.allclose(before, after)
