"""The report shows what it measured: an image strip with lesion outlines from the exact masks."""

import base64
import io

import numpy as np
import pandas as pd
from PIL import Image

from synthtrial.analyze.report import TYPE_COLOURS, image_strip, strip_days


def test_strip_days_are_the_first_day_and_each_period_end():
    rows = pd.DataFrame({"day": [1, 2, 3, 4, 5, 6], "treatment": ["A", "A", "B", "B", "A", "A"]})
    assert strip_days(rows) == [1, 2, 4, 6]


def test_image_strip_outlines_lesions_in_their_type_colour(quick_run_256):
    manifest = pd.read_parquet(quick_run_256 / "manifest.parquet")
    outcomes = manifest[["image", "patient_id", "day", "treatment", "view", "lesion_count"]]
    thumb = 96
    strip = np.asarray(Image.open(io.BytesIO(base64.b64decode(image_strip(quick_run_256, outcomes, thumb=thumb)))))
    columns = len(strip_days(outcomes[outcomes["patient_id"] == "P01"]))  # quick: day 1 + 8 period ends
    assert columns == 9
    assert strip.shape[:2] == (24 + 3 * (thumb + 28), 60 + columns * thumb)
    first = strip[24:24 + thumb, 60:60 + thumb]  # P01, day 1
    plain = np.asarray(Image.open(quick_run_256 / manifest["image"][0]).convert("RGB").resize(
        (thumb, thumb), Image.Resampling.LANCZOS))
    changed = (first != plain).any(axis=2)
    assert changed.any()  # outlines were drawn
    outline = first[changed]
    assert all(tuple(px) in set(TYPE_COLOURS.values()) for px in outline)  # in the types' colours only
