"""Diffusion renderer on a tiny random SDXL (built once per module, loaded from a local folder)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_sdxl import skin_scene  # noqa: E402

from synthtrial.util.errors import SynthtrialError  # noqa: E402
from synthtrial.render.diffusion import (  # noqa: E402
    DiffusionConfig,
    DiffusionRenderer,
    inpaint_region,
    severity_level,
    type_words,
)
from synthtrial.render.base import RenderRequest  # noqa: E402
from synthtrial.render.procedural import LesionSpec, ProceduralConfig, ProceduralRenderer  # noqa: E402

SIZE = 64



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def lora_dir(tiny_sdxl, tmp_path_factory):
    """A random (non-zero) LoRA for the tiny UNet, saved the way diffusers' training scripts save one."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                                init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def scene():
    """A 64 px skin-coloured test face with texture, a skin mask and three lesions."""
    image, skin = skin_scene(SIZE)
    lesions = [LesionSpec(1, "papule", 20.0, 24.0, 3.0, 1.0, seed=11),
               LesionSpec(2, "pustule", 42.0, 36.0, 2.5, 1.0, seed=12),
               LesionSpec(3, "open_comedo", 30.0, 48.0, 1.5, 1.0, seed=13)]
    return image, skin, lesions


def _config(model, **kw):
    # 4 steps: img2img needs strength >= 0.25 to run one of them (the anchor's 0.1 runs 3 of 30)
    base = dict(model=str(model), num_inference_steps=4, strength=0.5, device="cpu", guidance_scale=5.0,
                vae_tiling=False)
    base.update(kw)
    return DiffusionConfig(**base)


@pytest.fixture(scope="module")
def inpainter(tiny_sdxl):
    return DiffusionRenderer(_config(tiny_sdxl, mode="inpaint", mask_dilation_px=3))


@pytest.fixture(scope="module")
def img2img(tiny_sdxl):
    return DiffusionRenderer(_config(tiny_sdxl, mode="img2img", strength=0.5))


def test_defaults_are_the_anchor_recipe():
    cfg = DiffusionConfig()
    assert (cfg.mode, cfg.strength, cfg.guidance_scale, cfg.num_inference_steps, cfg.scheduler) == \
        ("img2img", 0.1, 12.0, 30, "unipc")
    assert cfg.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.prompt.format(level=2) == \
        "photo of a person with acne2, portrait, close-up, cheek, detailed, HQ, photo, 4k"
    # min(round(x), 3) with Python's round (half to even), never below 0
    assert [severity_level(x) for x in (-0.0, 0.5, 1.5, 1.994, 2.5, 2.51, 3.0, 4.2)] == [0, 0, 2, 2, 2, 3, 3, 3]


def test_type_words():
    les = [LesionSpec(1, "pustule", 1, 1, 1), LesionSpec(2, "papule", 1, 1, 1), LesionSpec(3, "papule", 1, 1, 1)]
    assert type_words(les) == "papules, pustules"
    assert type_words([]) == "clear skin"


def test_inpaint_keeps_outside_and_lesion_geometry(inpainter, scene):
    image, skin, lesions = scene
    assert type(inpainter.pipeline).__name__ == "StableDiffusionXLInpaintPipeline"
    assert type(inpainter.pipeline.scheduler).__name__ == "UniPCMultistepScheduler"
    res = inpainter(image, lesions, skin_mask=skin, seed=3, severity=2.2)
    proc = ProceduralRenderer()(image, lesions, skin_mask=skin, seed=3)
    region = inpaint_region(image, proc, skin, 3)
    assert res.image.shape == image.shape and res.image.dtype == np.uint8
    assert region.any() and not region.all() and not (region & ~skin).any()
    assert proc.masks.any(axis=0)[~region].sum() == 0          # every lesion pixel is inside the region
    assert np.array_equal(res.image[~region], image[~region])  # outside: bit-identical to the base image
    inside = np.any(res.image[region] != proc.image[region], axis=1)
    assert inside.mean() > 0.5                                  # inside: the diffusion output
    assert np.array_equal(res.masks, proc.masks) and np.array_equal(res.boxes, proc.boxes)
    assert res.masks.shape == (3, SIZE, SIZE) and res.masks.any()


