"""diagnose(): planted spikes against the BBP closed form, metrics against hand-computed closed forms."""

import dataclasses
import itertools
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


# ----------------------------------------------------------------------------- rank-fair statistics


def test_top_energy_is_the_share_of_the_top_tenth_of_the_spectrum():
    from rankscope.spectra import metrics

    rng = np.random.default_rng(11)
    lam = rng.exponential(size=(3, 23))  # unsorted; r = 23 → k = ⌈2.3⌉ = 3
    direct = np.sort(lam, axis=1)[:, ::-1][:, :3].sum(1) / lam.sum(1)
    got = metrics.top_energy(torch.from_numpy(lam)).numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-12)
    np.testing.assert_allclose(metrics.top_energy(torch.from_numpy(lam), k=5).numpy(),
                               np.sort(lam, axis=1)[:, ::-1][:, :5].sum(1) / lam.sum(1), rtol=1e-12)
    two = torch.tensor([4.0, 1.0], dtype=torch.float64)
    assert float(metrics.top_energy(two)) == pytest.approx(0.8, rel=1e-12)  # k = ⌈0.2⌉ = 1
    assert float(metrics.top_energy(torch.zeros(7))) == 0.0  # the zero form
    d = rs.diagnose(torch.from_numpy(rng.standard_normal((40, 30))))
    ev = d.eigenvalues.numpy()
    assert d.top_energy == pytest.approx(ev[:3].sum() / ev.sum(), rel=1e-12)  # r = 30 → k = 3


def _gaussian(structure, batch, seed, spike=0.0):
    """A batch of Gaussian forms of ``structure`` (a matrix (n, m) or a chain (n, k, m)); ``spike`` scales the
    first column of the (first) factor by 1 + spike: a rank-1 direction of energy ∝ (1 + spike)²."""
    g = torch.Generator().manual_seed(seed)
    dims = list(itertools.pairwise(structure))
    factors = [torch.randn(batch, a, b, generator=g, dtype=torch.float64) for a, b in dims]
    factors[0][:, :, 0] *= 1 + spike
    return factors[0] if len(factors) == 1 else factors


@pytest.mark.parametrize("structure", [(200, 100), (64, 16, 64)])
def test_top_energy_vs_null_is_one_on_noise_and_above_one_with_a_spike(structure):
    B = 16
    noise = rs.diagnose_batch(_gaussian(structure, B, seed=21))
    te = np.array([d.top_energy for d in noise])
    rel_sd = te.std(ddof=1) / te.mean()  # the spread of top_energy across independent draws
    ratios = np.array([d.top_energy_vs_null for d in noise])
    assert np.all(np.abs(ratios - 1) < 4 * rel_sd)
    # the mean of B draws: its own error rel_sd/√B, the null's mean (≥ hundreds of draws) much less
    assert abs(ratios.mean() - 1) < 4 * rel_sd / math.sqrt(B)
    # the null's mean is the draws' mean: the ratio is top_energy / that mean for every spectrum
    np.testing.assert_allclose(ratios / te, ratios[0] / te[0], rtol=1e-12)
    spiked = rs.diagnose_batch(_gaussian(structure, 4, seed=22, spike=9.0))  # column energy ×100
    assert all(d.top_energy_vs_null > 1 + 20 * rel_sd for d in spiked)
    assert all(d.top_energy_vs_null > 1.5 for d in spiked)


def test_top_energy_vs_null_is_nan_like_erank_vs_null_where_no_null_draws():
    W = _gaussian((60, 40), 1, seed=23)[0]
    for null in ("mp", "tw", "permutation"):
        d = rs.diagnose(W, null=null)
        assert math.isnan(d.erank_vs_null) and math.isnan(d.top_energy_vs_null)
        assert d.top_energy == pytest.approx(rs.diagnose(W).top_energy, rel=1e-12)  # null-free itself
    small = rs.diagnose(torch.randn(4, 6, dtype=torch.float64))  # r = 4: too small to count
    assert math.isnan(small.erank_vs_null) and math.isnan(small.top_energy_vs_null)


def _erank(lam: np.ndarray) -> float:
    s = np.sqrt(np.clip(lam, 0, None))
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_bulk_effective_rank_is_the_effective_rank_below_the_spikes():
    spiked = rs.diagnose_batch(planted(200, 400, [3.0, 2.5], 4, seed=24))
    for d in spiked:
        assert d.spikes >= 1  # finite: the bulk fits
        k = int(d.spikes)
        ev = d.eigenvalues.numpy()
        assert d.bulk_effective_rank == pytest.approx(_erank(ev[k:]), rel=1e-10)
        assert d.bulk_effective_rank > d.effective_rank  # the spikes took a share of σ: the bulk is flatter
    noise = rs.diagnose(planted(200, 400, [], 1, seed=25)[0])
    assert noise.spikes == 0
    assert noise.bulk_effective_rank == pytest.approx(noise.effective_rank, rel=1e-12)
    assert math.isnan(rs.diagnose(planted(200, 400, [], 1, seed=25)[0], null="mp").bulk_effective_rank)
    # a smoothly decaying spectrum is no "spikes on noise": spikes is NaN, and so is the bulk's effective rank
    g = torch.Generator().manual_seed(26)
    Q1 = torch.linalg.qr(torch.randn(120, 100, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64)).Q
    decaying = Q1 @ torch.diag(torch.arange(1, 101, dtype=torch.float64) ** -1.0) @ Q2.T
    d = rs.diagnose(decaying)
    assert math.isnan(d.spikes) and math.isnan(d.bulk_effective_rank)
