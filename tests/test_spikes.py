"""Spike counts that mean spikes: calibration on pure noise, power on planted spikes, silence on smooth decay.

Every case is simulated here from full Gaussian (or Student-t) factors and run through ``diagnose``; the nulls are
simulated by another route (Bartlett triangles, the bidiagonal model), so agreement is a real check. The larger
calibration and power tables are in benchmarks/null_power.py.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import rankscope as rs
from formtools import multiplied_out
from rankscope.attention_forms import mha_forms
from rankscope.spectra import budget
from rankscope.spectra.form import Chain, Structure, Sum
from rankscope.spectra.spikes import max_spikes, onatski_count

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def assert_rate_near(count, trials, fpr, null_draws, what):
    """Binomial sampling error of the trials plus the error of the null's own (1 − fpr) quantile."""
    sd = math.sqrt(fpr * (1 - fpr) * (1 / trials + 1 / null_draws))
    lo, hi = fpr - 3.5 * sd, fpr + 3.5 * sd
    assert lo <= count / trials <= hi, f"{what}: rate {count / trials:.4f} outside [{lo:.4f}, {hi:.4f}] at fpr={fpr}"


# ---- pure Gaussian noise: every form kind ----------------------------------------------------------------

D, DH, DC, DR = 160, 16, 48, 8


def matrix(g, T):
    return randn(g, T, 120, 60)


def head(g, T):
    return [randn(g, T, D, 32), randn(g, T, 32, D)]


def mla_chain(g, T):
    return [randn(g, T, D, DH), randn(g, T, DH, DC), randn(g, T, DC, D)]


def decoupled_sum(g, T):
    return [[randn(g, T, D, DH), randn(g, T, DH, DC), randn(g, T, DC, D)], [3 * randn(g, T, D, DR), randn(g, T, DR, D)]]


def gqa_layer(g, T):
    # a GQA layer's form from its weights: 8 query heads on 2 KV groups of head dim 8 (query heads of a group summed)
    forms = [next(mha_forms(0, randn(g, 64, D), randn(g, 16, D), None, None, n_heads=8, n_kv_heads=2,
                            heads=False, kinds=["qk"])).form for _ in range(T)]
    assert forms[0].structure == Structure(((D, 16, D),))
    return [torch.stack([f.factors[i] for f in forms]) for i in range(2)]


def shared_left(dq):
    def make(g, T):  # Wdqᵀ · (content + rope), one Wdq per head for both blocks
        left = Chain(randn(g, T, D, dq))
        return left @ Sum([Chain(randn(g, T, dq, DH), randn(g, T, DH, DC), randn(g, T, DC, D)),
                           Chain(randn(g, T, dq, DR), randn(g, T, DR, D))])
    return make


def fitted_layer(g, T):  # rank 160 ≥ FIT_MIN_RANK: Tracy–Widom-fitted edges and an exponential-tail bulk threshold
    return [randn(g, T, D, D), randn(g, T, D, D)]


KINDS = {"matrix": (matrix, 1000), "head_index": (head, 1000), "mla_chain": (mla_chain, 1000),
         "fitted_layer": (fitted_layer, 400),
         "decoupled_sum": (decoupled_sum, 600), "gqa_layer": (gqa_layer, 600),
         "shared_left_dq40": (shared_left(40), 600), "shared_left_dq20": (shared_left(20), 600)}


@pytest.mark.parametrize("fpr", [0.01, 0.05])
@pytest.mark.parametrize("kind", KINDS)
def test_spikes_keep_the_false_alarm_rate_on_gaussian_noise(kind, fpr):
    make, trials = KINDS[kind]
    form = make(gen(len(kind) + int(100 * fpr)), trials)
    ds = rs.diagnose_batch(form, fpr=fpr)
    structure = rs.spectra.prepare(form, batched=True).structure
    draws = budget.default_draws(structure, fpr)
    assert_rate_near(sum(d.spikes > 0 for d in ds), trials, fpr, draws, f"{kind} spikes")  # NaN is no spike
    assert_rate_near(sum(d.outliers > 0 for d in ds), trials, fpr, draws, f"{kind} outliers")
    # the bulk check on noise: it fails about as often as its own level says
    assert_rate_near(sum(d.bulk_fits is False for d in ds), trials, fpr, draws, f"{kind} bulk check")


