"""Autoencoder embeddings, PCA to one dimension and the redness signal (Schneider et al.'s pipeline)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from synthtrial.analyze.embed import (
    AutoencoderConfig,
    ConvAutoencoder,
    PCA1D,
    embed,
    load_images,
    load_model,
    patient_scores,
    pca_1d,
    redness,
    save_model,
    train_autoencoder,
)
from synthtrial.util.errors import SynthtrialError

SIZE = 32
FAST = dict(image_size=SIZE, epochs=5, batch_size=16, lr=2e-3)


def blobs(n: int = 48, size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Skin-coloured squares with one Gaussian blob each; the blob's redness follows a hidden factor in [0, 1]."""
    rng = np.random.default_rng(seed)
    factor = rng.random(n)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, 3, size, size), np.float32)
    skin = np.array([0.75, 0.6, 0.5])[:, None, None]
    for i in range(n):
        cx, cy = 0.3 + 0.4 * rng.random(2)
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.12 ** 2))
        blob = np.array([0.55 + 0.4 * factor[i], 0.55 - 0.35 * factor[i], 0.5 - 0.3 * factor[i]])[:, None, None]
        images[i] = skin * (1 - g) + blob * g
    return torch.from_numpy(images), factor


@pytest.fixture(scope="module")
def data():
    return blobs()


@pytest.fixture(scope="module")
def trained(data):
    images, _ = data
    config = AutoencoderConfig(**FAST, seed=0)
    model, losses = train_autoencoder(images, config, device="cpu")
    return config, model, losses


# ------------------------------------------------------------------------------------------- architecture

