"""Contact sheets: the series grid per patient, and the day-by-day view triplets when a run has side views."""

import io

import numpy as np
import pandas as pd
from PIL import Image

from synthtrial.run.grids import TRIPLET_THUMB, VIEW_ORDER, write_grids


def _fake_run(tmp_path, views):
    rows = []
    for day in (1, 2):
        for k, view in enumerate(views):
            rel = f"images/p/p_d{day:03d}_{view}.png"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            colour = (40 * (k + 1), 100, 50 * day)
            Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(tmp_path / rel)
            rows.append({"image": rel, "patient_id": "p", "day": day, "date": pd.NaT, "view": view,
                         "treatment": "A", "severity": 1.0, "lesion_count": 3, "iga": 2})
    return pd.DataFrame(rows)


def test_frontal_only_runs_get_one_sheet_per_patient(tmp_path):
    manifest = _fake_run(tmp_path, ["frontal"])
    paths = write_grids(tmp_path, manifest)
    assert [p.name for p in paths] == ["p.jpg"]


def test_side_views_get_a_triplet_sheet_in_left_frontal_right_order(tmp_path):
    manifest = _fake_run(tmp_path, ["right", "frontal", "left"])
    paths = write_grids(tmp_path, manifest)
    assert [p.name for p in paths] == ["p.jpg", "p_views.jpg"]
    with Image.open(paths[1]) as im:
        sheet = np.asarray(im.convert("RGB")).astype(int)
    assert sheet.shape[1] == 3 * TRIPLET_THUMB and sheet.shape[0] > 2 * TRIPLET_THUMB
    # each column holds its view (colours were set per view), whatever the manifest's order
    for k, view in enumerate(["right", "frontal", "left"]):
        col = VIEW_ORDER.index(view)
        centre = sheet[TRIPLET_THUMB // 2, col * TRIPLET_THUMB + TRIPLET_THUMB // 2]
        assert abs(centre[0] - 40 * (k + 1)) < 8, (view, centre)
