"""Contact sheets: one JPEG per patient showing the whole series, labelled, to look at a run at a glance; and
for patients photographed from the sides, a triplet sheet (left, frontal, right: one row per day), the views
an IGA grader reads together."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd

from synthtrial.run.rundir import GRIDS
from synthtrial.util.atomic import write_bytes_atomic

COLUMNS = 7            # a week per row for daily series
THUMB = 160


def contact_sheet(run_dir: Path, rows: pd.DataFrame, columns: int = COLUMNS, thumb: int = THUMB) -> bytes:
    """JPEG bytes of a labelled grid of the images in ``rows`` (in order)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_h = 26
    n = len(rows)
    cols = max(1, min(columns, n))
    grid_rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * thumb, grid_rows * (thumb + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, rec in enumerate(rows.itertuples(index=False)):
        x, y = (i % cols) * thumb, (i // cols) * (thumb + label_h)
        with Image.open(run_dir / rec.image) as im:
            sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS), (x, y))
        when = rec.date.strftime("%Y-%m-%d") if not pd.isna(rec.date) else f"day {rec.day}"
        view = "" if rec.view == "frontal" else f" {rec.view}"
        draw.text((x + 3, y + thumb + 1), f"{when}{view} {rec.treatment}"[:26], fill=(0, 0, 0), font=font)
        draw.text((x + 3, y + thumb + 13), f"s={rec.severity:.2f} n={rec.lesion_count} IGA {rec.iga}",
                  fill=(90, 90, 90), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


VIEW_ORDER = ("left", "frontal", "right")
TRIPLET_THUMB = 256


def triplet_sheet(run_dir: Path, rows: pd.DataFrame, thumb: int = TRIPLET_THUMB) -> bytes:
    """JPEG bytes of one row per day with that day's views side by side (left, frontal, right; a missing
    view leaves its cell blank)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_h = 16
    days = list(dict.fromkeys(rows["day"]))
    sheet = Image.new("RGB", (len(VIEW_ORDER) * thumb, len(days) * (thumb + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, day in enumerate(days):
        y = r * (thumb + label_h)
        for rec in rows[rows["day"] == day].itertuples(index=False):
            if rec.view not in VIEW_ORDER:
                continue
            x = VIEW_ORDER.index(rec.view) * thumb
            with Image.open(run_dir / rec.image) as im:
                sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS), (x, y))
            when = rec.date.strftime("%Y-%m-%d") if not pd.isna(rec.date) else f"day {rec.day}"
            draw.text((x + 3, y + thumb + 2), f"{when} {rec.view}  n={rec.lesion_count} IGA {rec.iga}",
                      fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def write_grids(run_dir: Path, manifest: pd.DataFrame) -> list[Path]:
    """Write ``grids/<patient_id>.jpg`` (:data:`synthtrial.run.rundir.GRIDS`) for every patient of a run, and
    ``grids/<patient_id>_views.jpg`` (the day-by-day triplets) for patients photographed from more than one view."""
    paths = []
    for pid, rows in manifest.groupby("patient_id", sort=False):
        path = run_dir / GRIDS / f"{pid}.jpg"
        write_bytes_atomic(path, contact_sheet(run_dir, rows))
        paths.append(path)
        if rows["view"].nunique() > 1:
            path = run_dir / GRIDS / f"{pid}_views.jpg"
            write_bytes_atomic(path, triplet_sheet(run_dir, rows))
            paths.append(path)
    return paths
