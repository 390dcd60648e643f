"""Theory checks: recursive-training simulations against their closed forms (within 4 standard errors), and the
ReLU effective-dimension measurement against numpy. The claimed E[EDim(ℓ)] = m[1 − (1 − 2/π)^ℓ] is not asserted:
measured, it does not hold (see benchmarks/theory_relu_edim.py and the README)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import theory_model_collapse as mc
import theory_relu_edim as relu


@pytest.mark.parametrize("simulate", [mc.ols_recursive, mc.gaussian_refit, mc.kde_resample],
                         ids=["ols", "gaussian", "kde"])
def test_model_collapse_simulation_matches_its_closed_form(simulate):
    mean, se, theory = simulate()
    z = np.abs(mean - theory) / se
    assert z.max() < 4, (z.round(2), mean, theory)
    assert theory[-1] != pytest.approx(theory[0], rel=0.5)  # the law actually moves over the generations


def test_kde_variance_is_the_data_variance_plus_the_squared_bandwidth():
    rng = np.random.default_rng(0)
    x, h = rng.standard_normal(30), 0.4
    draws = rng.choice(x, 400_000) + h * rng.standard_normal(400_000)
    se = draws.var() * np.sqrt(2 / len(draws)) * 2  # generous SE of a variance (heavier tails than Gaussian)
    assert abs(draws.var() - (x.var() + h**2)) < 4 * se


def test_log_variance_spread_matches_simulation():
    _, se, _ = mc.gaussian_refit(T=20, generations=5, repeats=4000, seed=3)
    assert se[-1] * np.sqrt(4000) == pytest.approx(mc.log_variance_spread(20, 5), rel=0.06)


def test_relu_measurement_rank_equals_numpy_matrix_rank():
    for H in relu.relu_features(m=24, n=40, depth=8, seed=0):
        rank, erank = relu.measure(H)
        assert rank == np.linalg.matrix_rank(H.numpy())
        s = np.linalg.svd(H.numpy(), compute_uv=False)
        p = s / s.sum()
        p = p[p > 0]
        assert erank == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)


def test_relu_claim_is_evaluated_as_written(one_thread):
    assert relu.claimed_edim(100, 1) == pytest.approx(100 * 2 / np.pi)
    res = relu.sweep(widths=(16,), n=32, depth=3, seeds=1)[16]
    assert len(res["rank"]) == len(res["effective_rank"]) == len(res["claim"]) == 3
