"""rankscope.spectra.tail: agreement with the `powerlaw` package, recovery of a known α, edge cases."""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import powerlaw
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankscope.spectra.tail import MIN_EIGENVALUES, _scan, power_law_fit


def _pareto(alpha: float, n: int, seed: int) -> np.ndarray:
    """Exact continuous power law with xmin = 1 and density ∝ x^(−alpha)."""
    return np.random.default_rng(seed).pareto(alpha - 1, n) + 1


def _wishart_eigs(entries: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(entries.T @ entries / entries.shape[0])


def _spectrum(name: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if name == "gaussian_wishart":
        return _wishart_eigs(rng.standard_normal((300, 100)))
    if name == "student_t2_wishart":
        return _wishart_eigs(rng.standard_t(2, (300, 100)))
    if name == "pareto_2.5":
        return _pareto(2.5, 2000, seed=1)
    if name == "pareto_3.5":
        return _pareto(3.5, 2000, seed=2)
    if name == "pareto_2.5_ties":  # rounding creates many tied values
        return np.round(_pareto(2.5, 2000, seed=3), 1)
    raise ValueError(name)


SPECTRA = ["gaussian_wishart", "student_t2_wishart", "pareto_2.5", "pareto_3.5", "pareto_2.5_ties"]


def _reference(x: np.ndarray, **kwargs) -> powerlaw.Fit:
    """powerlaw.Fit with its printing and warnings silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return powerlaw.Fit(x, xmin=None, discrete=False, verbose=0, **kwargs)


@pytest.fixture
def closed_form_powerlaw(monkeypatch):
    """powerlaw 2.0 with α taken from its closed-form MLE at every candidate.

    By default powerlaw 2.0 keeps α in (0, 3) and refits α outside (1.5, 3] with Nelder–Mead (tol 1e-4),
    so it cannot report α > 3. With the range widened to α > 1 and the refit skipped (for a continuous
    law without xmax the closed form *is* the MLE), its xmin search is exactly the one we reproduce.
    """
    monkeypatch.setattr(powerlaw.Power_Law, "fit", lambda self, data=None: self.compute_distance_metrics())
    return lambda x: _reference(x, parameter_ranges={"alpha": [1, math.inf]})


@pytest.mark.parametrize("name", SPECTRA)
def test_matches_powerlaw_package(name, closed_form_powerlaw):
    x = _spectrum(name)
    ref = closed_form_powerlaw(x)
    fit = power_law_fit(torch.from_numpy(x))
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-8)
    assert fit.xmin == pytest.approx(ref.xmin, rel=1e-8)
    assert fit.ks == pytest.approx(ref.D, rel=1e-8)
    assert fit.n_tail == ref.n_tail


@pytest.mark.parametrize("name", SPECTRA)
def test_every_candidate_matches_powerlaw_package(name, closed_form_powerlaw):
    x = _spectrum(name)
    ref = closed_form_powerlaw(x).xmin_fitting_results
    xs = torch.sort(torch.from_numpy(x)).values
    candidates = torch.unique(xs)[:-2]
    alpha, dist, _ = _scan(xs, candidates)
    assert ref["valid_fits"].all()
    np.testing.assert_array_equal(candidates.numpy(), ref["xmins"])
    np.testing.assert_allclose(alpha.numpy(), ref["alphas"], rtol=1e-10)
    np.testing.assert_allclose(dist.numpy(), ref["distances"], rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("name", ["student_t2_wishart", "pareto_2.5"])
def test_matches_unmodified_powerlaw_when_alpha_below_3(name):
    x = _spectrum(name)
    ref = _reference(x)
    fit = power_law_fit(torch.from_numpy(x))
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-8)
    assert fit.xmin == pytest.approx(ref.xmin, rel=1e-8)


def test_unmodified_powerlaw_cannot_report_alpha_above_3():
    """Why we do not copy powerlaw 2.0's default α range: it clips a true α = 3.5 to at most 3."""
    x = _spectrum("pareto_3.5")
    assert _reference(x).alpha <= 3
    assert power_law_fit(torch.from_numpy(x)).alpha == pytest.approx(3.5, abs=0.15)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=MIN_EIGENVALUES, max_size=120), st.floats(0.01, 100.0))