@pytest.mark.parametrize("size", [16, 32, 64, 256])
def test_feature_is_1024_and_shapes(size):
    config = AutoencoderConfig(image_size=size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConvAutoencoder(config).eval()
    assert model.channels[-1] == 64
    assert all(c <= 64 for c in model.channels)
    assert len(model.channels) == int(np.log2(size // 4))
    linear = model.to_embedding
    assert (linear.in_features, linear.out_features) == (1024, 64)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert model.features(x).shape == (2, 1024)
        z = model.encode(x)
        assert z.shape == (2, 64)
        assert ((z > 0) & (z < 1)).all()
        y = model(x)
    assert y.shape == (2, 3, size, size)
    assert ((y >= 0) & (y <= 1)).all()


def test_channels_grow_from_base():
    model = ConvAutoencoder(AutoencoderConfig(image_size=256, base_channels=8))
    assert model.channels == (8, 16, 32, 64, 64, 64)
    assert ConvAutoencoder(AutoencoderConfig(image_size=16, base_channels=8)).channels == (8, 64)


@pytest.mark.parametrize("bad", [dict(image_size=48), dict(image_size=8), dict(embedding_dim=0),
                                 dict(batch_size=0), dict(lr=0.0), dict(lr=float("nan")), dict(epochs=True)])
def test_config_refuses_bad_values(bad):
    with pytest.raises(SynthtrialError):
        AutoencoderConfig(**bad)


def test_config_is_json_able():
    from dataclasses import asdict

    config = AutoencoderConfig()
    assert AutoencoderConfig(**json.loads(json.dumps(asdict(config)))) == config
    assert (config.image_size, config.embedding_dim, config.batch_size, config.lr) == (256, 64, 16, 5e-5)


def test_wrong_image_size_is_refused(trained):
    _, model, _ = trained
    with pytest.raises(SynthtrialError, match="32"):
        embed(model, torch.rand(2, 3, 64, 64))


# ---------------------------------------------------------------------------------------------- training

def test_training_reduces_loss(trained):
    _, _, losses = trained
    assert len(losses) == FAST["epochs"]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] * 0.9


def test_progress_is_reported(data):
    images, _ = data
    seen = []
    _, losses = train_autoencoder(images[:16], AutoencoderConfig(**{**FAST, "epochs": 2}), device="cpu",
                                  progress=lambda e, n, status: seen.append((e, n, status)))
    assert seen == [(1, 2, f"loss {losses[0]:.5f}"), (2, 2, f"loss {losses[1]:.5f}")]


def test_training_is_deterministic_and_leaves_global_state(data, trained):
    images, _ = data
    config, model, losses = trained
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    again, losses_again = train_autoencoder(images, config, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    assert torch.get_num_threads() == threads_before

    assert losses_again == losses
    first = embed(model, images)
    assert first.dtype == np.float32 and first.shape == (len(images), 64)
    assert np.array_equal(embed(again, images), first)
    # an image's embedding is its own (no batch norm); other batch sizes may only change float rounding
    assert np.allclose(embed(model, images, batch_size=5), first, rtol=0, atol=1e-5)

    other, losses_other = train_autoencoder(images, AutoencoderConfig(**FAST, seed=1), device="cpu")
    assert losses_other != losses
    assert not np.array_equal(embed(other, images), first)


# ------------------------------------------------------------------------------------------- persistence

def test_save_load_round_trip(tmp_path, data, trained):
    images, _ = data
    config, model, _ = trained
    path = tmp_path / "ae" / "model.safetensors"
    save_model(model, config, path)
    config_path = tmp_path / "ae" / "model.json"
    assert config_path.is_file()
    assert AutoencoderConfig(**json.loads(config_path.read_text())) == config

    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()["format"] == "synthtrial.ConvAutoencoder"
    assert keys == set(model.state_dict())
    raw = path.read_bytes()  # safetensors layout: u64 header length, JSON header, raw tensor bytes; no pickle
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert set(header) - {"__metadata__"} == keys

    loaded = load_model(path, device="cpu")
    assert loaded.config == config and not loaded.training
    assert np.array_equal(embed(loaded, images), embed(model, images))


def test_load_model_errors_name_the_file(tmp_path, trained):
    config, model, _ = trained
    path = tmp_path / "model.safetensors"
    with pytest.raises(SynthtrialError, match="model.json"):
        load_model(path, device="cpu")
    save_model(model, config, path)
    path.write_bytes(b"not safetensors")
    with pytest.raises(SynthtrialError, match="model.safetensors"):
        load_model(path, device="cpu")
    save_model(model, config, path)
    (tmp_path / "model.json").write_text(json.dumps({**json.loads((tmp_path / "model.json").read_text()),
                                                     "embedding_dim": 32}))
    with pytest.raises(SynthtrialError, match="model.safetensors"):
        load_model(path, device="cpu")
    with pytest.raises(SynthtrialError):
        save_model(model, AutoencoderConfig(image_size=64), tmp_path / "other.safetensors")


# --------------------------------------------------------------------------------------------------- PCA

def test_pca_recovers_planted_factor_and_follows_align_with():
    rng = np.random.default_rng(3)
    n, d = 200, 64
    factor = rng.normal(size=n)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    embeddings = 0.5 + 0.2 * factor[:, None] * direction + 0.01 * rng.normal(size=(n, d))

    scores, pca = pca_1d(embeddings)
    assert isinstance(pca, PCA1D)
    assert scores.shape == (n,)
    assert abs(np.corrcoef(scores, factor)[0, 1]) > 0.95
    assert 0 < pca.explained_variance_ratio <= 1
    assert pca.explained_variance_ratio > 0.8
    assert pca.sign == 1
    assert pca.component[np.argmax(np.abs(pca.component))] > 0
    assert np.allclose(pca.transform(embeddings), scores)
    assert np.isclose(np.linalg.norm(pca.component), 1.0)

    up, pca_up = pca_1d(embeddings, align_with=factor)
    down, pca_down = pca_1d(embeddings, align_with=-factor)
    assert np.corrcoef(up, factor)[0, 1] > 0.95
    assert np.corrcoef(down, factor)[0, 1] < -0.95
    assert np.allclose(down, -up)
    assert pca_up.sign == -pca_down.sign
    assert np.allclose(pca_down.component, -pca_up.component)


def test_pca_refuses_degenerate_input():
    with pytest.raises(SynthtrialError):
        pca_1d(np.ones((5, 4)))
    with pytest.raises(SynthtrialError):
        pca_1d(np.ones((1, 4)))
    with pytest.raises(SynthtrialError):
        pca_1d(np.random.default_rng(0).random((5, 4)), align_with=np.arange(4))


def _marks_and_lesions(effect: float = 6.0, seed: int = 0, days: int = 40):
    """One patient's embeddings driven by active lesions L and red marks M: reference days 0-19 (L fluctuates,
    M steady), treated days 20-39 (L falls by ``effect``, and the resolved lesions turn into marks: M rises by
    more). Redness follows the marks more than the lesions, as on the rendered images."""
    rng = np.random.default_rng(seed)
    treated = np.arange(days) >= days // 2
    lesions = 10.0 - effect * treated + rng.normal(0, 1.5, days)
    marks = 5.0 + 1.2 * effect * treated + rng.normal(0, 0.3, days)
    u, v = np.zeros(16), np.zeros(16)
    u[0], v[1] = 1.0, 1.0
    embeddings = lesions[:, None] * u + marks[:, None] * v + rng.normal(0, 0.05, (days, 16))
    return embeddings, lesions, 0.3 * lesions + marks, ~treated


def test_patient_scores_keep_their_sign_when_marks_rise_while_lesions_fall():
    embeddings, lesions, red, reference = _marks_and_lesions()
    patients = np.full(len(lesions), "P1")
    scores, summary = patient_scores(embeddings, patients, reference, np.round(lesions))
    assert scores[~reference].mean() < scores[reference].mean()          # lesions fell: so does the score
    assert np.corrcoef(scores[reference], lesions[reference])[0, 1] > 0.9
    assert summary["sign"]["P1"] == "lesion count on reference days"
    # the old orientation (covariance with redness over every day) follows the marks and turns the effect round
    old, _ = pca_1d(embeddings, align_with=red)
    assert old[~reference].mean() > old[reference].mean()


def test_patient_scores_are_in_reference_sd_units_so_responders_are_not_shrunk():
    a = _marks_and_lesions(effect=2.0, seed=1)
    b = _marks_and_lesions(effect=6.0, seed=2)
    embeddings = np.vstack([a[0], b[0]])
    patients = np.repeat(["A", "B"], len(a[1]))
    reference = np.concatenate([a[3], b[3]])
    scores, summary = patient_scores(embeddings, patients, reference, np.concatenate([a[1], b[1]]))
    for pid in ("A", "B"):   # origin: the patient's reference mean
        assert scores[(patients == pid) & reference].mean() == pytest.approx(0.0, abs=1e-9)
    ref_scores = [scores[(patients == pid) & reference] for pid in ("A", "B")]
    pooled = np.sqrt(sum(np.sum((r - r.mean()) ** 2) for r in ref_scores) / sum(r.size - 1 for r in ref_scores))
    assert pooled == pytest.approx(1.0, rel=1e-9) and summary["unit_from"] == "reference-arm images"

    def effect(values, pid):
        own = patients == pid
        return values[own & ~reference].mean() - values[own & reference].mean()

    # B's effect is three times A's in the embedding; the reference-SD unit keeps that ratio near 3, where each
    # patient's total SD (which holds its own effect) brought it close to 1
    assert effect(scores, "B") / effect(scores, "A") == pytest.approx(3.0, rel=0.2)
    total = scores.copy()
    for pid in ("A", "B"):
        total[patients == pid] /= scores[patients == pid].std()
    assert effect(total, "B") / effect(total, "A") < 1.6


def test_patient_scores_without_reference_images_or_lesion_variation():
    embeddings, lesions, _, _ = _marks_and_lesions()
    patients = np.array(["P1"] * 38 + ["P2"] * 2)
    scores, summary = patient_scores(embeddings, patients, np.zeros(40, dtype=bool), lesions)
    assert np.isnan(scores[38:]).all()                                   # two images: no component
    assert summary["sign"]["P1"].startswith("canonical") and summary["unit_from"] == "all images"
    assert scores[:38].mean() == pytest.approx(0.0, abs=1e-9) and scores[:38].std(ddof=1) == pytest.approx(1.0)
    canonical, _ = pca_1d(embeddings[:38])
    assert np.corrcoef(scores[:38], canonical)[0, 1] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- redness

def test_redness_grows_with_red_tint(data):
    images, factor = data
    base = images[:4]
    values = [redness((base + tint * torch.tensor([1.0, -0.5, -0.5])[:, None, None]).clamp(0, 1))
              for tint in (0.0, 0.05, 0.1, 0.2)]
    for lower, higher in zip(values, values[1:]):
        assert (higher > lower).all()
    assert np.allclose(redness(torch.full((2, 3, 16, 16), 0.5)), 0.0, atol=1e-6)  # grey has a* = 0
    # the blobs' hidden factor shows in their redness (the blob sits near the centre)
    assert np.corrcoef(redness(images), factor)[0, 1] > 0.8


def test_redness_uses_the_central_region():
    images = torch.full((1, 3, 32, 32), 0.5)
    edge = images.clone()
    edge[:, 0, :4, :] = 1.0  # a red stripe along the top edge, outside the central half
    centre = images.clone()
    centre[:, 0, 14:18, 14:18] = 1.0
    assert redness(edge)[0] == pytest.approx(redness(images)[0], abs=1e-9)
    assert redness(centre)[0] > redness(images)[0] + 1


# ----------------------------------------------------------------------------------------------- loading

def test_load_images_resizes_and_reads_pngs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 64), (80, 80), (40, 50)]):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        array[:, :, 0] = 200  # a constant red channel survives any resampling
        path = tmp_path / f"img{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(tmp_path / "grey.png")
    paths.append(tmp_path / "grey.png")

    images = load_images(paths, 32)
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.allclose(images[:3, 0], torch.full((3, 32, 32), 200 / 255), atol=1 / 255)
    assert torch.allclose(images[3], torch.full((3, 32, 32), 90 / 255))
    # same size: read exactly
    exact = load_images(paths[:1], 64)
    expected = torch.from_numpy(np.array(Image.open(paths[0]))).permute(2, 0, 1).float() / 255
    assert torch.equal(exact[0], expected)


def test_load_images_names_a_corrupt_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:40])  # truncated
    with pytest.raises(SynthtrialError, match="broken.png"):
        load_images([good, bad], 16)
    with pytest.raises(SynthtrialError, match="missing.png"):
        load_images([tmp_path / "missing.png"], 16)


def test_logit_embedding_is_the_sigmoid_embedding_before_its_sigmoid():
    model, _ = train_autoencoder(torch.rand(6, 3, 16, 16), AutoencoderConfig(image_size=16, epochs=1, batch_size=3,
                                                                              base_channels=4))
    images = torch.rand(4, 3, 16, 16)
    logits = embed(model, images, kind="logits")
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), embed(model, images), rtol=0, atol=1e-6)
    with pytest.raises(SynthtrialError, match="kind"):
        embed(model, images, kind="raw")


def test_embed_refuses_a_device_that_is_not_one(data, trained):
    from synthtrial.util.device import DeviceError

    images, _ = data
    _, model, _ = trained
    with pytest.raises(DeviceError, match="is not a torch device"):
        embed(model, images[:2], device="not a device!!")
