"""What every estimator in :mod:`synthtrial.analyze` returns, and the input checks they share.

:class:`Estimate` is one effect (arm minus reference) with SE, CI, p, df and a note saying how it was
made. :func:`working_frame` validates a tidy frame (``patient_id``, ``day``, ``treatment``, an outcome)
into the columns the estimators fit; every rejection is a one-line :class:`SynthtrialError`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.analyze.limits import ALPHA_RANGE, MAX_OUTCOME
from synthtrial.util.errors import SynthtrialError

#: The missing value of every estimate's fields.
NAN = float("nan")
_MAX_SHOWN = 12


@dataclass(frozen=True)
class Estimate:
    """One effect estimate (arm minus reference) with its uncertainty; ``note`` says how it was made."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p: float
    df: float | None = None
    note: str = ""


def missing_estimate(note: str, estimate: float = NAN) -> Estimate:
    """An estimate without uncertainty (SE, CI and p NaN), saying why in ``note``."""
    return Estimate(estimate, NAN, NAN, NAN, NAN, None, note)


def join_notes(*parts: str) -> str:
    """Notes joined by ``; ``, empty ones left out."""
    return "; ".join(part for part in parts if part)


def show_names(names: Collection[Any]) -> str:
    """At most a dozen names, comma-separated, then how many more there are."""
    shown = [str(name) for name in list(names)[:_MAX_SHOWN]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def format_p(p: Any) -> str:
    """A p-value as people read it, the one format of every printed p: two decimals from 0.1 (``0.41``), three
    below (``0.042``, ``0.004``: the digits that matter beside an alpha of 0.05 or 0.01), ``<0.001`` below
    0.001, and ``n/a`` where there is none (NaN, None, not a probability)."""
    try:
        value = float(p)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(value) or not 0 <= value <= 1:
        return "n/a"
    if value < 0.001:
        return "<0.001"
    return f"{value:.3f}" if round(value, 3) < 0.1 else f"{value:.2f}"


def check_alpha(alpha: Any, option: str = "alpha") -> float:
    """``alpha`` as a float when it is a finite number inside :data:`~synthtrial.analyze.limits.ALPHA_RANGE` (one
    rule for every command and estimator); else a one-line error naming ``option``."""
    low, high = ALPHA_RANGE
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = NAN
    if isinstance(alpha, bool) or not (math.isfinite(value) and low < value < high):
        raise SynthtrialError(f"{option} must lie in ({low:g}, {high:g}), got {alpha!r}")
    return value


def working_frame(frame: pd.DataFrame, outcome: str, reference: str, need: Sequence[str]) -> tuple[pd.DataFrame, int]:
    """Validated copy with columns ``y``, ``treatment`` (str) and ``need``; rows without an outcome dropped."""
    if not isinstance(frame, pd.DataFrame):
        raise SynthtrialError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [col for col in (*need, "treatment", outcome) if col not in frame.columns]
    if missing:
        raise SynthtrialError(f"missing column(s) {show_names([repr(m) for m in dict.fromkeys(missing)])} "
                              f"(columns present: {show_names(list(frame.columns))})")
    values = frame[outcome]
    if not pd.api.types.is_numeric_dtype(values):
        raise SynthtrialError(f"outcome '{outcome}' is not numeric (dtype {values.dtype})")
    y = pd.to_numeric(values, errors="coerce").astype(float).to_numpy()
    keep = np.isfinite(y)
    if np.any(np.abs(y[keep]) > MAX_OUTCOME):
        raise SynthtrialError(f"outcome '{outcome}' holds values beyond {MAX_OUTCOME:g} in magnitude (up to "
                              f"{float(np.abs(y[keep]).max()):g}): too large to analyse")
    columns = {"y": y[keep], "treatment": frame["treatment"].astype(str).to_numpy()[keep]}
    for col in need:
        columns[col] = frame[col].to_numpy()[keep]
    if "day" in need:
        day = pd.to_numeric(pd.Series(columns["day"]), errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isfinite(day)) or np.any(day != np.round(day)):
            raise SynthtrialError("column 'day' must hold whole numbers")
        columns["day"] = day.astype(np.int64)
    if "patient_id" in need:
        columns["patient_id"] = frame["patient_id"].astype(str).to_numpy()[keep]
    work = pd.DataFrame(columns)
    present = frame["treatment"].astype(str).unique().tolist()
    if str(reference) not in present:
        raise SynthtrialError(f"reference '{reference}' is not a treatment in the data "
                              f"(treatments present: {show_names(present)})")
    if not (work["treatment"] == str(reference)).any():
        raise SynthtrialError(f"no reference ('{reference}') row has a value of '{outcome}'")
    return work, int((~keep).sum())


def arms_in(work: pd.DataFrame, reference: str) -> list[str]:
    arms = [arm for arm in work["treatment"].unique().tolist() if arm != str(reference)]
    if not arms:
        raise SynthtrialError(f"no arm besides the reference '{reference}' to compare with it")
    return arms


def dropped_note(dropped: int, outcome: str) -> str:
    return f"dropped {dropped} row(s) with missing '{outcome}'" if dropped else ""



def t_quantile(probability: float, df: float) -> float:
    """Student t quantile (scipy.special.stdtrit: the same number as ``scipy.stats.t.ppf``, without its overhead)."""
    from scipy import special

    return float(special.stdtrit(df, probability))


def t_two_sided_p(statistic: float, df: float) -> float:
    """Two-sided p-value of a t statistic (``2 * scipy.stats.t.sf(|t|, df)``, via scipy.special.stdtr)."""
    from scipy import special

    return float(2.0 * special.stdtr(df, -abs(statistic)))
