"""GLS with REML AR(1) errors for many series that share one design: :mod:`synthtrial.analyze.nof1`'s fit, batched.

A power study fits the same design matrix (a patient's schedule: arms or exposure curves, the trend) to
thousands of simulated series. The functions here take that design once, ``x`` (n x p) with the series'
``gaps``, and a stack of outcomes ``y`` (S x n), and run :func:`synthtrial.analyze.nof1.fit_phi`,
:meth:`~synthtrial.analyze.nof1.AR1Moments.solve` and :func:`~synthtrial.analyze.nof1.satterthwaite_df` on all
of them at once: the same grid (67 points, four zooms of 21, a parabola through the last three), the same
Cholesky-based deviance and the same finite differences, element by element, so the numbers agree with the
one-series functions to rounding (``tests/test_power_batch.py`` compares them). What the one-series code does
on a singular Gram matrix (one phi at a time) is done here too.
"""

from __future__ import annotations

import math

import numpy as np

from synthtrial.analyze.nof1 import PHI_BOUND


class AR1MomentsBatch:
    """:class:`synthtrial.analyze.nof1.AR1Moments` of S series sharing ``x`` and ``gaps``."""

    def __init__(self, y: np.ndarray, x: np.ndarray, gaps: np.ndarray) -> None:
        y = np.ascontiguousarray(np.atleast_2d(np.asarray(y, dtype=float)))
        s_count, n = y.shape
        self.n, self.p = x.shape
        q = self.p + 1
        data = np.concatenate([np.broadcast_to(np.asarray(x, dtype=float), (s_count, n, self.p)), y[:, :, None]],
                              axis=2)
        gaps = np.asarray(gaps, dtype=float)
        self._gaps, counts = np.unique(gaps, return_counts=True)
        self._counts = counts.astype(float)
        a, b, c = (np.zeros((s_count, self._gaps.size, q * q)) for _ in range(3))
        for k, gap in enumerate(self._gaps):   # matmul of each series' slices: the one-series code's numbers
            rows = np.flatnonzero(gaps == gap) + 1
            now, before = data[:, rows], data[:, rows - 1]
            now_t, before_t = now.transpose(0, 2, 1), before.transpose(0, 2, 1)
            cross = np.matmul(now_t, before)
            a[:, k] = np.matmul(now_t, now).reshape(s_count, -1)
            b[:, k] = -(cross + cross.transpose(0, 2, 1)).reshape(s_count, -1)
            c[:, k] = np.matmul(before_t, before).reshape(s_count, -1)
        self._stack = np.concatenate([a, b, c], axis=1)                       # (S, 3 gaps, q^2)
        self._first = (data[:, 0, :, None] * data[:, 0, None, :]).reshape(s_count, -1)

    @property
    def size(self) -> int:
        """The number of series."""
        return self._first.shape[0]

    def rho(self, phis: np.ndarray) -> np.ndarray:
        """``phi ** gap`` for each series' phis (S, G) and each distinct gap (the one power both gram and logdet use)."""
        return np.asarray(phis, dtype=float)[:, :, None] ** self._gaps[None, None, :]

    def gram(self, phis: np.ndarray, rho: np.ndarray | None = None) -> np.ndarray:
        """The whitened ``[X | y]' [X | y]`` of series s at each of its phis ``phis[s]``: (S, G, q, q)."""
        phis = np.asarray(phis, dtype=float)
        rho = self.rho(phis) if rho is None else rho
        inv = 1.0 / (1.0 - rho ** 2)
        weights = np.concatenate([inv, rho * inv, rho * rho * inv], axis=2)
        out = np.matmul(weights, self._stack) + self._first[:, None, :]
        return out.reshape(phis.shape[0], phis.shape[1], self.p + 1, self.p + 1)

    def logdet(self, phis: np.ndarray, rho: np.ndarray | None = None) -> np.ndarray:
        rho = self.rho(phis) if rho is None else rho
        return np.log(1.0 - rho ** 2) @ self._counts

    def deviance(self, phis: np.ndarray, reml: bool = True) -> np.ndarray:
        """-2 (restricted) log-likelihood at each series' phis (S, G), as ``AR1Moments.deviance``."""
        p = self.p
        dof = self.n - p if reml else self.n
        rho = self.rho(phis)
        gram = self.gram(phis, rho)
        with np.errstate(divide="ignore", invalid="ignore"):
            try:
                diag = np.linalg.cholesky(gram).diagonal(axis1=2, axis2=3)
                rss, logdet_xx = diag[..., p] ** 2, 2.0 * np.log(diag[..., :p]).sum(axis=2)
                ok = np.ones(rss.shape, bool)
            except np.linalg.LinAlgError:
                rss, logdet_xx, ok = self._singular(gram)
            dev = self.logdet(phis, rho) + dof * np.log(np.maximum(rss, 1e-300)) + (logdet_xx if reml else 0.0)
        return np.where((rss > 0) & ok & np.isfinite(dev), dev, 1e300)

    def _singular(self, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The deviance's parts where some Gram matrix is singular: each series as the one-series code does it
        (a Cholesky of its own phis, else the slogdet branch)."""
        p = self.p
        rss, logdet_xx, ok = (np.empty(gram.shape[:2]), np.empty(gram.shape[:2]), np.ones(gram.shape[:2], bool))
        for s in range(gram.shape[0]):
            try:
                diag = np.linalg.cholesky(gram[s]).diagonal(axis1=1, axis2=2)
                rss[s], logdet_xx[s] = diag[:, p] ** 2, 2.0 * np.log(diag[:, :p]).sum(axis=1)
            except np.linalg.LinAlgError:
                xx, xy, yy = gram[s, :, :p, :p], gram[s, :, :p, p], gram[s, :, p, p]
                sign, logdet_xx[s] = np.linalg.slogdet(xx)
                ok[s] = sign > 0
                beta = np.zeros_like(xy)
                if ok[s].any():
                    beta[ok[s]] = np.linalg.solve(xx[ok[s]], xy[ok[s]][:, :, None])[:, :, 0]
                rss[s] = yy - np.einsum("gi,gi->g", beta, xy)
        return rss, logdet_xx, ok

    def solve(self, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """GLS coefficients (S, p), ``(X' W X)^-1`` (S, p, p) and the RSS (S,) at each series' ``phi``."""
        gram = self.gram(np.asarray(phi, dtype=float)[:, None])[:, 0]
        p = self.p
        xx_inv = np.linalg.inv(gram[:, :p, :p])
        beta = np.matmul(xx_inv, gram[:, :p, p, None])[:, :, 0]
        rss = gram[:, p, p] - np.matmul(beta[:, None, :], gram[:, :p, p, None])[:, 0, 0]
        return beta, xx_inv, np.maximum(rss, 0.0)


def fit_phi_batch(moments: AR1MomentsBatch, reml: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`synthtrial.analyze.nof1.fit_phi` for every series: phi (S,) and its deviance (S,)."""
    s_count = moments.size
    grid = np.broadcast_to(np.linspace(-PHI_BOUND, PHI_BOUND, 67), (s_count, 67))
    dev = moments.deviance(grid, reml)
    rows = np.arange(s_count)
    for _ in range(4):
        best = np.argmin(dev, axis=1)
        low = grid[rows, np.maximum(best - 1, 0)]
        high = grid[rows, np.minimum(best + 1, grid.shape[1] - 1)]
        grid = np.linspace(low, high, 21, axis=1)
        dev = moments.deviance(grid, reml)
    best = np.argmin(dev, axis=1)
    phi, value = grid[rows, best].copy(), dev[rows, best].copy()
    inner = (best > 0) & (best < grid.shape[1] - 1) & (value < 1e300)
    at = np.clip(best, 1, grid.shape[1] - 2)
    x0, x1, x2 = grid[rows, at - 1], grid[rows, at], grid[rows, at + 1]
    f0, f1, f2 = dev[rows, at - 1], dev[rows, at], dev[rows, at + 1]
    curvature = f0 - 2 * f1 + f2
    try_vertex = inner & (curvature > 0)
    if try_vertex.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = np.where(try_vertex, x1 + 0.5 * (x1 - x0) * (f0 - f2) / curvature, phi)
        at_vertex = moments.deviance(vertex[:, None], reml)[:, 0]
        better = try_vertex & (at_vertex <= value)
        phi, value = np.where(better, vertex, phi), np.where(better, at_vertex, value)
    return phi, value


def satterthwaite_batch(moments: AR1MomentsBatch, phi: np.ndarray, sigma2: np.ndarray,
                        contrasts: np.ndarray) -> np.ndarray:
    """:func:`synthtrial.analyze.nof1.satterthwaite_df` of each contrast row (A, p) for every series: (S, A).

    Where the one-series function falls back to ``n - p`` (phi at its bound, a singular matrix, no positive
    variance or spread) so does this, series by series."""
    n, p = moments.n, moments.p
    fallback = float(n - p)
    s_count, a_count = phi.shape[0], contrasts.shape[0]
    out = np.full((s_count, a_count), fallback)
    h = np.where(np.abs(phi) < PHI_BOUND, np.minimum(1e-4, (PHI_BOUND - np.abs(phi)) / 2), 0.0)
    live = h > 0
    if not live.any():
        return out
    phis = np.stack([phi - h, phi, phi + h], axis=1)
    gram = moments.gram(phis)
    xx, xy, yy = gram[..., :p, :p], gram[..., :p, p], gram[..., p, p]
    sign, logdet_xx = np.linalg.slogdet(xx)
    invertible = np.all(np.abs(sign) > 0, axis=1)
    xx_inv = np.zeros_like(xx)
    xx_inv[invertible] = np.linalg.inv(xx[invertible])
    live &= invertible
    rss = yy - np.einsum("sgi,sgij,sgj->sg", xy, xx_inv, xy)
    logdets = moments.logdet(phis) + logdet_xx
    variances = sigma2[:, None, None] * np.einsum("ai,sgij,aj->sag", contrasts, xx_inv, contrasts)   # (S, A, 3)
    v = variances[:, :, 1]
    hs = 1e-4 * sigma2
    dof = n - p
    # math.log, as the one-series code: numpy's vectorised log may differ in the last bit, and these second
    # differences magnify the last bit of the deviance a millionfold
    logs = {sign: np.array([math.log(v) for v in (sigma2 + sign * hs).tolist()]) for sign in (-1, 0, 1)}

    def f(k: int, sign: int) -> np.ndarray:
        b = sign * hs if sign else 0.0
        return 0.5 * (dof * logs[sign] + logdets[:, k] + rss[:, k] / (sigma2 + b))

    with np.errstate(divide="ignore", invalid="ignore"):
        f0 = f(1, 0)
        h_pp = (f(2, 0) - 2 * f0 + f(0, 0)) / h ** 2
        h_ss = (f(1, 1) - 2 * f0 + f(1, -1)) / hs ** 2
        h_ps = (f(2, 1) - f(2, -1) - f(0, 1) + f(0, -1)) / (4 * h * hs)
    info = np.stack([np.stack([h_pp, h_ps], axis=1), np.stack([h_ps, h_ss], axis=1)], axis=1)   # (S, 2, 2)
    live &= np.abs(np.linalg.det(info)) > 0
    if not live.any():
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        grad = np.stack([(variances[:, :, 2] - variances[:, :, 0]) / (2 * h[:, None]), v / sigma2[:, None]],
                        axis=2)                                                                   # (S, A, 2)
    solved = np.zeros_like(grad)
    solved[live] = np.linalg.solve(np.broadcast_to(info[live][:, None], (int(live.sum()), a_count, 2, 2)),
                                   grad[live][:, :, :, None])[..., 0]
    spread = np.matmul(grad[:, :, None, :], solved[:, :, :, None])[:, :, 0, 0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        df = np.minimum(np.maximum(2 * v * v / spread, 1.0), fallback)
    use = live[:, None] & (v > 0) & (spread > 0)
    return np.where(use, df, out)