def test_inpaint_is_seeded(inpainter, scene):
    image, skin, lesions = scene
    a = inpainter(image, lesions, skin_mask=skin, seed=5, severity=1.0).image
    b = inpainter(image, lesions, skin_mask=skin, seed=5, severity=1.0).image
    c = inpainter(image, lesions, skin_mask=skin, seed=6, severity=1.0).image
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_inpaint_without_lesions_returns_base(inpainter, scene):
    image, skin, _ = scene
    res = inpainter(image, [], skin_mask=skin, seed=0)
    assert np.array_equal(res.image, image) and res.masks.shape == (0, SIZE, SIZE)


def test_img2img_shape_empty_masks_and_seed(img2img, scene):
    image, skin, lesions = scene
    a = img2img(image, lesions, skin_mask=skin, seed=1, severity=3.0)
    assert a.image.shape == image.shape and a.image.dtype == np.uint8
    assert a.masks.shape == (3, SIZE, SIZE) and not a.masks.any()
    assert np.allclose(a.boxes[0], [17.0, 21.0, 23.0, 27.0])     # the spec circle, clipped to the image
    assert not np.array_equal(a.image, image)
    b = img2img(image, lesions, skin_mask=skin, seed=1, severity=3.0)
    c = img2img(image, lesions, skin_mask=skin, seed=2, severity=3.0)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.image.tobytes() != c.image.tobytes()


def test_img2img_resizes_odd_sizes(img2img, scene):
    image, skin, lesions = scene
    odd, odd_skin = image[:50, :60], skin[:50, :60]
    res = img2img(odd, lesions, skin_mask=odd_skin, seed=0, severity=0)
    assert res.image.shape == (50, 60, 3) and res.masks.shape == (3, 50, 60)


def test_lora_changes_output(tiny_sdxl, lora_dir, img2img, scene, tmp_path):
    image, skin, lesions = scene
    plain = img2img(image, lesions, skin_mask=skin, seed=1, severity=1).image
    lora = DiffusionRenderer(_config(tiny_sdxl, mode="img2img", strength=0.5, lora=str(lora_dir)))
    with_lora = lora(image, lesions, skin_mask=skin, seed=1, severity=1).image
    assert with_lora.shape == plain.shape and with_lora.tobytes() != plain.tobytes()
    assert lora.pipeline.get_active_adapters() == ["acne"]
    # per-level layout holding only acne2: level 1 runs the base model with the LoRA layers disabled
    per_level = tmp_path / "levels"
    (per_level / "acne2").mkdir(parents=True)
    (per_level / "acne2" / "pytorch_lora_weights.safetensors").write_bytes(
        (lora_dir / "pytorch_lora_weights.safetensors").read_bytes())
    lv = DiffusionRenderer(_config(tiny_sdxl, mode="img2img", strength=0.5, lora=str(per_level)))
    assert lv(image, lesions, skin_mask=skin, seed=1, severity=1).image.tobytes() == plain.tobytes()
    assert "acne2" in lv.pipeline.get_list_adapters()["unet"]


def test_steps_times_strength_must_run_a_step(tiny_sdxl):
    with pytest.raises(SynthtrialError, match="no denoising step"):
        DiffusionRenderer(_config(tiny_sdxl, strength=0.1))


def test_compile_is_cuda_only(tiny_sdxl):
    renderer = DiffusionRenderer(_config(tiny_sdxl, compile=True, scheduler="ddim"))
    pipe = renderer.pipeline
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert any("compile=True ignored" in note for note in renderer.notes)
    assert pipe.unet.dtype == torch_float32() and pipe.device.type == "cpu"


def torch_float32():
    import torch

    return torch.float32


def test_errors(tmp_path, tiny_sdxl):
    with pytest.raises(SynthtrialError, match="no such folder.*nothing is downloaded"):
        DiffusionRenderer(DiffusionConfig(model=str(tmp_path / "missing")))
    (tmp_path / "empty_lora").mkdir()
    with pytest.raises(SynthtrialError, match="holds no pytorch_lora_weights.safetensors"):
        DiffusionRenderer(DiffusionConfig(model=str(tiny_sdxl), lora=str(tmp_path / "empty_lora")))
    with pytest.raises(SynthtrialError, match="LoRA .*no such folder"):
        DiffusionRenderer(DiffusionConfig(model=str(tiny_sdxl), lora=str(tmp_path / "nope")))
    with pytest.raises(SynthtrialError, match="unknown diffusion mode"):
        DiffusionRenderer(DiffusionConfig(model=str(tiny_sdxl), mode="txt2img"))
    with pytest.raises(SynthtrialError, match="unknown scheduler"):
        DiffusionRenderer(DiffusionConfig(model=str(tiny_sdxl), scheduler="pndm"))
    with pytest.raises(SynthtrialError, match="unknown dtype"):
        DiffusionRenderer(DiffusionConfig(model=str(tiny_sdxl), dtype="float8"))
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "readme.txt").write_text("hi")
    renderer = DiffusionRenderer(DiffusionConfig(model=str(tmp_path / "not_a_model"), device="cpu"))
    with pytest.raises(SynthtrialError, match="not a loadable diffusers SDXL model"):
        renderer.pipeline
    # the message is one line
    try:
        renderer.pipeline
    except SynthtrialError as exc:
        assert "\n" not in str(exc)


