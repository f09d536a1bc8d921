"""Label-free image embeddings for treatment-effect analysis (Schneider, Gärtner & Konigorski).

The pipeline reads a treatment effect from a series of images without any labels: a convolutional
autoencoder is trained on all images of a run, each image's 64-d bottleneck (``Linear(1024, 64)`` +
sigmoid) is its embedding, PCA reduces the embeddings to one score per image, and the scores go to the
statistical tests (t test, GLS with AR(1) errors, permutation test).

Architecture (:class:`ConvAutoencoder`), for ``image_size`` S = 2**k >= 16 and ``n = k - 2`` stages:

* encoder: ``n`` blocks ``Conv2d(kernel 4, stride 2, padding 1) -> ReLU``, each halving the side, from S
  down to 4 x 4. Channels start at ``base_channels`` and double per block, capped at 64; the last block
  always has 64 channels, so the flattened feature is exactly 64 x 4 x 4 = 1024 for every S.
  Then ``Linear(1024, embedding_dim) -> sigmoid`` is the embedding, in (0, 1).
* decoder, the mirror image: ``Linear(embedding_dim, 1024) -> ReLU``, reshape to 64 x 4 x 4, then ``n``
  blocks ``ConvTranspose2d(kernel 4, stride 2, padding 1) -> ReLU`` back through the encoder's channels to
  3 channels at S x S, where the last ReLU is a sigmoid (RGB in (0, 1)).

There is deliberately no batch normalisation: an image's embedding then depends on that image alone (not
on the other images of its batch, nor on running statistics that a few epochs estimate poorly), and the
network computes the same function in training and in evaluation mode.

Training (:func:`train_autoencoder`) is MSE with Adam, the defaults being Schneider's (256 px, batch 16,
lr 5e-5, 10 epochs). It is seeded: the weights are initialised after ``torch.manual_seed(seed)`` inside
:func:`torch.random.fork_rng` (the caller's global RNG state is restored afterwards) and batches are
shuffled by a private :class:`torch.Generator`. On the CPU two trainings with the same seed give the same
losses and weights bit for bit (with the same number of threads). On CUDA it runs under bf16 autocast
where supported; GPU runs are seeded but not bit-reproducible (cuDNN and atomic adds in the transposed
convolutions' backward pass).

Weights are stored with safetensors next to a JSON file holding the :class:`AutoencoderConfig`; nothing
is pickled and nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save
from torch import Tensor, nn
from torch.nn import functional as F

from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.device import resolve_device
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.progress import ProgressCallback

__all__ = [
    "AutoencoderConfig",
    "ConvAutoencoder",
    "PCA1D",
    "embed",
    "load_images",
    "load_model",
    "pca_1d",
    "patient_scores",
    "redness",
    "save_model",
    "train_autoencoder",
]

FEATURE_CHANNELS = 64  # channels of the encoder's last 4 x 4 feature map: 64 x 4 x 4 = 1024 (Schneider)
FEATURE_SIDE = 4
FEATURE_DIM = FEATURE_CHANNELS * FEATURE_SIDE * FEATURE_SIDE
_WEIGHTS_FORMAT = "synthtrial.ConvAutoencoder"


# ----------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and training settings; plain data (``dataclasses.asdict`` is JSON-able).

    The defaults are Schneider et al.'s: 256 px images, a 64-d embedding, MSE with Adam at lr 5e-5,
    batch 16. ``epochs`` and ``seed`` only affect training; ``image_size``, ``embedding_dim`` and
    ``base_channels`` define the network.
    """

    image_size: int = 256
    embedding_dim: int = 64
    base_channels: int = 16
    epochs: int = 10
    batch_size: int = 16
    lr: float = 5e-5
    seed: int = 0

    def __post_init__(self) -> None:
        def whole(name: str, minimum: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise SynthtrialError(f"autoencoder {name} must be a whole number >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))
            return int(value)

        size = whole("image_size", 16)
        if size & (size - 1):
            raise SynthtrialError(f"autoencoder image_size must be a power of two >= 16, got {size}")
        whole("embedding_dim", 1)
        whole("base_channels", 1)
        whole("epochs", 1)
        whole("batch_size", 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise SynthtrialError(f"autoencoder seed must be a whole number >= 0, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr) or lr <= 0:
            raise SynthtrialError(f"autoencoder lr must be a finite number > 0, got {lr!r}")
        object.__setattr__(self, "lr", float(lr))


def _architecture(config: AutoencoderConfig) -> tuple[int, int, int]:
    return config.image_size, config.embedding_dim, config.base_channels


# ------------------------------------------------------------------------------------------------ model

def _encoder_channels(config: AutoencoderConfig) -> list[int]:
    """Output channels of each stride-2 encoder block: base, 2*base, ... capped at 64; the last is 64."""
    stages = int(math.log2(config.image_size // FEATURE_SIDE))
    channels = [min(config.base_channels * 2 ** i, FEATURE_CHANNELS) for i in range(stages)]
    channels[-1] = FEATURE_CHANNELS
    return channels


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder with a sigmoid embedding (see the module docstring for the layers)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if not isinstance(config, AutoencoderConfig):
            raise TypeError(f"config must be an AutoencoderConfig, not {type(config).__name__}")
        self.config = config
        self.channels = tuple(_encoder_channels(config))
        self.feature_dim = FEATURE_DIM

        encoder: list[nn.Module] = []
        cin = 3
        for cout in self.channels:
            encoder += [nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True)]
            cin = cout
        self.encoder = nn.Sequential(*encoder)
        self.to_embedding = nn.Linear(FEATURE_DIM, config.embedding_dim)

        self.from_embedding = nn.Linear(config.embedding_dim, FEATURE_DIM)
        decoder: list[nn.Module] = []
        outs = list(reversed(self.channels[:-1])) + [3]
        cin = FEATURE_CHANNELS
        for i, cout in enumerate(outs):
            last = i == len(outs) - 1
            decoder += [nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1),
                        nn.Sigmoid() if last else nn.ReLU(inplace=True)]
            cin = cout
        self.decoder = nn.Sequential(*decoder)

    def _check(self, x: Tensor) -> None:
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise SynthtrialError(f"autoencoder expects images of shape (B, 3, {size}, {size}), got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """The flattened encoder feature, (B, 1024)."""
        self._check(x)
        return self.encoder(x).flatten(1)

    def encode_logits(self, x: Tensor) -> Tensor:
        """The bottleneck before its sigmoid, (B, embedding_dim), unbounded."""
        return self.to_embedding(self.features(x))

    def encode(self, x: Tensor) -> Tensor:
        """The embedding, (B, embedding_dim) in (0, 1)."""
        return torch.sigmoid(self.encode_logits(x))

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, 3, S, S) in (0, 1) from embeddings."""
        h = F.relu(self.from_embedding(z)).view(-1, FEATURE_CHANNELS, FEATURE_SIDE, FEATURE_SIDE)
        return self.decoder(h)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction, (B, 3, S, S) in (0, 1)."""
        return self.decode(self.encode(x))


# ----------------------------------------------------------------------------------------------- images

def load_images(paths: Sequence[Path], image_size: int, progress: ProgressCallback | None = None) -> torch.Tensor:
    """Read images as float32 RGB in [0, 1], shape (N, 3, S, S); ``progress(i, N, "")`` after each image.

    Each image is converted to RGB (alpha dropped, grey expanded) and resized to S x S with PIL's bicubic
    filter, which is antialiased when shrinking. A non-square image is stretched, not cropped (run
    directories hold square images). A file that cannot be read raises :class:`SynthtrialError` naming it.
    """
    size = int(image_size)
    if size < 1:
        raise SynthtrialError(f"image_size must be >= 1, got {image_size!r}")
    paths = list(paths)
    out = torch.empty((len(paths), 3, size, size), dtype=torch.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img.load()
                rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise SynthtrialError(f"{path}: cannot read image ({' '.join(str(exc).split()) or type(exc).__name__})") from exc
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(rgb, dtype=np.uint8)
        out[i] = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        if progress is not None:
            progress(i + 1, len(paths), "")
    return out


def _check_images(images: Tensor, config: AutoencoderConfig, what: str) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{what} needs a torch.Tensor, not {type(images).__name__}")
    size = config.image_size
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
        raise SynthtrialError(f"{what}: expected images of shape (N, 3, {size}, {size}), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise SynthtrialError(f"{what}: expected float images in [0, 1], got dtype {images.dtype}")


# --------------------------------------------------------------------------------------------- training

def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)`` for the block; the caller's CPU RNG state is restored afterwards.

    Only the CPU generator is forked: the weights are initialised on the CPU and nothing random runs on
    the GPU (no dropout), so CUDA generators are neither used nor touched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def train_autoencoder(images: torch.Tensor, config: AutoencoderConfig, *,
                      device: str | torch.device | None = None,
                      progress: ProgressCallback | None = None,
                      batch_progress: ProgressCallback | None = None,
                      ) -> tuple[ConvAutoencoder, list[float]]:
    """Train a fresh :class:`ConvAutoencoder` on ``images`` (N, 3, S, S) in [0, 1]; MSE, Adam(lr).

    Returns the model (in eval mode, on ``device``) and the per-epoch mean training loss (each batch's
    MSE weighted by its size, so the mean is over all images of the epoch, as the weights changed during
    it). ``device`` defaults to CUDA when available. ``progress(epoch, epochs, "loss ...")`` is called after
    each epoch, epochs counted from 1; ``batch_progress(batches, epochs x batches per epoch, "epoch E/N")``
    after each batch (a finer bar). ``images`` may live on the CPU (batches are copied to ``device``) or on
    ``device`` already. A non-finite loss raises :class:`SynthtrialError`.
    """
    if not isinstance(config, AutoencoderConfig):
        raise TypeError(f"config must be an AutoencoderConfig, not {type(config).__name__}")
    _check_images(images, config, "train_autoencoder")
    n = images.shape[0]
    if n == 0:
        raise SynthtrialError("train_autoencoder: no images to train on")
    dev = resolve_device(device)
    images = images.to(torch.float32) if images.dtype != torch.float32 else images
    pin = dev.type == "cuda" and images.device.type == "cpu"

    with _seeded(config.seed):
        model = ConvAutoencoder(config)
    model.to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    shuffle = torch.Generator(device="cpu")
    shuffle.manual_seed(config.seed)

    losses: list[float] = []
    per_epoch = -(-n // config.batch_size)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=shuffle)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for start in range(0, n, config.batch_size):
            index = order[start:start + config.batch_size]
            batch = images[index.to(images.device)]
            if pin:
                batch = batch.pin_memory()
            batch = batch.to(dev, non_blocking=True)
            with _autocast(dev):
                reconstruction = model(batch)
            loss = F.mse_loss(reconstruction.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().to(torch.float64) * len(index)
            if batch_progress is not None:
                batch_progress((epoch - 1) * per_epoch + start // config.batch_size + 1, config.epochs * per_epoch,
                               f"epoch {epoch}/{config.epochs}")
        mean = float(total.item()) / n
        if not math.isfinite(mean):
            raise SynthtrialError(f"autoencoder training diverged at epoch {epoch} (loss {mean}); "
                                  f"try a lower lr than {config.lr}")
        losses.append(mean)
        if progress is not None:
            progress(epoch, config.epochs, f"loss {mean:.5f}")
    model.eval()
    return model, losses


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


#: What :func:`embed` returns: Schneider's sigmoid embedding, or the bottleneck before the sigmoid.
EMBEDDINGS = ("sigmoid", "logits")


def embed(model: ConvAutoencoder, images: torch.Tensor, *, batch_size: int = 64,
          device: str | torch.device | None = None, kind: str = "sigmoid") -> np.ndarray:
    """Embeddings of ``images`` (N, 3, S, S): float32 array (N, embedding_dim).

    ``kind="sigmoid"`` is Schneider et al.'s embedding, in (0, 1). It saturates: after a few epochs most
    units sit near 0 or 1 and the images of a run differ by ~1e-4 there, so PCA reads float noise.
    ``kind="logits"`` returns the same bottleneck before the sigmoid, where those differences are not
    squashed (the sigmoid is monotone, so nothing else changes); ``synthtrial analyze`` uses it by default.

    Runs in eval mode without gradients and in float32 (no autocast), ``batch_size`` images at a time;
    the model's train/eval mode is restored afterwards. ``device`` defaults to the model's device; another
    device moves the model there (``nn.Module.to`` works in place). Each image's embedding depends on that
    image alone, so ``batch_size`` changes at most the float rounding (kernels block differently).
    """
    _check_images(images, model.config, "embed")
    if kind not in EMBEDDINGS:
        raise SynthtrialError(f"embed: kind must be one of {', '.join(EMBEDDINGS)}, got {kind!r}")
    if int(batch_size) < 1:
        raise SynthtrialError(f"embed: batch_size must be >= 1, got {batch_size!r}")
    dev = _model_device(model) if device is None else resolve_device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    out = np.empty((images.shape[0], model.config.embedding_dim), dtype=np.float32)
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], int(batch_size)):
                batch = images[start:start + int(batch_size)].to(dev, dtype=torch.float32)
                encoded = model.encode(batch) if kind == "sigmoid" else model.encode_logits(batch)
                out[start:start + batch.shape[0]] = encoded.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ persistence

def _config_path(path: Path) -> Path:
    config_path = path.with_suffix(".json")
    if config_path == path:
        raise SynthtrialError(f"{path}: the weights file cannot end in .json (the config is written beside it)")
    return config_path


def save_model(model: ConvAutoencoder, config: AutoencoderConfig, path: Path) -> None:
    """Write the weights to ``path`` (safetensors) and ``config`` as JSON to ``path.with_suffix('.json')``.

    Both files are written atomically. ``config`` must describe the model's architecture (image_size,
    embedding_dim, base_channels); its training fields are recorded as given.
    """
    path = Path(path)
    config_path = _config_path(path)
    if _architecture(config) != _architecture(model.config):
        raise SynthtrialError(f"save_model: config {_architecture(config)} (image_size, embedding_dim, base_channels) "
                              f"does not match the model's {_architecture(model.config)}")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": _WEIGHTS_FORMAT, "config": json.dumps(asdict(config), sort_keys=True)}
    write_bytes_atomic(path, save(tensors, metadata=metadata))
    write_text_atomic(config_path, json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")


def load_model(path: Path, device: str | torch.device | None = None) -> ConvAutoencoder:
    """Load a model written by :func:`save_model` (safetensors + JSON; never pickle), in eval mode.

    ``device`` defaults to CUDA when available. Missing, unreadable or mismatched files raise
    :class:`SynthtrialError` naming the file.
    """
    path = Path(path)
    config_path = _config_path(path)
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SynthtrialError(f"{config_path}: cannot read the autoencoder config ({exc})") from exc
    known = {f.name for f in fields(AutoencoderConfig)}
    if not isinstance(data, dict) or set(data) - known:
        extra = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
        raise SynthtrialError(f"{config_path}: not an autoencoder config (unexpected {extra})")
    config = AutoencoderConfig(**data)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise SynthtrialError(f"{path}: cannot read safetensors weights ({exc})") from exc
    model = ConvAutoencoder(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise SynthtrialError(f"{path}: weights do not fit the config in {config_path.name} ({reason})") from exc
    model.to(resolve_device(device))
    model.eval()
    return model


# -------------------------------------------------------------------------------------------------- PCA

@dataclass(frozen=True)
class PCA1D:
    """First principal component of a set of embeddings; ``scores = (X - mean) @ component``.

    ``component`` is the unit loading vector already oriented (see :func:`pca_1d`), ``mean`` the
    embeddings' mean, ``explained_variance_ratio`` the share of the total variance on the component.
    ``sign`` is +1 when the scores keep the canonical orientation (largest-|loading| coordinate
    positive) and -1 when ``align_with`` flipped it; without ``align_with`` it is always +1.
    """

    component: np.ndarray
    mean: np.ndarray
    explained_variance_ratio: float
    sign: int

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        """Scores of (other) embeddings on this component."""
        return (np.asarray(embeddings, dtype=np.float64) - self.mean) @ self.component


def pca_1d(embeddings: np.ndarray, align_with: np.ndarray | None = None) -> tuple[np.ndarray, PCA1D]:
    """Scores on the first principal component of ``embeddings`` (N, D), and the fitted :class:`PCA1D`.

    The component comes from numpy's SVD of the centred data (float64), as ``PCA(n_components=1)``.
    A principal component's sign is arbitrary (it even differs between LAPACK builds), so it is fixed:

    1. canonically, the coordinate with the largest absolute loading is made positive (ties: the first);
    2. if ``align_with`` (N,) is given — a label-free per-image quantity chosen by the caller, such as
       :func:`redness` — the scores are flipped when their covariance with it is negative, so that they grow
       with it. A zero covariance (or a constant ``align_with``) keeps the canonical orientation.

    Scores are float64 (N,). Fewer than two rows, non-finite values or embeddings without any variance
    raise :class:`SynthtrialError`.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise SynthtrialError(f"pca_1d needs embeddings of shape (N >= 2, D >= 1), got {x.shape}")
    if not np.isfinite(x).all():
        raise SynthtrialError("pca_1d: embeddings contain NaN or infinite values")
    mean = x.mean(axis=0)
    centred = x - mean
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    total = float(np.sum(singular ** 2))
    if not total > 0:
        raise SynthtrialError("pca_1d: all embeddings are identical (no variance to project)")
    component = vt[0].copy()
    top = int(np.argmax(np.abs(component)))
    if component[top] < 0:
        component = -component
    sign = 1
    scores = centred @ component
    if align_with is not None:
        a = np.asarray(align_with, dtype=np.float64).reshape(-1)
        if a.shape[0] != x.shape[0]:
            raise SynthtrialError(f"pca_1d: align_with has {a.shape[0]} values for {x.shape[0]} embeddings")
        if not np.isfinite(a).all():
            raise SynthtrialError("pca_1d: align_with contains NaN or infinite values")
        if float(np.dot(scores, a - a.mean())) < 0:
            sign = -1
            component = -component
            scores = -scores
    ratio = min(float(singular[0] ** 2) / total, 1.0)
    return scores, PCA1D(component=component, mean=mean, explained_variance_ratio=ratio, sign=sign)


def patient_scores(embeddings: np.ndarray, patients: np.ndarray, on_reference: np.ndarray,
                   lesion_count: np.ndarray) -> tuple[np.ndarray, dict]:
    """Per-patient first-component scores on a scale that neither the treatment nor red marks can bend.

    Each patient's embeddings (at least 3 images; fewer get NaN) go through :func:`pca_1d`. Then, using only
    the patient's **reference-arm images** (``on_reference``: untreated days, e.g. the baseline period):

    * **sign**: the scores are flipped when their covariance with ``lesion_count`` (active lesions, which do not
      count red marks) is negative there, so the score grows with the lesion count. Orienting by redness over
      all days followed the marks, which stay red after a lesion resolves and rise while lesions fall, and
      orienting on treated days would let the treatment choose the sign. Where the reference images leave the
      covariance 0 or undefined, the canonical orientation of :func:`pca_1d` is kept;
    * **origin**: the patient's mean score on its reference images (its mean over all images without them);
    * **unit**: the pooled within-patient SD of the reference images' scores over all patients (each about
      its own reference mean; ``n - 1`` df per patient). A patient's total SD includes its treatment effect,
      so dividing by it shrank the responders. Without two reference images anywhere the pooled SD over all
      images is used instead.

    Returns the scores (``len(patients)``) and a summary for ``pca.json``: the unit, which images it came from,
    and per patient the explained variance ratio and what set the sign.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    patients = np.asarray(patients).astype(str)
    on_reference = np.asarray(on_reference, dtype=bool)
    count = np.asarray(lesion_count, dtype=np.float64)
    scores = np.full(len(patients), np.nan)
    explained, signs = {}, {}
    for pid in dict.fromkeys(patients.tolist()):
        idx = np.flatnonzero(patients == pid)
        if idx.size < 3:
            continue
        s, pca = pca_1d(x[idx])
        ref = on_reference[idx] & np.isfinite(count[idx])
        covariance = float(np.dot(s[ref] - s[ref].mean(), count[idx][ref] - count[idx][ref].mean())) if ref.sum() > 1 \
            else 0.0
        if covariance < 0:
            s = -s
        signs[pid] = ("lesion count on reference days" if covariance != 0 else
                      "canonical (no lesion-count covariance on reference days)")
        scores[idx] = s - (s[on_reference[idx]].mean() if on_reference[idx].any() else s.mean())
        explained[pid] = round(float(pca.explained_variance_ratio), 4)
    unit, source = _pooled_sd(scores, patients, on_reference), "reference-arm images"
    if not unit > 0:
        unit, source = _pooled_sd(scores, patients, np.ones(len(patients), dtype=bool)), "all images"
    unit = unit if unit > 0 else 1.0
    return scores / unit, {"unit": unit, "unit_from": source, "explained_variance_ratio": explained, "sign": signs}


def _pooled_sd(scores: np.ndarray, patients: np.ndarray, use: np.ndarray) -> float:
    """Pooled within-patient SD of ``scores[use]`` (each patient about its own mean); NaN without df."""
    squares, df = 0.0, 0
    for pid in dict.fromkeys(patients.tolist()):
        own = scores[(patients == pid) & use]
        own = own[np.isfinite(own)]
        if own.size > 1:
            squares += float(np.sum((own - own.mean()) ** 2))
            df += own.size - 1
    return math.sqrt(squares / df) if df else float("nan")


# ---------------------------------------------------------------------------------------------- redness

_RGB_TO_XY = torch.tensor([[0.4124564, 0.3575761, 0.1804375],   # sRGB (D65) -> X
                           [0.2126729, 0.7151522, 0.0721750]],  # -> Y
                          dtype=torch.float64)
_WHITE = _RGB_TO_XY.sum(dim=1)  # X and Y of sRGB white (D65: 0.95047, 1.0), so that greys get a* = 0 exactly


def _lab_f(t: Tensor) -> Tensor:
    delta = 6.0 / 29.0
    return torch.where(t > delta ** 3, t.clamp_min(delta ** 3).pow(1.0 / 3.0), t / (3 * delta ** 2) + 4.0 / 29.0)


def redness(images: torch.Tensor) -> np.ndarray:
    """Mean CIELAB a* (D65, sRGB) over the central region of each image: float64 (N,).

    ``images`` is (N, 3, H, W) sRGB in [0, 1]. The central region is the middle half of the rows and of
    the columns (a quarter of the area: the mid-face in a framed portrait). a* is 0 for greys and grows
    as a colour turns from green to red (skin is roughly 10-20); acne's erythema raises it, so it serves
    as the label-free ``align_with`` of :func:`pca_1d`, orienting scores to grow with redness.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise SynthtrialError(f"redness expects images of shape (N, 3, H, W), got {shape}")
    h, w = images.shape[2], images.shape[3]
    top, left = h // 4, w // 4
    bottom, right = max(h - h // 4, top + 1), max(w - w // 4, left + 1)
    out = np.empty(images.shape[0], dtype=np.float64)
    for start in range(0, images.shape[0], 64):
        rgb = images[start:start + 64, :, top:bottom, left:right].to("cpu", torch.float64).clamp(0.0, 1.0)
        linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))
        xy = torch.einsum("kc,nchw->nkhw", _RGB_TO_XY, linear)
        a_star = 500.0 * (_lab_f(xy[:, 0] / _WHITE[0]) - _lab_f(xy[:, 1] / _WHITE[1]))
        out[start:start + rgb.shape[0]] = a_star.mean(dim=(1, 2)).numpy()
    return out
