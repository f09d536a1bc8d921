"""DermX+ training's live-map term and fine-tuning from saved weights (synthtrial.graders.dermx_train)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.graders.base import GraderError
from synthtrial.graders.dermx import CHARACTERISTICS, DermXConfig, DermXNet
from synthtrial.graders.dermx_train import DermXData, attention_loss, live_map_loss, pack_areas, train_dermx

PAPULE = CHARACTERISTICS.index("papule")


def test_live_map_loss_by_hand():
    """ReLU(0.1 - peak / max|map|) on the area's cells, averaged over the present pairs whose area is on the grid."""
    maps = torch.tensor([[[[-1.0, -2.0], [-3.0, -4.0]],      # dead: peak on the area -2, scale 4 -> 0.6
                          [[-1.0, 2.0], [-3.0, -4.0]],       # peak on its area half the scale -> 0
                          [[-1.0, -1.0], [-1.0, -1.0]],      # not present: left out
                          [[-5.0, -1.0], [-1.0, -1.0]]]])    # present, but no area cell on the grid: left out
    targets = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]],
                             [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    present = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    assert live_map_loss(maps, targets, present).item() == pytest.approx(0.3)
    maps[0, 1, 0, 1] = 0.2                                   # a twentieth of the scale: short of the margin by 0.05
    assert live_map_loss(maps, targets, present).item() == pytest.approx((0.6 + 0.05) / 2)
    assert live_map_loss(maps, targets, torch.zeros(1, 4)).item() == 0.0


def _dead_papule_net() -> DermXNet:
    """A network whose papule head speaks against the papule through every channel: the Grad-CAM map of the
    papule (ReLU of a sum of non-negative features with negative weights) is 0 on every cell of every image."""
    torch.manual_seed(0)
    net = DermXNet(DermXConfig(image_size=64)).eval()
    first, last = net.char_head[1], net.char_head[4]
    with torch.no_grad():
        first.weight.copy_(torch.eye(64)), first.bias.fill_(1.0)
        last.weight[PAPULE] = -1.0
    return net


def test_live_maps_revive_a_dead_map_that_the_dice_loss_cannot():
    image = torch.rand(1, 3, 64, 64)
    area = torch.zeros(1, len(CHARACTERISTICS), 8, 8)
    area[0, PAPULE, 2:4, 5:7] = 1.0
    present = torch.zeros(1, len(CHARACTERISTICS))
    present[0, PAPULE] = 1.0

    def attention(net, live):
        feats = net.features(image)
        _, _, dice, alive = attention_loss(net, feats, area, present, live)
        assert (alive is None) == (not live)
        return (dice + alive if live else dice), net.heads_with_cams(feats, relu=False)[2]

    net = _dead_papule_net()
    loss, maps = attention(net, live=False)
    assert maps.shape[-2:] == area.shape[-2:] and (maps[0, PAPULE] < 0).all()      # dead on every cell
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in net.parameters())      # Dice: no gradient at all
    net = _dead_papule_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        loss, maps = attention(net, live=True)
        if (maps[0, PAPULE][area[0, PAPULE] > 0] > 0).any():
            break
        loss.backward()
        opt.step()
    assert (maps[0, PAPULE][area[0, PAPULE] > 0] > 0).any(), "the papule map is still 0 on its area"
    loss, maps = attention(net, live=False)
    loss.backward()                                   # alive: the Dice loss has a gradient again
    assert any(p.grad is not None and p.grad.any() for p in net.parameters())


def _toy(n: int = 8, side: int = 64) -> DermXData:
    rng = np.random.default_rng(4)
    images = rng.integers(120, 220, (n, side, side, 3), dtype=np.uint8)
    masks = np.zeros((n, len(CHARACTERISTICS), side, side), bool)
    present = np.zeros((n, len(CHARACTERISTICS)), np.float32)
    for i in range(0, n, 2):
        images[i, 20:30, 30:40] = (170, 40, 50)
        masks[i, PAPULE, 20:30, 30:40] = True
        present[i, PAPULE] = 1.0
    return DermXData(images, np.arange(n) % 2, present, pack_areas(masks))


def test_fine_tuning_starts_from_the_given_weights_and_refuses_another_network(tmp_path):
    """At learning rate 0 a fine-tune keeps every trained parameter of its start (BatchNorm's running statistics
    still move); the start's hash is recorded; a start of another input size is refused naming the field, by the
    function and by the command before anything is read or written; --live-maps needs --guided."""
    data = _toy()
    kw = dict(epochs=1, batch_size=4, image_size=64, device="cpu", augment=False)
    start = train_dermx(data, tmp_path / "start", guided=True, lr=1e-2, **kw)
    tuned = train_dermx(data, tmp_path / "tuned", guided=True, live_maps=True, lr=0.0, init=tmp_path / "start", **kw)
    before = load_file(tmp_path / "start" / "model.safetensors")
    after = load_file(tmp_path / "tuned" / "model.safetensors")
    params = {k for k, _ in start.model.named_parameters()}
    assert params and all(torch.equal(before[k], after[k]) for k in params)
    assert tuned.record["settings"]["init"]["from"] == str(tmp_path / "start")
    assert len(tuned.record["settings"]["init"]["weights_sha256"]) == 64 and tuned.record["settings"]["live_maps"]
    assert all(0 <= h["live"] <= 1 + 0.1 for h in tuned.record["loss_history"])
    assert "live" not in start.record["loss_history"][0] and "live_maps" not in start.record["settings"]
    fresh = train_dermx(data, tmp_path / "fresh", guided=True, lr=0.0, seed=1, **kw)
    assert not all(torch.equal(before[k], v) for k, v in load_file(tmp_path / "fresh" / "model.safetensors").items()
                   if k in params)
    with pytest.raises(GraderError, match=r"--init .*image_size \(64 there, 128 here\)"):
        train_dermx(data, tmp_path / "big", init=tmp_path / "start", **{**kw, "image_size": 128})
    with pytest.raises(GraderError, match="add --guided"):
        train_dermx(data, tmp_path / "unguided", live_maps=True, **kw)


@pytest.mark.parametrize("extra, message", [(["--image-size", "128"], "image_size (64 there, 128 here)"),
                                            (["--image-size", "64", "--live-maps"], "add --guided")])
def test_the_command_refuses_a_foreign_start_or_live_maps_without_guidance(tmp_path, extra, message):
    train_dermx(_toy(), tmp_path / "start", epochs=1, batch_size=4, image_size=64, device="cpu", augment=False)
    (tmp_path / "data").mkdir()        # never read: the options are refused first
    result = CliRunner().invoke(app, ["graders", "train", "dermx", "--data", str(tmp_path / "data"), "--out",
                                      str(tmp_path / "w"), "--init", str(tmp_path / "start"), *extra, "-q"])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
