"""The nulls keep their false-positive rate on pure noise; the naive MP fit and a wrong-structure null do not.

Every noise spectrum here is computed from full Gaussian factors through the chain kernel (checked against
dense SVDs in test_kernels); the nulls are simulated by a different route (Bartlett triangles, the
Dumitriu–Edelman bidiagonal model), so agreement is a real check.
"""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import rankscope.spectra.nulls as nulls
from rankscope.errors import InputError
from rankscope.spectra import budget, diagnose_batch, nullcache, sampling
from rankscope.spectra.form import Form

D, DH, DC, DR = 768, 64, 256, 32  # GPT-2-small width and head dim; an MLA latent; a decoupled rope dim


def gen(seed):
    return torch.Generator().manual_seed(seed)


def any_outlier_rate(diagnoses):
    return float(np.mean([d.outliers > 0 for d in diagnoses]))


def assert_rate_near(count, trials, fpr, null_draws):
    """Binomial sampling error of the trials plus the error of the null's own (1−fpr) quantile."""
    sd = math.sqrt(fpr * (1 - fpr) * (1 / trials + 1 / null_draws))
    lo, hi = fpr - 3.5 * sd, fpr + 3.5 * sd
    assert lo <= count / trials <= hi, f"rate {count / trials:.4f} outside [{lo:.4f}, {hi:.4f}] at fpr={fpr}"


@pytest.mark.parametrize(("n", "m"), [(100, 100), (300, 100), (40, 30), (50, 2000), (1, 50)])
def test_gaussian_matrices_have_outliers_at_the_nominal_rate(n, m):
    trials = 1500
    W = torch.randn(trials, n, m, generator=gen(n * m), dtype=torch.float64)  # the same matrices at both rates
    for fpr in (0.01, 0.05):
        ds = diagnose_batch(W, fpr=fpr)
        count = sum(d.outliers > 0 for d in ds)
        if min(n, m) == 1:  # one eigenvalue is its own median: never an outlier
            assert count == 0
        else:
            assert_rate_near(count, trials, fpr, budget.default_draws([(n, m)]))


def test_wishart_bidiagonal_model_matches_direct_simulation():
    n, m, draws = 60, 25, 3000
    G = torch.randn(draws, n, m, generator=gen(3), dtype=torch.float64)
    lam = torch.linalg.eigvalsh(G.mT @ G).flip(-1)
    t_direct = (lam[:, 0] / torch.quantile(lam, 0.5, dim=-1)).numpy()
    assert stats.ks_2samp(sampling.wishart_t(n, m, draws, seed=4), t_direct).pvalue > 1e-3


def test_tracy_widom_fit_agrees_with_the_empirical_quantile_where_both_are_affordable():
    # 3000 draws of a rank-100 product: both estimates of the 0.99 quantile of t = λ_max/median; their
    # sampling errors are ≈ 0.04 and 0.09 standard deviations of t, a wrong fit is off by whole ones
    lam = sampling.simulate_spectra([(200, 100, 200)], [1.0], 3000, seed=8)
    t = (lam[:, 0] / nulls.median(lam)).numpy()
    fit, empirical = nulls.tracy_widom_fit_quantile(t, 0.99), np.quantile(t, 0.99)
    assert abs(fit - empirical) < 0.3 * t.std()

    def null(t, fitted):
        return nulls.ProductNull(t=np.sort(t), ratio_quantiles=np.zeros(3), mean_ratio=1.0, fitted=fitted)

    # the null's edge is the estimator it says it uses (the same numbers summed in another order: 1e-12 relative)
    assert null(t[:256], fitted=True).edge_ratio(0.01) == pytest.approx(
        nulls.tracy_widom_fit_quantile(t[:256], 0.99), rel=1e-12)
    assert null(t, fitted=False).edge_ratio(0.01) == pytest.approx(np.quantile(t, 0.99), rel=1e-12)
    with pytest.raises(InputError, match="at least 400"):  # 2.56 draws above the edge: not an estimate
        null(t[:256], fitted=False).edge_ratio(0.01)
    # which nulls are fitted: from rank FIT_MIN_RANK on, where the fit was measured unbiased
    assert nulls.product_null([(300, 100, 300)]).fitted and not nulls.product_null([(300, 99, 300)]).fitted
    assert nulls.product_null([(500, 100)]).fitted and not nulls.product_null([(500, 99)]).fitted


