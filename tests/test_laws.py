"""The closed-form laws against numerical integration, published tables and simulation."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from rankscope.spectra import laws


@pytest.mark.parametrize("q", [0.05, 0.3, 0.5, 1.0, 2.0, 7.0])
def test_mp_cdf_is_the_integral_of_the_density(q):
    a, b = laws.mp_edges(q, sigma2=2.5)
    xs = np.linspace(a, b, 9)[1:-1]
    lo = a if q != 1 else 0.0
    quad = [integrate.quad(lambda t: laws.mp_density(t, q, 2.5), lo, x, limit=200)[0] for x in xs]
    np.testing.assert_allclose(laws.mp_cdf(xs, q, 2.5), quad, atol=1e-7)
    assert laws.mp_cdf(b * 1.01, q, 2.5) == 1.0 and laws.mp_cdf(a * 0.99, q, 2.5) == 0.0
    a1, b1 = laws.mp_edges(q)
    total = integrate.quad(lambda t: laws.mp_density(t, q), a1 if q != 1 else 0.0, b1, limit=200)[0]
    assert total == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("q", [0.1, 1.0, 3.0])
def test_mp_quantile_inverts_cdf(q):
    p = np.array([0.01, 0.25, 0.5, 0.75, 0.99])
    np.testing.assert_allclose(laws.mp_cdf(laws.mp_quantile(p, q), q), p, atol=1e-10)


@pytest.mark.parametrize(("n", "m"), [(2000, 500), (600, 600), (300, 900)])
def test_mp_law_matches_a_large_gaussian_matrix(n, m):
    g = torch.Generator().manual_seed(n + m)
    W = torch.randn(n, m, generator=g, dtype=torch.float64)
    lam = torch.linalg.svdvals(W).square().numpy() / max(n, m)  # MP(q, 1) with q = min/max
    q = min(n, m) / max(n, m)
    ks = stats.kstest(lam, lambda x: laws.mp_cdf(x, q)).statistic
    assert ks < 0.02
    assert lam.mean() == pytest.approx(1.0, rel=0.01)  # the MP(q, σ²) mean is σ²


def test_mp_law_for_ratio_above_one_is_the_nonzero_part():
    # X is N×p with p = 3N: the N nonzero eigenvalues of XᵀX/N follow the q = 3 law, with mean q
    N, p = 400, 1200
    X = torch.randn(N, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = torch.linalg.svdvals(X).square().numpy() / N
    assert stats.kstest(lam, lambda x: laws.mp_cdf(x, 3.0)).statistic < 0.03
    assert lam.mean() == pytest.approx(3.0, rel=0.01)


def test_tracy_widom_quantiles_match_published_tables():
    # Johnstone (2001), Table 1 / Bejan (2005): TW1 quantiles and moments
    assert laws.tracy_widom1_quantile(0.95) == pytest.approx(0.9793, abs=2e-4)
    assert laws.tracy_widom1_quantile(0.99) == pytest.approx(2.0234, abs=2e-4)
    assert laws.tracy_widom1_quantile(0.90) == pytest.approx(0.4501, abs=2e-4)
    mean = integrate.quad(lambda s: 1 - laws.tracy_widom1_cdf(s), 0, 10)[0] - integrate.quad(
        laws.tracy_widom1_cdf, -10, 0)[0]
    assert mean == pytest.approx(-1.2065, abs=1e-3)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # quad's roundoff note, ~2e-6
def test_tracy_widom_moments_used_by_the_null_fit_match_the_cdf():
    from rankscope.spectra.nulls import TW1_MEAN, TW1_SD

    # E[S] and E[S²] from the CDF: ∫₀^∞ (1−F) − ∫_{−∞}^0 F, and 2∫₀^∞ s(1−F) − 2∫_{−∞}^0 s F
    tail = lambda s: 1 - laws.tracy_widom1_cdf(s)  # noqa: E731
    mean = integrate.quad(tail, 0, 12)[0] - integrate.quad(laws.tracy_widom1_cdf, -14, 0)[0]
    second = 2 * integrate.quad(lambda s: s * tail(s), 0, 12)[0] - 2 * integrate.quad(
        lambda s: s * laws.tracy_widom1_cdf(s), -14, 0)[0]
    assert TW1_MEAN == pytest.approx(mean, abs=1e-6)
    assert TW1_SD == pytest.approx(math.sqrt(second - mean**2), abs=1e-5)  # quad's own roundoff: ~2e-6


def test_johnstone_edge_controls_false_positives_when_the_scale_is_known():
    n, m, draws, fpr = 200, 80, 4000, 0.05
    g = torch.Generator().manual_seed(7)
    G = torch.randn(draws, n, m, generator=g, dtype=torch.float64)
    lam_max = torch.linalg.eigvalsh(G.mT @ G)[:, -1]  # λ_max(GᵀG), an independent eigensolver path
    rate = float((lam_max / n > laws.mp_tracy_widom_edge(n, m, fpr)).double().mean())
    assert abs(rate - fpr) < 4 * math.sqrt(fpr * (1 - fpr) / draws)


def test_bbp_closed_form_is_continuous_at_the_threshold():
    q = 0.25
    th = laws.bbp_threshold(q)
    assert th == pytest.approx(q**0.25)
    assert float(laws.bbp_outlier(th * (1 + 1e-9), q)) == pytest.approx(laws.mp_edges(q)[1], rel=1e-6)
    assert float(laws.bbp_outlier(0.5 * th, q)) == pytest.approx(laws.mp_edges(q)[1], rel=1e-15)  # the edge below
