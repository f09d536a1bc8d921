"""One training loop for every learned model (the graders, the diffusion LoRA): seeded, checkpointed, resumable.

Choices, stated once:

* **The loop** counts optimiser steps. The caller's ``step(i) -> {name: value}`` runs step ``i`` (its batch
  drawn however it likes) and returns the scalars to log (``loss`` at least). Every ``log_every`` steps the
  means of those scalars become one history entry (plus whatever ``summarize(step)`` adds: validation
  metrics, say); every ``save_every`` steps, and at the last, a checkpoint is written.
* **One checkpoint format**, in ``OUT/checkpoint/``: ``model.safetensors`` holds every tensor (the model's
  ``model.*``, the optimiser state ``optimizer.<param>.<key>``, the torch RNG ``rng.torch`` and
  ``rng.cuda.<i>``) and ``state.json`` the rest: the step, the run's ``record`` (data and settings), the
  history and the unfinished log window, the optimiser's param groups and scalar state, the state of every
  other stateful object (LR scheduler, grad scaler), NumPy's and Python's global RNG states and the SHA-256
  of the tensors file. Nothing is pickled. A checkpoint is replaced in three atomic steps: the new tensors
  beside the old (``model.next.safetensors``), the new ``state.json``, then the rename; whenever the writer is
  stopped, the state on disk names tensors that are there, so the old or the new checkpoint is resumed.
* **Resuming** restores all of it, so an interrupted run, resumed, ends with the same bytes as an
  uninterrupted one. A checkpoint written for another ``record`` is refused (one line, naming ``--restart``);
  ``restart=True`` removes the checkpoint and starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.errors import SynthtrialError, one_line
from synthtrial.util.progress import ProgressCallback

CHECKPOINT_DIR = "checkpoint"
TENSORS_FILE = "model.safetensors"
NEXT_TENSORS_FILE = "model.next.safetensors"
STATE_FILE = "state.json"
#: the most optimiser steps one training may plan (a guard against a typo's hours of work)
MAX_STEPS = 10_000_000


class TrainingError(SynthtrialError):
    """A training that cannot start or resume as asked."""


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data (tuples as lists, 0-d tensors and NumPy scalars as numbers)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} as JSON")


# ------------------------------------------------------------------------------------------------ RNG

def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """The global RNG states: ``(tensors, json)`` (torch CPU and CUDA as tensors, NumPy and Python as JSON)."""
    import torch

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, keys, gauss = random.getstate()
    return tensors, {"numpy": jsonable(np.random.get_state(legacy=False)),
                     "python": [version, list(keys), gauss]}


def restore_rng(tensors: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Put back what :func:`rng_state` returned."""
    import torch

    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    np.random.set_state(state["numpy"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))


# ------------------------------------------------------------------------------------------ optimizer

