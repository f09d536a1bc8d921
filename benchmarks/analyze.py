"""Seconds to analyze a run, split by stage (read, autoencoder training, embedding + PCA, statistics, report).

    python benchmarks/analyze.py [RUN] [--epochs 10] [--image-size 256] [--permutations 2000]

RUN defaults to runs/trial (make it with `synthtrial generate protocols/trial.csv --workers 2`). The analysis
is written to a copy's analysis folder beside nothing else: the run directory itself is not modified.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/trial", type=Path)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--permutations", type=int, default=2000)
    args = parser.parse_args()
    if not (args.run / "manifest.parquet").is_file():
        raise SystemExit(f"{args.run} is not a finished run: synthtrial generate protocols/trial.csv --workers 2")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / args.run.name
        run.mkdir()
        for name in ("config.json", "manifest.parquet", "lesions.parquet", "truth.json"):
            if (args.run / name).is_file():
                shutil.copy2(args.run / name, run / name)
        (run / "images").symlink_to((args.run / "images").resolve())
        settings = AnalysisSettings(epochs=args.epochs, image_size=args.image_size, n_permutations=args.permutations)
        start = time.perf_counter()
        analysis = analyze_run(run, settings, progress=False)
        total = time.perf_counter() - start
        stages = json.loads((analysis / "timings.json").read_text())
    print(f"analyze {args.run} (epochs {args.epochs}, {args.image_size} px, {args.permutations} permutations)")
    for name, seconds in stages.items():
        print(f"  {name:<20} {seconds:8.2f} s  {seconds / total:5.1%}")
    print(f"  {'total':<20} {total:8.2f} s")


if __name__ == "__main__":
    main()
