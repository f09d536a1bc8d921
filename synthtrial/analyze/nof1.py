"""Per-patient tests that stay valid on autocorrelated daily series with wash-in, washout and a trend.

A patient's daily outcome is AR(1)-correlated, shifts slowly when a treatment starts or stops, and may
drift; day-level tests that treat days as independent (Welch, day-level permutation) read the drift and
the correlation as an effect. The methods here were chosen by simulation (``synthtrial power``; the
table is in README.md) and each rests on one stated assumption. Every estimate is the *delivered*
effect of an arm against the reference: the mean outcome on the arm's days minus the mean on reference
days, kinetics included, which is what ``truth.json``'s ``delivered_effects`` hold.

* ``period`` — **period-level analysis**, the classic N-of-1 analysis: one mean per treatment period
  (a maximal run of days on one treatment; excluded days such as washout end a run), then OLS of the
  period means on the arms [+ the period's mid-day] with t on ``periods - coefficients`` df. Assumes
  period means are independent with equal variance: true when periods are long against the AR(1)
  memory (a 28-day period with phi 0.6 leaves a correlation of about 0.03 between neighbouring means).
  Honest but weak with few periods (the anchor design leaves 1 df once a trend is fitted).
* ``randomization`` — **randomisation test over the design's own scheme**: the period-level statistic
  recomputed under every treatment order the design could have drawn (``TrialDesign.randomize``: which
  arm starts an ABAB series, each pair's order, the order of the active arms' cycle). Valid by
  construction under the sharp null for a randomised design, whatever the serial correlation or trend.
  A fixed-order design (the anchor protocol) has no randomisation distribution: the row says so
  (estimate given, p NaN, role ``not available``; so is a design whose smallest attainable p exceeds alpha). Gives a p-value, not a CI. Its smallest attainable p is 2 / (number of orders)
  (an order and its mirror image give the same |statistic|): randomised pairs need at least 6 pairs
  (64 orders) before anything can be rejected at alpha 0.05, and an ABAB series (2 orders) never can.
* ``gls_kinetics`` — **GLS with AR(1) errors where the treatment enters through its exposure**: each arm's
  first-order exposure curve (:func:`synthtrial.trial.simulate.exposure`, computed over the patient's calendar)
  is the regressor, so a wash-in ramp is a mean shift, not autocorrelation. The steady-state effects are
  turned into the delivered contrast (a linear combination; SE by the delta rule, exact here). ``phi`` by
  REML; t with Satterthwaite df that account for the uncertainty of (phi, sigma^2) (:func:`satterthwaite_df`;
  with n - p df the test rejected 6.5% of null contrasts on the anchor design). Assumes the half-lives are right: those of the design when the run was
  simulated (``truth.json``), else the common half-life on a grid (0-12 days) that maximises the
  likelihood (its selection is not propagated into the CI).
* ``hac`` — OLS on the days with arm indicators [+ day] and Newey-West (HAC) standard errors, Bartlett
  kernel, ``floor(4 (n/100)^(2/9))`` lags, small-sample correction, t on ``n - p`` df. Its estimate is the
  delivered effect directly; its SE assumes the correlation dies out within the lag window, which a
  period-level contrast does not respect with few periods (it over-rejects on the shipped designs, see
  README.md: descriptive).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from synthtrial.analyze.estimate import NAN, Estimate, missing_estimate, t_quantile, t_two_sided_p
from synthtrial.util.errors import SynthtrialError

#: Half-lives (days) tried when the kinetics are not given.
HALF_LIFE_GRID = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
#: Bound of the AR(1) coefficient (as nlme's corAR1, open interval (-1, 1)).
PHI_BOUND = 0.99
#: Largest randomisation distribution enumerated exactly; beyond it a seeded Monte-Carlo sample is used.
EXACT_LIMIT = 20000



@dataclass(frozen=True)
class Kinetics:
    """First-order wash-in and washout half-lives in days (0 switches instantly)."""

    washin_half_life: float
    washout_half_life: float

    @classmethod
    def from_truth(cls, truth: Mapping | None) -> Kinetics | None:
        model = (truth or {}).get("model") or {}
        try:
            return cls(float(model["washin_half_life"]), float(model["washout_half_life"]))
        except (KeyError, TypeError, ValueError):
            return None


# ----------------------------------------------------------------------------------------------- AR(1)

def ar1_whiten(values: np.ndarray, phi: float, gaps: np.ndarray) -> np.ndarray:
    """Prais-Winsten whitening of rows (or of a stack of columns) over a gapped AR(1) chain."""
    rho = phi ** gaps
    scale = np.sqrt(1.0 - rho ** 2)
    cols = values.reshape(values.shape[0], -1)
    out = np.vstack([cols[:1], (cols[1:] - rho[:, None] * cols[:-1]) / scale[:, None]])
    return out.reshape(values.shape)


class AR1Moments:
    """Sufficient statistics of a gapped AR(1) GLS problem: the whitened Gram matrix at any phi in O(p^2).

    With ``D = [X | y]`` and rows ``d_t``, the Prais-Winsten whitened Gram matrix is
    ``d_0 d_0' + sum_t (d_t - r_t d_{t-1})(d_t - r_t d_{t-1})' / (1 - r_t^2)`` with ``r_t = phi^gap_t``.
    Grouping the steps by their gap ``g`` (a daily series has one or two distinct gaps) gives
    ``sum_g (A_g - phi^g (B_g + B_g') + phi^2g C_g) / (1 - phi^2g)``, where ``A_g``, ``B_g``, ``C_g`` are
    the step sums of ``d_t d_t'``, ``d_t d_{t-1}'`` and ``d_{t-1} d_{t-1}'``: computed once, so the
    likelihood at a phi costs a few p x p operations instead of whitening the series again.
    """

    def __init__(self, y: np.ndarray, x: np.ndarray, gaps: np.ndarray) -> None:
        data = np.column_stack([x, y]).astype(float)
        self.n, self.p = x.shape
        q = self.p + 1
        gaps = np.asarray(gaps, dtype=float)
        self._gaps, counts = np.unique(gaps, return_counts=True)
        self._counts = counts.astype(float)
        a, b, c = (np.zeros((self._gaps.size, q * q)) for _ in range(3))
        for k, gap in enumerate(self._gaps):
            rows = np.flatnonzero(gaps == gap) + 1
            now, before = data[rows], data[rows - 1]
            cross = now.T @ before
            a[k], b[k], c[k] = (now.T @ now).ravel(), -(cross + cross.T).ravel(), (before.T @ before).ravel()
        # rows: the A_g, then -(B_g + B_g'), then the C_g, flattened; gram(phi) is one matrix product
        self._stack = np.concatenate([a, b, c])
        self._first = np.outer(data[0], data[0]).ravel()

    def gram(self, phis: np.ndarray | float) -> np.ndarray:
        """The whitened ``[X | y]' [X | y]`` at each phi: shape (G, p + 1, p + 1)."""
        phis = np.atleast_1d(np.asarray(phis, dtype=float))
        rho = phis[:, None] ** self._gaps[None, :]                        # (G, gaps)
        inv = 1.0 / (1.0 - rho ** 2)
        weights = np.concatenate([inv, rho * inv, rho * rho * inv], axis=1)
        return (weights @ self._stack + self._first).reshape(phis.size, self.p + 1, self.p + 1)

    def logdet(self, phis: np.ndarray | float) -> np.ndarray:
        """``log det R`` of the AR(1) correlation matrix (per unit innovation variance) at each phi."""
        phis = np.atleast_1d(np.asarray(phis, dtype=float))
        return np.log(1.0 - (phis[:, None] ** self._gaps[None, :]) ** 2) @ self._counts

    def deviance(self, phis: np.ndarray | float, reml: bool = True) -> np.ndarray:
        """-2 log-likelihood (REML or ML, sigma^2 profiled, constants dropped) at each phi.

        From the Cholesky factor L of the whitened ``[X | y]' [X | y]``: ``L_yy^2`` is the RSS and
        ``2 sum log diag L_xx`` is ``log det X' W X``.
        """
        phis = np.atleast_1d(np.asarray(phis, dtype=float))
        p = self.p
        dof = self.n - p if reml else self.n
        gram = self.gram(phis)
        with np.errstate(divide="ignore", invalid="ignore"):
            try:
                diag = np.linalg.cholesky(gram).diagonal(axis1=1, axis2=2)
                rss, logdet_xx, ok = diag[:, p] ** 2, 2.0 * np.log(diag[:, :p]).sum(axis=1), np.ones(phis.size, bool)
            except np.linalg.LinAlgError:  # a singular Gram somewhere (an exact fit): one phi at a time
                xx, xy, yy = gram[:, :p, :p], gram[:, :p, p], gram[:, p, p]
                sign, logdet_xx = np.linalg.slogdet(xx)
                ok = sign > 0
                beta = np.zeros_like(xy)
                if ok.any():
                    beta[ok] = np.linalg.solve(xx[ok], xy[ok][:, :, None])[:, :, 0]
                rss = yy - np.einsum("gi,gi->g", beta, xy)
            dev = self.logdet(phis) + dof * np.log(np.maximum(rss, 1e-300)) + (logdet_xx if reml else 0.0)
        return np.where((rss > 0) & ok & np.isfinite(dev), dev, 1e300)  # finite: a minimum among numbers

    def solve(self, phi: float) -> tuple[np.ndarray, np.ndarray, float]:
        """GLS coefficients, ``(X' W X)^-1`` and the RSS at ``phi``."""
        gram = self.gram(phi)[0]
        p = self.p
        xx_inv = np.linalg.inv(gram[:p, :p])
        beta = xx_inv @ gram[:p, p]
        rss = float(gram[p, p] - beta @ gram[:p, p])
        return beta, xx_inv, max(rss, 0.0)


def fit_phi(y: np.ndarray, x: np.ndarray, gaps: np.ndarray, *, reml: bool = True,
            moments: AR1Moments | None = None) -> tuple[float, float]:
    """The AR(1) coefficient maximising the (restricted) likelihood on ``[-0.99, 0.99]``, and its deviance.

    A 67-point grid evaluated at once, then four zooms (21 points over the best point's neighbours, each
    ten times finer) and a parabola through the last three: phi to about 1e-8, in five vectorised calls.
    """
    moments = moments or AR1Moments(y, x, gaps)
    grid = np.linspace(-PHI_BOUND, PHI_BOUND, 67)
    dev = moments.deviance(grid, reml)
    for _ in range(4):
        best = int(np.argmin(dev))
        grid = np.linspace(grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)], 21)
        dev = moments.deviance(grid, reml)
    best = int(np.argmin(dev))
    phi, value = float(grid[best]), float(dev[best])
    if 0 < best < grid.size - 1 and dev[best] < 1e300:
        (x0, x1, x2), (f0, f1, f2) = grid[best - 1:best + 2], dev[best - 1:best + 2]
        curvature = (f0 - 2 * f1 + f2)
        if curvature > 0:
            vertex = x1 + 0.5 * (x1 - x0) * (f0 - f2) / curvature
            at_vertex = float(moments.deviance(vertex, reml)[0])
            if at_vertex <= value:
                phi, value = float(vertex), at_vertex
    return phi, value