def optimizer_state(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimiser's ``state_dict`` as ``(tensors, json)``: moments as tensors, the rest as JSON."""
    import torch

    full = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in full["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach()
            else:
                scalars[f"{index}.{key}"] = jsonable(value)
    return tensors, {"scalars": scalars, "param_groups": jsonable(full["param_groups"])}


def restore_optimizer(optimizer: Any, tensors: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Put back what :func:`optimizer_state` returned."""
    entries: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            entries.setdefault(int(index), {})[key] = value
    for name, value in saved["scalars"].items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
              for group in saved["param_groups"]]          # JSON lists back to tuples (Adam's betas)
    optimizer.load_state_dict({"state": entries, "param_groups": groups})


# ---------------------------------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    """What a checkpoint holds once read: its step, the model's tensors and the JSON state."""

    step: int
    model: dict[str, Any]
    tensors: dict[str, Any]
    state: dict[str, Any]


def save_checkpoint(folder: Path, *, step: int, model: Mapping[str, Any], optimizer: Any, record: Any,
                    kind: str, stateful: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/state.json`` (see the module docstring)."""
    from safetensors.torch import save

    opt_tensors, opt_json = optimizer_state(optimizer)
    rng_tensors, rng_json = rng_state()
    tensors = {**{f"model.{k}": v for k, v in model.items()}, **opt_tensors, **rng_tensors}
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    write_bytes_atomic(folder / NEXT_TENSORS_FILE, data)
    state = {"kind": kind, "step": step, "record": jsonable(record), "optimizer": opt_json, "rng": rng_json,
             "stateful": {k: jsonable(v.state_dict()) for k, v in (stateful or {}).items() if v is not None},
             **jsonable(dict(extra or {})), "tensors_sha256": hashlib.sha256(data).hexdigest()}
    write_text_atomic(folder / STATE_FILE, json.dumps(state, indent=1) + "\n")
    os.replace(folder / NEXT_TENSORS_FILE, folder / TENSORS_FILE)
    return folder


def read_checkpoint(folder: Path, kind: str, record: Any) -> Checkpoint | None:
    """The checkpoint in ``folder`` (None when there is none); one-line errors for a damaged one or one of
    another kind or record."""
    from synthtrial.util.weights import WeightsError, load_safetensors

    state_file, tensors_file = folder / STATE_FILE, folder / TENSORS_FILE
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{folder}: unreadable checkpoint ({one_line(exc)}); pass --restart to start over") \
            from None
    wanted = state.get("tensors_sha256") if isinstance(state, dict) else None
    for candidate in (tensors_file, folder / NEXT_TENSORS_FILE):     # stopped before the rename: the next one
        if candidate.is_file() and hashlib.sha256(candidate.read_bytes()).hexdigest() == wanted:
            if candidate != tensors_file:
                os.replace(candidate, tensors_file)
            break
    else:
        raise TrainingError(f"{folder}: damaged checkpoint ({STATE_FILE} does not match {TENSORS_FILE}); "
                            "pass --restart to start over")
    if state.get("kind") != kind:
        raise TrainingError(f"{folder}: holds a checkpoint of {state.get('kind')!r}, not {kind!r}; use another "
                            "--out or pass --restart")
    saved, wanted = state.get("record"), jsonable(record)
    if saved != wanted:
        names = sorted(k for k in {*saved, *wanted} if saved.get(k) != wanted.get(k)) \
            if isinstance(saved, dict) and isinstance(wanted, dict) else []
        which = f" ({', '.join(names)})" if names else ""
        raise TrainingError(f"{folder}: was written by a training with other settings or data{which}; pass "
                            "--restart to start over (or use another --out)")
    try:
        tensors = load_safetensors(tensors_file)
    except WeightsError as exc:
        raise TrainingError(f"{exc}; pass --restart to start over") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return Checkpoint(int(state["step"]), model, tensors, state)


# ----------------------------------------------------------------------------------------------- loop

@dataclass
class Plan:
    """What :func:`train_loop` runs: the steps, how often to log and save, and the run's identity."""

    steps: int
    #: ``step(i) -> {name: float}`` runs optimiser step ``i`` (0-based); ``loss`` is required
    step: Callable[[int], Mapping[str, float]]
    kind: str                            # what is trained (a grader's name, "lora")
    record: Any                          # data and settings: a checkpoint of another record is refused
    save_every: int = 1
    log_every: int = 1
    #: extra history fields after a log window ends at ``step`` (1-based), e.g. validation metrics
    summarize: Callable[[int], Mapping[str, Any]] | None = None
    #: objects with ``state_dict`` / ``load_state_dict`` kept in the checkpoint (LR scheduler, grad scaler)
    stateful: dict[str, Any] = field(default_factory=dict)
    #: the model's tensors and how to put them back (default: ``model.state_dict`` / ``load_state_dict``)
    get_model: Callable[[], Mapping[str, Any]] | None = None
    set_model: Callable[[Mapping[str, Any]], None] | None = None


def _check_plan(plan: Plan) -> None:
    for name in ("steps", "save_every", "log_every"):
        value = getattr(plan, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEPS:
            raise TrainingError(f"training {name} must be an integer from 1 to {MAX_STEPS:,}, got {value!r}")


def train_loop(model: Any, optimizer: Any, plan: Plan, out: Path, *, restart: bool = False,
               progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run ``plan`` on ``model`` with ``optimizer``, checkpointing to ``out/checkpoint``; resume from it.

    Returns ``{"steps", "history", "resumed_from"}``. ``progress(step, steps, "loss ...")`` is called after every step.
    """
    _check_plan(plan)
    folder = Path(out) / CHECKPOINT_DIR
    get_model = plan.get_model or model.state_dict
    set_model = plan.set_model or model.load_state_dict
    if restart:
        shutil.rmtree(folder, ignore_errors=True)
    start, history, window = 0, [], []
    found = read_checkpoint(folder, plan.kind, plan.record)
    if found is not None:
        if found.step > plan.steps:
            raise TrainingError(f"{folder}: the checkpoint is at step {found.step}, past the {plan.steps} steps asked; "
                                "pass --restart to start over")
        try:
            set_model(found.model)
        except RuntimeError as exc:
            raise TrainingError(f"{folder}: checkpoint does not fit this model ({one_line(exc)}); pass --restart "
                                "to start over") from None
        restore_optimizer(optimizer, found.tensors, found.state["optimizer"])
        for name, obj in plan.stateful.items():
            if obj is not None and name in found.state["stateful"]:
                obj.load_state_dict(found.state["stateful"][name])
        restore_rng(found.tensors, found.state["rng"])
        start, history, window = found.step, list(found.state["history"]), list(found.state["window"])
    for step in range(start, plan.steps):
        values = {k: float(v) for k, v in plan.step(step).items()}
        if not math.isfinite(values["loss"]):
            raise TrainingError(f"{plan.kind} training diverged at step {step + 1} (loss {values['loss']}); "
                                "lower the learning rate")
        window.append(values)
        done = step + 1
        if done % plan.log_every == 0 or done == plan.steps:
            entry = {"step": done, **{k: float(np.mean([w[k] for w in window])) for k in window[0]}}
            history.append({**entry, **(plan.summarize(done) if plan.summarize is not None else {})})
            window = []
        if done % plan.save_every == 0 or done == plan.steps:
            save_checkpoint(folder, step=done, model=get_model(), optimizer=optimizer, record=plan.record,
                            kind=plan.kind, stateful=plan.stateful, extra={"history": history, "window": window})
        if progress is not None:
            progress(done, plan.steps, f"loss {values['loss']:.4f}")
    return {"steps": plan.steps, "history": history, "resumed_from": start or None}
