"""The analytic two-factor edge (spectra/product_edge.py) against closed forms, an independent series, simulation.

- The law MP(k/n) ⊠ MP(k/m): its edge is the Fuss–Catalan 27/4 for square factors, its moments are those of
  the free product (a power series from the S-transform, not the θ-parametrization the code integrates), and
  as k → ∞ it is MP(n/m) (edge, median, Johnstone's Tracy–Widom scale) at the rate 1/k.
- Its quantiles match the pooled eigenvalues of simulated chains (sampling.two_factor_spectra, checked against
  dense products in test_nulls) up to the O(1/r) finite-size rate of a spectral distribution.
- The edge's false-positive rate on fresh draws (seeds unlike the calibration's) at 1 % and 5 %, within the
  binomial error of the draws; a planted spike well above the edge is flagged; the nulls say which edge they use.
"""

import math

import numpy as np
import pytest
import torch

from rankscope.errors import InputError
from rankscope.spectra import budget, diagnose_batch, nulls, product_edge
from rankscope.spectra.laws import mp_edges, mp_median
from rankscope.spectra.sampling import two_factor_spectra


def law_moments(n, k, m, orders=4, nodes=200):
    """E[P^j] (over all k eigenvalues, the zeros included) from the law's quantile function, Gauss–Legendre."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    q = product_edge.quantile(0.5 * (t + 1), n, k, m)
    share = min(n, k, m) / k
    return np.array([share * 0.5 * float(w @ q**j) for j in range(1, orders + 1)])


def free_product_moments(c1, c2, orders=4):
    """Moments of MP(c1) ⊠ MP(c2) from ψ(x) = Σ m_j x^j = x (1 + ψ)(1 + c1ψ)(1 + c2ψ) (S = 1/((1+c1 w)(1+c2 w))),
    solved as a power series in x: each pass fixes one more coefficient."""
    poly = np.polynomial.polynomial

    def cut(p):
        return np.pad(p, (0, orders + 1))[: orders + 1]

    one = cut([1.0])
    psi = np.zeros(orders + 1)
    for _ in range(orders + 1):
        f = cut(poly.polymul(cut(poly.polymul(one + psi, one + c1 * psi)), one + c2 * psi))
        psi = np.concatenate([[0.0], f[:orders]])  # x · f(ψ)
    return psi[1:]


def test_square_factors_give_the_fuss_catalan_law(one_thread):
    # edge 27/4 = z(1/2) exactly; moments the Fuss–Catalan numbers C(3j, j)/(2j + 1) = 1, 3, 12, 55
    for d in (100, 768, 4096):
        assert product_edge.product_law(d, d, d).upper == pytest.approx(27 / 4, rel=1e-12)
    fuss_catalan = [math.comb(3 * j, j) / (2 * j + 1) for j in range(1, 5)]
    np.testing.assert_allclose(law_moments(300, 300, 300), fuss_catalan, rtol=1e-5)  # quadrature: ~1e-7


@pytest.mark.parametrize("dims", [(400, 100, 200), (300, 600, 1200), (100, 400, 100), (1000, 125, 1000)])
def test_moments_match_the_free_product_series(dims, one_thread):
    n, k, m = dims
    np.testing.assert_allclose(law_moments(n, k, m), free_product_moments(k / n, k / m), rtol=1e-5)


@pytest.mark.parametrize(("n", "m"), [(100, 100), (400, 100), (100, 300)])
def test_wide_inner_dimension_gives_marchenko_pastur(n, m):
    # X Y / √k → a Gaussian n×m: eig(P) = (k/n)·eig(B Bᵀ/(k m)) → (k/n)·MP(n/m); Johnstone's scale for λ_max
    for K in (10**4, 10**6):
        law = product_edge.product_law(n, K * n, m)
        johnstone = (math.sqrt(n) + math.sqrt(m)) * (1 / math.sqrt(n) + 1 / math.sqrt(m)) ** (1 / 3) / m
        assert law.upper / K == pytest.approx(mp_edges(n / m)[1], rel=10 / K)
        assert law.median / K == pytest.approx(mp_median(n / m), rel=10 / K)
        assert law.tw_scale / K == pytest.approx(johnstone, rel=10 / K)


@pytest.mark.parametrize(("dims", "draws"), [((1600, 200, 800), 100), ((600, 200, 200), 200), ((200, 200, 200), 100)])
def test_quantiles_match_simulated_spectra(dims, draws, one_thread):
    # the share of each draw's eigenvalues below the law's p-quantile: p up to the ESD's O(1/r) finite-size
    # error (bounded by 1/(2r)) and 4 standard errors of the mean over draws
    n, k, m = dims
    lam = two_factor_spectra(n, k, m, draws, seed=11).numpy() / (n * m)  # (draws, r), P's nonzero eigenvalues
    r = lam.shape[1]
    probs = np.array([0.1, 0.5, 0.9])
    q = product_edge.quantile(probs, n, k, m)
    assert product_edge.product_law(n, k, m).median == pytest.approx(float(q[1]), rel=1e-12)
    below = (lam[:, :, None] < q).mean(axis=1)  # (draws, 3)
    se = below.std(axis=0, ddof=1) / math.sqrt(draws)
    assert np.all(np.abs(below.mean(axis=0) - probs) <= 1 / (2 * r) + 4 * se)


def rate_bound(fpr, trials):
    """3.5 binomial standard errors of a realized rate, with the calibration's draws (its smallest cell, 2000) as
    the error of the edge itself (as test_nulls.assert_rate_near)."""
    return 3.5 * math.sqrt(fpr * (1 - fpr) * (1 / trials + 1 / 2000))


def test_analytic_edge_keeps_its_false_positive_rate(one_thread):
    # fresh draws (seeds 1–3; the calibration's are 0x5EED0000 + i): a square cell on the grid, a head-like one,
    # and a rectangular chain between cells and ranks (u = −1.45, v = −0.74, r = 110)
    trials, counts = 2000, {0.01: 0, 0.05: 0}
    for seed, dims in enumerate([(100, 100, 100), (1600, 100, 1600), (300, 110, 180)], start=1):
        assert product_edge.covers(*dims)
        lam = two_factor_spectra(*dims, trials, seed=seed)
        t = (lam[:, 0] / nulls.median(lam)).numpy()
        for fpr in counts:
            rate = float((t > product_edge.edge_ratio(*dims, fpr)).mean())
            assert abs(rate - fpr) <= rate_bound(fpr, trials), f"{dims}: rate {rate:.4f} at fpr {fpr}"
            counts[fpr] += int((t > product_edge.edge_ratio(*dims, fpr)).sum())
    for fpr, count in counts.items():  # pooled over the three shapes
        assert abs(count / (3 * trials) - fpr) <= rate_bound(fpr, 3 * trials)


def test_a_planted_spike_above_the_edge_is_flagged(tmp_path, monkeypatch, one_thread):
    # B = (X + s u e₁ᵀ) Y: a rank-one spike s u Y₁ of singular value ≈ s√m = 3√(n m λ₊), so λ_max ≥ (3 − 1.1)²
    # times the bulk's edge in absolute units, whatever the noise; the median moves by at most one eigenvalue
    monkeypatch.setenv("RANKSCOPE_CACHE_DIR", str(tmp_path))
    n, k, m, trials = 300, 100, 300, 10
    g = torch.Generator().manual_seed(5)
    X = torch.randn(trials, n, k, generator=g, dtype=torch.float64)
    Y = torch.randn(trials, k, m, generator=g, dtype=torch.float64)
    s = 3 * math.sqrt(n * product_edge.product_law(n, k, m).upper)
    u = torch.randn(trials, n, generator=g, dtype=torch.float64)
    spiked = X.clone()
    spiked[..., 0] += s * u / u.norm(dim=-1, keepdim=True)
    assert nulls.product_null([(n, k, m)]).edge_source == "analytic"
    assert all(d.outliers >= 1 for d in diagnose_batch([spiked, Y]))
    assert sum(d.outliers > 0 for d in diagnose_batch([X, Y])) <= 2  # 10 draws at fpr 0.01: P(> 2) ≈ 1e-4


def test_nulls_say_which_edge_they_use_and_agree_with_their_draws(one_thread):
    null = nulls.product_null([(300, 100, 300)])
    assert null.edge_source == "analytic" and null.chain == (300, 100, 300)
    # the simulated draws (kept for the spike count) place the same edge within the fit's error, 2.3/√draws sd
    simulated = nulls.upper_quantile(null.t, 0.01, fitted=True)
    assert abs(null.edge_ratio(0.01) - simulated) < 4 * 2.3 / math.sqrt(null.t.size) * null.t.std()
    assert nulls.product_null([(300, 99, 300)]).edge_source == "simulated"  # rank below FIT_MIN_RANK: counted
    assert budget.FIT_MIN_RANK <= product_edge.calibration()["ranks"][0]
    for outside in [(2000, 500, 100), (100, 1000, 100), (300, 99, 300)]:  # m/n < 1/4, k/n > 4, rank < 100
        assert not product_edge.covers(*outside)
        with pytest.raises(InputError, match="simulated"):
            product_edge.correction(*outside)
    assert product_edge.edge_ratio(100, 200, 300, 0.01) == product_edge.edge_ratio(300, 200, 100, 0.01)  # B, Bᵀ
