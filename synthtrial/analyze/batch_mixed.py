"""The pooled random-intercept model's cluster-robust inference (CR1, CR2 with Satterthwaite df) for many fits at once.

A power study fits :func:`synthtrial.analyze.mixed.random_intercept_reml` to many outcomes that share one design
(the same patients, schedules and exposure curves). :func:`cluster_robust_ri_batch` computes what
:func:`synthtrial.analyze.robust.cluster_robust_low_rank` computes for each of those fits (working covariance
``V_g = scale I + tau2 1 1'``), with the per-cluster algebra that depends on the design alone (the orthonormal
basis of ``[1, X_g]`` and ``X_g`` on it) done once, and the rest batched over the fits; the numbers agree with
the one-fit function to rounding (``tests/test_power_batch.py``).

:func:`random_intercept_reml_batch` is :func:`~synthtrial.analyze.mixed.random_intercept_reml` for F outcomes on
one design: the same grid, then scipy's bounded Brent search run for every fit at once (:func:`bounded_brent`
takes scipy's steps element by element). Each fit's per-cluster sums are taken one cluster at a time, as the
one-fit code takes them: the REML optimum of a flat likelihood moves with the last bits of those sums, and so
the fits equal the one-fit function's to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from synthtrial.analyze.mixed import RandomInterceptFit
from synthtrial.analyze.robust import RobustCov


def _inv_sqrt_psd_batch(b: np.ndarray) -> np.ndarray:
    """Symmetric square root of the Moore-Penrose inverse of each symmetric PSD matrix of a stack."""
    values, vectors = np.linalg.eigh((b + b.transpose(0, 2, 1)) / 2.0)
    tol = np.maximum(values.max(axis=1, initial=0.0), 0.0) * b.shape[1] * 1e-12
    big = values > tol[:, None]
    inv = np.where(big, 1.0 / np.sqrt(np.where(big, values, 1.0)), 0.0)
    return np.matmul(vectors * inv[:, None, :], vectors.transpose(0, 2, 1))


def _sym(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 1)


def cluster_robust_ri_batch(x: np.ndarray, resid: np.ndarray, clusters: Sequence[np.ndarray], scale: np.ndarray,
                            tau2: np.ndarray, contrasts: np.ndarray) -> list[RobustCov]:
    """:func:`~synthtrial.analyze.robust.cluster_robust_low_rank` of F random-intercept fits sharing ``x`` and
    ``clusters``: residuals (F, n), ``scale`` and ``tau2`` (F,); one :class:`RobustCov` per fit."""
    x = np.asarray(x, dtype=float)
    resid = np.atleast_2d(np.asarray(resid, dtype=float))
    f_count, k = resid.shape[0], x.shape[1]
    bread = np.zeros((f_count, k, k))
    parts = []
    for idx in clusters:
        basis = np.column_stack([np.ones((idx.size, 1)), x[idx]])
        u, sv, _ = np.linalg.svd(basis, full_matrices=False)
        q = u[:, sv > sv.max(initial=0.0) * 1e-10]
        zq = q.T @ np.ones((idx.size, 1))
        r = q.shape[1]
        s = scale[:, None, None] * np.eye(r)[None] + np.matmul(zq[None] * tau2[:, None, None], zq.T[None])
        xq = q.T @ x[idx]
        p = np.linalg.solve(s, np.broadcast_to(xq, (f_count, r, k)))
        bread += np.matmul(xq.T[None], p)
        parts.append((q, s, xq, p))
    m = np.linalg.pinv(bread)
    meat1, meat2 = np.zeros((f_count, k, k)), np.zeros((f_count, k, k))
    ts = []
    for idx, (q, s, xq, p) in zip(clusters, parts, strict=True):
        values, vectors = np.linalg.eigh(s)
        root = np.matmul(vectors * np.sqrt(np.maximum(values, 0.0))[:, None, :], _sym(vectors))
        inner = np.matmul(np.matmul(np.matmul(root, xq[None]), m), np.matmul(xq.T[None], root))
        t = np.matmul(np.matmul(root, _inv_sqrt_psd_batch(np.matmul(s, s) - inner)), root)
        ts.append(t)
        eq = resid[:, idx] @ q                                                        # (F, r)
        u1 = np.matmul(_sym(p), eq[:, :, None])[:, :, 0]
        u2 = np.matmul(_sym(p), np.matmul(t, eq[:, :, None]))[:, :, 0]
        meat1 += u1[:, :, None] * u1[:, None, :]
        meat2 += u2[:, :, None] * u2[:, None, :]
    g_count = len(clusters)
    cr1 = np.matmul(np.matmul(m, meat1), m) * (g_count / (g_count - 1) if g_count > 1 else np.nan)
    cr2 = np.matmul(np.matmul(m, meat2), m)
    contrasts = np.atleast_2d(np.asarray(contrasts, dtype=float))
    df = np.empty((f_count, contrasts.shape[0]))
    for j, row in enumerate(contrasts):
        mc = np.matmul(m, row)                                                        # (F, k)
        b = [np.matmul(t, np.linalg.solve(s, np.matmul(xq[None], mc[:, :, None])))[:, :, 0]
             for (q, s, xq, p), t in zip(parts, ts, strict=True)]
        h = np.stack([bg @ xq for (q, s, xq, p), bg in zip(parts, b, strict=True)], axis=1)   # (F, G, k)
        total = np.zeros((f_count, g_count, g_count))
        for c_idx, ((q, s, xq, p), bg) in enumerate(zip(parts, b, strict=True)):
            a = -np.matmul(np.matmul(h, m), _sym(p))                                 # (F, G, r)
            a[:, c_idx] += bg
            total += np.matmul(np.matmul(a, s), _sym(a))
        denominator = np.sum(total ** 2, axis=(1, 2))
        trace = np.trace(total, axis1=1, axis2=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            df[:, j] = np.where(denominator > 0, trace ** 2 / denominator, np.nan)
    return [RobustCov(cr1=cr1[i], cr2=cr2[i], df_cr2=df[i], clusters=g_count) for i in range(f_count)]


# ------------------------------------------------------------------------------------- REML, batched

def _ri_parts(x: np.ndarray, ys: np.ndarray, clusters: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-cluster sums of every fit (the shared design's once), with the one-fit code's operations."""
    return {"n": np.array([len(i) for i in clusters], dtype=float),
            "sxx": np.stack([x[i].T @ x[i] for i in clusters]), "sx": np.stack([x[i].sum(axis=0) for i in clusters]),
            # one cluster of one fit at a time: a stacked product, row sum or dot product differs in the last bit,
            # and the REML optimum moves with the last bits of its flat likelihood
            "sxy": np.array([[x[i].T @ y[i] for i in clusters] for y in ys]),
            "sy": np.array([[y[i].sum() for i in clusters] for y in ys]),
            "yy": np.array([[y[i] @ y[i] for i in clusters] for y in ys])}