def test_a_fitted_edge_is_unbiased_and_as_precise_as_its_draws_promise():
    # 60 independent fitted nulls of FIT_DRAWS draws each, judged against the exact law of t (40,000 draws of
    # the same Wishart, rank ≥ FIT_MIN_RANK): the edges center on the true (1 − fpr) quantile, spread as the
    # fit's standard error (≈ 2.3/√draws standard deviations of t) says, and each edge's realized
    # false-positive rate is near the nominal one. (The empirical quantile of the same draws spreads 1.9×
    # wider and sits 0.11 standard deviations low: 1.4 % realized.)
    n, m, fpr, draws, nulls_made = 400, 128, 0.01, budget.FIT_DRAWS, 60
    reference = sampling.wishart_t(n, m, 40_000, seed=1)
    true_edge, sd_t = np.quantile(reference, 1 - fpr), reference.std()
    sets = sampling.wishart_t(n, m, draws * nulls_made, seed=2)
    sets = np.random.default_rng(3).permutation(sets).reshape(nulls_made, draws)  # wishart_t returns t sorted
    fitted = np.array([nulls.tracy_widom_fit_quantile(x, 1 - fpr) for x in sets])
    assert abs(fitted.mean() - true_edge) < 0.1 * sd_t  # a Gaussian fit is 0.22 below, TW₂'s far off
    assert fitted.std() < 1.35 * 2.3 / math.sqrt(draws) * sd_t  # 64 draws would spread 2× wider
    realized = np.array([(reference > e).mean() for e in fitted])
    assert 0.85 * fpr < realized.mean() < 1.25 * fpr
    assert np.quantile(realized, 0.9) < 1.8 * fpr and np.quantile(realized, 0.1) > 0.55 * fpr


def test_draws_follow_the_budget():
    assert budget.default_draws([(768, 16)]) == budget.MAX_DRAWS  # narrow and cheap: counted, fully
    assert budget.default_draws([(768, 64, 768)]) * 0.01 >= budget.MIN_EXCEEDANCES  # a GPT-2 head: counted
    assert budget.default_draws([(50, 8, 50)], fpr=1e-4) > budget.MAX_DRAWS  # tiny fpr: enough above the edge
    assert budget.default_draws([(768, 768)]) == budget.FIT_DRAWS  # a wide matrix: the fit
    assert budget.default_draws([(384, 384, 384)]) == budget.FIT_DRAWS  # a MiniLM layer form: the fit
    assert budget.MIN_DRAWS < budget.default_draws([(768, 768, 768)]) < budget.FIT_DRAWS  # GPT-2's: FIT_BUDGET
    assert budget.default_draws([(4096, 4096, 4096)]) == budget.MIN_DRAWS  # a LLaMA-7B layer: the floor


