"""Dimension metrics: intrinsic dimension of data on known low-dimensional manifolds, spectral ranks against a
direct numpy computation of their definitions, and scikit-dimension as an independent reference."""

import numpy as np
import pytest
import torch

from rankscope import representations as rr
from rankscope.errors import InputError


def embedded(d: int, n: int = 2000, D: int = 50, sphere: bool = False, seed: int = 0) -> np.ndarray:
    """n points of a d-dim standard Gaussian (or the unit d-sphere in R^{d+1}) mapped linearly into R^D."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d + sphere))
    if sphere:
        Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    A = rng.standard_normal((d + sphere, D))  # injective linear map
    return Z @ A


@pytest.mark.parametrize("d, sphere", [(5, False), (3, True)])
def test_twonn_mle_and_lid_recover_the_manifold_dimension(d, sphere):
    X = embedded(d, sphere=sphere)
    assert rr.twonn(X) == pytest.approx(d, rel=0.12)
    assert rr.mle_dimension(X, k=20) == pytest.approx(d, rel=0.15)
    assert rr.lid(X, k=20).geometric_mean == pytest.approx(d, rel=0.2)


def test_knn_distances_match_a_dense_computation_and_chunking():
    X = embedded(4, n=300, seed=1)
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)
    np.fill_diagonal(D, np.inf)
    np.testing.assert_allclose(rr.knn_distances(X, 5, chunk=7).numpy(), np.sort(D, 1)[:, :5], rtol=1e-6)


def test_rankme_and_stable_rank_match_their_definitions():
    rng = np.random.default_rng(2)
    Z = rng.standard_normal((200, 30)) @ np.diag(np.logspace(0, -3, 30))
    s = np.linalg.svd(Z, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rr.rankme(Z) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert rr.stable_rank(Z) == pytest.approx(np.linalg.norm(Z) ** 2 / np.linalg.norm(Z, 2) ** 2, rel=1e-12)
    low = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 30))  # rank 3
    assert rr.rankme(low) < 3.0 + 1e-3 and rr.rankme(Z) > rr.rankme(low)


def test_lidar_matches_the_lda_matrix_written_out():
    rng = np.random.default_rng(3)
    n, q, D = 40, 4, 6
    groups = np.repeat(np.arange(n), q)
    Z = rng.standard_normal((n, D))[groups] * 2 + rng.standard_normal((n * q, D))
    mu = np.stack([Z[groups == i].mean(0) for i in range(n)])
    Sb = np.cov(mu.T)  # 1/(n−1) about the grand mean
    Sw = sum((Z[groups == i] - mu[i]).T @ (Z[groups == i] - mu[i]) for i in range(n)) / (n * q) + 1e-4 * np.eye(D)
    w, U = np.linalg.eigh(Sw)
    inv_sqrt = U @ np.diag(w ** -0.5) @ U.T
    lam = np.linalg.eigvalsh(inv_sqrt @ Sb @ inv_sqrt)
    p = lam / lam.sum() + 1e-7
    assert rr.lidar(Z, groups) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_duplicates_and_too_few_points_raise_input_error():
    X = embedded(2, n=50)
    with pytest.raises(InputError, match="X: 2 rows have an exact duplicate"):
        rr.twonn(np.vstack([X, X[:1]]))
    with pytest.raises(InputError, match="X: needs at least 21 rows"):
        rr.mle_dimension(X[:10], k=20)
    with pytest.raises(InputError, match="Z: all embeddings are zero"):
        rr.rankme(np.zeros((5, 3)))


def test_against_scikit_dimension():
    skdim = pytest.importorskip("skdim", reason="scikit-dimension (skdim) is not installed: "
                                               "pip install scikit-dimension to run this cross-check")
    X = embedded(6, n=1500, seed=4)
    ref_twonn = skdim.id.TwoNN().fit(X).dimension_
    assert rr.twonn(X) == pytest.approx(ref_twonn, rel=1e-6)
    ref_mle = skdim.id.MLE(K=20).fit(X, n_neighbors=20).dimension_
    assert rr.mle_dimension(X, k=20) == pytest.approx(ref_mle, rel=1e-3)


def test_torch_input_and_numpy_input_agree():
    X = embedded(3, n=400, seed=5)
    assert rr.twonn(torch.from_numpy(X).float()) == pytest.approx(rr.twonn(X), rel=1e-4)