def _ri_deviance_batch(ratios: np.ndarray, parts: dict[str, np.ndarray], dof: int) -> tuple[np.ndarray, np.ndarray]:
    """-2 REML log-likelihood of each fit f at its ratios ``ratios[f]`` (F, L), and beta (F, L, k)."""
    n, sxx, sx, sxy, sy, yy = (parts[k] for k in ("n", "sxx", "sx", "sxy", "sy", "yy"))
    c = ratios[:, :, None] / (1.0 + ratios[:, :, None] * n[None, None, :])          # (F, L, G)
    a = sxx.sum(axis=0)[None, None] - np.einsum("flg,gi,gj->flij", c, sx, sx)
    b = sxy.sum(axis=1)[:, None] - np.einsum("flg,gi,fg->fli", c, sx, sy)
    yhy = yy.sum(axis=1)[:, None] - (c * sy[:, None, :] ** 2).sum(axis=2)
    beta = np.linalg.solve(a, b[..., None])[..., 0]
    rss = yhy - np.einsum("fli,fli->fl", beta, b)
    sign, logdet = np.linalg.slogdet(a)
    dev = np.log1p(ratios[:, :, None] * n[None, None, :]).sum(axis=2) + logdet + dof * np.log(np.maximum(rss, 1e-300))
    return np.where((sign > 0) & (rss > 0) & np.isfinite(dev), dev, 1e300), beta


def _exp(t: np.ndarray) -> np.ndarray:
    """exp of each value as the one-fit code takes it (of one scalar at a time)."""
    return np.array([np.exp(v) for v in t])


