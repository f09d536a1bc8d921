"""How `generate` (images/s) and `power` (trials/min) scale with the number of Dask workers.

    python benchmarks/scale.py [--workers 1,2,4] [--patients 4] [--days 8] [--size 256] [--replicates 60]

For each worker count a Dask LocalCluster of that many single-threaded processes is started (and warmed:
every worker imports the renderer and builds a face once) before the clock starts, so the figures are
steady-state throughput, not start-up: `generate --scheduler` renders a protocol of --patients x --days
images at --size px into a fresh run directory, and `power --scheduler` runs --replicates trials of the
anchor design (every default method). Worker counts above this machine's cores are a simulated larger
cluster by oversubscription: they show what the engine does with more workers than cores (the ratio stops
near the number of cores), not what more machines would give.

Printed per worker count: images/s and trials/min, each as a ratio to one worker, and the projected wall time
of a million-image and a 100,000-trial job at that rate, and on a cluster of 64 such workers assuming the
efficiency per worker measured at the largest count that does not oversubscribe (stated).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/graders.py would shadow the `graders` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from synthtrial.analyze.power import StudySettings, power_study, scenario_grid  # noqa: E402
from synthtrial.run.generation import generate  # noqa: E402
from synthtrial.trial.simulate import PRESETS  # noqa: E402
from synthtrial.util.cluster import local_cluster  # noqa: E402

IMAGES_JOB, TRIALS_JOB, PROJECTED_WORKERS = 1_000_000, 100_000, 64


def protocol_text(patients: int, days: int) -> str:
    rows = ["patient_id,day,treatment,severity"]
    for p in range(patients):
        for day in range(1, days + 1):
            arm = "Control" if (day - 1) // 2 % 2 == 0 else "Cream"
            rows.append(f"P{p:03d},{day},{arm},{1.0 + 0.8 * (arm == 'Control') + 0.05 * p:.2f}")
    return "\n".join(rows) + "\n"


def warm(client, address: str, size: int, folder: Path) -> None:
    """Every worker imports the renderer and renders once (faces and models built), untimed."""
    tiny = folder / "warm.csv"
    tiny.write_text(protocol_text(1, 1))
    client.run(lambda: __import__("synthtrial.run.rendering"))
    generate(tiny, folder / "warm", size=size, progress=False, scheduler=address)


def measure(workers: int, args, protocol: Path, grid) -> tuple[float, float]:
    """(images/s, trials/min) on a warm LocalCluster of ``workers`` processes."""
    from distributed import Client

    cluster = local_cluster(workers)
    client = Client(cluster)
    try:
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            warm(client, cluster.scheduler_address, args.size, Path(tmp))
            start = time.perf_counter()
            generate(protocol, Path(tmp) / "run", size=args.size, progress=False, scheduler=cluster.scheduler_address)
            images = args.patients * args.days / (time.perf_counter() - start)
        power_study(grid, replicates=workers, settings=StudySettings(seed=99), scheduler=cluster.scheduler_address)
        start = time.perf_counter()
        power_study(grid, replicates=args.replicates, settings=StudySettings(), scheduler=cluster.scheduler_address)
        trials = 60 * args.replicates / (time.perf_counter() - start)
    finally:
        client.close()
        cluster.close()
    return images, trials


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (the first should be 1)")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--replicates", type=int, default=60)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    cores = os.cpu_count() or 1
    grid = scenario_grid([("anchor", *PRESETS["anchor"])])
    with tempfile.TemporaryDirectory(prefix="scale-proto-") as tmp:
        protocol = Path(tmp) / "scale.csv"
        protocol.write_text(protocol_text(args.patients, args.days))
        print(f"{cores} CPU cores; generate: {args.patients * args.days} images at {args.size} px; power: "
              f"{args.replicates} anchor trials, every default method")
        results = {}
        for w in counts:
            results[w] = measure(w, args, protocol, grid)
            print(f"  {w} worker(s): {results[w][0]:.2f} images/s, {results[w][1]:.0f} trials/min", flush=True)
    base_images, base_trials = results[counts[0]]
    print(f"{'workers':>8} | {'images/s':>8} {'ratio':>6} | {'trials/min':>10} {'ratio':>6} | "
          f"{'1M images':>10} | {'100k trials':>11}")
    for w, (images, trials) in results.items():
        note = " (oversubscribed)" if w > cores else ""
        print(f"{w:>8} | {images:8.2f} {images / base_images:6.2f} | {trials:10.0f} {trials / base_trials:6.2f} | "
              f"{hours(IMAGES_JOB / images):>10} | {hours(60 * TRIALS_JOB / trials):>11}{note}")
    fits = [w for w in counts if w <= cores]
    top = max(fits)
    eff_images = results[top][0] / (top * base_images)
    eff_trials = results[top][1] / (top * base_trials)
    images64 = PROJECTED_WORKERS * eff_images * base_images
    trials64 = PROJECTED_WORKERS * eff_trials * base_trials
    print(f"projected on {PROJECTED_WORKERS} workers (one core each, efficiency per worker {eff_images:.2f} for "
          f"generate and {eff_trials:.2f} for power, as measured at {top} workers): 1M images in "
          f"{hours(IMAGES_JOB / images64)}, 100k trials in {hours(60 * TRIALS_JOB / trials64)}")


if __name__ == "__main__":
    main()
