"""Simulated trials analysed per minute by `synthtrial power` (non-image outcomes), per method set and engine.

    python benchmarks/power.py [--preset anchor] [--replicates 200] [--workers 2] [--rendered 2]

Prints one line per (method set, engine): trials, seconds, trials per minute. Method sets: every default
method, and the inferential ones only (period, randomization, gls_kinetics, lmm, lmm_cr1). Engines: this
process, and a Dask LocalCluster of --workers processes; the cluster's start-up and shut-down (timed on
its own first) is counted in "seconds" and left out of "steady". Then one line with the seconds per
rendered replicate (``--rendered`` trials of the quick design, default render settings: 128 px, counter,
autoencoder 3 epochs at 64 px; every default method on every outcome; in this process, after one untimed
rendered replicate has loaded the faces and models; 0 skips it). The figures depend on what else the
machine is doing: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# benchmarks/graders.py would shadow the `graders` package that rendered replicates import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from synthtrial.analyze.power import (DEFAULT_METHODS, StudySettings, local_cluster, power_study,  # noqa: E402
                                      scenario_grid)
from synthtrial.analyze.power_render import RenderedSettings  # noqa: E402
from synthtrial.trial.simulate import PRESETS  # noqa: E402

INFERENTIAL = ("period", "randomization", "gls_kinetics", "lmm", "lmm_cr1")


def _cluster_startup(workers: int) -> float:
    """Seconds to start and close the LocalCluster power_study starts."""
    from distributed import Client

    start = time.perf_counter()
    cluster = local_cluster(workers)
    Client(cluster).close()
    cluster.close()
    seconds = time.perf_counter() - start
    print(f"Dask LocalCluster of {workers} workers: {seconds:.1f} s to start and close")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="anchor", choices=sorted(PRESETS))
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rendered", type=int, default=2, help="rendered quick-design replicates timed (0: none)")
    args = parser.parse_args()
    grid = scenario_grid([(args.preset, *PRESETS[args.preset])])
    startup = _cluster_startup(args.workers)
    print(f"{args.preset}: {grid[0].design.n_patients} patients x {grid[0].design.days_per_patient} days, "
          "outcomes oracle + lesion_severity")
    for label, methods in (("all default methods", DEFAULT_METHODS), ("inferential only", INFERENTIAL)):
        settings = StudySettings(methods=methods)
        power_study(grid, replicates=1, settings=settings)  # imports and caches warm
        for engine, workers in (("in process", 0), (f"Dask, {args.workers} workers", args.workers)):
            start = time.perf_counter()
            power_study(grid, replicates=args.replicates, settings=settings, workers=workers)
            seconds = time.perf_counter() - start
            steady = seconds - (startup if workers else 0.0)
            print(f"{label:>20} | {engine:<16} | {args.replicates:4d} trials in {seconds:6.1f} s | "
                  f"{60 * args.replicates / seconds:6.0f} trials/min | steady {60 * args.replicates / steady:6.0f}/min")
    if args.rendered > 0:
        print(f"{args.rendered} rendered trial(s) of the quick design: {rendered_seconds(args.rendered):.1f} s per "
              "rendered replicate (in process, one core)")


def rendered_seconds(n: int) -> float:
    """Seconds per rendered quick-design replicate (default render settings), after one untimed warm-up."""
    grid = scenario_grid([("quick", *PRESETS["quick"])])
    power_study(grid, replicates=1, settings=StudySettings(seed=1, rendered=RenderedSettings(replicates=1)))
    settings = StudySettings(rendered=RenderedSettings(replicates=n))
    start = time.perf_counter()
    power_study(grid, replicates=n, settings=settings)
    return (time.perf_counter() - start) / n


if __name__ == "__main__":
    main()
