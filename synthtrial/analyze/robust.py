"""Cluster-robust covariances for a (G)LS fit with block-diagonal working covariance: CR1 and CR2.

For ``beta = M X' W y`` with ``M = (X' W X)^-1`` and ``W_g = V_g^-1`` (``V_g`` the working model's
covariance of cluster g, the identity for OLS):

* **CR1**: ``M (sum_g X_g' W_g e_g e_g' W_g X_g) M * G / (G - 1)``; tests use t on G - 1 df.
* **CR2** (bias-reduced linearisation, Bell & McCaffrey 2002; the form of R's clubSandwich,
  Pustejovsky & Tipton 2018): the residuals are first adjusted, ``e_g -> A_g e_g`` with
  ``A_g = D_g' B_g^{+1/2} D_g``, ``D_g' D_g = V_g`` and ``B_g = D_g (V_g - X_g M X_g') D_g'``, so that the
  estimator is exactly unbiased when the working model is right. Tests use a t reference with
  Satterthwaite-type degrees of freedom computed under the working model,
  ``df = (sum_g t_g' V t_g)^2 / sum_{g,h} (t_g' V t_h)^2``, where ``t_g' y`` is cluster g's adjusted score
  for the contrast (clubSandwich's ``coef_test(..., test = "Satterthwaite")``).

With one observation per cluster and ``V = I`` CR2 is HC2 (for a two-group comparison: Welch's SE) and an
intercept-only model gets the classical ``s / sqrt(G)`` on G - 1 df; the tests check both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RobustCov:
    """CR1 and CR2 covariances of the coefficients, and the CR2 Satterthwaite df of each coefficient."""

    cr1: np.ndarray
    cr2: np.ndarray
    df_cr2: np.ndarray  # per contrast
    clusters: int


def _inv_sqrt_psd(b: np.ndarray) -> np.ndarray:
    """Symmetric square root of the Moore-Penrose inverse of a symmetric PSD matrix."""
    values, vectors = np.linalg.eigh((b + b.T) / 2.0)
    tol = max(values.max(initial=0.0), 0.0) * b.shape[0] * 1e-12
    inv = np.where(values > tol, 1.0 / np.sqrt(np.where(values > tol, values, 1.0)), 0.0)
    return (vectors * inv) @ vectors.T


def cluster_robust(x: np.ndarray, resid: np.ndarray, clusters: Sequence[np.ndarray],
                   working: Sequence[np.ndarray] | None = None, contrasts: np.ndarray | None = None) -> RobustCov:
    """CR1, CR2 and CR2 df for a fit with design ``x``, residuals ``y - x beta``.

    ``clusters`` are the row indices of each cluster; ``working`` the matching ``V_g`` (default identity);
    ``df_cr2[j]`` is the Satterthwaite df of contrast row j (default: each coefficient).
    """
    x = np.asarray(x, dtype=float)
    resid = np.asarray(resid, dtype=float)
    n, k = x.shape
    g_count = len(clusters)
    if working is None:
        working = [np.eye(len(idx)) for idx in clusters]
    weights = [np.linalg.inv(v) for v in working]
    wx = np.zeros_like(x)
    bread = np.zeros((k, k))
    for idx, w in zip(clusters, weights, strict=True):
        wx[idx] = w @ x[idx]
        bread += x[idx].T @ wx[idx]
    m = np.linalg.pinv(bread)
    meat1, meat2 = np.zeros((k, k)), np.zeros((k, k))
    adjust = []
    for idx, v, w in zip(clusters, working, weights, strict=True):
        xg = x[idx]
        d = np.linalg.cholesky(v).T                      # upper triangular, d' d = v
        b = d @ (v - xg @ m @ xg.T) @ d.T
        a = d.T @ _inv_sqrt_psd(b) @ d
        adjust.append(a)
        u1 = wx[idx].T @ resid[idx]
        u2 = wx[idx].T @ (a @ resid[idx])
        meat1 += np.outer(u1, u1)
        meat2 += np.outer(u2, u2)
    factor = g_count / (g_count - 1) if g_count > 1 else np.nan
    cr1 = m @ meat1 @ m * factor
    cr2 = m @ meat2 @ m

    # Satterthwaite df per coefficient (contrast e_j), under the working model
    contrasts = np.eye(k) if contrasts is None else np.atleast_2d(np.asarray(contrasts, dtype=float))
    df = np.empty(contrasts.shape[0])
    for j, row in enumerate(contrasts):
        c = m @ row                                       # M c
        t = np.zeros((n, g_count))
        for h, (idx, a, w) in enumerate(zip(clusters, adjust, weights, strict=True)):
            q = a @ (w @ (x[idx] @ c))                    # A_g W_g X_g M c
            t[idx, h] += q
            t[:, h] -= wx @ (m @ (x[idx].T @ q))
        vt = np.zeros_like(t)
        for idx, v in zip(clusters, working, strict=True):
            vt[idx] = v @ t[idx]
        s = t.T @ vt
        total = float(np.sum(s ** 2))
        df[j] = float(np.trace(s) ** 2 / total) if total > 0 else np.nan
    return RobustCov(cr1=cr1, cr2=cr2, df_cr2=df, clusters=g_count)


def cluster_robust_low_rank(x: np.ndarray, resid: np.ndarray, clusters: Sequence[np.ndarray], scale: float,
                            z: np.ndarray, g: np.ndarray, contrasts: np.ndarray | None = None) -> RobustCov:
    """:func:`cluster_robust` for a mixed model's working covariance ``V_g = scale I + Z_g G Z_g'``, exactly.

    Every matrix of the CR2 algebra maps the span of ``[Z_g, X_g]`` (rank r) into itself and acts as a
    multiple of the identity on its complement, so with ``Q_g`` an orthonormal basis of that span the
    n_g x n_g work (inverse, square roots of V_g and B_g) shrinks to r x r: ``A_g = I - Q Q' + Q T Q'`` with
    ``T = S^1/2 Bq^+1/2 S^1/2``, ``S = Q' V Q`` and ``Bq = S^2 - S^1/2 Q'X M X'Q S^1/2`` (the symmetric
    square root ``D = V^1/2`` is used, which gives the same ``A_g`` as any D with ``D'D = V``).
    """
    x = np.asarray(x, dtype=float)
    resid = np.asarray(resid, dtype=float)
    k = x.shape[1]
    parts = []
    bread = np.zeros((k, k))
    for idx in clusters:
        basis = np.column_stack([z[idx], x[idx]])
        u, sv, _ = np.linalg.svd(basis, full_matrices=False)
        q = u[:, sv > sv.max(initial=0.0) * 1e-10]
        zq = q.T @ z[idx]
        s = scale * np.eye(q.shape[1]) + zq @ g @ zq.T
        xq = q.T @ x[idx]
        p = np.linalg.solve(s, xq)                        # Q' W X_g = S^-1 Q'X
        bread += xq.T @ p
        parts.append((q, s, xq, p))
    m = np.linalg.pinv(bread)
    meat1, meat2 = np.zeros((k, k)), np.zeros((k, k))
    ts = []
    for idx, (q, s, xq, p) in zip(clusters, parts, strict=True):
        values, vectors = np.linalg.eigh(s)
        root = (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T
        bq = s @ s - root @ xq @ m @ xq.T @ root
        t = root @ _inv_sqrt_psd(bq) @ root
        ts.append(t)
        eq = q.T @ resid[idx]
        u1 = p.T @ eq
        u2 = p.T @ (t @ eq)
        meat1 += np.outer(u1, u1)
        meat2 += np.outer(u2, u2)
    g_count = len(clusters)
    cr1 = m @ meat1 @ m * (g_count / (g_count - 1) if g_count > 1 else np.nan)
    cr2 = m @ meat2 @ m
    contrasts = np.eye(k) if contrasts is None else np.atleast_2d(np.asarray(contrasts, dtype=float))
    df = np.empty(contrasts.shape[0])
    for j, row in enumerate(contrasts):
        mc = m @ row
        # coordinates of the adjusted-score vectors t_g (over all rows) on each cluster's basis
        b = [t @ np.linalg.solve(s, xq @ mc) for (q, s, xq, p), t in zip(parts, ts, strict=True)]
        h = np.array([xq.T @ bg for (q, s, xq, p), bg in zip(parts, b, strict=True)])      # (G, k): X_g' q_g
        total = np.zeros((g_count, g_count))
        for c_idx, ((q, s, xq, p), bg) in enumerate(zip(parts, b, strict=True)):
            a = -(h @ m @ p.T)                             # (G, r): -P_k M X_g' q_g for every g
            a[c_idx] += bg
            total += a @ s @ a.T
        denominator = float(np.sum(total ** 2))
        df[j] = float(np.trace(total) ** 2 / denominator) if denominator > 0 else np.nan
    return RobustCov(cr1=cr1, cr2=cr2, df_cr2=df, clusters=g_count)