def gls_fit(y: np.ndarray, x: np.ndarray, gaps: np.ndarray, *,
            moments: AR1Moments | None = None) -> tuple[np.ndarray, np.ndarray, float, float]:
    """GLS with REML AR(1) errors: coefficients, their covariance, phi, sigma^2."""
    moments = moments or AR1Moments(y, x, gaps)
    phi, _ = fit_phi(y, x, gaps, moments=moments)
    beta, xx_inv, rss = moments.solve(phi)
    sigma2 = rss / (y.size - x.shape[1])
    return beta, sigma2 * xx_inv, phi, sigma2


def satterthwaite_df(y: np.ndarray, x: np.ndarray, gaps: np.ndarray, phi: float, sigma2: float,
                     contrast: np.ndarray, *, moments: AR1Moments | None = None) -> float:
    """Satterthwaite df of ``contrast' beta`` in GLS-AR(1) with (phi, sigma^2) estimated by REML.

    ``df = 2 v^2 / (g' C g)``: v the contrast's variance, g its gradient in (phi, sigma^2) and C the inverse
    observed REML information of (phi, sigma^2) (numerical derivatives), as lmerTest does for mixed models.
    It widens the CI where the contrast's variance is sensitive to an uncertain phi (slow level shifts).
    """
    moments = moments or AR1Moments(y, x, gaps)
    n, p = x.shape
    fallback = float(n - p)
    h = min(1e-4, (PHI_BOUND - abs(phi)) / 2) if abs(phi) < PHI_BOUND else 0.0
    if h <= 0:
        return fallback
    # the three phis the finite differences need, in one evaluation
    phis = np.array([phi - h, phi, phi + h])
    gram = moments.gram(phis)
    xx, xy, yy = gram[:, :p, :p], gram[:, :p, p], gram[:, p, p]
    try:
        xx_inv = np.linalg.inv(xx)
    except np.linalg.LinAlgError:
        return fallback
    rss = yy - np.einsum("gi,gij,gj->g", xy, xx_inv, xy)
    logdets = moments.logdet(phis) + np.linalg.slogdet(xx)[1]
    variances = sigma2 * np.einsum("i,gij,j->g", contrast, xx_inv, contrast)
    v = float(variances[1])
    if not v > 0:
        return fallback
    hs = 1e-4 * sigma2

    def f(k: int, b: float) -> float:  # half the REML deviance at (phis[k], sigma2 + b)
        return 0.5 * ((n - p) * math.log(sigma2 + b) + float(logdets[k]) + float(rss[k]) / (sigma2 + b))

    f0 = f(1, 0.0)
    h_pp = (f(2, 0) - 2 * f0 + f(0, 0)) / h ** 2
    h_ss = (f(1, hs) - 2 * f0 + f(1, -hs)) / hs ** 2
    h_ps = (f(2, hs) - f(2, -hs) - f(0, hs) + f(0, -hs)) / (4 * h * hs)
    info = np.array([[h_pp, h_ps], [h_ps, h_ss]])
    grad = np.array([(variances[2] - variances[0]) / (2 * h), v / sigma2])
    try:
        spread = float(grad @ np.linalg.solve(info, grad))
    except np.linalg.LinAlgError:
        return fallback
    if not spread > 0:
        return fallback
    return float(min(max(2 * v * v / spread, 1.0), fallback))