def test_render_batch_is_one_pipeline_call_per_level(inpainter, scene, monkeypatch):
    image, skin, lesions = scene
    calls = []
    original = inpainter._run

    def counting(images, *args, **kwargs):
        calls.append(len(images))
        return original(images, *args, **kwargs)

    monkeypatch.setattr(inpainter, "_run", counting)
    requests = [RenderRequest(image=image, lesions=lesions, skin_mask=skin, seed=s, severity=sev)
                for s, sev in ((1, 2.2), (2, 1.9), (3, 0.9))]
    results = inpainter.render_batch(requests)
    assert sorted(calls) == [1, 2]  # levels 2, 2 in one call; level 1 in another
    single = inpainter(image, lesions, skin_mask=skin, seed=3, severity=0.9)
    assert np.array_equal(results[2].image, single.image)  # alone in its call either way: same bytes
    for res in results:
        assert res.image.shape == image.shape and res.masks.shape[0] == len(lesions)


def test_inpaint_draws_its_lesion_map_with_the_procedural_component_given(tiny_sdxl, scene):
    """The procedural component is passed in configured (torchvision's pattern), not built with defaults."""
    image, skin, lesions = scene
    faded = [LesionSpec(lesion_id=l.lesion_id, type=l.type, cx=l.cx, cy=l.cy, radius_px=l.radius_px, intensity=0.3,
                        seed=l.seed) for l in lesions]
    config = ProceduralConfig(size_at_zero_intensity=1.0)
    given = DiffusionRenderer(_config(tiny_sdxl, mode="inpaint"), procedural=ProceduralRenderer(config))
    assert given.procedural.config == config
    default = DiffusionRenderer(_config(tiny_sdxl, mode="inpaint"))
    assert default.procedural.config.size_at_zero_intensity != 1.0
    ours = given.procedural(image, faded, skin_mask=skin).masks.sum()
    theirs = default.procedural(image, faded, skin_mask=skin).masks.sum()
    assert ours > theirs  # fading lesions keep their size under the run's setting


@pytest.fixture(scope="module")
def cropper(tiny_sdxl):
    return DiffusionRenderer(_config(tiny_sdxl, mode="inpaint", mask_dilation_px=3, crop_padding_px=2, crop_size=32,
                                     feather_px=2))


def test_inpaint_crops_diffuse_windows_only(cropper, scene, monkeypatch):
    """Crop and paste: only windows around the lesion clusters go through the pipeline, at crop_size; outside the
    region the base image comes back bit for bit, the lesion pixels are the diffusion output."""
    image, skin, _ = scene
    lesions = [LesionSpec(1, "pustule", 18.0, 22.0, 2.0, 1.0, seed=21), LesionSpec(2, "open_comedo", 46.0, 44.0, 1.5,
                                                                                  1.0, seed=22)]
    proc = cropper.procedural(image, lesions, skin_mask=skin, seed=3)
    region = inpaint_region(image, proc, skin, 3)
    pieces = cropper.inpaint_pieces(proc.image, region, 3)
    assert len(pieces) >= 2 and all(p[0] is not None for p in pieces)
    assert sum(p[0].side ** 2 for p in pieces) < SIZE * SIZE
    assert {p[4] for p in pieces} == {(32, 32)} and len({p[3] for p in pieces}) == len(pieces)
    sizes = []
    original = cropper._run

    def spy(images, prompts, seeds, level, size, masks=None):
        sizes.append((len(images), size, {im.shape for im in images}))
        return original(images, prompts, seeds, level, size, masks=masks)

    monkeypatch.setattr(cropper, "_run", spy)
    res = cropper(image, lesions, skin_mask=skin, seed=3, severity=2.2)
    assert sizes[0][:2] == (len(pieces), (32, 32))          # all crops of the image in one call
    assert sizes[0][2] == {(p[0].side, p[0].side, 3) for p in pieces}
    assert np.array_equal(res.image[~region], image[~region])
    lesion = proc.masks.any(axis=0)
    assert np.any(res.image[lesion] != proc.image[lesion], axis=1).mean() > 0.5
    assert np.array_equal(res.masks, proc.masks)
    again = cropper(image, lesions, skin_mask=skin, seed=3, severity=2.2)
    other = cropper(image, lesions, skin_mask=skin, seed=4, severity=2.2)
    assert res.image.tobytes() == again.image.tobytes() and res.image.tobytes() != other.image.tobytes()


