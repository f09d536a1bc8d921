"""Agreement of a rater panel as the field reports it, each beside the value the panel's parameters imply.

Observed, on every image's first reads (images x raters, complete):

* counts: ICC(2,1) and ICC(2,k) (two-way random effects, absolute agreement; ``pingouin.intraclass_corr``'s
  ICC2 and ICC2k, named ICC(A,1) and ICC(A,k) from pingouin 0.6 on) and Krippendorff's alpha, interval metric (the ``krippendorff`` package);
* grades (IGA, Hayashi level): ``kappa (quadratic)``, the quadratic-weighted Cohen's kappa averaged over every pair of raters
  (``sklearn.metrics.cohen_kappa_score``, ``weights="quadratic"``) and Krippendorff's alpha, ordinal metric;
* test-retest: the SD of a rater's count between the two reads of a reread image (the difference over sqrt 2).

Implied: the counts' statistics analytically, from the mean and variance of every rater's count of every image
that the model gives (:func:`synthtrial.grade.raters.expected_reads`), put into the two-way ANOVA's expected sums
of squares (a quadratic form's expectation: its value at the means plus the trace of the form times the
variances) and the statistic's formula as a ratio of those expectations; the test-retest SD as the root mean
variance of a read. The grades' statistics have no closed form: they are the mean over a seeded simulation of
the same panel (same raters, same lesion table) reading every image ``simulations`` times afresh. Every row's
``mc_sd`` is the statistic's SD over that simulation: how far one reading may fall from the implied value.

The simulated readings are scored by :func:`array_agreement`, the same statistics computed with numpy on the
reading's arrays (images x raters): the ICCs and the interval alpha from the two-way ANOVA's sums of squares, the
weighted kappa from each pair's sums (sklearn's weights: squared distances of the label *indices* among the
labels the pair used), the ordinal alpha from the coincidence matrix (the ``krippendorff`` package's formula for
complete data). They equal the libraries' values to rounding (tested against :func:`observed_agreement`, which
calls pingouin, sklearn and krippendorff), and score the observed reading too: pingouin's ICC alone took most of
``rate``'s time on the shipped trial's 1,400 images (its two-way ANOVA groups the table image by image).
Both are conditional on the raters drawn (their personal parameters are part of the truth), not on the rater
population the panel's spreads describe.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from synthtrial.grade.raters import Panel, Rater, expected_reads, read_arrays

__all__ = ["AGREEMENT_COLUMNS", "DEFAULT_SIMULATIONS", "agreement_table", "array_agreement", "expected_anova",
           "icc_from_anova", "observed_agreement", "reading_of"]

AGREEMENT_COLUMNS = ("variable", "statistic", "observed", "implied", "implied_by", "mc_sd", "images", "raters")
DEFAULT_SIMULATIONS = 100
_COUNT_STATS = ("ICC(2,1)", "ICC(2,k)", "alpha (interval)")
_GRADE_STATS = ("kappa (quadratic)", "alpha (ordinal)")
_GRADES = ("iga", "hayashi_level")


def _wide(ratings: pd.DataFrame, column: str) -> np.ndarray:
    """images x raters of the first reads (rows in image order, columns in rater order of appearance)."""
    first = ratings[~ratings["reread"].astype(bool)]
    wide = first.pivot(index="image_index", columns="rater", values=column)
    return wide[list(dict.fromkeys(first["rater"]))].to_numpy(dtype=float)


def _icc(values: np.ndarray) -> tuple[float, float]:
    import pingouin

    n, k = values.shape
    long = pd.DataFrame({"image": np.repeat(np.arange(n), k), "rater": np.tile(np.arange(k), n),
                         "score": values.ravel()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = pingouin.intraclass_corr(long, targets="image", raters="rater", ratings="score").set_index("Type")
    # pingouin >= 0.6 names Shrout & Fleiss's ICC2 / ICC2k after McGraw & Wong: ICC(A,1) / ICC(A,k)
    one, many = ("ICC(A,1)", "ICC(A,k)") if "ICC(A,1)" in table.index else ("ICC2", "ICC2k")
    return float(table.loc[one, "ICC"]), float(table.loc[many, "ICC"])


def _alpha(values: np.ndarray, level: str) -> float:
    import krippendorff

    if np.unique(values).size < 2:
        return float("nan")  # nothing to tell apart: alpha is undefined
    return float(krippendorff.alpha(reliability_data=values.T, level_of_measurement=level))


def _kappa(values: np.ndarray) -> float:
    from sklearn.metrics import cohen_kappa_score

    k = values.shape[1]
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a in range(k):
            for b in range(a + 1, k):
                if np.array_equal(values[:, a], values[:, b]):
                    scores.append(1.0)  # sklearn returns NaN (0/0) for two identical constant raters
                else:
                    scores.append(cohen_kappa_score(values[:, a].astype(int), values[:, b].astype(int),
                                                    weights="quadratic"))
    return float(np.nanmean(scores)) if scores else float("nan")


def observed_agreement(ratings: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Every statistic of :data:`AGREEMENT_COLUMNS` on one reading (``image_index``, ``rater``, ``reread`` and
    the rated columns), computed by the libraries the field uses (pingouin, sklearn, krippendorff); NaN where the
    panel has one rater or the images do not differ. The reference :func:`array_agreement` is tested against."""
    counts = _wide(ratings, "count")
    out: dict[tuple[str, str], float] = {}
    several = counts.shape[1] >= 2 and counts.shape[0] >= 2
    icc1, icck = _icc(counts) if several else (np.nan, np.nan)
    out[("count", "ICC(2,1)")], out[("count", "ICC(2,k)")] = icc1, icck
    out[("count", "alpha (interval)")] = _alpha(counts, "interval") if several else np.nan
    for grade in _GRADES:
        values = _wide(ratings, grade)
        out[(grade, _GRADE_STATS[0])] = _kappa(values) if several else np.nan
        out[(grade, _GRADE_STATS[1])] = _alpha(values, "ordinal") if several else np.nan
    out[("count", "test-retest SD")] = _retest_sd(ratings)
    return out