# ----------------------------------------------------------------------------------------------- periods

def period_arrays(days: np.ndarray, treatments: np.ndarray, values: np.ndarray, excluded: set[str],
            blocks: np.ndarray | None = None) -> pd.DataFrame:
    """One entry per treatment period (a run of days on one treatment, in day order; excluded days end it).

    ``days``/``treatments`` cover every scheduled row of the patient (excluded ones included, so that a
    washout separates periods); ``values`` is NaN where the outcome is missing. ``blocks`` (the protocol's
    block column) also ends a run where it changes, so that two adjacent periods on the same arm (pairs
    ``AB BA``) stay two. Columns: ``treatment``, ``mid`` (mean day), ``mean`` (of the values present), ``n``.
    """
    order = np.argsort(days, kind="stable")
    days = np.asarray(days, dtype=float)[order]
    treatments = np.asarray(treatments).astype(str)[order]
    values = np.asarray(values, dtype=float)[order]
    if days.size == 0:
        return {"treatment": [], "mid": np.zeros(0), "mean": np.zeros(0), "n": np.zeros(0, dtype=int)}
    change = np.ones(days.size, dtype=bool)
    change[1:] = treatments[1:] != treatments[:-1]
    if blocks is not None:
        labels = np.asarray([str(b) for b in np.asarray(blocks, dtype=object)[order]])
        change[1:] |= labels[1:] != labels[:-1]
    starts = np.flatnonzero(change)
    present = np.isfinite(values)
    counts = np.add.reduceat(present.astype(int), starts)
    sums = np.add.reduceat(np.where(present, values, 0.0), starts)
    day_sums = np.add.reduceat(np.where(present, days, 0.0), starts)
    names = treatments[starts]
    keep = (counts > 0) & ~np.isin(names, list(excluded))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"treatment": names[keep].tolist(), "mid": (day_sums / counts)[keep],
                "mean": (sums / counts)[keep], "n": counts[keep].astype(int)}