@pytest.mark.parametrize("dq", [40, 20])
def test_a_shared_query_factor_has_the_right_rank_and_its_null_draws_it_once(dq):
    g, trials, fpr = gen(dq), 300, 0.01
    form = shared_left(dq)(g, trials)
    B = multiplied_out(form[0])  # the first head, multiplied out
    ds = rs.diagnose_batch(form, fpr=fpr)
    assert ds[0].rank == min(dq, DH + DR) == torch.linalg.matrix_rank(B)
    torch.testing.assert_close(ds[0].eigenvalues, torch.linalg.svdvals(B)[: ds[0].rank] ** 2, rtol=1e-9,
                               atol=1e-9 * ds[0].lambda_max)
    draws = budget.default_draws(form.structure, fpr)
    assert_rate_near(sum(d.outliers > 0 for d in ds), trials, fpr, draws, f"dq={dq} outliers")
    assert_rate_near(sum(d.spikes > 0 for d in ds), trials, fpr, draws, f"dq={dq} spikes")
    # negative control: the same forms spelled as two independent chains (Wdq copied into each) get a null that
    # draws two independent Wdq: the rank is wrong where dq is below the summed rank, and the noise spectra do not
    # fit that null's shape, so it can count no spikes
    copies = [[form.left.factors[0], *c.factors] for c in form.chains]
    naive = rs.diagnose_batch(copies, fpr=fpr)
    assert naive[0].rank == DH + DR
    if dq < DH + DR:
        assert np.mean([d.bulk_fits is False for d in naive]) > 0.5


# ---- power: planted spikes at 30 % and 50 % of the rank -----------------------------------------------------

N, H, M = 160, 32, 160


def noise_lambda_max(g):
    return float(np.mean([d.lambda_max for d in rs.diagnose_batch([randn(g, 400, N, H), randn(g, 400, H, M)])]))


def planted(g, trials, spikes, strength, lam_noise):
    """Head forms A C whose first ``spikes`` inner dimensions carry u_i v_iᵀ with λ = strength × noise λ_max."""
    A, C = randn(g, trials, N, H), randn(g, trials, H, M)
    U = torch.linalg.qr(randn(g, trials, N, spikes)).Q
    V = torch.linalg.qr(randn(g, trials, M, spikes)).Q
    A[:, :, :spikes] = U * math.sqrt(strength * lam_noise)
    C[:, :spikes, :] = V.mT
    return [A, C]


@pytest.mark.parametrize("spikes", [10, 16])  # 30 % and 50 % of the rank
def test_spikes_well_above_the_bulk_are_counted_exactly_where_outliers_are_masked(spikes):
    g = gen(spikes)
    ds = rs.diagnose_batch(planted(g, 200, spikes, 10.0, noise_lambda_max(g)))
    assert np.mean([d.spikes == spikes for d in ds]) >= 0.95
    assert np.mean([d.spikes_gap == spikes for d in ds]) >= 0.95  # Onatski's count agrees
    if spikes == 16:  # half the spectrum is signal: the median moves up with it and masks the spikes
        assert np.mean([d.outliers for d in ds]) < spikes / 2


def test_spikes_near_the_bulk_are_counted_no_worse_than_outliers():
    g = gen(3)
    ds = rs.diagnose_batch(planted(g, 200, 10, 1.5, noise_lambda_max(g)))
    spikes = np.array([d.spikes for d in ds])
    outliers = np.array([d.outliers for d in ds])
    assert np.nanmean(spikes) >= outliers.mean()
    assert np.mean(spikes == 10) >= 0.9


