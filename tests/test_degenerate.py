"""Degenerate and bad input: valid-but-degenerate gives a well-defined diagnosis, NaN/Inf a named error."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rankscope as rs
from rankscope.spectra.tail import MIN_EIGENVALUES

ALLOWED_NAN = {"pl_alpha", "pl_xmin"}
# NaN by definition, each in its documented case (checked below)
SPIKE_NAN = {"spikes", "bulk_stat", "bulk_threshold", "erank_vs_null", "spikes_gap", "excess_kurtosis",
             "top_energy_vs_null", "bulk_effective_rank"}


def check_well_defined(d: rs.Diagnosis):
    row = d.as_dict()
    for k, v in row.items():
        if isinstance(v, float) and math.isnan(v):
            assert k in ALLOWED_NAN | SPIKE_NAN, f"{k} is NaN"
    # spikes is a count exactly where the bulk check passed (or the form is zero); else NaN, never a silent number
    if d.bulk_fits is True:
        assert float(d.spikes).is_integer() and 0 <= d.spikes < d.rank  # a count, held in a float
    elif d.lambda_max > 0:
        assert math.isnan(d.spikes)
    if d.bulk_fits is None and d.lambda_max > 0:  # not tested: a spectrum too small to hold a bulk
        assert d.rank <= 4 and math.isnan(d.bulk_stat)
    assert math.isnan(d.spikes_gap) == (d.rank < 10)
    # NaN kurtosis only for a constant factor (a zero matrix, a single entry)
    assert len(d.factor_kurtosis) >= 1
    assert math.isnan(d.excess_kurtosis) == all(math.isnan(k) for k in d.factor_kurtosis)
    positive = d.eigenvalues[d.eigenvalues > 0]
    if positive.numel() >= MIN_EIGENVALUES and torch.unique(positive).numel() >= MIN_EIGENVALUES:
        assert not math.isnan(d.pl_alpha)
    assert d.outliers >= 0 and d.bulk_edge >= 0 and d.scale >= 0 and 0 <= d.outlier_energy <= 1 + 1e-12
    assert (d.eigenvalues[:-1] >= d.eigenvalues[1:]).all()  # descending
    assert d.stable_rank <= d.rank + 1e-9 and d.effective_rank <= d.rank + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 24), k=st.integers(1, 24), m=st.integers(1, 24),
    seed=st.integers(0, 2**16), chain=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]),
)
def test_random_small_shapes_and_dtypes_give_well_defined_diagnoses(n, k, m, seed, chain, dtype):
    g = torch.Generator().manual_seed(seed)
    make = lambda a, b: (torch.randn(a, b, generator=g) * 3).to(dtype)  # noqa: E731
    form = [make(n, k), make(k, m)] if chain else make(n, m)
    d = rs.diagnose(form, draws=400)
    check_well_defined(d)
    assert d.rank == (min(n, k, m) if chain else min(n, m))


@pytest.mark.parametrize("shape", [(1, 1), (1, 30), (30, 1), (17, 17), (5, 40)])
def test_zero_matrix(shape):
    d = rs.diagnose(torch.zeros(shape))
    check_well_defined(d)
    assert d.lambda_max == 0 and d.outliers == 0 and d.stable_rank == 0 and d.effective_rank == 0
    assert d.participation_ratio == 0 and d.spectral_entropy == 0 and d.spike_strength == 0


def test_rank_one_matrix_is_one_spike_over_a_zero_bulk():
    u, v = torch.randn(50, 1), torch.randn(1, 40)
    d = rs.diagnose(u @ v)
    check_well_defined(d)
    assert d.outliers == 1 and d.stable_rank == pytest.approx(1.0) and d.effective_rank == pytest.approx(1.0)
    assert d.outlier_energy == pytest.approx(1.0) and d.mp_soft_rank == 0 and math.isinf(d.spike_strength)


@pytest.mark.parametrize("shape", [(1, 64), (64, 1)])
def test_vectors_have_one_eigenvalue_and_no_outlier(shape):
    w = torch.randn(shape)
    d = rs.diagnose(w)
    check_well_defined(d)
    assert d.rank == 1 and d.lambda_max == pytest.approx(float(w.double().square().sum())) and d.outliers == 0


def test_numpy_and_integer_input():
    a = np.arange(12).reshape(3, 4)
    d = rs.diagnose(a)
    ref = np.linalg.svd(a.astype(float), compute_uv=False) ** 2
    np.testing.assert_allclose(d.eigenvalues.numpy()[:2], ref[:2], rtol=1e-10)


def test_half_precision_is_read_exactly_in_float64():
    w = torch.randn(30, 20).to(torch.bfloat16)
    ref = torch.linalg.svdvals(w.double()).square()
    torch.testing.assert_close(rs.diagnose(w).eigenvalues, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@given(i=st.integers(0, 9), j=st.integers(0, 7))
@settings(max_examples=10, deadline=None)
def test_non_finite_values_raise_a_named_error(bad, i, j):
    w = torch.randn(10, 8)
    w[i, j] = bad
    with pytest.raises(rs.InputError, match=r"q_proj.*non-finite"):
        rs.diagnose(w, name="layer3.q_proj")
    with pytest.raises(rs.InputError, match=r"chain 0, factor 1.*non-finite"):
        rs.diagnose([torch.randn(5, 10), w], name="head")


def test_bad_shapes_and_options_raise_clear_errors():
    with pytest.raises(rs.InputError, match="does not multiply"):
        rs.diagnose([torch.randn(5, 4), torch.randn(3, 6)])
    with pytest.raises(rs.InputError, match="one shape"):
        rs.diagnose([[torch.randn(5, 4), torch.randn(4, 6)], [torch.randn(5, 2), torch.randn(2, 7)]])
    with pytest.raises(rs.InputError, match="2-D"):
        rs.diagnose(torch.randn(3, 4, 5))
    with pytest.raises(rs.InputError, match="empty"):
        rs.diagnose(torch.randn(0, 4))
    with pytest.raises(rs.InputError, match="complex"):
        rs.diagnose(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(rs.InputError, match="null must be"):
        rs.diagnose(torch.randn(4, 4), null="bogus")
    with pytest.raises(rs.InputError, match="fpr"):
        rs.diagnose(torch.randn(4, 4), fpr=1.5)
    with pytest.raises(rs.InputError, match="expected a matrix"):
        rs.diagnose("not a matrix")
    with pytest.raises(rs.InputError, match="too few to place"):
        rs.diagnose([torch.randn(9, 3), torch.randn(3, 9)], fpr=0.001, draws=20)
    with pytest.raises(rs.InputError, match="overflows"):
        rs.diagnose(torch.full((4, 3), 1e200, dtype=torch.float64))


def test_model_parameters_are_read_without_their_autograd_graph():
    lin_q, lin_k = torch.nn.Linear(30, 8, bias=False), torch.nn.Linear(30, 8, bias=False)
    d = rs.diagnose([lin_q.weight.T, lin_k.weight])
    ref = torch.linalg.svdvals(lin_q.weight.detach().double().T @ lin_k.weight.detach().double())[:8].square()
    torch.testing.assert_close(d.eigenvalues, ref, rtol=1e-9, atol=1e-12)
    assert rs.diagnose(lin_q.weight).rank == 8


def test_empty_batch_and_size_one_batch_broadcast():
    assert rs.diagnose_batch(torch.randn(0, 5, 4)) == []
    ds = rs.diagnose_batch([torch.randn(3, 20, 4), torch.randn(1, 4, 20)])
    assert len(ds) == 3