def periods(days: np.ndarray, treatments: np.ndarray, values: np.ndarray, excluded: set[str],
            blocks: np.ndarray | None = None) -> pd.DataFrame:
    """:func:`period_arrays` as a DataFrame (columns ``treatment``, ``mid``, ``mean``, ``n``)."""
    return pd.DataFrame(period_arrays(days, treatments, values, excluded, blocks),
                        columns=["treatment", "mid", "mean", "n"])


def _period_design(labels: Sequence[str], mids: np.ndarray, reference: str, arms: Sequence[str],
                   trend: bool) -> np.ndarray:
    cols = [np.ones(len(labels))] + [np.asarray([lab == arm for lab in labels], dtype=float) for arm in arms]
    if trend:
        cols.append(mids - mids.mean())
    return np.column_stack(cols)


def period_level(table: pd.DataFrame, reference: str, arms: Sequence[str], *, trend: bool = True,
                 alpha: float = 0.05) -> dict[str, Estimate]:
    """OLS of period means on the arms [+ mid-day]: an :class:`Estimate` per arm.

    ``table``: :func:`periods`' frame or :func:`period_arrays`' mapping (``treatment``, ``mid``, ``mean``).
    """
    labels = list(table["treatment"])
    arms = [a for a in arms if a in labels]
    if reference not in labels or not arms:
        return {}
    x = _period_design(labels, np.asarray(table["mid"], dtype=float), reference, arms, trend)
    y = np.asarray(table["mean"], dtype=float)
    k, p = x.shape
    out = {}
    if k < p:
        return {a: missing_estimate(f"{k} periods leave no df for {p} coefficients") for a in arms}
    if np.linalg.matrix_rank(x) < p:
        return {a: missing_estimate("periods cannot separate the arms" + (" from the trend" if trend else ""))
                for a in arms}
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    df = k - p
    note = f"{k} periods, t on {df} df" + ("; trend-adjusted" if trend else "")
    if df < 1:
        return {a: missing_estimate(f"{k} periods leave no df for {p} coefficients", float(beta[1 + i]))
                for i, a in enumerate(arms)}
    resid = y - x @ beta
    sigma2 = float(resid @ resid) / df
    cov = sigma2 * np.linalg.inv(x.T @ x)
    q = t_quantile(1 - alpha / 2, df)
    for i, arm in enumerate(arms):
        est, se = float(beta[1 + i]), float(math.sqrt(max(cov[1 + i, 1 + i], 0.0)))
        if se == 0.0:
            out[arm] = Estimate(est, 0.0, est, est, NAN, float(df), note + "; no residual variation")
            continue
        p_value = t_two_sided_p(est / se, df)
        out[arm] = Estimate(est, se, est - q * se, est + q * se, p_value, float(df), note)
    return out