def test_candidates_match_powerlaw_with_ties(values, scale):
    x = np.array(values, dtype=np.float64) * scale
    if len(np.unique(x)) < 4:  # fewer than two candidate xmins: no fit (tested below)
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(powerlaw.Power_Law, "fit", lambda self, data=None: self.compute_distance_metrics())
        ref = _reference(x, parameter_ranges={"alpha": [1, math.inf]}).xmin_fitting_results
    xs = torch.sort(torch.from_numpy(x)).values
    alpha, dist, _ = _scan(xs, torch.unique(xs)[:-2])
    np.testing.assert_allclose(alpha.numpy(), ref["alphas"], rtol=1e-10)
    np.testing.assert_allclose(dist.numpy(), ref["distances"], rtol=1e-8, atol=1e-13)
    fit = power_law_fit(torch.from_numpy(x))
    assert fit.ks == pytest.approx(ref["distances"].min(), rel=1e-8, abs=1e-13)
    assert math.isfinite(fit.alpha) and fit.alpha > 1


@pytest.mark.parametrize("alpha", [2.5, 3.5])
@pytest.mark.parametrize("seed", range(5))
def test_recovers_known_alpha(alpha, seed):
    fit = power_law_fit(torch.from_numpy(_pareto(alpha, 2000, seed=10 + seed)))
    standard_error = (fit.alpha - 1) / math.sqrt(fit.n_tail)
    assert abs(fit.alpha - alpha) < 3 * standard_error
    assert fit.n_tail > 500


def _is_no_fit(fit) -> bool:
    return math.isnan(fit.alpha) and math.isnan(fit.xmin) and math.isnan(fit.ks) and fit.n_tail == 0


def test_too_few_positive_eigenvalues_gives_nan():
    x = torch.cat([torch.arange(1.0, MIN_EIGENVALUES), torch.zeros(50)])  # 9 positive values
    assert _is_no_fit(power_law_fit(x))
    assert _is_no_fit(power_law_fit(torch.empty(0)))
    assert not math.isnan(power_law_fit(torch.arange(1.0, MIN_EIGENVALUES + 1)).alpha)


def test_all_equal_or_too_few_distinct_values_gives_nan():
    assert _is_no_fit(power_law_fit(torch.full((100,), 2.5)))
    assert _is_no_fit(power_law_fit(torch.tensor([1.0, 2.0, 3.0]).repeat(10)))  # one candidate only
    assert not math.isnan(power_law_fit(torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(10)).alpha)


def same_fit(a, b) -> bool:
    """The same fit up to float rounding (the same numbers, perhaps summed in another order)."""
    close = all(getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-12) for k in ("alpha", "xmin", "ks"))
    return close and a.n_tail == b.n_tail


def test_zeros_negatives_order_and_dtype_are_ignored():
    x = torch.from_numpy(_pareto(2.5, 500, seed=0))
    fit = power_law_fit(x)
    zeros, tiny_negatives = torch.zeros(100, dtype=x.dtype), torch.full((5,), -1e-12, dtype=x.dtype)
    padded = torch.cat([zeros, x, tiny_negatives])
    assert same_fit(power_law_fit(padded), fit)
    assert same_fit(power_law_fit(x[torch.randperm(500, generator=torch.Generator().manual_seed(0))]), fit)
    assert power_law_fit(x.float()).alpha == pytest.approx(fit.alpha, rel=1e-5)
    assert isinstance(fit.alpha, float) and isinstance(fit.n_tail, int)


def test_chunking_does_not_change_the_result(monkeypatch):
    x = torch.from_numpy(_spectrum("student_t2_wishart"))
    fit = power_law_fit(x)
    monkeypatch.setattr("rankscope.spectra.tail._CHUNK_ELEMENTS", 7 * x.numel())  # 7 candidates per chunk
    assert same_fit(power_law_fit(x), fit)
