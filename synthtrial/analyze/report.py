"""The analysis report: one self-contained HTML file that leads with the answer.

Order: (1) the answer — every outcome's pooled estimate (mixed model, CR2) beside its truth, as a forest plot on
one scale (each effect over its outcome's within-patient residual SD, beside the standardised truth) and a table
in the outcome's own units with the raw truth (the severity-scale estimand every outcome targets) on every row;
(2) grader accuracy (:mod:`synthtrial.analyze.report_graders`); (3) the trajectories, truth beside every outcome
and grader; (4) per-patient results as a patients x methods grid per outcome; (5) details: estimands, calibration,
responders, the image strip, embeddings, settings and timings. Notes are said once, as numbered footnotes
(:mod:`synthtrial.analyze.report_tables`); CR1 appears only where it differs from CR2; a method the design
leaves no chance to reject is left out of the grid with one line saying why.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.analyze.estimands import DESCRIPTIONS
from synthtrial.analyze.estimators import GRADER_OUTCOME_PREFIX
from synthtrial.analyze.report_graders import grader_section
from synthtrial.analyze.report_tables import (Footnotes, answer_table, html_table, patient_grid, png, pyplot,
                                             unavailable_lines)
from synthtrial.run import rundir
from synthtrial.util.atomic import write_text_atomic

PALETTE = ("#bdbdbd", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
OUTCOME_LABELS = {
    "oracle": "oracle (simulated severity)",
    "lesion_severity": "lesion count on the severity scale",
    "lesion_count": "lesion count",
    "iga": "IGA from drawn lesions",
    "ae_pca": "autoencoder + PCA (unsupervised)",
}


def _colours(treatments: list[str], reference: str) -> dict[str, str]:
    order = [reference] + [t for t in treatments if t != reference]
    return {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(order)}


#: Colours of the grader outcomes on the trajectories, in order.
GRADER_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _severity_scale(column: str) -> bool:
    """Outcomes on the 0-3 severity scale, drawn on the trajectories' own axis (others are z-scored)."""
    return column in ("oracle", "lesion_severity") or column.endswith("_severity")


def trajectory_outcomes(outcomes: pd.DataFrame) -> list[str]:
    """The grader outcomes drawn on the trajectories (``grader_*`` columns with at least one value)."""
    return [c for c in outcomes.columns if c.startswith(GRADER_OUTCOME_PREFIX) and outcomes[c].notna().any()]


def _shade_periods(ax: Any, days: np.ndarray, treat: np.ndarray, colours: dict[str, str]) -> None:
    start = 0
    for i in range(1, len(days) + 1):
        if i == len(days) or treat[i] != treat[start]:
            ax.axvspan(days[start] - 0.5, days[i - 1] + 0.5, color=colours[treat[start]], alpha=0.25, lw=0)
            start = i


def trajectories_figure(outcomes: pd.DataFrame, reference: str, max_patients: int = 12) -> str:
    """:func:`trajectories_axes` as base64 PNG."""
    return png(trajectories_axes(outcomes, reference, max_patients))