# ------------------------------------------------------------------------------------- randomisation

def design_orders(design) -> list[tuple[str, ...]] | None:
    """Every period order a :class:`~synthtrial.trial.simulate.TrialDesign` could assign (None if fixed)."""
    if not design.randomize:
        return None
    ref, active = design.arms[0], list(design.arms[1:])
    if design.design == "baseline-alternating":
        orders = set()
        for perm in itertools.permutations(active):
            orders.add(tuple([ref] + [perm[b % len(perm)] for b in range(design.blocks - 1)]))
        return sorted(orders)
    if design.design == "abab":
        a, b = ref, active[0]
        return [tuple(a if i % 2 == 0 else b for i in range(design.blocks)),
                tuple(b if i % 2 == 0 else a for i in range(design.blocks))]
    pairs = [(ref, active[0]), (active[0], ref)]
    return [tuple(itertools.chain.from_iterable(choice)) for choice in itertools.product(pairs, repeat=design.blocks)]


def smallest_attainable_p(orders: Sequence[tuple[str, ...]]) -> float:
    """The smallest p the randomisation test can give over ``orders``: 2 / N when every order's mirror image
    (the two labels swapped) is also an order (their statistics have the same size), else 1 / N."""
    if not orders:
        return 1.0
    labels = sorted({label for order in orders for label in order})
    mirrored = False
    if len(labels) == 2:
        swap = {labels[0]: labels[1], labels[1]: labels[0]}
        known = set(map(tuple, orders))
        mirrored = all(tuple(swap[label] for label in order) in known for order in known)
    return min(1.0, (2.0 if mirrored else 1.0) / len(set(map(tuple, orders))))


