"""Neural-collapse metrics against closed forms (simplex ETF, collapsed features), invariances, a direct numpy
computation of the definitions, and streaming = full batch."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankscope import representations as rr
from rankscope.errors import InputError


def simplex_etf(C: int, D: int, seed: int = 0) -> np.ndarray:
    """(C, D) rows forming a simplex ETF (unit norm, pairwise cosine −1/(C−1)), randomly rotated into R^D."""
    rng = np.random.default_rng(seed)
    M = math.sqrt(C / (C - 1)) * (np.eye(C) - np.ones((C, C)) / C)  # (C, C)
    Q = np.linalg.qr(rng.standard_normal((D, C)))[0]  # (D, C) orthonormal columns
    return M @ Q.T


def noisy_classes(C=6, D=10, n=300, seed=0, imbalanced=False):
    rng = np.random.default_rng(seed)
    p = np.arange(1, C + 1) / np.arange(1, C + 1).sum() if imbalanced else np.full(C, 1 / C)
    y = rng.choice(C, size=n, p=p)
    y[:C] = np.arange(C)  # every class present
    H = 3 * rng.standard_normal((C, D))[y] + rng.standard_normal((n, D)) @ rng.standard_normal((D, D))
    return H, y


def direct(H, y):
    """The definitions, written out with numpy loops: class means, μ_G = sample mean, Σ_W over samples."""
    classes = np.unique(y)
    mu = np.stack([H[y == c].mean(0) for c in classes])
    mu_g = H.mean(0)
    Sw = sum((H[y == c] - mu[i]).T @ (H[y == c] - mu[i]) for i, c in enumerate(classes)) / len(H)
    return classes, mu, mu_g, Sw


def test_collapsed_features_give_zero_nc1_and_vci_also_for_imbalanced_classes():
    means = simplex_etf(5, 8)
    for counts in ([4] * 5, [1, 2, 3, 7, 20]):
        y = np.repeat(np.arange(5), counts)
        H = means[y]
        assert rr.nc1(H, y) == pytest.approx(0, abs=1e-12)
        assert rr.vci(H, y) == pytest.approx(0, abs=1e-10)


def test_simplex_etf_gives_zero_nc2_nc3_nc4():
    C, D = 6, 9
    means = simplex_etf(C, D, seed=1)
    y = np.repeat(np.arange(C), 3)
    H = 5.0 * means[y]  # any common scale
    parts = rr.nc2(H, y)
    for value in (parts.equinorm, parts.equiangularity, parts.max_angle, parts.etf_distance):
        assert value == pytest.approx(0, abs=1e-7)
    d = rr.nc3(H, y, 2.0 * means)  # W ∝ M
    assert d.distance == pytest.approx(0, abs=1e-12) and d.mean_cosine == pytest.approx(1) and d.unc3 < 1e-12
    assert rr.nc4(H, y, means, np.zeros(C)) == 0.0
    assert rr.gnc2(H, y).variation == pytest.approx(0, abs=1e-7)  # all pairwise distances equal


def test_nc2_detects_a_non_etf_configuration():
    means = simplex_etf(4, 4)
    means[0] *= 2.0  # unequal norms
    y = np.repeat(np.arange(4), 2)
    assert rr.nc2(means[y], y).equinorm > 0.1 and rr.nc2(means[y], y).etf_distance > 0.05


@pytest.mark.parametrize("imbalanced", [False, True])
def test_nc1_vci_cdnv_gnc2_match_the_written_out_definitions(imbalanced):
    H, y = noisy_classes(imbalanced=imbalanced)
    classes, mu, mu_g, Sw = direct(H, y)
    C = len(classes)
    M = mu - mu_g
    assert rr.nc1(H, y) == pytest.approx(np.trace(Sw @ np.linalg.pinv(M.T @ M / C)) / C, rel=1e-9)
    n_c = np.array([(y == c).sum() for c in classes])
    Sb = (M.T * n_c / len(H)) @ M
    St = np.cov(H.T, bias=True)
    assert rr.vci(H, y) == pytest.approx(1 - np.trace(np.linalg.pinv(St) @ Sb) / np.linalg.matrix_rank(Sb), rel=1e-9)
    var = np.array([((H[y == c] - mu[i]) ** 2).sum(1).mean() for i, c in enumerate(classes)])
    pairs = [(a, b) for a in range(C) for b in range(C) if a != b]
    cd = np.mean([(var[a] + var[b]) / (2 * np.sum((mu[a] - mu[b]) ** 2)) for a, b in pairs])
    assert rr.cdnv(H, y) == pytest.approx(cd, rel=1e-9)
    assert rr.cdnv(H, y, chunk=2) == pytest.approx(cd, rel=1e-9)
    U = M / np.linalg.norm(M, axis=1, keepdims=True)
    k = np.array([-np.log(np.linalg.norm(U[a] - U[b])) for a, b in pairs])
    g = rr.gnc2(H, y, chunk=4)
    assert g.energy == pytest.approx(k.mean(), rel=1e-9) and g.variation == pytest.approx(k.std(), rel=1e-7)
    cos = np.array([U[a] @ U[b] for a, b in pairs])
    assert rr.nc2(H, y).equiangularity == pytest.approx(cos.std(), rel=1e-7)
    assert rr.nc2(H, y).max_angle == pytest.approx(np.abs(cos + 1 / (C - 1)).mean(), rel=1e-9)
    G = M @ M.T
    etf = np.linalg.norm(G / np.linalg.norm(G) - (np.eye(C) - 1 / C) / np.sqrt(C - 1))
    assert rr.nc2(H, y).etf_distance == pytest.approx(etf, rel=1e-9)


def test_vci_is_invariant_under_invertible_maps_nc1_only_under_rotations():
    H, y = noisy_classes(seed=3)
    rng = np.random.default_rng(4)
    Q = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    A = Q @ np.diag(np.logspace(-1, 1, 10)) @ np.linalg.qr(rng.standard_normal((10, 10)))[0]  # invertible, anisotropic
    assert rr.vci(H @ A.T, y) == pytest.approx(rr.vci(H, y), rel=1e-9)
    assert rr.nc1(H @ Q.T, y) == pytest.approx(rr.nc1(H, y), rel=1e-9)
    assert abs(rr.nc1(H @ A.T, y) / rr.nc1(H, y) - 1) > 0.05


def test_streaming_batches_equal_the_full_batch():
    H, y = noisy_classes(C=7, n=500, seed=5, imbalanced=True)
    H = H + 100.0  # a large offset: the shifted second moments must not lose precision
    acc = rr.ClassStats()
    for idx in np.array_split(np.random.default_rng(0).permutation(len(H)), 9):
        acc.update(torch.from_numpy(H[idx]), y[idx])
    m = acc.compute()
    _, mu, mu_g, Sw = direct(H, y)
    np.testing.assert_allclose(m.means.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(m.global_mean.numpy(), mu_g, rtol=1e-12)
    np.testing.assert_allclose(m.within.numpy(), Sw, atol=1e-9)
    for f in (rr.nc1, rr.vci, rr.cdnv):
        assert f(m) == pytest.approx(f(H, y), rel=1e-8)


def test_nc3_and_nc4_against_a_direct_computation():
    H, y = noisy_classes(seed=6)
    rng = np.random.default_rng(7)
    W, b = rng.standard_normal((6, 10)), rng.standard_normal(6)
    _, mu, mu_g, _ = direct(H, y)
    M = mu - mu_g
    assert rr.nc3(H, y, W).distance == pytest.approx(
        np.sum((W / np.linalg.norm(W) - M / np.linalg.norm(M)) ** 2), rel=1e-10)
    cos = np.sum(W * M, 1) / np.linalg.norm(W, axis=1) / np.linalg.norm(M, axis=1)
    assert rr.unc3(H, y, W) == pytest.approx(cos.std() / abs(cos.mean()), rel=1e-9)
    ncc = np.argmin(((H[:, None, :] - mu[None]) ** 2).sum(-1), 1)
    assert rr.nc4(H, y, W, b) == pytest.approx(np.mean(np.argmax(H @ W.T + b, 1) != ncc))


def test_linguistic_collapse_keeps_the_top_k_tokens():
    rng = np.random.default_rng(8)
    tokens = rng.zipf(1.5, size=3000) % 500  # heavy-tailed "vocabulary"
    H = rng.standard_normal((500, 16))[tokens] + 0.3 * rng.standard_normal((3000, 16))
    W = rng.standard_normal((500, 16))
    out = rr.linguistic_collapse(H, tokens, top_k=20, W=W)
    ids, counts = np.unique(tokens, return_counts=True)
    top = ids[np.argsort(-counts, kind="stable")[:20]]
    keep = np.isin(tokens, top)
    assert out["classes"] == 20 and out["samples"] == keep.sum()
    assert out["nc1"] == pytest.approx(rr.nc1(H[keep], tokens[keep]), rel=1e-9)
    assert out["cdnv_mean"] == pytest.approx(rr.cdnv(H[keep], tokens[keep]), rel=1e-9)
    assert out["unc3"] == pytest.approx(rr.unc3(H[keep], tokens[keep], W), rel=1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda H, y: rr.nc1(H, y[:-1]), "y: has 29 labels but the features have 30 rows"),
    (lambda H, y: rr.nc1(H, np.zeros(30, int)), "y: needs at least 2 distinct classes, got 1"),
    (lambda H, y: rr.vci(np.where(np.arange(30)[:, None] == 4, np.nan, H), y), "H: 4 NaN/Inf entries"),
    (lambda H, y: rr.cdnv(H, np.where(np.arange(30) == 2, np.nan, y)), "y: contains NaN/Inf"),
    (lambda H, y: rr.nc3(H, y, np.ones((3, 5))), "W: has 5 columns but the features have 4"),
    (lambda H, y: rr.nc3(H, y, np.ones((2, 4))), "W: has 2 rows but the labels run from 0 to 2"),
    (lambda H, y: rr.nc1(H[:, :, None], y), "H: expected a 2-D (N, D) matrix"),
])
def test_bad_input_raises_input_error_naming_the_input(call, message):
    rng = np.random.default_rng(9)
    H, y = rng.standard_normal((30, 4)), np.arange(30) % 3
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(H, y)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 5), k=st.integers(1, 4), scale=st.sampled_from([0.0, 1e-8, 1.0, 1e6]),
       seed=st.integers(0, 10_000))
def test_degenerate_inputs_give_a_finite_value_or_input_error(n, d, k, scale, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    H = scale * rng.standard_normal((n, d))
    for f in (rr.nc1, rr.vci, rr.cdnv, lambda H, y: rr.nc2(H, y).equinorm):
        try:
            value = f(H, y)
        except InputError:
            continue
        assert math.isfinite(value)


def test_linguistic_collapse_records_nan_for_a_measure_undefined_on_the_batch_and_computes_the_rest():
    """Two classes with identical rows (a probe batch whose contexts repeat) have equal means: CDNV's distance is 0
    and GNC2's log kernel infinite. Alone each is an error; the bundle gives NaN for both, with a warning, and the
    rest as computed alone (a training run's probe batch can hit this, and it must not end the run)."""
    torch.manual_seed(0)
    H0, H2 = torch.randn(30, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64) + 3.0
    H = torch.cat([H0, H0, H2])  # classes 0 and 1 share every row
    y = torch.arange(3).repeat_interleave(30)
    for alone in (rr.gnc2, rr.cdnv):
        with pytest.raises(InputError):
            alone(H, y)
    with pytest.warns(UserWarning, match="is undefined here"):
        out = rr.linguistic_collapse(H, y, top_k=3)
    assert all(math.isnan(out[k]) for k in ("gnc2_energy", "gnc2_variation", "cdnv_mean"))
    assert out["nc1"] == pytest.approx(rr.nc1(H, y), rel=1e-12) and math.isfinite(out["nc1"])
    assert out["nc2_equinorm"] == pytest.approx(rr.nc2(H, y).equinorm, rel=1e-12)


def test_linguistic_collapse_still_raises_for_a_bad_input_it_could_mistake_for_an_undefined_measure():
    torch.manual_seed(0)
    H, y = torch.randn(90, 8, dtype=torch.float64), torch.arange(3).repeat_interleave(30)
    with pytest.raises(InputError, match="columns"):
        rr.linguistic_collapse(H, y, top_k=3, W=torch.randn(3, 999, dtype=torch.float64))  # W of the wrong width
