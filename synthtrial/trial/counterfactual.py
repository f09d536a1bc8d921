"""Counterfactual severities: each patient's series had it received one arm on every day.

Definition (stated once; docs/counterfactual.md repeats it for users). For a patient *i* and an arm *X* of the
design (the reference arm included), the counterfactual world "always *X*" is the patient's whole calendar, from
the first to the last day, with *X* given on every day — washout days included, since a patient kept on *X* has
none — and everything that is not the assignment shared with the factual world: the baseline, the patient's own
effects, the trend, the AR(1) noise (the same innovations: common random numbers), the face, the lesion process'
random streams and each image's render seed. Its severity is the simulator's equation evaluated on that
calendar (:func:`synthtrial.trial.simulate.simulate_severity` with ``counterfactual=True``), so on every day
before the first one whose arm differs from *X* the two worlds have the same severity to the bit.

The individual treatment effect of the factual schedule against arm *X* on day *d* is
``ITE_X(i, d) = Y_i(d; factual) - Y_i(d; always X)`` for an outcome *Y* (severity, lesion count). Against the
reference arm it is the effect the schedule delivered that day, wash-in, washout and carryover included; the
patient's delivered contrast of arm *A* (``truth.json``'s ``delivered_effects``) is then the mean of
``ITE_reference`` over *A*'s days minus its mean over the reference days (without noise and clipping, which
the ITEs of a clipped day do include).

A run's severities may come from the protocol (rounded to 4 decimals in the CSV) rather than the simulator; the
counterfactual severity is then the protocol's plus the simulated difference between the two worlds, so it
equals the protocol's exactly where the worlds agree (and is rounded like it elsewhere). It needs the truth that made the severities: the
simulation is run again from ``truth.json`` (its design, model and seed, or the protocol's own schedule) and
must reproduce the protocol's severities; otherwise nothing counterfactual can be said and the request is
refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.trial import scale
from synthtrial.util.errors import SynthtrialError

#: protocol.csv stores severities rounded to 4 decimals: the re-simulated ones must agree within this.
REPRODUCE_TOLERANCE = 0.5e-4 + 1e-9


class CounterfactualError(SynthtrialError):
    """A run whose counterfactual worlds cannot be made (no truth, or a truth that does not reproduce it)."""


def counterfactual_arms(truth: Mapping[str, Any]) -> list[str]:
    """The arms of the design (reference first): one counterfactual world each."""
    arms = truth.get("arms")
    if not isinstance(arms, list) or not arms or not all(isinstance(a, str) and a for a in arms):
        raise CounterfactualError("--counterfactual: the simulation truth names no arms")
    return list(arms)


def counterfactual_severities(protocol: pd.DataFrame, truth: Mapping[str, Any] | None,
                              source: str) -> pd.DataFrame:
    """Every protocol row's severity in each counterfactual world: columns ``patient_id, day, view, arm,
    severity`` (rows in protocol order, arm by arm). ``source`` names where the truth came from, for errors."""
    from synthtrial.trial.simulate import DesignError, SeverityModel, TrialDesign, simulate_severity, simulate_trial

    if not isinstance(truth, Mapping):
        raise CounterfactualError(f"--counterfactual needs the simulation truth, and {source} has none: the "
                                  "protocol gives severities that no simulation made (give a protocol from "
                                  "`synthtrial protocol design`, or one without severities)")
    given = truth.get("given_patients")
    if given:
        raise CounterfactualError(f"--counterfactual: patients {', '.join(map(str, given))} have severities of "
                                  "their own, which no simulation made; leave them out or drop their severities")
    arms = counterfactual_arms(truth)
    try:
        model = SeverityModel(**truth["model"])
        seed = int(truth["seed"])
        if isinstance(truth.get("design"), Mapping):
            design = dict(truth["design"])
            trial = simulate_trial(TrialDesign(**{**design, "arms": tuple(design.get("arms", ()))}), model, seed,
                                   counterfactual=True)
        else:
            schedule = protocol.assign(severity=np.nan)
            trial = simulate_severity(schedule, model, seed, reference=str(truth["reference"]),
                                      no_effect=[t for t in truth.get("treatments", []) if t not in arms],
                                      counterfactual=True)
    except (KeyError, TypeError, ValueError, DesignError) as exc:
        raise CounterfactualError(f"--counterfactual: {source} cannot be simulated again ({exc})") from None
    factual = trial.protocol.drop_duplicates(["patient_id", "day"]).set_index(["patient_id", "day"])["severity"]
    worlds = trial.counterfactual.drop_duplicates(["patient_id", "day", "arm"]).set_index(
        ["patient_id", "day", "arm"])["severity"]
    if sorted(set(worlds.index.get_level_values("arm"))) != sorted(arms):
        raise CounterfactualError(f"--counterfactual: {source} names arms {arms} that its simulation does not have")
    keys = pd.MultiIndex.from_arrays([protocol["patient_id"].astype(str), protocol["day"].astype("int64")])
    simulated = factual.reindex(keys).to_numpy(dtype=float)
    stated = protocol["severity"].to_numpy(dtype=float)
    bad = np.flatnonzero(~(np.abs(simulated - stated) <= REPRODUCE_TOLERANCE))
    if len(bad):
        j = int(bad[0])
        raise CounterfactualError(
            f"--counterfactual: simulating {source} again does not reproduce the protocol (patient "
            f"{protocol['patient_id'].iloc[j]!r}, day {int(protocol['day'].iloc[j])}: severity "
            f"{stated[j]:.4f}, simulated {simulated[j]:.4f}); the truth does not belong to these severities")
    frames = []
    for arm in arms:
        other = worlds.reindex(pd.MultiIndex.from_arrays([keys.get_level_values(0), keys.get_level_values(1),
                                                          [arm] * len(keys)])).to_numpy(dtype=float)
        # the protocol's severity where the worlds agree to the bit, else moved by the simulated difference
        severity = np.where(other == simulated, stated,
                            np.round(np.clip(stated + (other - simulated), scale.SEVERITY_MIN, scale.SEVERITY_MAX), 4))
        frames.append(pd.DataFrame({"patient_id": protocol["patient_id"].astype(str).to_numpy(),
                                    "day": protocol["day"].astype("int64").to_numpy(),
                                    "view": protocol["view"].astype(str).to_numpy(), "arm": arm,
                                    "severity": severity}))
    return pd.concat(frames, ignore_index=True)
