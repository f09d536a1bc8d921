"""Inference speed of the localisation graders (detector, DermX predict, DermX Grad-CAM maps), in images per
second and as a ratio to the classical counter measured on the same images in the same process.

    python benchmarks/graders_detection.py [RUN] [--images 16] [--detector FOLDER] [--dermx FOLDER] [--device cpu]

RUN defaults to runs/gtest (`synthtrial generate protocols/graders_test.csv --out runs/gtest --seed 2 --size 512`);
weights default to the shipped ones (graders/weights/detector, graders/weights/dermx).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from synthtrial.graders.base import DEFAULT_WEIGHTS_DIR, read_rgb
from synthtrial.graders.counter import LesionCounter
from synthtrial.graders.dermx import DermX
from synthtrial.graders.detector import LesionDetector
from synthtrial.run import rundir


def _rate(func, images) -> float:
    func(images[:1])                          # warm-up (lazy imports, MediaPipe graph, allocator)
    start = time.perf_counter()
    func(images)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/gtest", type=Path)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--detector", type=Path, default=DEFAULT_WEIGHTS_DIR / "detector")
    parser.add_argument("--dermx", type=Path, default=DEFAULT_WEIGHTS_DIR / "dermx")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if not (args.run / "manifest.parquet").is_file():
        raise SystemExit(f"{args.run} is not a finished run: synthtrial generate protocols/graders_test.csv "
                         "--out runs/gtest --seed 2 --size 512")
    manifest = rundir.read_manifest(args.run)
    images = [read_rgb(args.run / rel) for rel in manifest["image"][:args.images]]
    detector = LesionDetector.from_pretrained(args.detector, device=args.device)
    dermx = DermX.from_pretrained(args.dermx, device=args.device)
    counter = LesionCounter()
    rates = {
        "counter (baseline)": _rate(counter.predict, images),
        "detector predict": _rate(detector.predict, images),
        "dermx predict": _rate(dermx.predict, images),
        "dermx Grad-CAM maps (7 per image)": _rate(lambda ims: [dermx.explain(im) for im in ims], images),
    }
    base = rates["counter (baseline)"]
    h, w = images[0].shape[:2]
    print(f"{len(images)} images of {w} x {h} px from {args.run}, device {detector.device}")
    for name, rate in rates.items():
        print(f"  {name:36s} {rate:8.2f} images/s   {rate / base:6.2f} x counter")
    for name, folder in (("detector", args.detector), ("dermx", args.dermx)):
        size = (folder / "model.safetensors").stat().st_size / 2 ** 20
        print(f"  {name} weights: {size:.1f} MiB")


if __name__ == "__main__":
    main()