def _retest_sd(ratings: pd.DataFrame) -> float:
    again = ratings[ratings["reread"].astype(bool)]
    if again.empty:
        return float("nan")
    first = ratings[~ratings["reread"].astype(bool)]
    pairs = again.merge(first, on=["rater", "image_index"], suffixes=("_2", "_1"))
    return float(np.sqrt(np.mean((pairs["count_2"] - pairs["count_1"]) ** 2 / 2.0)))


def expected_anova(mean: np.ndarray, var: np.ndarray) -> dict[str, float]:
    """Expected two-way ANOVA mean squares (rows: images, columns: raters) of a table of independent values with
    these means and variances: each sum of squares at the means plus its projection's diagonal times the
    variances."""
    n, k = mean.shape
    grand = mean.mean()
    ss_rows = k * np.sum((mean.mean(axis=1) - grand) ** 2) + (1 - 1 / n) / k * var.sum()
    ss_cols = n * np.sum((mean.mean(axis=0) - grand) ** 2) + (1 - 1 / k) / n * var.sum()
    resid = mean - mean.mean(axis=1, keepdims=True) - mean.mean(axis=0, keepdims=True) + grand
    ss_err = np.sum(resid**2) + (1 - 1 / n) * (1 - 1 / k) * var.sum()
    return {"n": n, "k": k, "ss_rows": ss_rows, "ss_cols": ss_cols, "ss_err": ss_err,
            "ms_rows": ss_rows / (n - 1), "ms_cols": ss_cols / (k - 1), "ms_err": ss_err / ((n - 1) * (k - 1))}


def icc_from_anova(a: dict[str, float]) -> dict[str, float]:
    """ICC(2,1), ICC(2,k) (Shrout & Fleiss; pingouin's formulas) and Krippendorff's interval alpha (complete data:
    ``1 - (N - 1) k SS_within / ((k - 1) N SS_total)``) from (expected) ANOVA sums and mean squares."""
    n, k = a["n"], a["k"]
    msr, msc, mse = a["ms_rows"], a["ms_cols"], a["ms_err"]
    icc1 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    icck = (msr - mse) / (msr + (msc - mse) / n)
    total = n * k
    within = a["ss_cols"] + a["ss_err"]
    alpha = 1 - (total - 1) * k * within / ((k - 1) * total * (a["ss_rows"] + within))
    return {"ICC(2,1)": float(icc1), "ICC(2,k)": float(icck), "alpha (interval)": float(alpha)}


def agreement_table(ratings: pd.DataFrame, table: dict[str, np.ndarray], panel: Panel, raters: list[Rater],
                    seed: int, simulations: int = DEFAULT_SIMULATIONS) -> pd.DataFrame:
    """Observed statistics of ``ratings`` beside the implied ones (module docstring), one row per statistic."""
    observed = array_agreement(reading_of(ratings))
    sims = [array_agreement(read_arrays(table, panel, raters, seed, stream=("agreement", r)))
            for r in range(simulations)]
    simulated = pd.DataFrame(sims)
    k = len(raters)
    implied: dict[tuple[str, str], tuple[float, str]] = {}
    mean, var = expected_reads(table, panel, raters)
    implied[("count", "test-retest SD")] = (float(np.sqrt(var.mean())), "analytic")
    if k >= 2 and int(table["n_images"]) >= 2:
        for name, value in icc_from_anova(expected_anova(mean, var)).items():
            implied[("count", name)] = (value, "analytic")
    rows = []
    for key, value in observed.items():
        column = simulated[key] if key in simulated else pd.Series(dtype=float)
        finite = column.dropna()
        value_implied, how = implied.get(key, (float(finite.mean()) if len(finite) else np.nan,
                                               f"simulation ({simulations})"))
        rows.append({"variable": key[0], "statistic": key[1], "observed": value, "implied": value_implied,
                     "implied_by": how, "mc_sd": float(finite.std(ddof=1)) if len(finite) > 1 else np.nan,
                     "images": int(table["n_images"]), "raters": k})
    return pd.DataFrame(rows, columns=list(AGREEMENT_COLUMNS))


