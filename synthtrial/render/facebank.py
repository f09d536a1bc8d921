"""A bank of synthetic base portraits, rendered text-to-image with SDXL and kept only when frontal.

``generate_face_bank(n, model, out_dir)`` renders portraits whose prompts vary age (20s..60s), sex,
Fitzpatrick skin type I-VI (as words: "very fair" .. "dark brown skin") and lighting, always as a
"frontal passport-style portrait photo, neutral expression, looking at the camera, plain background".
Attempt ``i`` draws its attributes and its diffusion seed from ``derived_rng(seed, "facebank", i)``, so
the prompts and images do not depend on how many attempts came before; skin types cycle with the
attempt index so even a small bank spans all six.

Frontal rule (MediaPipe face mesh via :class:`synthtrial.face.faces.LandmarkDetector`): an image is kept only if

* exactly one face is found;
* the eye line (centres of the two eyes, landmarks 33/133 and 362/263) is rolled less than
  ``MAX_ROLL_DEG`` = 10 degrees from horizontal;
* the nose tip (landmark 1), projected on the eye line, lies within ``MAX_NOSE_OFFSET`` = 15 % of the
  interocular distance from the eye midpoint (a turned head moves the nose towards one eye);
* the interocular distance is at least ``MIN_EYE_FRACTION`` = 8 % of the image width (a face, not a
  speck in the background).

Kept images are written as ``face_{k:04d}.png`` (k = 0, 1, ... in order kept) and ``faces.csv`` lists
file, prompt, seed, attempt and the attributes; both are written atomically and ``faces.csv`` is
rewritten after every kept face, so an interrupted run leaves a consistent folder. The folder is
accepted by :func:`synthtrial.face.faces.load_base_faces` (``--faces DIR``). A folder that already holds
``face_*.png`` files is refused rather than mixed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.util.atomic import write_bytes_atomic
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.device import resolve_device
from synthtrial.util.progress import ProgressCallback
from synthtrial.util.seeding import derived_rng

__all__ = [
    "AGES",
    "COLUMNS",
    "LIGHTING",
    "SKIN_WORDS",
    "FaceBankError",
    "face_prompt",
    "frontal_check",
    "generate_face_bank",
]

AGES = ("20s", "30s", "40s", "50s", "60s")
SEXES = ("woman", "man")
#: Fitzpatrick type -> how the prompt words it.
SKIN_WORDS = {1: "very fair", 2: "fair", 3: "medium", 4: "olive", 5: "brown", 6: "dark brown"}
LIGHTING = ("studio soft light", "window light", "overcast daylight", "ring light", "warm indoor light")
FIXED = "frontal passport-style portrait photo, neutral expression, looking at the camera, plain background"
NEGATIVE = "profile, turned head, tilted head, sunglasses, hat, hands, text, watermark, multiple people"
COLUMNS = ("file", "prompt", "seed", "attempt", "age", "sex", "fitzpatrick", "skin", "lighting",
           "roll_deg", "nose_offset", "eye_distance_px")

MAX_ROLL_DEG = 10.0
MAX_NOSE_OFFSET = 0.15
MIN_EYE_FRACTION = 0.08
RIGHT_EYE = (33, 133)   # subject's right eye (image left): outer, inner corner
LEFT_EYE = (362, 263)
NOSE_TIP = 1


class FaceBankError(SynthtrialError):
    """A face bank that cannot be generated (bad arguments, occupied folder, unloadable model)."""


def face_prompt(seed: int, attempt: int) -> tuple[str, dict[str, Any], int]:
    """The prompt, its attributes and the diffusion seed of one attempt (deterministic)."""
    rng = derived_rng(seed, "facebank", attempt)
    fitz = attempt % 6 + 1
    attrs = {"age": AGES[int(rng.integers(len(AGES)))], "sex": SEXES[int(rng.integers(len(SEXES)))],
             "fitzpatrick": fitz, "skin": SKIN_WORDS[fitz], "lighting": LIGHTING[int(rng.integers(len(LIGHTING)))]}
    prompt = (f"{FIXED}, a {attrs['sex']} in their {attrs['age']} with {attrs['skin']} skin "
              f"(Fitzpatrick type {'I II III IV V VI'.split()[fitz - 1]}), {attrs['lighting']}, "
              f"natural skin texture, sharp focus")
    return prompt, attrs, int(rng.integers(0, 2**31 - 1))




def frontal_check(landmarks: np.ndarray, width: int) -> tuple[bool, dict[str, float]]:
    """Whether one face's landmarks pass the frontal rule, and the measured values."""
    right = landmarks[list(RIGHT_EYE)].mean(axis=0)
    left = landmarks[list(LEFT_EYE)].mean(axis=0)
    axis = left - right
    dist = float(np.hypot(*axis))
    if dist <= 0:
        return False, {"roll_deg": float("nan"), "nose_offset": float("nan"), "eye_distance_px": 0.0}
    roll = math.degrees(math.atan2(axis[1], axis[0]))
    offset = float(np.dot(landmarks[NOSE_TIP] - (left + right) / 2, axis / dist) / dist)
    values = {"roll_deg": round(roll, 3), "nose_offset": round(offset, 4), "eye_distance_px": round(dist, 2)}
    ok = abs(roll) < MAX_ROLL_DEG and abs(offset) <= MAX_NOSE_OFFSET and dist >= MIN_EYE_FRACTION * width
    return ok, values


