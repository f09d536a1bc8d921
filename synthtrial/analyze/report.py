"""The analysis report: one self-contained HTML file with the figures a methodologist looks at first.

Per-patient trajectories of the truth beside each outcome with treatment periods shaded, the autoencoder
embedding's principal components coloured by treatment, and a forest plot of every estimate beside the
truth it should recover. Tables state the estimand each method targets once (not per row), show each
outcome's calibration slope beside its noise, and number the pooled rows' notes instead of repeating them.
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
from synthtrial.analyze.estimators import NOT_AVAILABLE
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


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colours(treatments: list[str], reference: str) -> dict[str, str]:
    order = [reference] + [t for t in treatments if t != reference]
    return {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(order)}


def trajectories_figure(outcomes: pd.DataFrame, reference: str, max_patients: int = 12) -> str:
    """Small multiples: oracle and lesion-count severity (left axis), unsupervised score (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    daily = outcomes.groupby(["patient_id", "day", "treatment"], sort=False, as_index=False).mean(numeric_only=True)
    patients = list(dict.fromkeys(daily["patient_id"]))[:max_patients]
    colours = _colours(list(dict.fromkeys(daily["treatment"])), reference)
    cols = 2 if len(patients) > 1 else 1
    rows = int(np.ceil(len(patients) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 2.2 * rows), squeeze=False, sharey=True)
    for ax, pid in zip(axes.flat, patients, strict=False):
        rows_p = daily[daily["patient_id"] == pid].sort_values("day")
        days = rows_p["day"].to_numpy()
        treat = rows_p["treatment"].to_numpy()
        start = 0
        for i in range(1, len(days) + 1):
            if i == len(days) or treat[i] != treat[start]:
                ax.axvspan(days[start] - 0.5, days[i - 1] + 0.5, color=colours[treat[start]], alpha=0.25, lw=0)
                start = i
        ax.plot(days, rows_p["oracle"], color="black", lw=1.4, label="truth (oracle)")
        ax.plot(days, rows_p["lesion_severity"], color="#d62728", lw=0.9, alpha=0.8, label="lesion count")
        if "ae_pca" in rows_p:
            twin = ax.twinx()
            z = (rows_p["ae_pca"] - outcomes["ae_pca"].mean()) / (outcomes["ae_pca"].std() or 1.0)
            twin.plot(days, z, color="#1f77b4", lw=0.9, alpha=0.8, label="autoencoder PCA (z)")
            twin.set_yticks([])
        ax.set_title(f"patient {pid}", fontsize=9, loc="left")
        ax.set_ylim(-0.1, 3.1)
        ax.set_ylabel("severity")
    for ax in list(axes.flat)[len(patients):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color="black", label="truth (oracle)"),
               plt.Line2D([], [], color="#d62728", label="lesion count (severity scale)")]
    if "ae_pca" in outcomes:
        handles.append(plt.Line2D([], [], color="#1f77b4", label="autoencoder PCA (z, right axis)"))
    handles += [plt.matplotlib.patches.Patch(color=c, alpha=0.4, label=t) for t, c in colours.items()]
    fig.legend(handles=handles, loc="upper center", ncol=min(6, len(handles)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _png(fig)


def embedding_figure(embeddings: pd.DataFrame, outcomes: pd.DataFrame, reference: str) -> str:
    """First two principal components of the autoencoder embeddings, coloured by treatment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in embeddings.columns if c.startswith("e") and c[1:].isdigit()]
    x = embeddings[cols].to_numpy(dtype=float)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    pcs = x @ vt[:2].T
    ratio = (s[:2] ** 2) / max((s ** 2).sum(), 1e-12)
    treat = embeddings[["image"]].merge(outcomes[["image", "treatment"]], on="image", how="left")["treatment"]
    colours = _colours(list(dict.fromkeys(treat)), reference)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for t, c in colours.items():
        sel = (treat == t).to_numpy()
        ax.scatter(pcs[sel, 0], pcs[sel, 1], s=8, alpha=0.6, color=c if t != reference else "#555555", label=t)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "PC2")
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title("autoencoder embeddings", fontsize=10, loc="left")
    return _png(fig)


def _per_patient_method(effects: pd.DataFrame) -> str:
    """The per-patient method the forest plot shows: the first inferential one with CIs that ran."""
    for method in ("gls_kinetics", "period", "welch"):
        if (effects["method"] == method).any() and effects.loc[effects["method"] == method, "ci_low"].notna().any():
            return method
    return "welch"


def per_patient_table(effects: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per outcome, method, role and arm: patients, mean estimate, share rejected at ``alpha`` (blank where the
    method is not available on the design) and CI coverage of the truth."""
    return (effects[effects["scope"] != "pooled"]
            .assign(rejected=lambda d: (d["p"] < alpha).astype(float).where(d["role"] != NOT_AVAILABLE))
            .groupby(["outcome", "method", "role", "arm"], as_index=False, sort=False)
            .agg(patients=("scope", "nunique"), mean_estimate=("estimate", "mean"),
                 rejected=("rejected", "mean"), coverage=("covered", lambda c: c.dropna().astype(bool).mean()
                                                       if c.notna().any() else np.nan)))


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
    """Pooled (mixed model, CR2) and per-patient (GLS with kinetics, else period-level) estimates with CIs
    beside the truth; one panel per outcome, sharing the rows, so an arm and patient can be read across
    outcomes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_patient = _per_patient_method(effects)
    shown = effects[((effects["method"] == "lmm") & (effects["scope"] == "pooled"))
                    | ((effects["method"] == per_patient) & (effects["scope"] != "pooled"))]
    outcomes = list(dict.fromkeys(shown["outcome"]))
    rows = (shown[["arm", "scope"]].drop_duplicates()
            .sort_values(["arm", "scope"], key=lambda s: s.map(lambda v: (v != "pooled", v))))
    labels = [f"{r.arm} · {'pooled' if r.scope == 'pooled' else r.scope}" for r in rows.itertuples(index=False)]
    position = {(r.arm, r.scope): len(labels) - 1 - i for i, r in enumerate(rows.itertuples(index=False))}
    ncols = min(3, len(outcomes))
    nrows = int(np.ceil(len(outcomes) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.2, 0.2 * len(labels) * nrows + 1.2),
                             squeeze=False, sharey=True)
    for ax, outcome in zip(axes.flat, outcomes, strict=False):
        for rec in shown[shown["outcome"] == outcome].itertuples(index=False):
            y = position[(rec.arm, rec.scope)]
            colour = "#d62728" if rec.scope == "pooled" else "#333333"
            if np.isfinite(rec.ci_low) and np.isfinite(rec.ci_high):
                ax.plot([rec.ci_low, rec.ci_high], [y, y], color=colour, lw=1)
            ax.plot(rec.estimate, y, "D" if rec.scope == "pooled" else "o", color=colour, ms=3.5)
            if pd.notna(rec.true_effect):
                ax.plot(rec.true_effect, y, "x", color="#2ca02c", ms=6, mew=1.5)
        ax.axvline(0, color="#999999", lw=0.8, ls=":")
        ax.set_title(OUTCOME_LABELS.get(outcome, outcome), fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(outcomes):]:
        ax.axis("off")
    axes[0, 0].set_yticks(range(len(labels)))
    axes[0, 0].set_yticklabels(labels[::-1], fontsize=7)
    fig.text(0.5, 0.0, "effect vs reference in each outcome's units: red = pooled mixed model (CR2), black = "
             f"per-patient {per_patient}, green x = truth", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return _png(fig)


def _table(frame: pd.DataFrame, floats: int = 3) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else (f"{v:.2e}" if 0 < abs(v) < 10 ** -floats else f"{v:.{floats}f}")
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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


def numbered_notes(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``frame`` with its ``note`` column replaced by note numbers, and the notes listed once below it."""
    if "note" not in frame.columns or frame.empty:
        return frame, ""
    notes = list(dict.fromkeys(frame["note"].fillna("").astype(str)))
    number = {note: i + 1 for i, note in enumerate(notes)}
    listed = "".join(f"<li>{html.escape(note) or '(none)'}</li>" for note in notes)
    return frame.assign(note=frame["note"].fillna("").astype(str).map(number)), f"<ol class=notes>{listed}</ol>"


def _truth_line(truth: dict) -> str:
    def show(key: str) -> str:
        return ", ".join(f"{a} {v:+.3f}" for a, v in (truth.get(key) or {}).items() if v is not None) or "n/a"

    return ("<p>Simulation truth: steady-state population effects " + html.escape(show("population_effects"))
            + "; delivered through these schedules, population " + html.escape(show("population_delivered_effects"))
            + " (carryover part " + html.escape(show("population_carryover_effects")) + "), mean over the patients "
            + html.escape(show("mean_delivered_effects")) + ".</p>")


def write_report(path: Path, *, run_dir: Path, outcomes: pd.DataFrame, effects: pd.DataFrame, truth: dict | None,
                 reference: str, settings: dict[str, Any], timings: dict[str, float],
                 individual: pd.DataFrame | None = None) -> Path:
    """Write ``report.html``: summary table, trajectories, embedding plot, forest plot, settings (and, for a run
    with counterfactual worlds, each outcome's error against the individual effects)."""
    pooled_columns = ["outcome", "method", "arm", "estimate", "se", "ci_low", "ci_high", "p", "true_effect", "bias",
                      "covered", "true_sample_mean", "note"]
    pooled, pooled_notes = numbered_notes(effects[effects["scope"] == "pooled"][
        [c for c in pooled_columns if c in effects.columns]])
    per_patient, responders = per_patient_table(effects, settings.get("alpha", 0.05)), responder_table(effects)
    one_scale = effects[(effects["scope"] == "pooled") & (effects["method"] == "lmm")][
        ["outcome", "arm", "std_estimate", "std_ci_low", "std_ci_high", "std_true_effect",
         "std_covered"]] if "std_estimate" in effects else pd.DataFrame()
    sections = [
        "<h2>Estimands</h2>",
        "<p>What each method's estimate targets; <i>true_effect</i>, <i>bias</i> and <i>covered</i> are measured "
        "against it (docs/analysis.md states each in ICH E9(R1) terms).</p>",
        _table(estimand_table(effects)),
        "<h2>Pooled effects (linear mixed model)</h2>",
        "<p><i>lmm</i>: CR2 cluster-robust SE with Satterthwaite df (the small-sample choice); <i>lmm_cr1</i>: "
        "CR1 with G - 1 df. In a balanced design the two SEs coincide; the df differ. Their interval is for the "
        "population: <i>true_effect</i> is the population effect delivered through these schedules, "
        "<i>true_sample_mean</i> the mean of these patients' delivered contrasts. <i>note</i>: the numbered "
        "notes below the table.</p>",
        _table(pooled), pooled_notes,
        "<h2>Calibration: attenuation apart from noise</h2>",
        "<p><i>slope</i>: each outcome's estimates regressed on the true effects they target (severity scale) "
        "through the origin, per patient and arm for a per-patient method (<i>arm</i> all), the estimate over "
        "its truth for a pooled row, with its CI (<i>slope_low</i>, <i>slope_high</i>). In the outcome's units "
        "per severity unit: 1 on the severity scale means nothing is lost; noise widens the interval but does "
        "not move the slope. <i>residual_sd</i>: the outcome's within-patient residual SD, its noise. "
        "Descriptive methods left out.</p>",
        _table(calibration_table(effects)),
        "<h2>All outcomes on one scale</h2>",
        "<p>Each pooled effect divided by its outcome's within-patient residual SD, beside the oracle's "
        "standardised truth; the interval carries the SD's own uncertainty (delta method).</p>",
        _table(one_scale),
        "<p>Effects are differences from the reference arm "
        f"<b>{html.escape(reference)}</b> in the outcome's own units; the truth (the mean effect the schedule "
        "delivered, wash-in and carryover included) applies to outcomes on the severity scale.</p>",
        "<h2>Per-patient tests</h2>",
        "<p><i>inferential</i> methods hold their size on autocorrelated series with kinetics; <i>descriptive</i> "
        "ones (Welch, day-level permutation, GLS with a step, Newey-West) do not and are shown because the "
        "anchors report them; <i>not available</i>: the design leaves the test no chance to reject (a "
        "randomisation test on a fixed order or with too few orders), so its row is no test (rejected blank).</p>",
        _table(per_patient),
        "<h2>Responders</h2>",
        "<p>Per inferential per-patient test: a patient is a responder when the test rejects at alpha with a "
        "beneficial (negative) estimate; <i>p_holm</i> (family-wise) and <i>p_bh</i> (false discovery rate) "
        "adjust the p-values across the patients of one outcome, method and arm. <i>responders</i>, "
        "<i>holm</i> and <i>bh</i> list the patients called without adjustment, after Holm and after BH; "
        "<i>min_p*</i> are the family's smallest p-values.</p>",
        _table(responders),
        "<h2>Trajectories</h2>",
        f'<img alt="trajectories" src="data:image/png;base64,{trajectories_figure(outcomes, reference)}">',
        "<h2>What the outcomes measured</h2>",
        "<p>Each patient's frontal image on the first day and at the end of every treatment period, every lesion "
        "outlined in its type's colour from the run's exact instance masks.</p>",
        f'<img alt="image strip" src="data:image/png;base64,{image_strip(run_dir, outcomes)}">',
    ]
    emb_path = path.parent / "embeddings.parquet"  # the analysis folder being written
    if "ae_pca" in outcomes and emb_path.is_file():
        emb = pd.read_parquet(emb_path)
        sections += ["<h2>Autoencoder embeddings</h2>",
                     f'<img alt="embeddings" src="data:image/png;base64,{embedding_figure(emb, outcomes, reference)}">']
    sections += ["<h2>Estimates beside the truth</h2>",
                 f'<img alt="forest plot" src="data:image/png;base64,{forest_figure(effects)}">',
                 "<h2>Settings</h2>",
                 _table(pd.DataFrame({"setting": list(settings), "value": [str(v) for v in settings.values()]})),
                 "<h2>Time per stage (s)</h2>",
                 _table(pd.DataFrame({"stage": list(timings), "seconds": list(timings.values())}), floats=2)]
    if individual is not None:
        from synthtrial.analyze.individual import summary

        sections[sections.index("<h2>Responders</h2>"):sections.index("<h2>Responders</h2>")] = [
            "<h2>Against the individual effects (counterfactual worlds)</h2>",
            "<p>Each per-patient estimate against the patient's own effect, read off the images of its series "
            "under the reference arm (<i>rmse_individual</i>), beside its error against the patients' average "
            "(<i>rmse_average</i>); <i>sd_individual</i>: how much the patients' effects differ. In the outcome's "
            "units (severity; lesions for lesion_count). Rows: individual_effects.csv.</p>",
            _table(summary(individual))]
    if truth is not None:
        sections.insert(0, _truth_line(truth))
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>synthtrial analysis: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ddd; padding: 3px 7px; text-align: right; }}
th {{ background: #f4f4f4; }} td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }} ol.notes {{ font-size: 11px; color: #555; }}
</style></head><body>
<h1>synthtrial analysis: {html.escape(str(run_dir))}</h1>
<p>{len(outcomes)} images, {outcomes['patient_id'].nunique()} patients.</p>
{''.join(sections)}
</body></html>
"""
    return write_text_atomic(path, doc)