# ---- no spike at all: a smoothly decaying bulk and a gapless power law --------------------------------------


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_a_smoothly_decaying_bulk_is_not_reported_as_spikes(beta):
    # a random product whose inner variances decay ∝ i^−β: no spike, but outliers flags several
    g, trials, n, h = gen(int(10 * beta)), 150, 256, 48
    scale = torch.arange(1, h + 1, dtype=torch.float64) ** (-beta / 2)
    ds = rs.diagnose_batch([randn(g, trials, n, h) * scale, randn(g, trials, h, n)])
    fits = np.array([d.bulk_fits for d in ds])
    assert np.mean(fits == False) > 0.6  # noqa: E712 (an array of bools)
    assert all(math.isnan(d.spikes) for d in ds if d.bulk_fits is False)  # never reported as a count
    assert np.mean([d.outliers for d in ds]) > 2  # what the audit saw: outliers without spikes
    assert np.nanmean([d.spikes_gap for d in ds]) < np.mean([d.outliers for d in ds])  # the gap count flags fewer


def test_a_gapless_power_law_spectrum_does_not_fit_the_noise_bulk():
    g, trials, n, h = gen(7), 60, 200, 40
    lam = torch.arange(1, h + 1, dtype=torch.float64) ** -1.5  # effective rank / rank ≈ 0.7, as trained forms
    U, V = torch.linalg.qr(randn(g, trials, n, h)).Q, torch.linalg.qr(randn(g, trials, n, h)).Q
    ds = rs.diagnose_batch([U * lam.sqrt(), V.mT])
    assert all(d.bulk_fits is False and math.isnan(d.spikes) for d in ds)


# ---- heavy tails: the permutation null ------------------------------------------------------------------


def test_the_permutation_null_keeps_the_rate_on_student_t_factors_where_the_gaussian_null_does_not():
    rng, trials, fpr = np.random.default_rng(5), 150, 0.01
    A = torch.from_numpy(rng.standard_t(5, (trials, 100, 20)))
    C = torch.from_numpy(rng.standard_t(5, (trials, 20, 100)))
    gaussian = rs.diagnose_batch([A, C], fpr=fpr)
    shuffled = rs.diagnose_batch([A, C], fpr=fpr, null="permutation")
    assert np.mean([d.outliers > 0 for d in gaussian]) > 0.1  # heavy tails alone lift λ_max
    from rankscope.spectra.permutation import default_draws

    assert_rate_near(sum(d.outliers > 0 for d in shuffled), trials, fpr, default_draws(fpr), "permutation")
    assert all(d.null == "permutation" and math.isnan(d.spikes) and d.bulk_fits is None for d in shuffled)
    assert np.mean([d.excess_kurtosis for d in gaussian]) == pytest.approx(6.0, rel=0.35)  # t₅: 6/(ν − 4) = 6


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_permutation_null_finds_a_spike_whichever_factor_carries_it(side):
    # unbalanced, a spike whose weight sits in one factor is shuffled into that factor's large entries and hides
    g, trials = gen(11), 25
    A, C = randn(g, trials, 100, 20), randn(g, trials, 20, 100)
    u = torch.nn.functional.normalize(randn(g, trials, 100), dim=-1)
    v = torch.nn.functional.normalize(randn(g, trials, 100), dim=-1)
    big = math.sqrt(3 * noise_lambda_max_small(g))
    A[:, :, 0], C[:, 0, :] = (big * u, v) if side == "left" else (u, big * v)
    found = rs.diagnose_batch([A, C], null="permutation")
    assert np.mean([d.outliers >= 1 for d in found]) >= 0.9


def noise_lambda_max_small(g):
    return float(np.mean([d.lambda_max for d in rs.diagnose_batch([randn(g, 200, 100, 20), randn(g, 200, 20, 100)])]))


