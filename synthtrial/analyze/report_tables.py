"""The report's tables and figure helpers: HTML cells at one precision, notes said once as footnotes, the pooled
answer (CR1 only where it differs from CR2), and the per-patient results as a patients x methods grid.

Notes: ``effects.csv``'s ``note`` holds clauses separated by "; " (a fit's df, "trend-adjusted", ...). The report
numbers each distinct clause once (:class:`Footnotes`) and marks a row, or a method's column, with the numbers of
its clauses. In the per-patient grid a clause that differs between patients only in its figures (an AR(1) phi,
a df) is said once with its figures replaced by "…"; the figures stay in ``effects.csv``.

Precision: estimates and CIs with :data:`DIGITS` significant decimals (3), p-values with two significant
digits. CR1 (``lmm_cr1``) is shown beside CR2 (``lmm``) only for an outcome and arm where its CI or p, so
rounded, or its decision at alpha, differs.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.analyze.estimate import format_p
from synthtrial.analyze.estimators import NOT_AVAILABLE, POOLED

#: Decimals of estimates and intervals in the report.
DIGITS = 3
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> str:
    """A figure as base64 PNG (closed after)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def number(value: Any, digits: int = DIGITS) -> str:
    """A number as the report shows it: ``digits`` decimals, scientific below 10^-digits; "" for NaN/None."""
    if value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.2e}" if 0 < abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return str(value)


def p_value(p: Any) -> str:
    """A p-value as every command prints it (:func:`~synthtrial.analyze.estimate.format_p`: ``0.41``, ``0.042``,
    ``<0.001``); "" where there is none."""
    if p is None or not np.isfinite(p):
        return ""
    return format_p(p)


def interval(estimate: Any, low: Any, high: Any, digits: int = DIGITS) -> str:
    """``estimate [low, high]`` at ``digits`` decimals (the interval left out where it is missing)."""
    text = number(estimate, digits)
    if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
        text += f" [{number(low, digits)}, {number(high, digits)}]"
    return text