def _sdxl_source(model: str, size: int, steps: int, guidance: float) -> tuple[Callable, Any]:
    """A ``(prompt, generator) -> PIL.Image`` over StableDiffusionXLPipeline, and the device."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from synthtrial.render.diffusion import check_model

    check_model(model, "model")
    device = resolve_device(None)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float16 if device.type == "cuda"
                                                         else torch.float32,
                                                         use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FaceBankError(f"model {model}: not a loadable diffusers SDXL model ({type(exc).__name__}: {exc})"
                            .splitlines()[0]) from None
    pipe = pipe.to(device)
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)

    def source(prompt: str, generator: Any):
        with torch.inference_mode():
            return pipe(prompt=prompt, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                        guidance_scale=guidance, generator=generator).images[0]

    return source, device


def generate_face_bank(n: int, model: str, out_dir: Path, *, seed: int = 0, size: int = 1024, steps: int = 30,
                       guidance: float = 7.0, max_tries: int | None = None,
                       progress: ProgressCallback | None = None,
                       pipeline: Callable[[str, Any], Any] | None = None) -> pd.DataFrame:
    """Render up to ``n`` frontal synthetic portraits into ``out_dir``; returns the ``faces.csv`` table.

    ``model`` is a hub id or local diffusers SDXL folder (ignored when ``pipeline`` is given).

    Stops after ``n`` kept faces or ``max_tries`` attempts (default ``4 * n``). ``pipeline`` replaces the
    SDXL text-to-image source with any ``(prompt, generator) -> PIL.Image`` (tests, other models); the
    generator is a ``torch.Generator`` seeded with the attempt's seed. ``progress(attempts, max_tries, "N kept")`` is
    called after every attempt.
    """
    import torch
    from PIL import Image

    from synthtrial.face.faces import LandmarkDetector

    if int(n) < 1:
        raise FaceBankError(f"n must be at least 1, got {n}")
    max_tries = 4 * int(n) if max_tries is None else int(max_tries)
    if max_tries < 1:
        raise FaceBankError(f"max_tries must be at least 1, got {max_tries}")
    if int(size) < 64 or int(size) % 8:
        raise FaceBankError(f"size must be a multiple of 8 and at least 64, got {size}")
    if pipeline is None:
        from synthtrial.render.diffusion import check_model

        check_model(model, "model")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FaceBankError(f"{out_dir}: not a folder")
    if out_dir.is_dir() and any(out_dir.glob("face_*.png")):
        raise FaceBankError(f"{out_dir}: already holds face_*.png files; choose an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    device = torch.device("cpu")
    if pipeline is None:
        pipeline, device = _sdxl_source(model, int(size), int(steps), float(guidance))
    detector = LandmarkDetector()
    rows: list[dict[str, Any]] = []
    _write_table(out_dir, rows)
    try:
        for attempt in range(max_tries):
            if len(rows) >= n:
                break
            prompt, attrs, image_seed = face_prompt(seed, attempt)
            generator = torch.Generator(device=device).manual_seed(image_seed)
            image = np.asarray(pipeline(prompt, generator).convert("RGB"))
            faces = detector.faces(image) if min(image.shape[:2]) >= 64 else []
            if len(faces) == 1:
                ok, values = frontal_check(faces[0], image.shape[1])
                if ok:
                    name = f"face_{len(rows):04d}.png"
                    buf = io.BytesIO()
                    Image.fromarray(image).save(buf, format="PNG")
                    write_bytes_atomic(out_dir / name, buf.getvalue())
                    rows.append({"file": name, "prompt": prompt, "seed": image_seed, "attempt": attempt,
                                 **attrs, **values})
                    _write_table(out_dir, rows)
            if progress is not None:
                progress(attempt + 1, max_tries, f"{len(rows)} kept")
    finally:
        detector.close()
    return _table(rows)


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _write_table(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    write_bytes_atomic(out_dir / "faces.csv", _table(rows).to_csv(index=False).encode("utf-8"))
