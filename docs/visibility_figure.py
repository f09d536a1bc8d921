"""Draw docs/visibility.png: closed comedones and scars on the held-out Hopper split of the grader set that pass
the contrast rule, those whose signal (what they changed) is below 5 ΔE above six visible by both.

    synthtrial graders dataset --out runs/graderset --images 3000 --seed 0
    python docs/visibility_figure.py [runs/graderset/test_portrait] [docs/visibility.png]
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from synthtrial.graders.base import read_rgb
from synthtrial.render.visibility import MIN_AREA_PX, VISIBLE_DELTA_E
from synthtrial.run import rundir

SIDE, ZOOM = 24, 7


def tile(run: Path, r) -> np.ndarray:
    image = read_rgb(run / r.image)
    x0 = min(max(int(r.cx) - SIDE // 2, 0), image.shape[1] - SIDE)
    y0 = min(max(int(r.cy) - SIDE // 2, 0), image.shape[0] - SIDE)
    crop = Image.fromarray(image[y0:y0 + SIDE, x0:x0 + SIDE]).resize((SIDE * ZOOM,) * 2, Image.NEAREST)
    draw = ImageDraw.Draw(crop)
    draw.rectangle([(r.x0 - x0) * ZOOM - 2, (r.y0 - y0) * ZOOM - 2, (r.x1 - x0) * ZOOM + 2, (r.y1 - y0) * ZOOM + 2],
                   outline=(0, 255, 0))
    draw.text((3, 3), r.type.replace("_comedo", " com."), fill=(255, 255, 0))
    draw.text((3, SIDE * ZOOM - 16), f"c {r.contrast:.1f}  s {r.signal:.1f}", fill=(255, 255, 0))
    return np.pad(np.asarray(crop), ((2, 2), (2, 2), (0, 0)), constant_values=255)


def main(run: Path, out: Path) -> None:
    manifest = rundir.read_manifest(run, ("image",))
    lesions = rundir.read_lesions(run, set(manifest["image"]))
    passed = lesions[(lesions["contrast"] >= VISIBLE_DELTA_E) & (lesions["area_px"] >= MIN_AREA_PX)]
    rows = []
    for label, pick in [(f"contrast >= {VISIBLE_DELTA_E:g}, signal < {VISIBLE_DELTA_E:g}: not visible",
                         passed[~passed["visible"] & passed["type"].isin(["closed_comedo", "scar"])]),
                        (f"contrast and signal >= {VISIBLE_DELTA_E:g}: visible",
                         passed[passed["visible"] & (passed["type"] == "closed_comedo")])]:
        strip = np.concatenate([tile(run, r) for r in pick.sample(6, random_state=1).itertuples()], 1)
        head = Image.new("RGB", (strip.shape[1], 20), (255, 255, 255))
        ImageDraw.Draw(head).text((4, 4), label, fill=(0, 0, 0))
        rows += [np.asarray(head), strip]
    Image.fromarray(np.concatenate(rows, 0)).save(out)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/graderset/test_portrait"),
         Path(sys.argv[2] if len(sys.argv) > 2 else "docs/visibility.png"))
