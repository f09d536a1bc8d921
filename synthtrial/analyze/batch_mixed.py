"""The pooled random-intercept model's cluster-robust inference (CR1, CR2 with Satterthwaite df) for many fits at once.

A power study fits :func:`synthtrial.analyze.mixed.random_intercept_reml` to many outcomes that share one design
(the same patients, schedules and exposure curves). :func:`cluster_robust_ri_batch` computes what
:func:`synthtrial.analyze.robust.cluster_robust_low_rank` computes for each of those fits (working covariance
``V_g = scale I + tau2 1 1'``), with the per-cluster algebra that depends on the design alone (the orthonormal
basis of ``[1, X_g]`` and ``X_g`` on it) done once, and the rest batched over the fits; the numbers agree with
the one-fit function to rounding (``tests/test_power_batch.py``). :func:`pooled_contrasts` is the arms'
delivered contrasts of :func:`synthtrial.analyze.mixed.mixed_model_both`, for a design.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def pooled_contrasts(effect_cols: np.ndarray, treatment: np.ndarray, rows_of: Sequence[np.ndarray], reference: str,
                     arms: Sequence[str], n_coef: int) -> np.ndarray:
    """Each arm's contrast over the coefficients, averaged over the patients (``rows_of``: each one's rows, in
    first-appearance order) who have the arm and the reference; the arm's own coefficient where none has."""
    out = np.zeros((len(arms), n_coef))
    for i, arm in enumerate(arms):
        per_patient = []
        for rows in rows_of:
            own_t, own_cols = treatment[rows], effect_cols[rows]
            on, ref = own_t == arm, own_t == reference
            if on.any() and ref.any():
                per_patient.append(own_cols[on].mean(axis=0) - own_cols[ref].mean(axis=0))
        if per_patient:
            out[i, 1:1 + len(arms)] = np.mean(per_patient, axis=0)
        else:
            out[i, 1 + i] = 1.0
    return out
