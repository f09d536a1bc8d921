"""One device resolver for every stage: the torch device a command runs on.

``None`` means CUDA when this machine has it, else the CPU; a name given is checked (a torch device, of a
kind this machine has, cpu or cuda) and refused with one line naming the option.
"""

from __future__ import annotations

from typing import Any

from synthtrial.util.errors import SynthtrialError


class DeviceError(SynthtrialError):
    """A device that is not a torch device, or not one this machine has."""


def resolve_device(device: Any = None, *, option: str = "--device") -> Any:
    """A ``torch.device``: ``device`` as given (checked), else CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{option} '{device}' is not a torch device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{option} {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"{option} {device}: only cpu and cuda are supported")
    return dev
