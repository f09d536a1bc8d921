"""Simulated trials analysed per minute by `synthtrial power` (non-image outcomes), per method set and engine.

    python benchmarks/power.py [--preset anchor] [--replicates 20] [--workers 2]

Prints one line per (method set, engine): trials, seconds, trials per minute. Method sets: every default
method, and the inferential ones only (period, randomization, gls_kinetics, lmm, lmm_cr1). Engines: this
process, and a Dask LocalCluster of --workers processes (its start-up is counted). The figures depend on
what else the machine is doing: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

from synthtrial.analyze.power import DEFAULT_METHODS, StudySettings, power_study, scenario_grid
from synthtrial.simulate import PRESETS

INFERENTIAL = ("period", "randomization", "gls_kinetics", "lmm", "lmm_cr1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="anchor", choices=sorted(PRESETS))
    parser.add_argument("--replicates", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    grid = scenario_grid([(args.preset, *PRESETS[args.preset])])
    print(f"{args.preset}: {grid[0].design.n_patients} patients x {grid[0].design.days_per_patient} days, "
          "outcomes oracle + lesion_severity")
    for label, methods in (("all default methods", DEFAULT_METHODS), ("inferential only", INFERENTIAL)):
        settings = StudySettings(methods=methods)
        power_study(grid, replicates=1, settings=settings)  # imports and caches warm
        for engine, workers in (("in process", 0), (f"Dask, {args.workers} workers", args.workers)):
            start = time.perf_counter()
            power_study(grid, replicates=args.replicates, settings=settings, workers=workers)
            seconds = time.perf_counter() - start
            print(f"{label:>20} | {engine:<16} | {args.replicates:4d} trials in {seconds:7.1f} s | "
                  f"{60 * args.replicates / seconds:7.1f} trials/min")


if __name__ == "__main__":
    main()
