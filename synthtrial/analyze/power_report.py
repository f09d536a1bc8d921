"""The power report: one self-contained HTML file (figures embedded as PNG) from a power summary.

Per design and block length, a power curve per outcome: rejection rate against the effect scale, one line
per method (solid: inferential, dashed: descriptive; the null's 0.05 and its two-MC-SE band drawn), then
the type I error table (effect scale 0), the power/bias/coverage table, and the settings. Image outcomes of
rendered replicates (``ae_pca``, ``grader_*``) get their own panels and rows; their ``tests`` column counts
the rendered replicates they rest on, and having no truth on the severity scale they show no bias or
coverage, only their calibration slope and standardised coverage.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.analyze.estimators import NOT_AVAILABLE
from synthtrial.analyze.power_render import is_image_outcome
from synthtrial.util.atomic import write_text_atomic

_COLUMNS = ["scenario", "outcome", "method", "role", "estimand", "level", "arm", "population_effect", "rejection_rate",
            "mc_se", "tests", "no_p", "bias", "coverage", "calibration", "std_coverage", "fw_trials", "familywise",
            "familywise_holm", "familywise_bh"]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def power_curves(summary: pd.DataFrame, alpha: float) -> list[tuple[str, str]]:
    """(title, base64 PNG) per design and block length: panels per outcome x arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    for (design, days), block in summary.groupby(["design_name", "period_days"], sort=False):
        panels = list(block.groupby(["outcome", "arm"], sort=False))
        cols = min(2, len(panels))
        rows = int(np.ceil(len(panels) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
        for ax, ((outcome, arm), grp) in zip(axes.flat, panels, strict=False):
            for (method, role, level), line in grp.groupby(["method", "role", "level"], sort=False):
                line = line.sort_values("effect_scale")
                if line["rejection_rate"].notna().sum() == 0 or role == NOT_AVAILABLE:
                    continue
                ax.plot(line["effect_scale"], line["rejection_rate"], marker="o", ms=3,
                        ls="-" if role == "inferential" else "--",
                        label=f"{method}{' (pooled)' if level == 'pooled' else ''}")
            ax.axhline(alpha, color="grey", lw=0.8)
            ax.set_ylim(-0.02, 1.02)
            rendered = " (rendered trials)" if is_image_outcome(outcome) else ""
            ax.set_title(f"{outcome}: {arm}{rendered}", fontsize=9)
            ax.set_xlabel("effect scale (x the design's effects)", fontsize=8)
            ax.set_ylabel("rejection rate", fontsize=8)
            ax.legend(fontsize=6, ncol=2)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        figures.append((f"{design}, {days}-day periods", _png(fig)))
    return figures


def _table(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{v:.3f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_power_report(path: str | Path, summary: pd.DataFrame, *, settings: Any, replicates: int,
                       scenarios: Sequence[str]) -> Path:
    """Write the HTML report of a power study."""
    alpha = float(getattr(settings, "alpha", 0.05))
    null = summary[summary["effect_scale"] == 0]
    effect = summary[summary["effect_scale"] != 0]
    sections = [f"<p>{replicates} simulated trials per scenario; scenarios: {html.escape(', '.join(scenarios))}. "
                "Rates are over the tests that returned a p-value; <i>no_p</i> counts the rest (failed fits, or a "
                "randomisation test a fixed-order design does not have). MC SE = sqrt(r(1-r)/tests). "
                "Descriptive methods are not valid tests on autocorrelated series with kinetics; they are shown "
                "because the anchors report them. A method <i>not available</i> on a design (a randomisation test "
                "on a fixed order or with too few orders, which cannot reject) has no power curve. "
                "<i>familywise</i>, <i>familywise_holm</i>, <i>familywise_bh</i>: the share of the "
                "<i>fw_trials</i> trials in which at least one patient is called a responder (the per-patient test "
                "rejects with a beneficial estimate), unadjusted and with Holm and Benjamini-Hochberg adjustment "
                "across the patients; under the null, the family-wise error.</p>"]
    rendered = getattr(settings, "rendered", None)
    if rendered is not None:
        graders = ", ".join(rendered.graders) or "none"
        sections.append(
            f"<p>Image outcomes: the first {rendered.replicates} trial(s) of each scenario were also rendered "
            f"(procedural backend, {rendered.image_size} px, built-in faces) and scored by the graders ({graders}; "
            "columns <i>grader_&lt;grader&gt;_&lt;column&gt;</i>) and by the autoencoder + per-patient PCA "
            f"(<i>ae_pca</i>: {rendered.epochs} epoch(s) at {rendered.ae_image_size} px). Their rates, calibration slopes and "
            "coverages rest on those trials only (<i>tests</i>, and wider MC SEs); they have no truth on the "
            "severity scale, so <i>bias</i> and <i>coverage</i> are blank and <i>calibration</i> (the median "
            "calibration slope: their estimates regressed on the true effects, in their units per severity unit) "
            "says how much of the true effect they show, apart from their noise.</p>")
    for title, png in power_curves(summary, alpha):
        sections.append(f"<h2>Power curves: {html.escape(title)}</h2>"
                        f'<img alt="power curves {html.escape(title)}" src="data:image/png;base64,{png}">')
    if len(null):
        sections += ["<h2>Type I error (effect scale 0)</h2>",
                     _table(null[[c for c in _COLUMNS if c in null.columns and c not in ("calibration",)]])]
    if len(effect):
        sections += ["<h2>Power, bias and coverage</h2>", _table(effect[[c for c in _COLUMNS if c in effect.columns]])]
    values = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings or {})
    flat: dict[str, Any] = {}
    for key, value in values.items():  # a nested config (the rendered replicates') as key.field rows
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    values = flat
    sections += ["<h2>Settings</h2>", _table(pd.DataFrame({"setting": list(values),
                                                           "value": [str(v) for v in values.values()]}))]
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>synthtrial power study</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ddd; padding: 3px 7px; text-align: right; }}
th {{ background: #f4f4f4; }} td:nth-child(-n+7), th:nth-child(-n+7) {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>synthtrial power study</h1>
{''.join(sections)}
</body></html>
"""
    return write_text_atomic(Path(path), doc)