def bounded_brent(func, low: np.ndarray, high: np.ndarray, xatol: float = 1e-9,
                   maxfun: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """scipy's ``minimize_scalar(method="bounded")`` (Brent's method) run for many functions at once, each on
    its own interval: ``func(x)`` evaluates every function at its x (F,). Every step is scipy's, element by
    element, so each function gets the x and f scipy would give it. Returns (x, f)."""
    sqrt_eps, golden_mean = math.sqrt(2.2e-16), 0.5 * (3.0 - math.sqrt(5.0))
    a, b = low.astype(float).copy(), high.astype(float).copy()
    fulc = a + golden_mean * (b - a)
    nfc, xf = fulc.copy(), fulc.copy()
    rat, e = np.zeros_like(a), np.zeros_like(a)
    fx = func(xf)
    num = 1
    ffulc, fnfc = fx.copy(), fx.copy()
    xm = 0.5 * (a + b)
    tol1 = sqrt_eps * np.abs(xf) + xatol / 3.0
    tol2 = 2.0 * tol1
    active = np.abs(xf - xm) > (tol2 - 0.5 * (b - a))
    while active.any() and num < maxfun:
        par = active & (np.abs(e) > tol1)
        r = (xf - nfc) * (fx - ffulc)
        q = (xf - fulc) * (fx - fnfc)
        p = (xf - fulc) * q - (xf - nfc) * r
        q = 2.0 * (q - r)
        p = np.where(q > 0.0, -p, p)
        q = np.abs(q)
        r = e.copy()
        e = np.where(par, rat, e)
        with np.errstate(divide="ignore", invalid="ignore"):
            accept = par & (np.abs(p) < np.abs(0.5 * q * r)) & (p > q * (a - xf)) & (p < q * (b - xf))
            step = (p + 0.0) / q
        near = ((xf + step - a) < tol2) | ((b - (xf + step)) < tol2)
        edge = np.sign(xm - xf) + ((xm - xf) == 0)
        rat = np.where(accept, np.where(near, tol1 * edge, step), rat)
        golden = active & ~accept
        e = np.where(golden, np.where(xf >= xm, a - xf, b - xf), e)
        rat = np.where(golden, golden_mean * e, rat)
        si = np.sign(rat) + (rat == 0)
        x = np.where(active, xf + si * np.maximum(np.abs(rat), tol1), xf)
        fu = np.where(active, func(x), fx)
        num += 1
        better = active & (fu <= fx)
        worse = active & ~better
        a = np.where(better & (x >= xf), xf, np.where(worse & (x < xf), x, a))
        b = np.where(better & (x < xf), xf, np.where(worse & (x >= xf), x, b))
        first = worse & ((fu <= fnfc) | (nfc == xf))
        second = worse & ~first & ((fu <= ffulc) | (fulc == xf) | (fulc == nfc))
        fulc, ffulc = (np.where(better | first, nfc, np.where(second, x, fulc)),
                       np.where(better | first, fnfc, np.where(second, fu, ffulc)))
        nfc, fnfc = np.where(better, xf, np.where(first, x, nfc)), np.where(better, fx, np.where(first, fu, fnfc))
        xf, fx = np.where(better, x, xf), np.where(better, fu, fx)
        xm = 0.5 * (a + b)
        tol1 = sqrt_eps * np.abs(xf) + xatol / 3.0
        tol2 = 2.0 * tol1
        active = active & (np.abs(xf - xm) > (tol2 - 0.5 * (b - a)))
    return xf, fx


def random_intercept_reml_batch(x: np.ndarray, ys: np.ndarray, groups: np.ndarray) -> list[RandomInterceptFit]:
    """:func:`synthtrial.analyze.mixed.random_intercept_reml` of F outcomes (F, n) on one design: the same grid,
    the same bounded Brent search (run for every fit at once) and the same closing steps."""
    codes, _ = pd.factorize(np.asarray(groups))
    clusters = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    ys = np.ascontiguousarray(ys, dtype=float)
    f_count = ys.shape[0]
    parts = _ri_parts(x, ys, clusters)
    dof = ys.shape[1] - x.shape[1]
    grid = np.concatenate([[0.0], np.logspace(-8, 6, 57)])
    dev, _ = _ri_deviance_batch(np.broadcast_to(grid, (f_count, grid.size)), parts, dof)
    best = np.argmin(dev, axis=1)
    rows = np.arange(f_count)
    ratio = grid[best].copy()
    search = best > 0
    if search.any():
        sub = {k: (v[search] if k in ("sxy", "sy", "yy") else v) for k, v in parts.items()}
        low = np.log(grid[np.maximum(best[search] - 1, 1)])
        high = np.log(grid[np.minimum(best[search] + 1, grid.size - 1)])
        found_x, found_f = bounded_brent(
            lambda t: _ri_deviance_batch(_exp(t)[:, None], sub, dof)[0][:, 0], low, high)
        take = found_f <= dev[rows[search], best[search]]
        ratio[search] = np.where(take, _exp(found_x), ratio[search])
    one = best == 1
    if one.any():
        sub = {k: (v[one] if k in ("sxy", "sy", "yy") else v) for k, v in parts.items()}
        at = _ri_deviance_batch(ratio[one][:, None], sub, dof)[0][:, 0]
        ratio[one] = np.where(dev[one, 0] <= at, 0.0, ratio[one])
    _, beta = _ri_deviance_batch(ratio[:, None], parts, dof)
    fits = []
    for f in range(f_count):
        c = ratio[f] / (1.0 + ratio[f] * parts["n"])
        yhy = parts["yy"][f].sum() - float((c * parts["sy"][f] ** 2).sum())
        b = parts["sxy"][f].sum(axis=0) - np.einsum("g,gi,g->i", c, parts["sx"], parts["sy"][f])
        scale = float(yhy - beta[f, 0] @ b) / dof
        fits.append(RandomInterceptFit(x, ys[f], clusters, beta[f, 0], scale, float(ratio[f]) * scale))
    return fits