def trajectories_axes(outcomes: pd.DataFrame, reference: str, max_patients: int = 12) -> Any:
    """The figure of small multiples: per patient, the truth (oracle) and the lesion count on the severity axis,
    every grader outcome (on that axis when it is a severity, else z-scored on the right axis, dashed) and the
    unsupervised score (z-scored, right axis), treatment periods shaded."""
    plt = pyplot()
    daily = outcomes.groupby(["patient_id", "day", "treatment"], sort=False, as_index=False).mean(numeric_only=True)
    patients = list(dict.fromkeys(daily["patient_id"]))[:max_patients]
    colours = _colours(list(dict.fromkeys(daily["treatment"])), reference)
    graders = trajectory_outcomes(outcomes)
    styles = {c: GRADER_COLOURS[i % len(GRADER_COLOURS)] for i, c in enumerate(graders)}
    right = [c for c in [*graders, "ae_pca"] if c in outcomes and not _severity_scale(c)]
    cols = 2 if len(patients) > 1 else 1
    rows = int(np.ceil(len(patients) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 2.2 * rows), squeeze=False, sharey=True)
    for ax, pid in zip(axes.flat, patients, strict=False):
        rows_p = daily[daily["patient_id"] == pid].sort_values("day")
        days = rows_p["day"].to_numpy()
        _shade_periods(ax, days, rows_p["treatment"].to_numpy(), colours)
        ax.plot(days, rows_p["oracle"], color="black", lw=1.4)
        ax.plot(days, rows_p["lesion_severity"], color="#d62728", lw=0.9, alpha=0.8)
        for c in graders:
            if _severity_scale(c):
                ax.plot(days, rows_p[c], color=styles[c], lw=0.9, alpha=0.9)
        if right:
            twin = ax.twinx()
            for c in right:
                z = (rows_p[c] - outcomes[c].mean()) / (outcomes[c].std() or 1.0)
                twin.plot(days, z, color=styles.get(c, "#1f77b4"), lw=0.9, alpha=0.8,
                          ls="--" if c != "ae_pca" else "-")
            twin.set_yticks([])
        ax.set_title(f"patient {pid}", fontsize=9, loc="left")
        ax.set_ylim(-0.1, 3.1)
        ax.set_ylabel("severity")
    for ax in list(axes.flat)[len(patients):]:
        ax.axis("off")
    fig.legend(handles=_trajectory_legend(plt, outcomes, graders, styles, colours), loc="lower center", ncol=4,
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return fig


def _trajectory_legend(plt: Any, outcomes: pd.DataFrame, graders: list[str], styles: dict[str, str],
                       colours: dict[str, str]) -> list[Any]:
    handles = [plt.Line2D([], [], color="black", label="truth (oracle)"),
               plt.Line2D([], [], color="#d62728", label="lesion count (severity scale)")]
    handles += [plt.Line2D([], [], color=styles[c], ls="-" if _severity_scale(c) else "--",
                           label=c[len(GRADER_OUTCOME_PREFIX):] + ("" if _severity_scale(c) else " (z, right axis)"))
                for c in graders]
    if "ae_pca" in outcomes:
        handles.append(plt.Line2D([], [], color="#1f77b4", label="autoencoder PCA (z, right axis)"))
    return handles + [plt.matplotlib.patches.Patch(color=c, alpha=0.4, label=t) for t, c in colours.items()]


def embedding_axes(embeddings: pd.DataFrame, outcomes: pd.DataFrame, reference: str) -> Any:
    """The figure of the first two principal components of the autoencoder embeddings, coloured by treatment.
    At most five ticks per axis, with a shared scale factor where the values are small, so the tick labels
    never overlap however little the embeddings spread (a small run's)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    cols = [c for c in embeddings.columns if c.startswith("e") and c[1:].isdigit()]
    x = embeddings[cols].to_numpy(dtype=float)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    pcs = np.zeros((len(x), 2))
    pcs[:, :min(2, vt.shape[0])] = x @ vt[:2].T
    ratio = (s[:2] ** 2) / max((s ** 2).sum(), 1e-12)
    treat = embeddings[["image"]].merge(outcomes[["image", "treatment"]], on="image", how="left")["treatment"]
    colours = _colours(list(dict.fromkeys(treat)), reference)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for t, c in colours.items():
        sel = (treat == t).to_numpy()
        ax.scatter(pcs[sel, 0], pcs[sel, 1], s=8, alpha=0.6, color=c if t != reference else "#555555", label=t)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=5))
        formatter = ScalarFormatter(useMathText=True)
        formatter.set_powerlimits((-2, 3))
        axis.set_major_formatter(formatter)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "PC2")
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title("autoencoder embeddings", fontsize=10, loc="left")
    return fig


def embedding_figure(embeddings: pd.DataFrame, outcomes: pd.DataFrame, reference: str) -> str:
    """:func:`embedding_axes` as base64 PNG."""
    return png(embedding_axes(embeddings, outcomes, reference))


def responder_table(effects: pd.DataFrame) -> pd.DataFrame:
    """Per outcome, inferential per-patient method and arm: the patients called responders (unadjusted, Holm,
    BH) and each patient's p, Holm and BH p."""
    if "responder" not in effects.columns:
        return pd.DataFrame()
    rows = effects[(effects["scope"] != "pooled") & (effects["role"] == "inferential") & effects["p"].notna()]
    if rows.empty:
        return pd.DataFrame()

    def called(group: pd.Series) -> str:
        return ", ".join(rows.loc[group.index[group.eq(True).to_numpy()], "scope"].astype(str)) or "none"

    return (rows.groupby(["outcome", "method", "arm"], as_index=False, sort=False)
            .agg(patients=("scope", "nunique"), responders=("responder", called),
                 holm=("responder_holm", called), bh=("responder_bh", called),
                 min_p=("p", "min"), min_p_holm=("p_holm", "min"), min_p_bh=("p_bh", "min")))


def forest_figure(effects: pd.DataFrame) -> str:
    """The answer at a glance: per outcome and arm, the pooled estimate (mixed model, CR2) with its CI beside
    the truth, all on one scale (each effect over its outcome's within-patient residual SD, so outcomes in counts,
    grades and severity read side by side); in raw units where the run has no standardised figures."""
    plt = pyplot()
    pooled = effects[(effects["scope"] == "pooled") & (effects["method"] == "lmm")]
    std = "std_estimate" in pooled.columns and pooled["std_estimate"].notna().any()
    est, low, high, true = (("std_estimate", "std_ci_low", "std_ci_high", "std_true_effect") if std else
                            ("estimate", "ci_low", "ci_high", "true_effect"))
    labels = [f"{OUTCOME_LABELS.get(r.outcome, r.outcome)} · {r.arm}" for r in pooled.itertuples(index=False)]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(labels) + 1.2))
    for y, rec in enumerate(pooled.itertuples(index=False)):
        y = len(labels) - 1 - y
        lo, hi = getattr(rec, low), getattr(rec, high)
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [y, y], color="#d62728", lw=1.2)
        ax.plot(getattr(rec, est), y, "D", color="#d62728", ms=4)
        if pd.notna(getattr(rec, true)):
            ax.plot(getattr(rec, true), y, "x", color="#2ca02c", ms=7, mew=1.8)
    ax.axvline(0, color="#999999", lw=0.8, ls=":")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    ax.set_xlabel("effect / within-patient residual SD (standardised)" if std else "effect in the outcome's units",
                  fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("pooled estimate and CI (red) beside the truth (green x)", fontsize=9, loc="left")
    fig.tight_layout()
    return png(fig)


#: Outline colours of the lesion types in the image strip.
TYPE_COLOURS = {"open_comedo": (20, 20, 20), "closed_comedo": (245, 245, 245), "papule": (230, 30, 30),
                "pustule": (250, 220, 0), "nodule": (150, 40, 200), "mark": (255, 120, 170), "scar": (40, 120, 255)}


def strip_days(rows: pd.DataFrame) -> list[int]:
    """The days a patient's strip shows: the first day, then the last day of every treatment period."""
    per_day = rows.drop_duplicates("day").sort_values("day")
    treatments = per_day["treatment"].tolist()
    days = per_day["day"].tolist()
    ends = [days[k] for k in range(len(days)) if k == len(days) - 1 or treatments[k + 1] != treatments[k]]
    return list(dict.fromkeys([days[0], *ends]))


def image_strip(run_dir: Path, outcomes: pd.DataFrame, *, max_patients: int = 10, thumb: int = 160) -> str:
    """Base64 PNG: per patient (a row), the frontal image on the first day and at the end of every period, each
    lesion outlined in its type's colour from the run's exact instance masks, labelled with day, treatment and
    the lesion count."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    lesions = pd.read_parquet(run_dir / "lesions.parquet", columns=["image", "lesion_id", "type"])
    types = {(r.image, int(r.lesion_id) + 1): r.type for r in lesions.itertuples(index=False)}
    frontal = outcomes[outcomes["view"] == "frontal"]
    patients = list(dict.fromkeys(frontal["patient_id"]))[:max_patients]
    rows = {pid: frontal[frontal["patient_id"] == pid] for pid in patients}
    plan = {pid: [rows[pid][rows[pid]["day"] == d].iloc[0] for d in strip_days(rows[pid])] for pid in patients}
    cols = max((len(v) for v in plan.values()), default=1)
    label_h, name_w = 28, 60
    sheet = Image.new("RGB", (name_w + cols * thumb, 24 + len(patients) * (thumb + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x = name_w
    for name, colour in TYPE_COLOURS.items():  # legend
        draw.rectangle([x, 6, x + 10, 16], fill=colour, outline=(0, 0, 0))
        draw.text((x + 14, 5), name.replace("_", " "), fill=(0, 0, 0), font=font)
        x += 24 + 6 * len(name)
    for r, pid in enumerate(patients):
        y = 24 + r * (thumb + label_h)
        draw.text((4, y + thumb // 2), str(pid), fill=(0, 0, 0), font=font)
        for c, rec in enumerate(plan[pid]):
            with Image.open(run_dir / rec["image"]) as im:
                picture = np.asarray(im.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS)).copy()
            mask_path = run_dir / rundir.mask_path_for(str(rec["image"]))
            if mask_path.is_file():
                with Image.open(mask_path) as im:
                    labels = np.asarray(im).astype(np.int32)
                small = cv2.resize(labels, (thumb, thumb), interpolation=cv2.INTER_NEAREST)
                edge = cv2.morphologyEx((small > 0).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((2, 2), np.uint8))
                for label in np.unique(small[edge > 0]):
                    colour = TYPE_COLOURS.get(types.get((rec["image"], int(label))))
                    if label and colour is not None:
                        picture[(edge > 0) & (small == label)] = colour
            sheet.paste(Image.fromarray(picture), (name_w + c * thumb, y))
            count = int(rec["lesion_count"]) if "lesion_count" in rec and pd.notna(rec["lesion_count"]) else None
            text = f"day {int(rec['day'])} {rec['treatment']}"[:24]
            draw.text((name_w + c * thumb + 2, y + thumb + 1), text, fill=(0, 0, 0), font=font)
            if count is not None:
                draw.text((name_w + c * thumb + 2, y + thumb + 13), f"{count} lesions", fill=(90, 90, 90), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def estimand_table(effects: pd.DataFrame) -> pd.DataFrame:
    """Each estimand in the effects, what it is and which methods target it."""
    if "estimand" not in effects.columns:
        return pd.DataFrame()
    grouped = effects.groupby("estimand", sort=False)["method"].agg(lambda m: ", ".join(dict.fromkeys(m)))
    return pd.DataFrame({"estimand": grouped.index, "methods": grouped.to_numpy(),
                         "what it is": [DESCRIPTIONS.get(e, "") for e in grouped.index]})


def calibration_table(effects: pd.DataFrame) -> pd.DataFrame:
    """Per outcome and method (per-patient methods over their patients and arms; pooled rows per arm): the
    calibration slope with its CI, beside the outcome's residual SD (its noise)."""
    if "calibration_slope" not in effects.columns:
        return pd.DataFrame()
    rows = effects[effects["calibration_slope"].notna() & (effects["role"] != "descriptive")]
    per_patient = rows[rows["scope"] != "pooled"].assign(arm="all")
    pooled = rows[rows["scope"] == "pooled"]
    keys = ["outcome", "method", "arm"]
    return (pd.concat([pooled, per_patient]).drop_duplicates(keys)
            [keys + ["calibration_slope", "calibration_lo", "calibration_hi", "residual_sd"]]
            .rename(columns={"calibration_slope": "slope", "calibration_lo": "slope_low",
                             "calibration_hi": "slope_high"}))


def _truth_line(truth: dict) -> str:
    def show(key: str) -> str:
        return ", ".join(f"{a} {v:+.3f}" for a, v in (truth.get(key) or {}).items() if v is not None) or "n/a"

    return ("<p>Simulation truth: steady-state population effects " + html.escape(show("population_effects"))
            + "; delivered through these schedules, population " + html.escape(show("population_delivered_effects"))
            + " (carryover part " + html.escape(show("population_carryover_effects")) + "), mean over the patients "
            + html.escape(show("mean_delivered_effects")) + ".</p>")


def _img(alt: str, data: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def answer_section(effects: pd.DataFrame, reference: str, alpha: float, notes: Footnotes) -> list[str]:
    """Section 1: the forest plot and the table of every outcome's pooled estimate beside its truth."""
    table, differing = answer_table(effects, notes, alpha)
    cr1 = (f"CR1 (<i>lmm_cr1</i>, G - 1 df) is shown only where it differs from CR2 at this precision or in its "
           f"decision at alpha {alpha:g}: {differing} row(s)." if differing else
           f"CR1 (<i>lmm_cr1</i>, G - 1 df) agrees with CR2 on every row at this precision and in its decision at "
           f"alpha {alpha:g}, so it is not shown (it is in effects.csv).")
    return [
        "<h2>1. Pooled effects beside the truth</h2>",
        "<h3>Estimates beside the truth</h3>",
        _img("forest plot", forest_figure(effects)),
        "<h3>All outcomes on one scale</h3>",
        "<p>Linear mixed model, CR2 cluster-robust SE with Satterthwaite df, each arm against the reference "
        f"<b>{html.escape(reference)}</b> in the outcome's own units. <i>truth (severity)</i>: the population "
        "effect delivered through these schedules on the 0-3 severity scale, the estimand of every outcome "
        "(the raw truth; outcomes on other scales are read against it through their calibration <i>slope</i>, "
        "the outcome's units per severity unit); <i>covered</i>: whether the CI holds it (outcomes on the "
        "severity scale). <i>standardised</i>: the effect over the outcome's within-patient residual SD, beside "
        f"the standardised truth. {cr1} Numbers in <i>notes</i> refer to the notes below.</p>",
        html_table(table, raw=tuple(table.columns), cls="answer"),
    ]


def patients_section(effects: pd.DataFrame, alpha: float, notes: Footnotes) -> list[str]:
    """Section 4: per outcome, the patients x methods grid; unavailable methods named once with the reason."""
    parts = ["<h2>4. Per-patient tests</h2>",
             "<p>One grid per outcome: a row per patient (and arm), a column per method, each cell the estimate "
             f"(<b>*</b>: the test rejects at alpha {alpha:g}); <i>truth</i> is the patient's delivered effect. "
             "Inferential methods first; <i>(d)</i> marks descriptive ones (Welch, day-level permutation, GLS with "
             "a step, Newey-West), shown because the anchors report them. The last rows give each method's share "
             "of patients rejected and of CIs covering the truth.</p>"]
    parts += [f"<p class=unavailable>{html.escape(line)}</p>" for line in unavailable_lines(effects)]
    for i, outcome in enumerate(dict.fromkeys(effects.loc[effects["scope"] != "pooled", "outcome"])):
        grid = patient_grid(effects, outcome, alpha, notes)
        if grid.empty:
            continue
        title = html.escape(OUTCOME_LABELS.get(outcome, outcome))
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{title}</summary>"
                     f"{html_table(grid, raw=tuple(grid.columns), cls='grid', raw_header=True)}</details>")
    return parts


def individual_section(individual: pd.DataFrame) -> list[str]:
    """Each per-patient estimate against the patient's own effect (counterfactual worlds)."""
    from synthtrial.analyze.individual import summary

    return ["<h3>Against the individual effects (counterfactual worlds)</h3>",
            "<p>Each per-patient estimate against the patient's own effect, read off the images of its series "
            "under the reference arm (<i>rmse_individual</i>), beside its error against the patients' average "
            "(<i>rmse_average</i>); <i>sd_individual</i>: how much the patients' effects differ. In the outcome's "
            "units (severity; lesions for lesion_count). Rows: individual_effects.csv.</p>",
            html_table(summary(individual))]


def details_section(run_dir: Path, path: Path, outcomes: pd.DataFrame, effects: pd.DataFrame, reference: str,
                    settings: dict[str, Any], timings: dict[str, float]) -> list[str]:
    """Section 5: estimands, calibration, responders, the image strip, embeddings, settings and timings."""
    parts = [
        "<h2>5. Details</h2>",
        "<h3>Estimands</h3>",
        "<p>What each method's estimate targets; <i>true_effect</i>, <i>bias</i> and <i>covered</i> are measured "
        "against it (docs/analysis.md states each in ICH E9(R1) terms).</p>",
        html_table(estimand_table(effects)),
        "<h3>Calibration: attenuation apart from noise</h3>",
        "<p><i>slope</i>: each outcome's estimates regressed on the true effects they target (severity scale) "
        "through the origin, per patient and arm for a per-patient method (<i>arm</i> all), the estimate over "
        "its truth for a pooled row, with its CI (<i>slope_low</i>, <i>slope_high</i>). In the outcome's units "
        "per severity unit: 1 on the severity scale means nothing is lost; noise widens the interval but does "
        "not move the slope. <i>residual_sd</i>: the outcome's within-patient residual SD, its noise. "
        "Descriptive methods left out.</p>",
        html_table(calibration_table(effects)),
        "<h3>Responders</h3>",
        "<p>Per inferential per-patient test: a patient is a responder when the test rejects at alpha with a "
        "beneficial (negative) estimate; <i>p_holm</i> (family-wise) and <i>p_bh</i> (false discovery rate) "
        "adjust the p-values across the patients of one outcome, method and arm. <i>responders</i>, "
        "<i>holm</i> and <i>bh</i> list the patients called without adjustment, after Holm and after BH; "
        "<i>min_p*</i> are the family's smallest p-values.</p>",
        html_table(responder_table(effects)),
        "<h3>What the outcomes measured</h3>",
        "<p>Each patient's frontal image on the first day and at the end of every treatment period, every lesion "
        "outlined in its type's colour from the run's exact instance masks.</p>",
        _img("image strip", image_strip(run_dir, outcomes)),
    ]
    emb_path = path.parent / "embeddings.parquet"  # the analysis folder being written
    if "ae_pca" in outcomes and emb_path.is_file():
        parts += ["<h3>Autoencoder embeddings</h3>",
                  _img("embeddings", embedding_figure(pd.read_parquet(emb_path), outcomes, reference))]
    agreement = path.parent / "agreement.csv"  # analyze writes it beside the report when the run was rated
    if agreement.is_file():
        parts += ["<h3>Rater panel agreement (observed beside implied)</h3>", html_table(pd.read_csv(agreement))]
    return parts + [
        "<h3>Settings</h3>",
        html_table(pd.DataFrame({"setting": list(settings), "value": [str(v) for v in settings.values()]})),
        "<h3>Time per stage (s)</h3>",
        html_table(pd.DataFrame({"stage": list(timings), "seconds": list(timings.values())}), floats=2)]


def write_report(path: Path, *, run_dir: Path, outcomes: pd.DataFrame, effects: pd.DataFrame, truth: dict | None,
                 reference: str, settings: dict[str, Any], timings: dict[str, float],
                 individual: pd.DataFrame | None = None) -> Path:
    """Write ``report.html``: the answer first (pooled effects beside the truth), then grader accuracy,
    trajectories, per-patient grids (and, for a run with counterfactual worlds, each outcome's error against the
    individual effects) and the details (see the module docstring)."""
    alpha = float(settings.get("alpha", 0.05))
    notes = Footnotes()
    sections = [_truth_line(truth)] if truth is not None else []
    sections += answer_section(effects, reference, alpha, notes)
    sections += ["<h2>2. Grader accuracy</h2>", grader_section(run_dir, outcomes),
                 "<h2>3. Trajectories</h2>",
                 "<p>Per patient: the truth, the lesion count on the severity scale, every grader outcome (a "
                 "severity on the same axis; counts and grades z-scored on the right axis, dashed) and the "
                 "unsupervised score; treatment periods shaded.</p>",
                 _img("trajectories", trajectories_figure(outcomes, reference))]
    sections += patients_section(effects, alpha, notes)
    if individual is not None:
        sections += individual_section(individual)
    sections += ["<h2>Notes</h2>", notes.html() or "<p>(none)</p>"]
    sections += details_section(run_dir, path, outcomes, effects, reference, settings, timings)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>synthtrial analysis: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ddd; padding: 3px 7px; text-align: right; }}
th {{ background: #f4f4f4; }} td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }} ol.notes {{ font-size: 11px; color: #555; }} sup {{ color: #777; }}
p.warn {{ color: #a15c00; }} p.unavailable {{ color: #555; font-style: italic; }}
</style></head><body>
<h1>synthtrial analysis: {html.escape(str(run_dir))}</h1>
<p>{len(outcomes)} images, {outcomes['patient_id'].nunique()} patients; effects against
<b>{html.escape(reference)}</b>.</p>
{''.join(sections)}
</body></html>
"""
    return write_text_atomic(path, doc)
