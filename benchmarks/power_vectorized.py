"""`synthtrial power` vectorised across replicates against today's path: trials per minute, the ratio, and identity.

    python benchmarks/power_vectorized.py [--preset anchor] [--replicates 200] [--baseline 8] [--rounds 3]
                                          [--workers 2]

Both paths run in this process (one core), in alternating rounds so that both meet the same load on a shared
machine: today's path (``run_replicate`` per trial, :mod:`synthtrial.analyze.power` with
``SYNTHTRIAL_POWER_VECTORISED=0``) on ``--baseline`` trials per round, the vectorised one
(:mod:`synthtrial.analyze.power_batch`, chunks of 25 as ``power_study`` sends them) on ``--replicates``
trials per round; it prints each round, the median trials/min of each path and their ratio. Then
``power_study`` with ``--workers`` Dask processes (the default engine of ``synthtrial power``) on the
vectorised path, timed with the cluster's start-up. Last, the identity check on the fixed seed 0: every
column of every replicate that today's path computed (estimates, SEs, p, CIs, roles, notes, truth,
standardised and responder columns) against the vectorised path's, equal to 1e-9 relative (1e-12 absolute);
the script exits 1 if any differs. Export ``OPENBLAS_NUM_THREADS=1`` (as the script does for itself when unset):
threaded BLAS on tiny matrices only adds contention. Figures depend on what else the machine does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# benchmarks/graders.py would shadow the `graders` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from synthtrial.analyze.power import StudySettings, power_study, run_replicate, scenario_grid  # noqa: E402
from synthtrial.analyze.power_batch import SWITCH, batch_applies, run_chunk_batched  # noqa: E402
from synthtrial.trial.simulate import PRESETS  # noqa: E402

CHUNK = 25


def differences(today: pd.DataFrame, batched: pd.DataFrame, rtol: float = 1e-9, atol: float = 1e-12) -> list[str]:
    """Every column where two replicate frames differ (beyond rtol/atol for numbers), as lines."""
    if list(today.columns) != list(batched.columns) or len(today) != len(batched):
        return [f"shape or columns differ: {today.shape} {batched.shape}"]
    out = []
    for col in today.columns:
        a, b = today[col], batched[col]
        if a.dtype != b.dtype:
            out.append(f"{col}: dtype {a.dtype} vs {b.dtype}")
        elif a.dtype.kind == "f":
            x, y = a.to_numpy(), b.to_numpy()
            bad = ~((np.isnan(x) & np.isnan(y)) | np.isclose(x, y, rtol=rtol, atol=atol))
            if bad.any():
                out.append(f"{col}: {int(bad.sum())} row(s), e.g. {x[bad][0]!r} vs {y[bad][0]!r}")
        elif (a.astype(object).to_numpy() != b.astype(object).to_numpy()).any():
            out.append(f"{col}: values differ")
    return out


def rounds(scenario, settings, args) -> tuple[list[float], list[float], dict[int, pd.DataFrame],
                                               dict[int, pd.DataFrame]]:
    """Alternating timed rounds of both paths; the frames of the replicates today's path computed."""
    today_rates, batch_rates, today, batched = [], [], {}, {}
    offset = args.replicates  # today's rounds take replicates the vectorised rounds also compute
    for k in range(args.rounds):
        reps = list(range(offset * k, offset * k + args.baseline))
        start = time.perf_counter()
        for r in reps:
            today[r] = run_replicate(scenario, settings, r)
        today_rates.append(60 * len(reps) / (time.perf_counter() - start))
        reps = list(range(offset * k, offset * (k + 1)))
        start = time.perf_counter()
        for i in range(0, len(reps), CHUNK):
            frames = run_chunk_batched(scenario, settings, reps[i:i + CHUNK], run_replicate)
            batched.update({r: f for r, f in zip(reps[i:i + CHUNK], frames, strict=True) if r in today})
        batch_rates.append(60 * len(reps) / (time.perf_counter() - start))
        print(f"round {k + 1}: today's path {today_rates[-1]:7.0f} trials/min ({args.baseline} trials) | "
              f"vectorised {batch_rates[-1]:7.0f} trials/min ({len(reps)} trials)", flush=True)
    return today_rates, batch_rates, today, batched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="anchor", choices=sorted(PRESETS))
    parser.add_argument("--replicates", type=int, default=200, help="vectorised trials per round")
    parser.add_argument("--baseline", type=int, default=8, help="today's-path trials per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="Dask workers of the power_study run (0: skip)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    scenario = scenario_grid([(args.preset, *PRESETS[args.preset])])[0]
    settings = StudySettings()
    if not batch_applies(scenario, settings):
        print(f"the vectorised path does not cover {args.preset} (or {SWITCH}=0 is set)")
        return 1
    run_replicate(scenario, settings, 0)
    run_chunk_batched(scenario, settings, [0, 1], run_replicate)  # imports and caches warm
    design = scenario.design
    print(f"{args.preset}: {design.n_patients} patients x {design.days_per_patient} days, outcomes oracle + "
          f"lesion_severity, every default method; one core (this process), alternating rounds")
    today_rates, batch_rates, today, batched = rounds(scenario, settings, args)
    t_rate, b_rate = statistics.median(today_rates), statistics.median(batch_rates)
    print(f"median: today's path {t_rate:.0f} trials/min, vectorised {b_rate:.0f} trials/min, "
          f"ratio {b_rate / t_rate:.1f}x (same process, same rounds)")
    if args.workers:
        grid = [scenario]
        start = time.perf_counter()
        power_study(grid, replicates=args.replicates, settings=settings, workers=args.workers)
        seconds = time.perf_counter() - start
        print(f"power_study, Dask {args.workers} workers, vectorised: {args.replicates} trials in {seconds:.1f} s = "
              f"{60 * args.replicates / seconds:.0f} trials/min (cluster start-up included)")
    bad = {r: differences(today[r], batched[r]) for r in sorted(today)}
    bad = {r: lines for r, lines in bad.items() if lines}
    columns = len(next(iter(today.values())).columns)
    if bad:
        for r, lines in bad.items():
            print(f"replicate {r} differs: " + "; ".join(lines))
        return 1
    print(f"identical: {len(today)} replicates (seed 0), {sum(len(f) for f in today.values())} rows x {columns} "
          "columns, every number equal to 1e-9 relative and every role, note and flag equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
