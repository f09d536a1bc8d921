"""Images per second for inference of every grader, on CPU and on CUDA where present, beside a baseline measured
in the same run (decoding the same PNG files), so figures from different machines compare as ratios; and what
grading the shipped trial would take: per grader, its images over its rate, and in total for the graders
`synthtrial grade` runs by default (those whose model card meets its targets) and for all of them.

    python benchmarks/graders.py [RUN] [--images 48] [--batch 16] [--weights NAME=FOLDER ...] [--threads N]
                                 [--trial protocols/trial.csv]

RUN defaults to runs/quick (make it with `synthtrial generate protocols/quick.csv --out runs/quick`). Every grader
that `synthtrial graders list` shows with weights and that grades single images is measured (``synthtrial.graders.base.image_graders()``; the tracker grades series), plus
those given --weights. Each grader runs once untimed (model load, MediaPipe start-up) and then over the images
in batches of --batch with the run's manifest rows as ``meta`` (IGA fuses the views of a visit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# this script shares its name with the `graders` package: keep its own folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from synthtrial.graders.base import REGISTRY, get_grader, image_graders, read_rgb  # noqa: E402
from synthtrial.graders.cards import default_graders  # noqa: E402
from synthtrial.run import rundir  # noqa: E402
from synthtrial.trial.protocol import read_protocol  # noqa: E402

#: The shipped trial whose grading time is projected.
TRIAL = Path(__file__).resolve().parents[1] / "protocols" / "trial.csv"


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/quick", type=Path)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--weights", action="append", default=[], help="NAME=FOLDER (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--trial", type=Path, default=TRIAL, help="protocol whose grading time is projected")
    args = parser.parse_args()
    if not (args.run / rundir.MANIFEST).is_file():
        raise SystemExit(f"{args.run} is not a finished run: synthtrial generate protocols/quick.csv --out {args.run}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    weights = dict(item.split("=", 1) for item in args.weights)
    names = list(dict.fromkeys([*image_graders(), *weights]))
    manifest = rundir.read_manifest(args.run, ("image", "patient_id", "day", "view")).iloc[:args.images]
    paths = [args.run / rel for rel in manifest["image"]]
    read_rgb(paths[0])                           # untimed: the decoder's first call loads its plug-ins
    start = time.perf_counter()
    images = [read_rgb(p) for p in paths]
    decode = _rate(len(images), time.perf_counter() - start)
    h, w = images[0].shape[:2]
    print(f"{len(images)} images of {args.run} ({w}x{h}), batches of {args.batch}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"baseline: PNG decoding {decode:,.1f} images/s")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    trial = len(read_protocol(args.trial))      # one image per protocol row (a row names its view)
    print(f"{'grader':<10} {'device':<6} {'images/s':>10} {'x decoding':>11} {'trial (' + str(trial) + ' images)':>22}")
    rates: dict[tuple[str, str], float] = {}
    for name in names:
        for device in devices if REGISTRY[name].needs_weights else ["cpu"]:   # the counter has no device
            rates[name, device] = rate = _measure(get_grader(name, weights.get(name), device=device), images,
                                                  manifest, args.batch, device)
            print(f"{name:<10} {device:<6} {rate:>10,.1f} {rate / decode:>11.4f} {_clock(trial / rate):>22}")
    chosen = [n for n in default_graders() if (n, "cpu") in rates]   # a series grader (the tracker) is not timed
    for device in devices:
        def seconds(group: list[str], device: str = device) -> float:
            return sum(trial / rates.get((n, device), rates[n, "cpu"]) for n in group)

        print(f"shipped trial ({args.trial.name}, {trial} images at {w}x{h}) on {device}: default graders "
              f"({', '.join(chosen) or 'none'}) {_clock(seconds(chosen))}; every grader measured "
              f"{_clock(seconds(names))}")

def _measure(grader, images: list, manifest, batch: int, device: str) -> float:
    """Images per second of ``grader`` over ``images`` in batches (after one untimed warm-up call)."""
    import torch

    grader.predict(images[:min(3, len(images))], manifest.iloc[:3].reset_index(drop=True))
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        grader.predict(images[i:i + batch], manifest.iloc[i:i + batch].reset_index(drop=True))
    if device == "cuda":
        torch.cuda.synchronize()
    return _rate(len(images), time.perf_counter() - start)


def _clock(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    if seconds == float("inf"):
        return "-"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

if __name__ == "__main__":
    main()