def test_inpaint_falls_back_to_the_whole_image(tiny_sdxl, scene):
    """Crops off, or windows covering as much as the image: one whole-image piece, seeded with the image's seed."""
    image, skin, lesions = scene
    whole = DiffusionRenderer(_config(tiny_sdxl, mode="inpaint", mask_dilation_px=3, inpaint_crops=False))
    wide = DiffusionRenderer(_config(tiny_sdxl, mode="inpaint", mask_dilation_px=3, crop_padding_px=40))
    proc = whole.procedural(image, lesions, skin_mask=skin, seed=3)
    region = inpaint_region(image, proc, skin, 3)
    for renderer in (whole, wide):
        (piece,) = renderer.inpaint_pieces(proc.image, region, 9)
        assert piece[0] is None and piece[3] == 9 and piece[4] == (SIZE, SIZE)
    assert whole(image, lesions, skin_mask=skin, seed=3, severity=1).image.tobytes() == \
        wide(image, lesions, skin_mask=skin, seed=3, severity=1).image.tobytes()


def test_crop_settings_are_checked(tiny_sdxl):
    for bad in (dict(crop_padding_px=-1), dict(feather_px=-1), dict(crop_size=4)):
        with pytest.raises(SynthtrialError, match=next(iter(bad))):
            DiffusionRenderer(_config(tiny_sdxl, mode="inpaint", **bad))


def test_a_pipeline_built_elsewhere_is_converted_and_prepared(tiny_sdxl, scene):
    """pipeline= (the benchmark's random full-size SDXL): converted to the mode's class, scheduler swapped."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    image, skin, lesions = scene
    built = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), dtype=torch.float32)
    given = DiffusionRenderer(_config("stabilityai/stable-diffusion-xl-base-1.0", mode="inpaint", mask_dilation_px=3),
                              pipeline=built)
    assert type(given.pipeline).__name__ == "StableDiffusionXLInpaintPipeline"
    assert type(given.pipeline.scheduler).__name__ == "UniPCMultistepScheduler"
    loaded = DiffusionRenderer(_config(tiny_sdxl, mode="inpaint", mask_dilation_px=3))
    a = given(image, lesions, skin_mask=skin, seed=2, severity=1).image
    b = loaded(image, lesions, skin_mask=skin, seed=2, severity=1).image
    assert a.tobytes() == b.tobytes()


def test_crops_only_when_they_cost_less_than_the_whole_image(tiny_sdxl):
    """Each crop is diffused at its working size: four far-apart clusters at crop size 64 on a 256 px image cost
    4 x 64^2 < 256^2 (crops); at crop size 256 they would cost 4 x the whole image (whole image)."""
    image = np.full((256, 256, 3), 180, np.uint8)
    region = np.zeros((256, 256), bool)
    for y, x in ((30, 30), (30, 220), (220, 30), (220, 220)):
        region[y - 3:y + 3, x - 3:x + 3] = True
    small = DiffusionRenderer(_config(tiny_sdxl, mode="inpaint", crop_size=64, crop_padding_px=8))
    pieces = small.inpaint_pieces(image, region, 1)
    assert len(pieces) == 4 and all(p[0] is not None and p[4] == (64, 64) for p in pieces)
    large = DiffusionRenderer(_config(tiny_sdxl, mode="inpaint", crop_size=256, crop_padding_px=8))
    (whole,) = large.inpaint_pieces(image, region, 1)
    assert whole[0] is None and whole[4] == (256, 256)


def test_device_goes_through_the_one_resolver(tmp_path):
    """The renderer's device comes from synthtrial.util.device: a bad name is one line naming --device, before
    any model is read."""
    from synthtrial.util.device import DeviceError

    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "readme.txt").write_text("hi")
    for device, message in (("not a device!!", "--device 'not a device!!' is not a torch device"),
                            ("mps", "--device mps: only cpu and cuda are supported")):
        renderer = DiffusionRenderer(DiffusionConfig(model=str(tmp_path / "not_a_model"), device=device))
        with pytest.raises(DeviceError, match=message):
            renderer.pipeline