@pytest.mark.parametrize(
    ("dims", "ratios"),
    [([(120, 16, 90)], [1.0]), ([(100, 12, 30, 100)], [1.0]), ([(80, 10, 20, 80), (80, 4, 80)], [1.0, 0.3]),
     ([(40, 40, 40)], [1.0])],  # square factors: Bartlett triangles of a square Gaussian too
)
def test_bartlett_reduced_simulation_matches_full_factors(dims, ratios):
    draws = 2000
    reduced = sampling.simulate_spectra(dims, ratios, draws, seed=5)
    g = gen(6)
    blocks = []
    for d, ratio in zip(dims, ratios, strict=True):
        P = torch.randn(draws, d[0], d[1], generator=g, dtype=torch.float64)
        for a, b in itertools.pairwise(d[1:]):
            P = P @ torch.randn(draws, a, b, generator=g, dtype=torch.float64)
        blocks.append(P * ratio / torch.linalg.matrix_norm(P)[:, None, None])
    B = sum(blocks)  # (draws, n, m), dense
    full = torch.linalg.eigvalsh(B.mT @ B).flip(-1)[:, : reduced.shape[1]]
    for stat in (lambda x: x[:, 0] / torch.quantile(x, 0.5, dim=-1), lambda x: x[:, -1] / x[:, 0]):
        assert stats.ks_2samp(stat(reduced).numpy(), stat(full).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("dims", [(40, 24, 56), (30, 50, 20), (12, 12, 12), (60, 30, 10),
                                  (90, 70, 80), (80, 72, 40)])  # p > 64: one draw at a time
def test_two_factor_model_matches_dense_products(dims):
    # the Dumitriu–Edelman bidiagonal in place of A, a Bartlett triangle (or a p×m Gaussian) in place of G,
    # against the SVD of A @ G from full Gaussian factors: λ_max, trace, t and the pooled λ/median all agree
    n, k, m = dims
    draws = 4000
    fast = sampling.two_factor_spectra(n, k, m, draws, seed=2).numpy()
    g = gen(7)
    AG = torch.randn(draws, n, k, generator=g, dtype=torch.float64) @ torch.randn(draws, k, m, generator=g,
                                                                                 dtype=torch.float64)
    dense = (torch.linalg.svdvals(AG)[:, : min(dims)] ** 2).numpy()
    assert fast.shape == dense.shape
    for stat in (lambda x: x[:, 0], lambda x: x.sum(1), lambda x: x[:, 0] / np.median(x, 1),
                 lambda x: (x / np.median(x, 1, keepdims=True))[:, ::3].ravel()):
        assert stats.ks_2samp(stat(fast), stat(dense)).pvalue > 1e-3
    assert abs(fast.sum(1).mean() / (n * k * m) - 1) < 0.02  # E tr (AG)(AG)ᵀ = n·k·m


def head_factors(trials, seed):
    g = gen(seed)
    return [torch.randn(trials, D, DH, generator=g), torch.randn(trials, DH, D, generator=g)]


def mla_factors(trials, seed):
    g = gen(seed)
    return [torch.randn(trials, D, DH, generator=g), torch.randn(trials, DH, DC, generator=g),
            torch.randn(trials, DC, D, generator=g)]


def decoupled_factors(trials, seed, rope_scale=30.0):
    g = gen(seed)
    rope = [rope_scale * torch.randn(trials, D, DR, generator=g), torch.randn(trials, DR, D, generator=g)]
    return [mla_factors(trials, seed + 1), rope]


def two_factor_rate(diagnoses, fpr):
    """Share of the diagnosed spectra flagged by a plain two-factor (d×k)(k×d) null of their rank k."""
    lam = torch.stack([d.eigenvalues for d in diagnoses])  # (trials, k): the chain kernel's spectra, as diagnosed
    null = nulls.product_null([(D, lam.shape[-1], D)])
    t = lam[:, 0] / nulls.median(lam)
    return float((t.numpy() > null.edge_ratio(fpr)).mean())


CASES = {"mha_head": head_factors, "mla_head": mla_factors, "decoupled_sum": decoupled_factors}


@pytest.mark.parametrize("case", CASES)
def test_structure_matched_null_keeps_fpr_where_naive_mp_flags_every_head(case):
    trials, fpr = 400, 0.01
    form = CASES[case](trials, seed=len(case))
    product = diagnose_batch(form, fpr=fpr)
    structure = Form.of(form).structure  # from the shapes (no float64 copy of 400 forms)
    assert_rate_near(sum(d.outliers > 0 for d in product), trials, fpr, budget.default_draws(structure))

    naive = diagnose_batch([f[:100] for f in form] if case != "decoupled_sum" else
                           [[f[:100] for f in c] for c in form], null="mp")
    assert any_outlier_rate(naive) == 1.0
    assert np.mean([d.outliers for d in naive]) >= 3  # "several outliers per head" in pure noise
    if case != "mha_head":  # a plain two-factor null ignores the bottleneck / the block structure
        assert two_factor_rate(product, fpr) > 0.2


def test_naive_mp_flags_a_whole_untrained_layer():
    # the layer's form Wqᵀ Wk of a d=256 model at init: a product of two square Gaussians (Fuss–Catalan)
    g = gen(11)
    d = 256
    form = [torch.randn(4, d, d, generator=g), torch.randn(4, d, d, generator=g)]
    assert all(x.outliers >= 5 for x in diagnose_batch(form, null="mp"))
    assert sum(x.outliers for x in diagnose_batch(form)) <= 1


def test_null_is_cached_on_disk_for_the_next_process(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE_DIR", str(tmp_path))
    code = ("from rankscope.spectra.nulls import product_null; import sys; "
            "sys.stdout.write(repr(product_null([(300, 24, 300)]).edge_ratio(0.01)))")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the null was simulated again instead of read from disk")

    monkeypatch.setattr(nulls, "_simulate", refuse)
    nullcache.CACHE.clear()
    assert nulls.product_null([(300, 24, 300)]).edge_ratio(0.01) == pytest.approx(float(first), rel=1e-12)


def test_corrupt_cache_file_is_simulated_again(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE_DIR", str(tmp_path))
    nullcache.CACHE.clear()
    good = nulls.product_null([(200, 16, 200)]).edge_ratio(0.01)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    nullcache.CACHE.clear()
    assert nulls.product_null([(200, 16, 200)]).edge_ratio(0.01) == pytest.approx(good, rel=1e-12)  # simulated again


def test_the_memory_cache_is_bounded_and_keeps_the_most_recently_used(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE_DIR", str(tmp_path))
    cache = nullcache.NullCache(entries=3)
    made = []

    def make(i):
        return lambda: made.append(i) or {"t": np.array([float(i)])}

    for i in range(5):
        cache.get(nullcache.key("test", (i,), (), 1), make(i))
    assert len(cache) == 3
    cache.get(nullcache.key("test", (4,), (), 1), make(99))  # in memory: not made again
    for path in tmp_path.glob("*.npz"):
        path.unlink()  # only the memory holds them now
    cache.get(nullcache.key("test", (0,), (), 1), make(100))  # evicted first: made again
    assert made == [0, 1, 2, 3, 4, 100]


def test_a_cached_null_of_an_older_format_without_top_energy_is_simulated_again(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE_DIR", str(tmp_path))
    nullcache.CACHE.clear()
    fresh = nulls.product_null([(60, 8, 60)], draws=400)
    (path,) = tmp_path.glob("*.npz")
    with np.load(path) as z:
        old = {name: z[name] for name in z.files if name != "top_energy"}  # same key: only the array is missing
    np.savez(path, **old)
    nullcache.CACHE.clear()
    again = nulls.product_null([(60, 8, 60)], draws=400)  # no KeyError: simulated again, with the same seed
    assert again.top_energy == pytest.approx(fresh.top_energy, rel=1e-12) and 0 < fresh.top_energy < 1
    with np.load(path) as z:
        assert "top_energy" in z.files  # and stored again whole


def test_interpolated_null_weights_top_energy_like_erank():
    s = [(64, 8, 64), (64, 4, 64)]
    null = nulls.sum_null(s, [1.0, 0.37], draws=400)
    assert len(null.parts) == 2
    for name in ("erank", "top_energy"):
        assert getattr(null, name) == pytest.approx(sum(w * getattr(p, name) for p, w in null.parts), rel=1e-12)
    lo, hi = sorted(p.top_energy for p, _ in null.parts)
    assert lo <= null.top_energy <= hi