def randomization_test(table: pd.DataFrame, reference: str, arms: Sequence[str], orders: Sequence[tuple[str, ...]],
                       *, trend: bool = True, seed: int = 0) -> dict[str, Estimate]:
    """Per arm the period-level estimate with its two-sided p against the randomisation distribution (no SE, no CI).

    ``p = #{orders with |stat| >= |observed|} / #orders`` over every order the design could draw (the
    observed one included), exact when there are at most :data:`EXACT_LIMIT`, else over that many drawn
    from ``seed`` plus the observed order.
    """
    labels = tuple(table["treatment"])
    arms = [a for a in arms if a in labels]
    if not arms:
        return {}
    matching = [o for o in orders if len(o) == len(labels)]
    if labels not in set(matching):
        return {a: missing_estimate("the patient's periods do not follow the design's scheme") for a in arms}
    if len(matching) > EXACT_LIMIT:
        rng = np.random.default_rng(seed)
        matching = [labels] + [matching[i] for i in rng.integers(0, len(matching), EXACT_LIMIT)]
        how = f"monte carlo, {EXACT_LIMIT} orders"
    else:
        how = f"exact over {len(matching)} orders"
    mids = np.asarray(table["mid"], dtype=float)
    y = np.asarray(table["mean"], dtype=float)

    def statistic(order: tuple[str, ...]) -> np.ndarray:
        x = _period_design(order, mids, reference, arms, trend)
        if np.linalg.matrix_rank(x) < x.shape[1]:
            return np.full(len(arms), NAN)
        beta, *_ = np.linalg.lstsq(x, y, rcond=None)
        return beta[1:1 + len(arms)]

    observed = statistic(labels)
    null = np.array([statistic(o) for o in matching])
    tol = 1e-12 * max(1.0, float(np.nanmax(np.abs(null))) if np.isfinite(null).any() else 1.0)
    out = {}
    for i, arm in enumerate(arms):
        column = null[:, i]
        usable = np.isfinite(column)
        p = float(np.count_nonzero(np.abs(column[usable]) >= abs(observed[i]) - tol) / usable.sum())
        out[arm] = Estimate(float(observed[i]), NAN, NAN, NAN, p, None, how + ("; trend-adjusted" if trend else ""))
    return out


# ----------------------------------------------------------------------------------- kinetics GLS, HAC

