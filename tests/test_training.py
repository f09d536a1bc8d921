"""The one training loop (synthtrial.util.training): a run interrupted and resumed ends with the same bytes as an
uninterrupted one even when every step draws from the global torch, NumPy and Python RNGs; the checkpoint is
safetensors + JSON only; other records, damaged checkpoints and impossible plans are refused in one line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from synthtrial.util.training import CHECKPOINT_DIR, Plan, TrainingError, train_loop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(out, steps=6, stop_at=None, record=None, restart=False, save_every=2):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def step(i):
        x = torch.randn(8, 4) + float(np.random.rand()) + random.random()   # every global RNG is drawn
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if stop_at is not None and i + 1 == stop_at:
            raise KeyboardInterrupt
        return {"loss": loss.item()}

    plan = Plan(steps, step, "toy", record or {"lr": 1e-2}, save_every=save_every, log_every=3,
                stateful={"scheduler": sched})
    result = train_loop(model, opt, plan, out, restart=restart)
    return model, result


def _bytes(model):
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def test_interrupted_and_resumed_gives_the_same_bytes(tmp_path):
    whole, result = _run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", stop_at=5)      # the checkpoint holds step 4, mid log window
    ckpt = tmp_path / "cut" / CHECKPOINT_DIR
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and len(state["window"]) == 1 and state["stateful"]["scheduler"]["last_epoch"] == 4
    resumed, again = _run(tmp_path / "cut")
    assert _bytes(resumed) == _bytes(whole)
    assert again["history"] == result["history"] and again["resumed_from"] == 4
    assert [h["step"] for h in result["history"]] == [3, 6]


def test_other_records_damaged_checkpoints_and_bad_plans_are_refused(tmp_path):
    _run(tmp_path / "a", steps=2)
    with pytest.raises(TrainingError, match=r"other settings or data \(lr\).*--restart"):
        _run(tmp_path / "a", steps=2, record={"lr": 5e-3})
    _run(tmp_path / "a", steps=2, record={"lr": 5e-3}, restart=True)       # --restart starts over
    with pytest.raises(TrainingError, match="past the 1 steps asked"):
        _run(tmp_path / "a", steps=1, record={"lr": 5e-3})
    tensors = tmp_path / "a" / CHECKPOINT_DIR / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\1\2\3\4")
    with pytest.raises(TrainingError, match="damaged checkpoint") as err:
        _run(tmp_path / "a", steps=2, record={"lr": 5e-3})
    assert "\n" not in str(err.value)
    with pytest.raises(TrainingError, match="steps must be an integer from 1"):
        _run(tmp_path / "b", steps=0)


def test_a_checkpoint_write_stopped_at_any_point_resumes_the_old_or_the_new_one(tmp_path, monkeypatch):
    from synthtrial.util import training

    _run(tmp_path / "a", steps=4, save_every=2)              # checkpoint at step 4
    ckpt = tmp_path / "a" / CHECKPOINT_DIR
    state = json.loads((ckpt / "state.json").read_text())
    # stopped after the new tensors, before the new state: the old pair is still whole
    (ckpt / "model.next.safetensors").write_bytes(b"half-written next tensors")
    assert training.read_checkpoint(ckpt, "toy", {"lr": 1e-2}).step == 4
    # stopped after the new state, before the rename: the next tensors are taken (and renamed)
    (ckpt / "model.safetensors").rename(ckpt / "model.next.safetensors")
    (ckpt / "model.safetensors").write_bytes(b"the old tensors")
    found = training.read_checkpoint(ckpt, "toy", {"lr": 1e-2})
    assert found.step == state["step"] and not (ckpt / "model.next.safetensors").exists()
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.json"}
