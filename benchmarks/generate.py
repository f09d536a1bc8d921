"""Images per second of `synthtrial generate` (procedural backend) beside its own I/O floor.

The floor, measured in the same run on the same images: read the patient's base face from disk and write
one PNG per image, nothing else. The figure that matters is the ratio: how close rendering gets to I/O.

    python benchmarks/generate.py [--images 60] [--size 512] [--severity 2.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from synthtrial.util.atomic import write_bytes_atomic
from synthtrial.run.generation import generate
from synthtrial.run.rendering import png_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--severity", type=float, default=2.0, help="latent severity (2.0: ~36 lesions)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        protocol = tmp / "bench.csv"
        rows = [f"B1,{d},Control,{args.severity}" for d in range(args.images)]
        protocol.write_text("patient_id,day,treatment,severity\n" + "\n".join(rows) + "\n")

        stamps: list[tuple[int, float]] = []  # (images done, time): reported per finished image
        start = time.perf_counter()
        run = generate(protocol, tmp / "run", size=args.size, progress=False,  # done 0: a status (the face), no image
                       on_progress=lambda done, total, status: done and stamps.append((done, time.perf_counter())))
        total_s = time.perf_counter() - start
        (n0, t0_), (n1, t1_) = stamps[0], stamps[-1]
        steady = (t1_ - t0_) / max(1, n1 - n0)
        setup = t0_ - start - n0 * steady

        # floor: read the base face (as saved by the run, so the same pixels) and write one PNG per image
        from synthtrial.face.faces import Identity, load_base_faces, make_face

        face = make_face(load_base_faces(None)[0], Identity(base="astronaut"), args.size)
        base_path = tmp / "base.png"
        Image.fromarray(face.image).save(base_path)
        t0 = time.perf_counter()
        for i in range(args.images):
            pixels = np.asarray(Image.open(base_path).convert("RGB"))
            write_bytes_atomic(tmp / "floor" / f"{i}.png", png_bytes(pixels))
        floor = (time.perf_counter() - t0) / args.images

        import pandas as pd

        lesions = pd.read_parquet(run / "lesions.parquet")
        per_image = lesions.groupby("image").size().mean()
    print(f"images: {args.images} at {args.size}px, {per_image:.1f} lesions per image (marks and scars included)")
    print(f"setup (faces, landmarks, lesion course): {setup:.2f} s; whole run {total_s:.2f} s")
    print(f"generate, steady state: {1 / steady:6.1f} images/s ({steady * 1000:.1f} ms/image: render, image + mask PNG, record)")
    print(f"I/O floor (read face, write PNG): {1 / floor:6.1f} images/s ({floor * 1000:.1f} ms/image)")
    print(f"ratio generate / floor: {floor / steady:.2f} (1.0 = as fast as I/O alone)")


if __name__ == "__main__":
    main()
