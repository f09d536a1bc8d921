"""``synthtrial power``: type I error and power of each analysis over many simulated trials.

Each replicate simulates a fresh trial from one design and severity model (new baselines, effects,
noise) and analyses the outcomes that need no rendering: the oracle severity and the lesion count the
lesion model would draw (``round(expected_lesion_count(s))``, read back on the severity scale). The
rejection rate of each test is its power where the arm has an effect and its type I error where the
effect is zero (``--null``), given with its Monte-Carlo standard error sqrt(r(1-r)/n).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from synthtrial import scale
from synthtrial.errors import SynthtrialError
from synthtrial.seeding import derive_seed
from synthtrial.simulate import SeverityModel, TrialDesign, simulate_trial

POWER_OUTCOMES = ("oracle", "lesion_severity")
DEFAULT_METHODS = ("welch", "gls_ar1", "lmm")


def design_from_file(path: str | os.PathLike[str]) -> tuple[TrialDesign, SeverityModel]:
    """A design and model from a truth file written by ``synthtrial protocol design`` (or any JSON with the
    same ``design`` and ``model`` objects)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise SynthtrialError(f"{path}: cannot be read ({exc.strerror or exc}) (option --design)") from None
    except json.JSONDecodeError as exc:
        raise SynthtrialError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}) (option --design)") from None
    if not isinstance(data, dict) or not isinstance(data.get("design"), dict) or not isinstance(data.get("model"), dict):
        raise SynthtrialError(f"{path}: needs 'design' and 'model' objects, as in a <stem>.truth.json written by "
                              "`synthtrial protocol design` (option --design)")
    try:
        design = TrialDesign(**{**data["design"], "arms": tuple(data["design"].get("arms", ()))})
        model = SeverityModel(**data["model"])
    except TypeError as exc:
        raise SynthtrialError(f"{path}: {exc} (option --design)") from None
    return design, model


def replicate_outcomes(protocol: pd.DataFrame) -> pd.DataFrame:
    """The rendering-free outcomes of one simulated trial, one row per patient-day."""
    severity = protocol["severity"].to_numpy(dtype=float)
    count = np.rint(scale.expected_lesion_count(severity))
    return pd.DataFrame({
        "patient_id": protocol["patient_id"].to_numpy(), "day": protocol["day"].to_numpy(),
        "treatment": protocol["treatment"].to_numpy(), "oracle": severity,
        "lesion_severity": scale.severity_from_count(count),
    })


def _one_replicate(args: tuple) -> pd.DataFrame:
    from synthtrial.analyze.stats import analyze_outcome, attach_truth

    design, model, seed, replicate, methods, trend, alpha, outcomes, random_slopes = args
    trial = simulate_trial(design, model, seed=derive_seed("power", seed, replicate, bits=32))
    data = replicate_outcomes(trial.protocol)
    frames = [analyze_outcome(data, outcome, design.reference, exclude=(design.washout_label,), trend=trend,
                              seed=replicate, alpha=alpha, methods=methods, random_slopes=random_slopes)
              for outcome in outcomes]
    effects = attach_truth(pd.concat(frames, ignore_index=True), trial.truth, outcomes_on_truth_scale=POWER_OUTCOMES)
    effects.insert(0, "replicate", replicate)
    effects["population_effect"] = effects["arm"].map(lambda a: float(model.effects.get(a, 0.0)))
    return effects


def power_study(design: TrialDesign, model: SeverityModel, replicates: int, *, seed: int = 0, workers: int = 1,
                alpha: float = 0.05, trend: bool = True, methods: Sequence[str] = DEFAULT_METHODS,
                outcomes: Sequence[str] = POWER_OUTCOMES, random_slopes: bool = True,
                on_replicate: Callable[[int, int], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run ``replicates`` simulated trials; return every estimate and the per-method summary.

    The result depends on ``seed`` only, not on ``workers``.
    """
    unknown = [o for o in outcomes if o not in POWER_OUTCOMES]
    if unknown:
        raise SynthtrialError(f"unknown outcome '{unknown[0]}'; power studies use {', '.join(POWER_OUTCOMES)}")
    if replicates < 1:
        raise SynthtrialError(f"--replicates must be >= 1, got {replicates}")
    if workers < 1:
        raise SynthtrialError(f"--workers must be >= 1, got {workers}")
    jobs = [(design, model, seed, r, tuple(methods), trend, alpha, tuple(outcomes), random_slopes)
            for r in range(replicates)]
    results: list[pd.DataFrame] = [None] * replicates  # type: ignore[list-item]
    if workers == 1:
        for r, job in enumerate(jobs):
            results[r] = _one_replicate(job)
            if on_replicate:
                on_replicate(r + 1, replicates)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for r, frame in enumerate(pool.map(_one_replicate, jobs, chunksize=max(1, replicates // (8 * workers)))):
                results[r] = frame
                if on_replicate:
                    on_replicate(r + 1, replicates)
    estimates = pd.concat(results, ignore_index=True)
    return estimates, summarize_power(estimates, alpha)


def summarize_power(estimates: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Rejection rate (power or type I error), its Monte-Carlo SE, bias and coverage per outcome/method/arm."""
    data = estimates.assign(rejected=estimates["p"] < alpha, level=np.where(estimates["scope"] == "pooled",
                                                                            "pooled", "per patient"))
    rows = []
    for (outcome, method, level, arm), grp in data.groupby(["outcome", "method", "level", "arm"], sort=False):
        n = int(grp["p"].notna().sum())
        rate = float(grp.loc[grp["p"].notna(), "rejected"].mean()) if n else np.nan
        effect = float(grp["population_effect"].iloc[0])
        covered = grp["covered"].dropna()
        rows.append({
            "outcome": outcome, "method": method, "level": level, "arm": arm, "population_effect": effect,
            "quantity": "type I error" if effect == 0 else "power",
            "rejection_rate": rate, "mc_se": float(np.sqrt(rate * (1 - rate) / n)) if n else np.nan, "tests": n,
            "mean_estimate": float(grp["estimate"].mean()), "mean_truth": float(grp["true_effect"].mean()),
            "bias": float(grp["bias"].mean()), "coverage": float(covered.mean()) if len(covered) else np.nan,
        })
    return pd.DataFrame(rows)


def with_effects(model: SeverityModel, effects: dict[str, float] | None = None, null: bool = False) -> SeverityModel:
    """The model with effects replaced (``null`` sets every effect and its spread to zero)."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    if null:
        fields["effects"] = {a: 0.0 for a in model.effects}
        fields["effect_sd"] = 0.0
    elif effects:
        fields["effects"] = {**model.effects, **effects}
    return SeverityModel(**fields)