# ------------------------------------------------------------------------------------------ the same, in numpy

def _anova_agreement(values: np.ndarray) -> dict[str, float]:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = icc_from_anova(expected_anova(values, np.zeros_like(values)))
    if np.unique(values).size < 2:
        out["alpha (interval)"] = float("nan")  # as _alpha: nothing to tell apart
    return out


def _kappa_arrays(values: np.ndarray) -> float:
    """:func:`_kappa` of an images x raters table of integer grades, pair by pair in closed form: with x, y the
    grades' indices among the labels the pair used, ``1 - sum (x - y)^2 / (sum x^2 + sum y^2 - 2 sum x sum y / n)``."""
    n, k = values.shape
    levels, codes = np.unique(values, return_inverse=True)
    codes = codes.reshape(n, k)
    scores = []
    for a in range(k):
        for b in range(a + 1, k):
            x, y = codes[:, a], codes[:, b]
            if np.array_equal(x, y):
                scores.append(1.0)
                continue
            used = np.zeros(len(levels), bool)
            used[x] = used[y] = True
            rank = np.cumsum(used) - 1
            x, y = rank[x].astype(float), rank[y].astype(float)
            expected = x @ x + y @ y - 2.0 * x.sum() * y.sum() / n
            scores.append(1.0 - float(np.sum((x - y) ** 2)) / expected if expected > 0 else np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(np.nanmean(scores)) if scores else float("nan")


def _ordinal_alpha(values: np.ndarray) -> float:
    """Krippendorff's ordinal alpha of a complete images x raters table: the coincidence matrix
    ``o = (H'H - diag n) / (k - 1)`` (H: each image's count of every value), the ordinal distance
    ``(sum of n_g from c to v - (n_c + n_v) / 2)^2`` and ``1 - (N - 1) sum o d / sum n_c n_v d``."""
    n, k = values.shape
    levels, codes = np.unique(values, return_inverse=True)
    if levels.size < 2:
        return float("nan")
    cells = np.repeat(np.arange(n), k) * levels.size + codes.ravel()
    held = np.bincount(cells, minlength=n * levels.size).reshape(n, levels.size).astype(float)
    totals = held.sum(axis=0)
    coincidence = (held.T @ held - np.diag(totals)) / (k - 1)
    upto = np.concatenate([[0.0], np.cumsum(totals)])
    low = np.minimum.outer(np.arange(levels.size), np.arange(levels.size))
    high = np.maximum.outer(np.arange(levels.size), np.arange(levels.size))
    distance = (upto[high + 1] - upto[low] - (totals[:, None] + totals[None, :]) / 2.0) ** 2
    return float(1.0 - (totals.sum() - 1) * np.sum(coincidence * distance) / np.sum(np.outer(totals, totals) * distance))


def reading_of(ratings: pd.DataFrame) -> dict:
    """The arrays :func:`array_agreement` scores, from a ratings table (``rater``, ``image_index``, ``reread``,
    ``count``, ``iga``, ``hayashi_level``; every rater read every image once, rereads after): raters in order of
    appearance, images in ``image_index`` order."""
    again = ratings["reread"].astype(bool).to_numpy()
    first = ratings[~again]
    order = list(dict.fromkeys(first["rater"]))
    reading: dict = {}
    for column in ("count", *_GRADES):
        wide = first.pivot(index="image_index", columns="rater", values=column)[order]
        reading[column] = wide.to_numpy().T
    position = pd.Index(wide.index)
    second = ratings[again]
    reading["reread"] = [(position.get_indexer(rows["image_index"]), {"count": rows["count"].to_numpy()})
                         for rows in (second[second["rater"] == name] for name in order)]
    return reading


def array_agreement(reading: dict) -> dict[tuple[str, str], float]:
    """:func:`observed_agreement` of a reading as :func:`synthtrial.grade.raters.read_arrays` returns it (raters x
    images arrays and the rereads), computed in numpy (module docstring); the same keys and NaN rules."""
    counts = reading["count"].T.astype(float)
    out: dict[tuple[str, str], float] = {}
    several = counts.shape[1] >= 2 and counts.shape[0] >= 2
    found = _anova_agreement(counts) if several else {}
    for name in _COUNT_STATS:
        out[("count", name)] = found.get(name, np.nan)
    for grade in _GRADES:
        values = reading[grade].T
        out[(grade, _GRADE_STATS[0])] = _kappa_arrays(values) if several else np.nan
        out[(grade, _GRADE_STATS[1])] = _ordinal_alpha(values) if several else np.nan
    again = reading.get("reread")
    if not again or not sum(len(idx) for idx, _ in again):
        out[("count", "test-retest SD")] = float("nan")
    else:
        diff = np.concatenate([second["count"] - reading["count"][k][idx] for k, (idx, second) in enumerate(again)])
        out[("count", "test-retest SD")] = float(np.sqrt(np.mean(diff.astype(float) ** 2 / 2.0)))
    return out