def exposures(days: np.ndarray, treatments: np.ndarray, arms: Sequence[str], kinetics: Kinetics,
              calendar: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Each arm's exposure on each given day (columns follow ``arms``), over the patient's full calendar.

    ``calendar`` (days, treatments) adds the scheduled days that have no row (missing days) with their
    scheduled treatment (:func:`patient_calendar`); a day neither lists continues the previous day's
    treatment, as the simulator assumes for days a protocol skips.
    """
    from synthtrial.trial.simulate import exposure, treatment_calendar

    cal_days, cal_treatments = (days, treatments) if calendar is None else calendar
    grid, on_day = treatment_calendar(cal_days, np.asarray(cal_treatments).astype(str))
    index = np.asarray(days).astype(np.int64) - grid[0]
    columns = [exposure(on_day == arm, kinetics.washin_half_life, kinetics.washout_half_life)[index] for arm in arms]
    return np.column_stack(columns) if columns else np.zeros((len(days), 0))


def patient_calendar(days: np.ndarray, treatments: np.ndarray, scheduled_days: np.ndarray | None,
                     scheduled_treatments: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One patient's rows plus the scheduled days they lack (missing days), each with its treatment.

    The rows' own treatments come first (a row's treatment is what was given); a scheduled day without a
    row takes the schedule's treatment. Without a schedule the rows alone are the calendar.
    """
    days = np.asarray(days)
    treatments = np.asarray(treatments).astype(str)
    if scheduled_days is None or len(scheduled_days) == 0:
        return days, treatments
    scheduled_days = np.asarray(scheduled_days).astype(np.int64)
    absent = ~np.isin(scheduled_days, np.asarray(days).astype(np.int64))
    return (np.concatenate([days.astype(np.int64), scheduled_days[absent]]),
            np.concatenate([treatments, np.asarray(scheduled_treatments).astype(str)[absent]]))


def missing_day_treatments(days: np.ndarray, treatments: np.ndarray, missing_days: Sequence[int]) -> np.ndarray:
    """The treatment of each of ``missing_days`` (scheduled days without a row) from one patient's rows alone.

    The rule, for when the schedule itself is not known: a missing day belongs to the period of the nearest
    row. Where the rows before and after are equally far and on different treatments (a lone missing day at
    a period boundary), it joins the earlier period if that period's rows span fewer days than the patient's
    longest run on that treatment (the earlier period lacks its last day), else the later one (the later
    period lacks its first day). Days before the first row or after the last take the nearest row's.
    """
    order = np.argsort(days, kind="stable")
    days = np.asarray(days).astype(np.int64)[order]
    treatments = np.asarray(treatments).astype(str)[order]
    starts = np.flatnonzero(np.r_[True, treatments[1:] != treatments[:-1]])
    ends = np.r_[starts[1:], days.size] - 1
    span = days[ends] - days[starts] + 1                          # days each observed run covers
    run_of = np.repeat(np.arange(starts.size), ends - starts + 1)
    longest = {t: int(span[treatments[starts] == t].max()) for t in set(treatments[starts].tolist())}
    out = []
    for day in np.asarray(missing_days, dtype=np.int64):
        after = int(np.searchsorted(days, day))
        if after == 0 or after == days.size:
            out.append(treatments[min(after, days.size - 1)])
            continue
        before_gap, after_gap = day - days[after - 1], days[after] - day
        earlier, later = treatments[after - 1], treatments[after]
        if before_gap != after_gap or earlier == later:
            out.append(earlier if before_gap < after_gap or earlier == later else later)
            continue
        out.append(earlier if span[run_of[after - 1]] < longest[earlier] else later)
    return np.asarray(out, dtype=str)


def gls_kinetics(days: np.ndarray, treatments: np.ndarray, values: np.ndarray, reference: str, arms: Sequence[str],
                 excluded: set[str], *, kinetics: Kinetics | None = None, trend: bool = True,
                 alpha: float = 0.05, exposure: tuple[Sequence[str], np.ndarray] | None = None,
                 calendar: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Estimate]:
    """Delivered effects from GLS-AR(1) on the arms' exposure curves: an :class:`Estimate` per arm.

    ``exposure`` may carry the curves already computed with ``kinetics``: (their arms, rows x arms);
    ``calendar`` is the patient's full calendar (:func:`patient_calendar`) the curves run over.
    """
    treatments = treatments.astype(str)
    use = np.isfinite(values) & ~np.isin(treatments, list(excluded))
    order = np.argsort(days[use], kind="stable")
    d, t, y = days[use][order], treatments[use][order], values[use][order]
    arms = [a for a in arms if (t == a).any()]
    if not arms or not (t == reference).any():
        return {}
    all_arms = sorted({a for a in treatments if a != reference and a not in excluded})
    gaps = np.diff(d).astype(float)
    p = 1 + len(all_arms) + int(trend)
    if d.size - p < 3:
        return {a: missing_estimate(f"too few days ({d.size}) for {p} coefficients and phi") for a in arms}

    def design(kin: Kinetics) -> np.ndarray:
        if exposure is not None and kin == kinetics and set(all_arms) <= set(exposure[0]):
            x = exposure[1][:, [list(exposure[0]).index(a) for a in all_arms]][use][order]
        else:
            x = exposures(days, treatments, all_arms, kin, calendar)[use][order]
        cols = [np.ones(d.size), x] + ([(d - d.mean())[:, None].astype(float)] if trend else [])
        return np.column_stack(cols)

    if kinetics is None:
        best = None
        for h in HALF_LIFE_GRID:
            x = design(Kinetics(h, h))
            if np.linalg.matrix_rank(x) < x.shape[1]:
                continue
            _, dev = fit_phi(y, x, gaps, reml=False)
            if best is None or dev < best[0]:
                best = (dev, h)
        if best is None:
            return {a: missing_estimate("exposures are collinear at every half-life") for a in arms}
        kinetics = Kinetics(best[1], best[1])
        kin_note = f"half-life {best[1]:g} d (profile ML over {len(HALF_LIFE_GRID)} values)"
    else:
        kin_note = f"half-lives in {kinetics.washin_half_life:g} d / out {kinetics.washout_half_life:g} d"
    x = design(kinetics)
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return {a: missing_estimate("exposures and trend are collinear") for a in arms}
    df = float(d.size - x.shape[1])
    ref_days = t == reference
    if np.sum((y - y.mean()) ** 2) <= 1e-24 * max(1.0, float(y @ y)):
        beta, cov, phi, note_phi = np.linalg.lstsq(x, y, rcond=None)[0], np.zeros((x.shape[1],) * 2), NAN, "no variation"
        sigma2 = 0.0
    else:
        moments = AR1Moments(y, x, gaps)
        beta, cov, phi, sigma2 = gls_fit(y, x, gaps, moments=moments)
        note_phi = f"phi={phi:.4f} (REML)"
    out = {}
    for arm in arms:
        c = np.zeros(x.shape[1])
        c[1:1 + len(all_arms)] = x[t == arm, 1:1 + len(all_arms)].mean(axis=0) - x[ref_days, 1:1 + len(all_arms)].mean(axis=0)
        est, se = float(c @ beta), float(math.sqrt(max(c @ cov @ c, 0.0)))
        note = "; ".join([note_phi, kin_note, "delivered contrast of steady-state effects"]
                         + (["trend-adjusted"] if trend else []))
        if se == 0.0:
            out[arm] = Estimate(est, 0.0, est, est, NAN, df, note)
            continue
        arm_df = satterthwaite_df(y, x, gaps, phi, sigma2, c, moments=moments)
        q = t_quantile(1 - alpha / 2, arm_df)
        out[arm] = Estimate(est, se, est - q * se, est + q * se, t_two_sided_p(est / se, arm_df), arm_df,
                            f"{note}; Satterthwaite t on {arm_df:.1f} df")
    return out


def hac(days: np.ndarray, treatments: np.ndarray, values: np.ndarray, reference: str, arms: Sequence[str], *,
        trend: bool = True, alpha: float = 0.05) -> dict[str, Estimate]:
    """OLS on the days with Newey-West SEs (statsmodels ``cov_type='HAC'``): an :class:`Estimate` per arm."""
    import statsmodels.api as sm

    order = np.argsort(days, kind="stable")
    d, t, y = days[order].astype(float), treatments[order].astype(str), values[order]
    arms = [a for a in arms if (t == a).any()]
    cols = [np.ones(d.size)] + [(t == a).astype(float) for a in arms] + ([d - d.mean()] if trend else [])
    x = np.column_stack(cols)
    n, p = x.shape
    if not arms or n - p < 2 or np.linalg.matrix_rank(x) < p:
        return {a: missing_estimate("too few days or a rank-deficient design") for a in arms}
    lags = int(math.floor(4 * (n / 100) ** (2 / 9)))
    fit = sm.OLS(y, x).fit(cov_type="HAC", cov_kwds={"maxlags": lags, "use_correction": True}, use_t=True)
    df = float(n - p)
    q = t_quantile(1 - alpha / 2, df)
    out = {}
    for i, arm in enumerate(arms):
        est, se = float(fit.params[1 + i]), float(fit.bse[1 + i])
        note = f"Newey-West, {lags} lags, t on {n - p} df" + ("; trend-adjusted" if trend else "")
        if not (np.isfinite(se) and se > 0):
            out[arm] = Estimate(est, NAN, NAN, NAN, NAN, df, note + "; no residual variation")
            continue
        out[arm] = Estimate(est, se, est - q * se, est + q * se, t_two_sided_p(est / se, df), df, note)
    return out


def check_kinetics(kinetics: Kinetics | None) -> None:
    if kinetics is None:
        return
    for name in ("washin_half_life", "washout_half_life"):
        value = getattr(kinetics, name)
        if not (math.isfinite(value) and value >= 0):
            raise SynthtrialError(f"{name} must be a finite number >= 0, got {value!r}")
