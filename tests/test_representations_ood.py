"""OOD scores against a direct numpy computation with scikit-learn's estimators, and real-data collapse/OOD on
scikit-learn's digits (an MLP trained past zero training error)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from rankscope import representations as rr
from rankscope.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import digits_collapse


def blobs(seed=0, n=300, D=8, C=4):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    A = rng.standard_normal((D, D))
    return 4 * rng.standard_normal((C, D))[y] + rng.standard_normal((n, D)) @ A, y, rng.standard_normal((50, D)) * 5


@pytest.mark.parametrize("relative", [False, True])
def test_mahalanobis_matches_numpy_with_ledoit_wolf(relative):
    H, y, T = blobs()
    mu = np.stack([H[y == c].mean(0) for c in range(4)])
    P = LedoitWolf(assume_centered=True).fit(H - mu[y]).precision_
    md = np.stack([np.einsum("nd,de,ne->n", T - m, P, T - m) for m in mu], 1)  # (N_test, C)
    if relative:
        bg = LedoitWolf().fit(H)
        md = md - np.einsum("nd,de,ne->n", T - bg.location_, bg.precision_, T - bg.location_)[:, None]
    np.testing.assert_allclose(rr.mahalanobis(H, y, T, relative=relative).numpy(), md.min(1), rtol=1e-8, atol=1e-8)


def test_neco_matches_sklearn_pca_on_standardised_features():
    H, _, T = blobs(seed=1)
    ss = StandardScaler().fit(H)
    pca = PCA(n_components=3).fit(ss.transform(H))
    Z = ss.transform(T)
    expected = np.linalg.norm(pca.transform(Z) + pca.mean_ @ pca.components_.T, axis=1) / np.linalg.norm(Z, axis=1)
    np.testing.assert_allclose(rr.neco(H, T, dim=3).numpy(), expected, rtol=1e-8)
    logits = np.random.default_rng(2).standard_normal((50, 4))
    np.testing.assert_allclose(rr.neco(H, T, dim=3, logits=logits).numpy(), expected * logits.max(1), rtol=1e-8)


def test_ood_bad_input():
    H, y, T = blobs()
    with pytest.raises(InputError, match="H_test: has 3 columns but H_train has 8"):
        rr.mahalanobis(H, y, T[:, :3])
    with pytest.raises(InputError, match=r"dim: must lie in \[1, 8\]"):
        rr.neco(H, T, dim=9)


def test_mlp_on_digits_collapses_nc1_by_10x_past_zero_training_error(one_thread):
    X, y, *_ = digits_collapse.digits()
    t = digits_collapse.train(X, y)
    assert t.train_error[-1] == 0.0
    assert t.nc1[0] / t.nc1[-1] >= 10, (t.nc1[0], t.nc1[-1])


def test_neco_and_mahalanobis_detect_a_held_out_digit(one_thread):
    auroc = digits_collapse.ood_auroc(exclude=9, neco_dim=8)
    print(auroc)
    assert auroc["neco"] > 0.8 and auroc["mahalanobis"] > 0.8 and auroc["relative_mahalanobis"] > 0.8, auroc
