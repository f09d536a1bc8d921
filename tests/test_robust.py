"""CR1 / CR2 cluster-robust covariances and Satterthwaite df: known answers and unbiasedness."""

import numpy as np
import pytest

from synthtrial.analyze.robust import cluster_robust, cluster_robust_low_rank


def _singletons(n):
    return [np.array([i]) for i in range(n)]


def test_cr2_of_a_mean_is_the_classical_standard_error_on_g_minus_1_df():
    y = np.random.default_rng(0).normal(size=7)
    robust = cluster_robust(np.ones((7, 1)), y - y.mean(), _singletons(7))
    assert np.sqrt(robust.cr2[0, 0]) == pytest.approx(y.std(ddof=1) / np.sqrt(7), rel=1e-12)
    assert robust.df_cr2[0] == pytest.approx(6.0, rel=1e-12)
    # CR1 has the G / (G - 1) factor on the plain sandwich, which here is the same number
    assert robust.cr1[0, 0] == pytest.approx(robust.cr2[0, 0], rel=1e-12)


def test_cr2_of_a_two_group_difference_is_welchs_se_with_bell_mccaffrey_df():
    rng = np.random.default_rng(1)
    group = np.r_[np.ones(4), np.zeros(6)]
    y = rng.normal(size=10) * np.where(group == 1, 2.0, 0.5) + group
    x = np.column_stack([np.ones(10), group])
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    robust = cluster_robust(x, y - x @ beta, _singletons(10))
    a, b = y[group == 1], y[group == 0]
    assert np.sqrt(robust.cr2[1, 1]) == pytest.approx(np.sqrt(a.var(ddof=1) / 4 + b.var(ddof=1) / 6), rel=1e-12)
    # under the working (homoscedastic) model the df is Welch-Satterthwaite with equal variances
    expected = (1 / 4 + 1 / 6) ** 2 / (1 / (16 * 3) + 1 / (36 * 5))
    assert robust.df_cr2[1] == pytest.approx(expected, rel=1e-10)


def test_cr2_is_unbiased_under_a_correct_working_model_and_cr1_is_not():
    rng = np.random.default_rng(2)
    sizes = [3, 5, 8, 4, 6]
    clusters, start = [], 0
    for size in sizes:
        clusters.append(np.arange(start, start + size))
        start += size
    n = start
    x = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    working = [0.5 * np.eye(len(c)) + 0.3 for c in clusters]   # compound symmetry
    chol = [np.linalg.cholesky(v) for v in working]
    weights = np.zeros((n, n))
    for c, v in zip(clusters, working):
        weights[np.ix_(c, c)] = np.linalg.inv(v)
    model_cov = np.linalg.inv(x.T @ weights @ x)
    # the estimators are quadratic in the residuals e = (I - H) y, so their expectation under the working
    # model is exact: the sum of the estimator over the columns of R, where R R' = Cov(e) = (I - H) V (I - H)'
    phi = np.zeros((n, n))
    for c, l in zip(clusters, chol):
        phi[np.ix_(c, c)] = l
    hat = x @ model_cov @ x.T @ weights
    root = (np.eye(n) - hat) @ phi
    cr1 = sum(cluster_robust(x, root[:, j], clusters, working).cr1 for j in range(n))
    cr2 = sum(cluster_robust(x, root[:, j], clusters, working).cr2 for j in range(n))
    np.testing.assert_allclose(cr2, model_cov, rtol=1e-8, atol=1e-12)
    assert not np.allclose(np.diag(cr1), np.diag(model_cov), rtol=0.01)
    robust = cluster_robust(x, root[:, 0], clusters, working)
    assert np.all(robust.df_cr2 > 0) and np.all(robust.df_cr2 < len(sizes))


def test_contrast_df_for_a_coefficient_equals_the_unit_contrast():
    rng = np.random.default_rng(3)
    x = np.column_stack([np.ones(12), rng.normal(size=12)])
    y = rng.normal(size=12)
    clusters = [np.arange(i, i + 3) for i in range(0, 12, 3)]
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    plain = cluster_robust(x, y - x @ beta, clusters)
    contrast = cluster_robust(x, y - x @ beta, clusters, contrasts=np.array([[0.0, 2.0]]))
    assert contrast.df_cr2[0] == pytest.approx(plain.df_cr2[1], rel=1e-12)


def test_low_rank_path_equals_the_dense_computation():
    rng = np.random.default_rng(4)
    clusters, start = [], 0
    for size in (7, 12, 9, 15, 6):
        clusters.append(np.arange(start, start + size))
        start += size
    n = start
    x = np.column_stack([np.ones(n), rng.integers(0, 2, n), rng.normal(size=n)])
    resid = rng.normal(size=n)
    for z, g in ((np.ones((n, 1)), np.array([[0.4]])), (x[:, :2], np.array([[0.5, 0.1], [0.1, 0.2]])),
                 (np.ones((n, 1)), np.array([[0.0]]))):
        working = [0.3 * np.eye(len(c)) + z[c] @ g @ z[c].T for c in clusters]
        contrasts = np.array([[0.0, 1.0, 0.0], [0.0, 0.7, 0.2]])
        dense = cluster_robust(x, resid, clusters, working, contrasts=contrasts)
        fast = cluster_robust_low_rank(x, resid, clusters, 0.3, z, g, contrasts=contrasts)
        np.testing.assert_allclose(fast.cr1, dense.cr1, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(fast.cr2, dense.cr2, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(fast.df_cr2, dense.df_cr2, rtol=1e-9)
