"""The null simulation's reduced chains (``sampling.reduced_chain``) have the law of the full Gaussian chains: two-
sample Kolmogorov–Smirnov tests against a direct simulation written here (every factor a full Gaussian, blocks
scaled to their Frobenius-norm ratios, the dense sum's eigenvalues), with a wrong reduction as the control that the
test can tell laws apart."""

from __future__ import annotations

import itertools
import math

import numpy as np

from rankscope.spectra import sampling
from rankscope.spectra.form import Structure

DRAWS = 3000
ALPHA = 1e-4  # per comparison: the KS critical value below is exceeded by chance this rarely
CRITICAL = math.sqrt(-math.log(ALPHA / 2) / 2 * (2 / DRAWS))  # two-sample, equal sizes (asymptotic)

# a shared left factor, a content chain with a wide inner width (150 ≫ 12) and a rope-like chain (80 ≫ 12)
STRUCTURE = Structure(chains=((12, 150, 6, 25), (12, 80, 25)), left=(30, 12))
RATIOS = (1.0, 0.5)


def _direct(draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        left = rng.standard_normal((30, 12))
        core = 0
        for dims, ratio in zip(STRUCTURE.chains, RATIOS, strict=True):
            block = rng.standard_normal(dims[:2])
            for a, b in itertools.pairwise(dims[1:]):
                block = block @ rng.standard_normal((a, b))
            block = left @ block
            core = core + block * (ratio / np.linalg.norm(block))
        out.append(np.linalg.eigvalsh(core @ core.T)[::-1][: STRUCTURE.rank_bound])
    return np.array(out)


def _ks(x: np.ndarray, y: np.ndarray) -> float:
    grid = np.sort(np.concatenate([x, y]))
    return float(np.max(np.abs(np.searchsorted(np.sort(x), grid, side="right") / x.size
                               - np.searchsorted(np.sort(y), grid, side="right") / y.size)))


def _statistics(lam: np.ndarray) -> dict[str, np.ndarray]:
    med = np.median(lam, axis=1)
    return {"t": lam[:, 0] / med, "second": lam[:, 1] / med, "smallest": lam[:, -1] / med, "trace": lam.sum(1)}


def test_reduced_chains_keep_the_law():
    assert sampling.reduced_chain((12, 150, 6, 25), False, True)[0] == ("lower", 12, 12, 150)
    simulated = sampling.simulate_spectra(STRUCTURE, RATIOS, DRAWS, seed=11).numpy()
    direct = _direct(DRAWS, seed=12)
    for name, (a, b) in {k: (v, _statistics(direct)[k]) for k, v in _statistics(simulated).items()}.items():
        assert _ks(a, b) < CRITICAL, name


def test_a_wrong_reduction_is_told_apart(monkeypatch):
    """Control: a Bartlett triangle with too few degrees of freedom (as if the wide width were the narrow one) gives
    a different law, and the same test sees it."""
    real = sampling.bartlett
    monkeypatch.setattr(sampling, "bartlett", lambda k, dof, draws, rng: real(k, k, draws, rng))
    simulated = sampling.simulate_spectra(STRUCTURE, RATIOS, DRAWS, seed=11).numpy()
    direct = _direct(DRAWS, seed=12)
    assert _ks(_statistics(simulated)["t"], _statistics(direct)["t"]) > CRITICAL


def test_reduced_chains_fit_and_keep_the_rank_bound():
    for dims in ((1536, 16384, 512, 7168), (7, 3, 50, 2, 9), (64, 768, 768, 64), (5, 5, 5)):
        recipe = sampling.reduced_chain(dims, False, False)
        assert recipe[0][1] == dims[0] and recipe[-1][2] == dims[-1]
        for (_, _, b, _), (_, a, _, _) in itertools.pairwise(recipe):
            assert a == b  # consecutive factors fit
        assert min(min(x[1], x[2]) for x in recipe) == min(dims)  # the rank bound is the chain's
        for (kind, a, b, dof), (p, q) in zip(recipe, itertools.pairwise(dims), strict=True):
            assert a * b <= p * q and (kind == "gauss" or dof in (p, q))
    assert sampling.reduced_chain((1536, 16384, 512, 7168), False, False)[:2] == [
        ("lower", 1536, 1536, 16384), ("gauss", 1536, 512, 0)]
