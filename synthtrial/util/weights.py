"""Weights and models from disk or the hub: safetensors only, and never foreign code.

One owner for the rules every loader follows (the diffusion backends, fine-tuning, the face bank, the
graders):

* tensors are read with ``safetensors`` only; a file that is really a pickle (``torch.save``) is refused by
  its first bytes with a one-line error, before any library sees it;
* a model folder whose component holds only pickled weights (``.bin``, ``.pt``, ``.ckpt``) is refused, and
  every ``from_pretrained`` passes ``use_safetensors=True``;
* a folder whose configs name custom code (``auto_map``) is refused, and every tokenizer is loaded with
  ``trust_remote_code=False`` (transformers would otherwise prompt ``[y/N]`` and run that code);
* a model string that is not a local folder must be a hub id; when the hub cannot be reached (offline, or
  ``HF_HUB_OFFLINE=1``) that is said at once instead of after the hub client's retries.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from synthtrial.util.errors import SynthtrialError, one_line

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Components of a diffusers model folder that hold weights.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "transformer", "safety_checker")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class WeightsError(SynthtrialError):
    """Weights or a model that synthtrial refuses to load (pickles, custom code, unreachable hub)."""


def is_pickle(path: Path) -> bool:
    """True when a file starts like a pickle or a ``torch.save`` zip archive (and not like safetensors: an
    8-byte little-endian header length, then the JSON header's ``{``; a header of 128 + 256 k bytes starts
    with the byte a pickle starts with)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head[:1] == b"\x80" or head[:2] == b"PK"


def load_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file; a one-line error for a pickle or a damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if is_pickle(path):
        raise WeightsError(f"{path}: is a pickled (torch.save) checkpoint, not safetensors; refusing to load it")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: is not a valid safetensors file ({one_line(exc)})") from None


def _names_custom_code(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("auto_map"))


def check_model_folder(folder: str | os.PathLike[str], what: str = "model") -> Path:
    """Refuse a model folder that would need pickles or custom code; return it as a Path."""
    folder = Path(folder).expanduser()
    for config in sorted(folder.rglob("*.json")):
        if _names_custom_code(config):
            raise WeightsError(f"{what} {folder}: {config.relative_to(folder)} names custom code (auto_map); "
                               "synthtrial never runs code shipped with a model")
    for part in [folder, *(folder / c for c in WEIGHT_COMPONENTS)]:
        if not part.is_dir():
            continue
        files = [p for p in part.iterdir() if p.is_file()]
        pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise WeightsError(f"{what} {folder}: {part.relative_to(folder) if part != folder else '.'} holds only "
                               f"pickled weights ({pickles[0]}); convert them to safetensors")
        for p in files:
            if p.suffix == ".safetensors" and is_pickle(p):
                raise WeightsError(f"{what} {folder}: {p.relative_to(folder)} is a pickle named .safetensors; "
                                   "refusing to load it")
    return folder


def resolve_model(value: str, what: str = "model") -> str:
    """A local model folder (checked by :func:`check_model_folder`) or a reachable hub id; one-line errors."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{what} {value}: not a folder (expected a diffusers model folder or a hub id)")
        return str(check_model_folder(path, what))
    if value.startswith((".", "/", "~")) or "\\" in value or not HUB_ID.fullmatch(value):
        raise WeightsError(f"{what} {value}: no such folder; the folder does not exist (nothing is downloaded "
                           "unless a hub id such as stabilityai/stable-diffusion-xl-base-1.0 is given)")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise WeightsError(f"{what} {value}: not a local folder, and the hub is offline (HF_HUB_OFFLINE=1)")
    try:
        from huggingface_hub import model_info

        model_info(value, timeout=10)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise WeightsError(f"{what} {value}: not a local folder, and the hub is unreachable or does not have it "
                           f"({one_line(exc)})") from None
    return value
