"""The size-and-coverage grid: does every method labelled inferential hold on designs it was not tuned to?

``synthtrial power --grid full`` simulates, per cell, a null and an effect scenario of one design family and
tabulates, per cell and method, the role the rules give (:mod:`synthtrial.analyze.roles`), the size (with
its MC SE), the power and the CI coverage of the method's own estimand; :func:`grid_violations` lists every
inferential method whose size exceeds alpha + 2 MC SE or whose coverage falls below :data:`MIN_COVERAGE`.

Choices, stated once:

* Cells: period length x AR(1) phi x trend (none, or the anchor's -0.001 per day) x carryover (none: both
  half-lives 0; or the anchor's wash-in 3 d / washout 4 d) x order (fixed AB pairs, or each pair's order
  randomised). ``full`` spans the issue's ranges with periods of 2, 7, 14 and 28 days and phi 0.3, 0.6 and
  0.95 (96 cells); ``small``, the corners, periods of 2 and 28 days and phi 0.3 and 0.95 (32 cells).
* One design family: :data:`GRID_PAIRS` pairs of periods (``pairs`` design, Control / Active), so the
  randomisation test has 64 orders (smallest attainable p 1/32, available at alpha 0.05) and the series
  runs 24 to 336 days; :data:`GRID_PATIENTS` patients; the anchor's baseline, noise (SD 0.12) and spread
  of the effect (SD 0.1) around a population effect of -0.3.
* Outcome: the oracle severity (the methods, not the graders, are checked); the inferential-by-design
  methods only (:data:`GRID_METHODS`): the descriptive ones are not claimed to hold anywhere.
* Tests per row: a per-patient method gives :data:`GRID_PATIENTS` tests per trial, the pooled model one, so
  the pooled methods (:data:`GRID_POOLED_METHODS`) run on :func:`pooled_replicates` trials per scenario
  (``GRID_PATIENTS`` x ``--replicates``; the first ``--replicates`` are the same trials as the per-patient
  rows', taken from that study, :func:`known_pooled`): every row's size then rests on as many tests (2,000 at 500 replicates, MC SE 0.005 at 0.05). With
  500 trials a pooled row's MC SE is 0.010, and a size of 0.05 exceeds 0.05 + 2 MC SE by chance in about one
  row in forty: the small grid's first run flagged ``lmm`` at 0.078 in one cell whose next 1,500 trials
  rejected 0.034-0.042 (0.0475 over all 2,000).
* Coverage is of the effect scenario's truth, the estimand each row names (``estimand``, ``true_effect``:
  the patient's delivered contrast per patient, the population's for the pooled model;
  :mod:`synthtrial.analyze.estimands`); the randomisation test gives no CI and has none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from synthtrial.analyze.roles import INFERENTIAL
from synthtrial.trial.simulate import SeverityModel, TrialDesign
from synthtrial.util.atomic import write_text_atomic
from synthtrial.util.errors import SynthtrialError

#: Grids by name: (period lengths, phis). Trend, carryover and order are always both ways.
GRIDS = {"full": ((2, 7, 14, 28), (0.3, 0.6, 0.95)), "small": ((2, 28), (0.3, 0.95))}
GRID_PAIRS = 6
GRID_PATIENTS = 4
GRID_EFFECT = -0.3
GRID_TREND = -0.001
GRID_KINETICS = (3.0, 4.0)          # wash-in and washout half-lives (days) of the cells with carryover
GRID_METHODS = ("period", "randomization", "gls_kinetics", "lmm", "lmm_cr1")
#: The methods with one test per trial; the grid runs them on :func:`pooled_replicates` trials.
GRID_POOLED_METHODS = ("lmm", "lmm_cr1")
#: An inferential method's CI must cover its estimand at least this often in every cell.
MIN_COVERAGE = 0.93
#: Columns of :func:`grid_table`, one row per cell x method x arm.
TABLE_COLUMNS = ("cell", "period_days", "phi", "trend", "carryover", "order", "method", "level", "arm", "role",
                 "estimand", "size", "size_mc_se", "null_tests", "power", "coverage", "effect_tests", "check")


def pooled_replicates(replicates: int) -> int:
    """Trials per scenario for the pooled methods: as many tests as a per-patient row gets from ``replicates``."""
    return GRID_PATIENTS * int(replicates)


def pooled_trials(estimates: pd.DataFrame) -> dict[str, dict[int, pd.DataFrame]]:
    """The pooled methods' rows of the grid's main study, per scenario name and replicate, grouped once (the
    pooled study runs in batches of scenarios; :func:`known_pooled` picks each batch's)."""
    pooled = estimates[estimates["method"].isin(GRID_POOLED_METHODS)]
    trials: dict[str, dict[int, pd.DataFrame]] = {}
    for (name, r), frame in pooled.groupby(["scenario", "replicate"], sort=False):
        trials.setdefault(name, {})[int(r)] = frame.reset_index(drop=True)
    return trials


def known_pooled(trials: Mapping[str, Mapping[int, pd.DataFrame]],
                 scenario_names: Sequence[str]) -> dict[tuple[int, int], pd.DataFrame]:
    """Per (scenario index, replicate) of ``scenario_names``, the rows :func:`pooled_trials` holds: what the pooled
    study computes for those trials (the pooled fit does not depend on the other methods), so it need not again.
    Scenarios not named are left out."""
    return {(i, r): frame for i, name in enumerate(scenario_names) for r, frame in trials.get(name, {}).items()}


def merge_pooled(frame: pd.DataFrame, pooled: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (a summary or the estimates of the grid's main study) with its pooled methods' rows replaced by
    those of ``pooled`` (the study of :data:`GRID_POOLED_METHODS` on :func:`pooled_replicates` trials), in the
    main study's scenario order and :data:`GRID_METHODS`' method order."""
    keep = frame[~frame["method"].isin(GRID_POOLED_METHODS)]
    merged = pd.concat([keep, pooled[pooled["method"].isin(GRID_POOLED_METHODS)]], ignore_index=True)
    scenario_order = {name: i for i, name in enumerate(dict.fromkeys(frame["scenario"]))}
    method_order = {name: i for i, name in enumerate(GRID_METHODS)}
    order = pd.DataFrame({"s": merged["scenario"].map(scenario_order),
                          "m": merged["method"].map(lambda m: method_order.get(m, len(method_order)))})
    return merged.loc[order.sort_values(["s", "m"], kind="stable").index].reset_index(drop=True)


def cell_name(period_days: int, phi: float, trend: bool, carryover: bool, randomized: bool) -> str:
    """A cell's name, e.g. ``L07 phi0.60 trend carry random``."""
    return (f"L{period_days:02d} phi{phi:.2f} {'trend' if trend else 'flat'} {'carry' if carryover else 'nocarry'} "
            f"{'random' if randomized else 'fixed'}")


def grid_designs(name: str) -> list[tuple[str, TrialDesign, SeverityModel]]:
    """Every cell of grid ``name`` (:data:`GRIDS`) as (cell name, design, model with the effect)."""
    if name not in GRIDS:
        raise SynthtrialError(f"unknown grid '{name}'; grids are {', '.join(GRIDS)} (option --grid)")
    period_days, phis = GRIDS[name]
    cells = []
    for days in period_days:
        for phi in phis:
            for trend in (False, True):
                for carryover in (False, True):
                    for randomized in (False, True):
                        design = TrialDesign(design="pairs", arms=("Control", "Active"), n_patients=GRID_PATIENTS,
                                             blocks=GRID_PAIRS, period_days=days, randomize=randomized)
                        washin, washout = GRID_KINETICS if carryover else (0.0, 0.0)
                        model = SeverityModel(effects={"Active": GRID_EFFECT}, effect_sd=0.1, baseline_mean=2.2,
                                              baseline_sd=0.35, baseline_min=1.6, baseline_max=2.7,
                                              trend_per_day=GRID_TREND if trend else 0.0, washin_half_life=washin,
                                              washout_half_life=washout, ar_phi=phi, noise_sd=0.12)
                        cells.append((cell_name(days, phi, trend, carryover, randomized), design, model))
    return cells


def _cell_fields(name: str) -> dict[str, object]:
    days, phi, trend, carry, order = name.split()
    return {"period_days": int(days[1:]), "phi": float(phi[3:]), "trend": trend == "trend",
            "carryover": carry == "carry", "order": order}


def grid_table(summary: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per cell x method x arm of a grid study's summary: role, size (± MC SE), power, coverage and the check."""
    rows = []
    keys = ["design_name", "outcome", "method", "level", "arm"]
    for (cell, _, method, level, arm), grp in summary.groupby(keys, sort=False):
        null, effect = grp[grp["effect_scale"] == 0], grp[grp["effect_scale"] != 0]
        roles = sorted(set(grp["role"]))
        row = {"cell": cell, **_cell_fields(cell), "method": method, "level": level, "arm": arm,
               "role": roles[0] if len(roles) == 1 else " / ".join(roles),
               "estimand": grp["estimand"].iloc[0] if "estimand" in grp else "",
               "size": _first(null, "rejection_rate"), "size_mc_se": _first(null, "mc_se"),
               "null_tests": int(null["tests"].sum()), "power": _first(effect, "rejection_rate"),
               "coverage": _first(effect, "coverage"), "effect_tests": int(effect["tests"].sum())}
        rows.append({**row, "check": check_row(row, alpha)})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _first(frame: pd.DataFrame, column: str) -> float:
    return float(frame[column].iloc[0]) if len(frame) else np.nan


def check_row(row: dict | pd.Series, alpha: float = 0.05) -> str:
    """'' for a method not labelled inferential; else 'ok', or what fails: size > alpha + 2 MC SE, coverage <
    :data:`MIN_COVERAGE` (a rate or coverage without any test, NaN, is not checked)."""
    if row["role"] != INFERENTIAL:
        return ""
    failed = []
    size, se = float(row["size"]), float(row["size_mc_se"])
    if np.isfinite(size) and size > alpha + 2 * (se if np.isfinite(se) else 0.0):
        failed.append(f"size {size:.3f} > {alpha:g} + 2 x {se:.3f}")
    coverage = float(row["coverage"])
    if np.isfinite(coverage) and coverage < MIN_COVERAGE:
        failed.append(f"coverage {coverage:.3f} < {MIN_COVERAGE:g}")
    return "; ".join(failed) or "ok"


def grid_violations(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """The rows of a grid table (or any frame with its columns) whose inferential method fails the check."""
    checks = table.apply(lambda row: check_row(row, alpha), axis=1) if len(table) else pd.Series(dtype=str)
    failed = (checks != "") & (checks != "ok")
    # the checks of the failing rows only: assigning a longer Series to an empty frame takes its index (pandas 3)
    return table[failed].assign(check=checks[failed])


def _cell(value: object, column: str) -> str:
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return ""
        return f"{value:.2f}" if column == "phi" else f"{value:.3f}"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value)


def markdown_table(table: pd.DataFrame, columns: Sequence[str]) -> str:
    """A Markdown table of ``columns`` (rates to 3 decimals, phi to 2, flags yes/no, NaN blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rec in table[list(columns)].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, c) for v, c in zip(rec, columns)) + " |")
    return "\n".join(lines)


def write_grid(path: str | Path, table: pd.DataFrame, *, grid: str, replicates: int, seed: int,
               alpha: float = 0.05, pooled_trials: int | None = None) -> tuple[Path, Path]:
    """Write the grid table as Markdown (``path``, with the check's verdict) and as CSV beside it."""
    path = Path(path)
    csv_path = path.with_suffix(".csv")
    write_text_atomic(csv_path, table.to_csv(index=False, lineterminator="\n"))
    bad = grid_violations(table, alpha)
    inferential = int((table["role"] == INFERENTIAL).sum())
    verdict = (f"**Check: every one of the {inferential} inferential rows holds** (size <= {alpha:g} + 2 MC SE, "
               f"coverage >= {MIN_COVERAGE:g})." if bad.empty else
               f"**Check: {len(bad)} of {inferential} inferential rows fail** (size <= {alpha:g} + 2 MC SE, "
               f"coverage >= {MIN_COVERAGE:g}):\n\n" + markdown_table(bad, ("cell", "method", "role", "check")))
    shown = ("period_days", "phi", "trend", "carryover", "order", "method", "role", "estimand", "size", "size_mc_se",
             "power", "coverage", "check")
    pooled = pooled_trials or pooled_replicates(replicates)
    option = "" if pooled == GRID_PATIENTS * replicates else f" --pooled-replicates {pooled}"
    text = (f"# Size-and-coverage grid ({grid})\n\n"
            f"Written by `synthtrial power --grid {grid} --replicates {replicates} --seed {seed} --grid-table "
            f"{path.name}{option}` ({replicates} null and {replicates} effect trials per cell for the per-patient "
            f"methods ({GRID_PATIENTS * replicates} tests per row: {GRID_PATIENTS} patients), {pooled} of each for the "
            f"pooled model (one test per trial); {GRID_PAIRS} pairs of periods, oracle outcome, alpha {alpha:g}). Data: [{csv_path.name}]({csv_path.name}). How the cells are built: "
            "`synthtrial/analyze/grid.py`; the role rules: `synthtrial/analyze/roles.py` and docs/analysis.md.\n\n"
            f"{verdict}\n\n{markdown_table(table, shown)}\n")
    write_text_atomic(path, text)
    return path, csv_path