def html_table(frame: pd.DataFrame, *, raw: tuple[str, ...] = (), floats: int = DIGITS, cls: str = "",
               raw_header: bool = False) -> str:
    """``frame`` as an HTML table; columns in ``raw`` hold HTML already (footnote marks), others are escaped, and
    so are the column names unless ``raw_header``."""
    head = "".join(f"<th>{c if raw_header else html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = [str(v) if c in raw else html.escape(number(v, floats)) for c, v in zip(frame.columns, row)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def clauses(note: Any) -> list[str]:
    """A note's clauses ("; "-separated), blanks dropped."""
    if note is None or (isinstance(note, float) and np.isnan(note)):
        return []
    return [c.strip() for c in str(note).split(";") if c.strip()]


class Footnotes:
    """Distinct note clauses, numbered in the order first marked; :meth:`mark` gives a row's ``<sup>`` marks."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, notes: Any) -> str:
        found = clauses(notes) if not isinstance(notes, (list, tuple, set)) else list(notes)
        nums = [self.numbers.setdefault(c, len(self.numbers) + 1) for c in dict.fromkeys(found)]
        return f"<sup>{','.join(map(str, nums))}</sup>" if nums else ""

    def html(self) -> str:
        if not self.numbers:
            return ""
        items = "".join(f'<li value="{n}">{html.escape(text)}</li>' for text, n in self.numbers.items())
        return f"<ol class=notes>{items}</ol>"


def masked(clause: str) -> str:
    """A clause with its figures replaced by "…" (how a per-patient clause reads once for every patient)."""
    return _NUMBER.sub("…", clause)


def shared_clauses(notes: pd.Series) -> list[str]:
    """The distinct clauses of ``notes``: a clause that reads the same in every note as it is, else (it differs
    between rows in its figures) with its figures masked."""
    every = [clauses(n) for n in notes]
    counts: dict[str, int] = {}
    for found in every:
        for c in dict.fromkeys(found):
            counts[c] = counts.get(c, 0) + 1
    out: list[str] = []
    for found in every:
        for c in found:
            shown = c if counts[c] == len(every) else masked(c)
            if shown not in out:
                out.append(shown)
    return out


def cr1_differs(cr2: Any, cr1: Any, alpha: float) -> bool:
    """Whether the CR1 row shows anything the CR2 row does not: its CI or p at the report's precision, or its
    decision at ``alpha``."""
    shown = [(interval(r.estimate, r.ci_low, r.ci_high), p_value(r.p)) for r in (cr2, cr1)]
    decide = [bool(np.isfinite(r.p) and r.p < alpha) for r in (cr2, cr1)]
    return shown[0] != shown[1] or decide[0] != decide[1]


def answer_table(effects: pd.DataFrame, notes: Footnotes, alpha: float) -> tuple[pd.DataFrame, int]:
    """One row per outcome and arm: the pooled CR2 estimate beside its truth (raw, severity scale), the
    calibration slope, the standardised estimate beside the standardised truth, CR1 where it differs, and
    footnote marks. Also returns how many rows show a CR1 that differs."""
    pooled = effects[effects["scope"] == POOLED]
    cr2 = pooled[pooled["method"] == "lmm"]
    cr1 = {(r.outcome, r.arm): r for r in pooled[pooled["method"] == "lmm_cr1"].itertuples(index=False)}
    truth = _severity_truth(cr2)
    rows, differing = [], 0
    for r in cr2.itertuples(index=False):
        other = cr1.get((r.outcome, r.arm))
        show_cr1 = other is not None and cr1_differs(r, other, alpha)
        differing += show_cr1
        true = r.true_effect if pd.notna(r.true_effect) else truth.get(r.arm, np.nan)
        rows.append({
            "outcome": html.escape(str(r.outcome)), "arm": html.escape(str(r.arm)),
            f"estimate [{1 - alpha:.0%} CI]": interval(r.estimate, r.ci_low, r.ci_high),
            "p": p_value(r.p),
            "truth (severity)": number(true),
            "covered": "" if pd.isna(r.covered) or pd.isna(r.true_effect) else ("yes" if _true(r.covered) else "no"),
            "slope [CI]": interval(_get(r, "calibration_slope"), _get(r, "calibration_lo"), _get(r, "calibration_hi")),
            "standardised [CI]": interval(_get(r, "std_estimate"), _get(r, "std_ci_low"), _get(r, "std_ci_high")),
            "standardised truth": number(_get(r, "std_true_effect")),
            "CR1 [CI], p": (f"{interval(other.estimate, other.ci_low, other.ci_high)}, p {p_value(other.p)}"
                            + notes.mark([c for c in clauses(other.note) if c not in clauses(r.note)])
                            if show_cr1 else ""),
            "notes": notes.mark(r.note),
        })
    table = pd.DataFrame(rows)
    if not differing and not table.empty:
        table = table.drop(columns=["CR1 [CI], p"])
    return table, differing


def _get(rec: Any, name: str) -> Any:
    return getattr(rec, name, np.nan)


def _true(value: Any) -> bool:
    return str(value) == "True" or value is True


def _severity_truth(rows: pd.DataFrame) -> dict[str, float]:
    """Per arm, the pooled truth on the severity scale (the estimand every outcome targets)."""
    known = rows[rows["true_effect"].notna()]
    return {arm: float(v) for arm, v in known.groupby("arm", sort=False)["true_effect"].first().items()}


def unavailable_lines(effects: pd.DataFrame) -> list[str]:
    """One line per method the design leaves no chance to reject (role ``not available``): why, in its own words."""
    rows = effects[effects["role"] == NOT_AVAILABLE]
    lines = []
    for method, group in rows.groupby("method", sort=False):
        reasons = [c for c in shared_clauses(group["note"]) if "not available" in c or c.startswith("no ")]
        lines.append(f"{method}: left out — " + ("; ".join(reasons) or "the design leaves it no chance to reject"))
    return lines


def patient_grid(effects: pd.DataFrame, outcome: str, alpha: float, notes: Footnotes) -> pd.DataFrame:
    """Patients x methods for one outcome: each cell the estimate, ``*`` where the test rejects at ``alpha``;
    a column for the patient's truth (its delivered effect on the severity scale, which every outcome's
    per-patient methods target); below, per method, the share rejected (inferential and descriptive
    methods) and the share of CIs covering the truth. Methods not available on the design are left out."""
    rows = effects[(effects["outcome"] == outcome) & (effects["scope"] != POOLED)
                   & (effects["role"] != NOT_AVAILABLE)]
    if rows.empty:
        return pd.DataFrame()
    methods = list(dict.fromkeys(rows.sort_values("role", key=lambda r: r != "inferential", kind="stable")["method"]))
    header = {m: f"{html.escape(m)}{'' if _role(rows, m) == 'inferential' else ' (d)'}"
                 f"{notes.mark(shared_clauses(rows.loc[rows['method'] == m, 'note']))}" for m in methods}
    cells = rows.assign(cell=[number(e) + ("*" if np.isfinite(p) and p < alpha else "")
                              for e, p in zip(rows["estimate"], rows["p"])])
    grid = cells.pivot_table(index=["scope", "arm"], columns="method", values="cell", aggfunc="first", sort=False)
    patients = effects[(effects["scope"] != POOLED) & effects["true_effect"].notna()]
    truth = patients.groupby(["scope", "arm"], sort=False)["true_effect"].first()   # the same for every outcome
    grid = grid.reindex(columns=methods).reset_index()
    grid["scope"], grid["arm"] = grid["scope"].map(lambda v: html.escape(str(v))), grid["arm"].map(
        lambda v: html.escape(str(v)))
    grid.insert(2, "truth", [number(truth.get((s, a))) for s, a in zip(grid["scope"], grid["arm"])])
    summary = []
    for label, values in (("rejected", lambda g: (g["p"] < alpha).mean() if g["p"].notna().any() else np.nan),
                          ("CI covers truth", lambda g: g["covered"].dropna().map(_true).mean()
                           if g["covered"].notna().any() else np.nan)):
        line = {"scope": label, "arm": "all", "truth": ""}
        line.update({m: number(values(rows[rows["method"] == m]), 2) for m in methods})
        summary.append(line)
    grid = pd.concat([grid.fillna(""), pd.DataFrame(summary)], ignore_index=True)
    return grid.rename(columns={"scope": "patient", **header})


def _role(rows: pd.DataFrame, method: str) -> str:
    """``inferential`` when every row of the method is, else ``descriptive`` (marked "(d)" in the grid)."""
    return "inferential" if (rows.loc[rows["method"] == method, "role"] == "inferential").all() else "descriptive"
