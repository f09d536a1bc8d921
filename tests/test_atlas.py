"""The lesion atlas: every type x stage x skin is drawn, at the stated sizes, and written atomically."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from synthtrial.render.atlas import (ATLAS_DIAMETER_MM, SKINS, STAGES, AtlasError, render_atlas, skin_swatch,
                              write_atlas)
from synthtrial.lesions.course import ACTIVE_TYPES, DIAMETER_MM

MM = 0.16   # a coarse atlas keeps the tests fast (80 px tiles)


@pytest.fixture(scope="module")
def atlas():
    return render_atlas(mm_per_px=MM)


def test_every_type_stage_and_skin_is_drawn(atlas):
    cells = atlas.cells
    assert len(cells) == len(ACTIVE_TYPES) * len(STAGES) * len(SKINS)
    assert set(map(tuple, cells[["skin", "type", "stage"]].to_numpy())) == {
        (s, t, g) for s in SKINS for t in ACTIVE_TYPES for g in STAGES}
    drawn = cells[cells["drawn"] != ""]
    assert (drawn["changed_px"] > 0).all()                          # every drawn lesion changed its tile
    # residual stages: inflamed lesions leave marks (nodules a scar too), comedones clear
    res = cells[cells["stage"] == "residual"].set_index(["skin", "type"])["drawn"]
    for skin in SKINS:
        assert res[(skin, "papule")] == "mark" and res[(skin, "pustule")] == "mark"
        assert res[(skin, "nodule")] == "mark+scar"
        assert res[(skin, "open_comedo")] == "" and res[(skin, "closed_comedo")] == ""
    assert (cells[cells["drawn"] == ""]["changed_px"] == 0).all()
    active = cells[cells["stage"] == "active"]
    assert (active["drawn"] == active["type"]).all()


def test_sizes_are_in_the_lesion_model_ranges_and_stages_differ(atlas):
    for kind, d in ATLAS_DIAMETER_MM.items():
        lo, hi = DIAMETER_MM[kind]
        assert lo <= d <= hi
    cells = atlas.cells.set_index(["skin", "type", "stage"])
    for skin in SKINS:
        for kind in ACTIVE_TYPES:
            active = cells.loc[(skin, kind, "active")]
            assert active["radius_px"] * 2 * MM == pytest.approx(ATLAS_DIAMETER_MM[kind], rel=1e-6)
            # growing and fading lesions are smaller and fainter than at their peak
            assert cells.loc[(skin, kind, "onset"), "changed_px"] < active["changed_px"]
            assert cells.loc[(skin, kind, "resolving"), "changed_px"] < active["changed_px"]


def test_tiles_sit_on_their_skin_and_skins_differ(atlas):
    lightness = {}
    for skin in SKINS:
        sw = skin_swatch(skin, 64, mm_per_px=MM)
        lightness[skin] = sw.mean()
    assert lightness["light"] > lightness["medium"] > lightness["dark"]
    # a tile's corner (away from its lesion) is its skin swatch's colour
    cells = atlas.cells
    row = cells[(cells["skin"] == "dark") & (cells["stage"] == "active")].iloc[0]
    corner = atlas.image[row.y:row.y + 8, row.x:row.x + 8].mean()
    assert abs(corner - lightness["dark"]) < 15


def test_same_seed_same_bytes(atlas):
    again = render_atlas(mm_per_px=MM)
    assert np.array_equal(again.image, atlas.image)


def test_write_atlas_and_bad_output(tmp_path):
    path = write_atlas(tmp_path / "a.jpg", mm_per_px=MM)
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.size == (path.image.shape[1], path.image.shape[0])
    with pytest.raises(AtlasError, match=r"\.gif.*--out"):
        write_atlas(tmp_path / "a.gif", mm_per_px=MM)
    with pytest.raises(AtlasError, match="no such folder"):
        write_atlas(tmp_path / "missing" / "a.png", mm_per_px=MM)
    with pytest.raises(AtlasError, match="mm_per_px"):
        render_atlas(mm_per_px=5.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]   # nothing half-written


def test_cli_atlas(tmp_path):
    out = tmp_path / "atlas.png"
    run = subprocess.run([sys.executable, "-m", "synthtrial", "atlas", "--out", str(out), "--mm-per-px", "0.2"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and "60 tiles" in " ".join(run.stdout.split())
    bad = subprocess.run([sys.executable, "-m", "synthtrial", "atlas", "--out", str(tmp_path / "x.bmp")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "x.bmp" in bad.stderr
