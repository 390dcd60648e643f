"""diagnose(): planted spikes against the BBP closed form, metrics against hand-computed closed forms."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import rankscope as rs
from rankscope.spectra import laws

DESIGN_FIELDS = [  # DESIGN.md §3
    "eigenvalues", "lambda_max", "scale", "bulk_edge", "outliers", "outlier_energy", "spike_strength",
    "mp_soft_rank", "stable_rank", "effective_rank", "participation_ratio", "spectral_entropy", "ks", "pl_alpha",
]


def planted(n, m, thetas, trials, seed):
    """W = Σ θ_i u_i v_iᵀ + G/√max(n, m): orthonormal random u, v; noise spectrum MP(n/m, 1)."""
    g = torch.Generator().manual_seed(seed)
    r = len(thetas)
    U = torch.linalg.qr(torch.randn(trials, n, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(trials, m, r, generator=g, dtype=torch.float64)).Q
    signal = U @ torch.diag(torch.tensor(thetas, dtype=torch.float64)) @ V.mT
    return signal + torch.randn(trials, n, m, generator=g, dtype=torch.float64) / math.sqrt(max(n, m))


def test_spikes_above_the_bbp_threshold_are_found_exactly_and_where_theory_puts_them():
    n, m, trials = 200, 400, 200
    q = n / m
    thetas = [2.5, 2.0, 1.6]  # threshold q^(1/4) ≈ 0.84
    ds = rs.diagnose_batch(planted(n, m, thetas, trials, seed=1))
    exact = np.mean([d.outliers == len(thetas) for d in ds])
    assert exact >= 0.95
    top = np.mean([d.lambda_max for d in ds])
    assert top == pytest.approx(float(laws.bbp_outlier(thetas[0], q)), rel=0.03)
    second = np.mean([d.eigenvalues[1].item() for d in ds])
    assert second == pytest.approx(float(laws.bbp_outlier(thetas[1], q)), rel=0.03)
    # the noise scale is fitted right despite the spikes: σ² = 1 here
    assert np.mean([d.scale for d in ds]) == pytest.approx(1.0, rel=0.02)


def test_spikes_below_the_bbp_threshold_are_not_found():
    n, m, trials = 200, 400, 200
    theta = 0.5 * laws.bbp_threshold(n / m)
    ds = rs.diagnose_batch(planted(n, m, [theta], trials, seed=2))
    assert np.mean([d.outliers == 0 for d in ds]) >= 0.95


def test_metrics_match_closed_forms_on_a_constructed_spectrum():
    lam = np.array([9.0, 4.0, 4.0, 1.0, 1.0, 0.25])
    Q1 = torch.linalg.qr(torch.randn(10, 6, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(8, 6, dtype=torch.float64)).Q
    W = Q1 @ torch.diag(torch.tensor(np.sqrt(lam))) @ Q2.T  # 10×8 of rank 6, σ² = lam
    d = rs.diagnose(W)
    ev = np.concatenate([lam, [0.0, 0.0]])  # a 10×8 matrix has 8 eigenvalues of WᵀW
    np.testing.assert_allclose(d.eigenvalues.numpy(), ev, atol=1e-12)
    assert d.stable_rank == pytest.approx(lam.sum() / 9.0)
    assert d.participation_ratio == pytest.approx(lam.sum() ** 2 / (lam**2).sum())
    p = lam / lam.sum()
    assert d.spectral_entropy == pytest.approx(-(p * np.log(p)).sum())
    s = np.sqrt(lam) / np.sqrt(lam).sum()
    assert d.effective_rank == pytest.approx(np.exp(-(s * np.log(s)).sum()))
    assert d.lambda_max == pytest.approx(9.0)
    assert d.spike_strength == pytest.approx(9.0 / d.bulk_edge)
    assert d.mp_soft_rank == pytest.approx(d.bulk_edge / 9.0)
    above = ev[ev > d.bulk_edge]
    assert d.outliers == above.size and d.outlier_energy == pytest.approx(above.sum() / ev.sum())


def test_effective_rank_and_entropy_of_a_flat_spectrum_are_the_dimension():
    d = rs.diagnose(torch.eye(12) * 3.0)
    assert d.effective_rank == pytest.approx(12.0) and d.stable_rank == pytest.approx(12.0)
    assert d.participation_ratio == pytest.approx(12.0) and math.exp(d.spectral_entropy) == pytest.approx(12.0)
    assert d.outliers == 0


def test_naive_mp_fit_is_the_mean_and_the_mp_edge():
    g = torch.Generator().manual_seed(3)
    A, C = torch.randn(300, 20, generator=g), torch.randn(20, 300, generator=g)
    d = rs.diagnose([A, C], null="mp")
    lam = torch.linalg.svdvals((A @ C).double())[:20].square()
    assert d.scale == pytest.approx(float(lam.mean()), rel=1e-9)
    assert d.bulk_edge == pytest.approx(float(lam.mean()) * (1 + math.sqrt(20 / 300)) ** 2, rel=1e-9)


def test_tracy_widom_null_uses_median_matching_and_johnstone():
    W = torch.randn(150, 60, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    d = rs.diagnose(W, null="tw", fpr=0.05)
    lam = torch.linalg.svdvals(W).square().numpy()
    # MP(0.4, 1) median by numerical inversion of the integrated density (independent of laws.mp_cdf)
    from scipy import integrate, optimize
    a, b = (1 - 0.4**0.5) ** 2, (1 + 0.4**0.5) ** 2
    dens = lambda x: np.sqrt((b - x) * (x - a)) / (2 * np.pi * 0.4 * x)  # noqa: E731
    med = optimize.brentq(lambda x: integrate.quad(dens, a, x)[0] - 0.5, a, b)
    root = np.sqrt(149) + np.sqrt(60)  # Johnstone (2001): μ = (√(n−1)+√p)², σ = (√(n−1)+√p)(1/√(n−1)+1/√p)^⅓
    mu, sd = root**2, root * (1 / np.sqrt(149) + 1 / np.sqrt(60)) ** (1 / 3)
    assert d.bulk_edge == pytest.approx(np.median(lam) / med * (mu + sd * 0.9793) / 150, rel=1e-3)
    with pytest.raises(rs.InputError, match="single matrix"):
        rs.diagnose([W, W.T], null="tw")


def test_diagnosis_has_every_design_field_and_a_flat_row():
    d = rs.diagnose(torch.randn(40, 30))
    names = {f.name for f in dataclasses.fields(d)}
    assert set(DESIGN_FIELDS) <= names
    row = d.as_dict()
    assert "eigenvalues" not in row and set(DESIGN_FIELDS) - {"eigenvalues"} <= set(row)
    assert all(isinstance(v, int | float | str) for k, v in row.items() if k != "bulk_fits")
    assert isinstance(row["bulk_fits"], bool) and len(d.factor_kurtosis) == 1
    assert row["n"] == 40 and row["m"] == 30 and row["rank"] == 30


def test_batch_equals_one_by_one():
    g = torch.Generator().manual_seed(5)
    A, C = torch.randn(3, 100, 8, generator=g), torch.randn(8, 100, generator=g)  # C shared
    batch = rs.diagnose_batch([A, C])
    for h in range(3):
        single = rs.diagnose([A[h], C])
        assert single.as_dict() == pytest.approx(batch[h].as_dict(), nan_ok=True)


def test_a_sum_with_a_planted_rope_spike_is_found_by_the_structure_matched_null():
    g = torch.Generator().manual_seed(6)
    d, dh, dr = 256, 32, 8
    content = [torch.randn(d, dh, generator=g), torch.randn(dh, d, generator=g)]
    rope = [torch.randn(d, dr, generator=g), torch.randn(dr, d, generator=g)]
    clean = rs.diagnose([content, rope])
    u = torch.randn(d, 1, generator=g)
    rope_spiked = [torch.cat([rope[0][:, :-1], 40 * u], 1), torch.cat([rope[1][:-1], u.T], 0)]
    spiked = rs.diagnose([content, rope_spiked])
    assert clean.outliers == 0 and spiked.outliers >= 1