# ---- the pieces, against independent computations ------------------------------------------------------


def test_excess_kurtosis_is_each_factors_against_scipy():
    rng = np.random.default_rng(1)
    a, c = rng.standard_t(6, (3, 40, 8)), rng.standard_normal((8, 40))
    ds = rs.diagnose_batch([torch.from_numpy(a), torch.from_numpy(c)])
    for h, d in enumerate(ds):
        want = (stats.kurtosis(a[h].ravel(), fisher=True, bias=True), stats.kurtosis(c.ravel(), fisher=True, bias=True))
        np.testing.assert_allclose(d.factor_kurtosis, want, rtol=1e-10)
        assert d.excess_kurtosis == pytest.approx(max(want), rel=1e-10)


def test_deflation_takes_one_dimension_per_spike_from_every_space_it_crosses():
    assert Structure(((768, 64, 768),)).deflated(5) == Structure(((763, 59, 763),))
    assert Structure(((100, 40),)).deflated(3) == Structure(((97, 37),))
    # a sum splits k between its blocks in proportion to their rank; a shared left chain loses k too
    s = Structure(((40, 16, 48, 160), (40, 8, 160)), left=(160, 40))
    d = s.deflated(6)
    assert d == Structure(((34, 12, 44, 154), (34, 6, 154)), left=(154, 34))
    assert d.rank_bound == s.rank_bound - 6
    assert max_spikes(64) == 32 and max_spikes(9) == 4 and max_spikes(4) == 0


def test_onatski_counts_separated_spikes_and_none_in_a_bulk():
    from rankscope.spectra.laws import mp_quantile

    bulk = mp_quantile((np.arange(60) + 0.5) / 60, 0.25)[::-1]  # a noise bulk, descending
    assert onatski_count(np.concatenate([[30.0, 20.0, 12.0], bulk])) == 3
    assert onatski_count(bulk) == 0
    assert math.isnan(onatski_count(bulk[:9]))


def test_spikes_are_defined_for_the_structure_matched_null_only():
    W = randn(gen(2), 80, 50)
    found = rs.spectra.diagnose_nulls(W, ("product", "mp", "tw"))
    assert found["product"][0].bulk_fits is not None and not math.isnan(found["product"][0].spikes)
    for null in ("mp", "tw"):
        d = found[null][0]
        assert math.isnan(d.spikes) and d.bulk_fits is None
        assert d.spikes_gap == found["product"][0].spikes_gap  # null-free: the same


def test_awkward_inputs_get_a_diagnosis_not_a_crash():
    g = gen(21)
    # a mostly-zero column (a pruned factor): the permutation null's balancing leaves that junction alone
    A, C = randn(g, 64, 16), randn(g, 16, 64)
    A[:40, 3] = 0
    d = rs.diagnose([A, C], null="permutation")
    assert math.isfinite(d.bulk_edge) and d.outliers >= 0
    # the caller's draws are raised where a later step's counted edge needs more (30 planted spikes)
    W = randn(g, 120, 200)
    U, V = torch.linalg.qr(randn(g, 120, 30)).Q, torch.linalg.qr(randn(g, 200, 30)).Q
    d = rs.diagnose(W + U @ torch.diag(torch.linspace(60, 90, 30, dtype=torch.float64)) @ V.T, draws=256)
    assert d.spikes == 30
    # a size-1 batch axis broadcasts, for the permutation null's per-item forms too
    ds = rs.diagnose_batch(Chain(randn(g, 1, 8, 3), randn(g, 4, 3, 8)), null="permutation", draws=100, fpr=0.1)
    assert len(ds) == 4
    # a sum whose blocks cannot lose as many dimensions as its rank: the count stops where deflation must
    s = Structure(((50, 1, 50),) * 10)
    assert s.rank_bound == 10 and s.max_deflation == 0
    with pytest.raises(rs.InputError, match="cannot deflate"):
        s.deflated(1)
