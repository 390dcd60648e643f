"""The spike count: sequential tests against deflated nulls, then a check that what is left is noise.

For a spectrum λ_1 ≥ … ≥ λ_r of a form of structure S (docs/design.md §5, Kritchman & Nadler 2008):

1. k = 0. Test λ_{k+1} against the null of S deflated by k (``nulls.spike_null``): reject when
   λ_{k+1} / σ̂(λ_{k+1..r}) exceeds the null's (1 − fpr) quantile of the same statistic, with σ̂ the bulk scale
   fitted to the lower quantiles of λ_{k+1..r} (``spikes.bulk_scale``). On rejection, k ← k + 1 and repeat, up
   to ``spikes.max_spikes(r)``. Under pure noise only the first test can fire, so P(spikes > 0) = fpr.
2. The bulk check: the Anderson–Darling distance of λ_{k+1..r} (at its fitted scale) from the deflated null's
   shape, against that null's (1 − fpr) quantile of the same distance on pure noise. If it is above, the
   spectrum is not "k spikes on noise" (a smoothly decaying or heavy-tailed bulk, or more spikes than can be
   counted), and ``spikes`` is NaN: the sequential count is then no count of spikes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rankscope.spectra.form import Structure
from rankscope.spectra.nulls import PROBS, spike_null
from rankscope.spectra.spikes import MIN_BULK, anderson_darling, fit_weights, max_spikes, sequential_statistic


@dataclass(frozen=True)
class SpikeCount:
    spikes: float  # the count, or NaN where the bulk does not fit (or the spectrum is too small to test)
    bulk_fits: bool | None  # None where not tested
    bulk_stat: float  # Anderson–Darling A² of the bulk left after the spikes
    bulk_threshold: float  # its (1 − fpr) quantile on pure noise of the deflated structure
    erank_vs_null: float  # effective rank of the spectrum / the null's mean effective rank
    top_energy_vs_null: float  # metrics.top_energy of the spectrum / the null's mean top_energy


UNTESTED = SpikeCount(math.nan, None, math.nan, math.nan, math.nan, math.nan)  # no count: too small, or not this null


def count_spikes(lam: np.ndarray, structure: Structure, norms: np.ndarray | None, fpr: float,
                 draws: int | None, effective_rank: np.ndarray, top_energy: np.ndarray) -> list[SpikeCount]:
    """The spike count of each spectrum of a batch: ``lam`` (B, r) descending, ``norms`` (B, C) block norms of a
    sum (None for a chain), ``effective_rank`` and ``top_energy`` (B,) of each spectrum."""
    B, r = lam.shape
    if r <= MIN_BULK:
        return [UNTESTED] * B
    ascending = lam[:, ::-1]
    if len(structure.chains) == 1 or norms is None:
        groups = [(np.arange(B), None)]
    else:  # a sum: each spectrum has its own block-norm ratios, hence its own nulls
        groups = [(np.array([b]), norms[b].tolist()) for b in range(B)]
    out: list[SpikeCount | None] = [None] * B
    for idx, block_norms in groups:
        for b, result in zip(idx, _count(ascending[idx], structure, block_norms, fpr, draws,
                                         effective_rank[idx], top_energy[idx]), strict=True):
            out[b] = result
    return out


@dataclass(frozen=True, eq=False)
class _Step:
    """What one step of the count reads from its null."""

    quantiles: np.ndarray
    weights: tuple[np.ndarray, np.ndarray]  # spikes.fit_weights for the r − k eigenvalues this step reads
    edge: float
    threshold: float
    erank: float
    top_energy: float


def _step(s: Structure, k: int, norms, draws: int | None, fpr: float) -> _Step:
    null = spike_null(s, k, norms, draws, fpr)
    weights = fit_weights(s.rank_bound - k, PROBS, null.ratio_quantiles)
    return _Step(null.ratio_quantiles, weights, null.seq_edge(fpr), null.gof_threshold(fpr), null.erank,
                 null.top_energy)


@lru_cache(maxsize=4096)
def _chain_step(s: Structure, k: int, draws: int | None, fpr: float) -> _Step:
    """``_step`` of a chain (no block norms): the heads of a layer, the layers of a model share it."""
    return _step(s, k, None, draws, fpr)


def _count(ascending: np.ndarray, s: Structure, norms, fpr: float, draws: int | None,
           effective_rank: np.ndarray, top_energy: np.ndarray) -> list[SpikeCount]:
    """Spectra (G, r) ascending that share their nulls: the sequential tests run for all at once."""
    G, r = ascending.shape
    top = min(max_spikes(r), s.max_deflation)
    # −1: every test up to ``top`` rejected: more spikes than can be counted, or a zero bulk (an exactly low-rank
    # form, whose fitted scale is 0, is no spectrum of spikes on noise)
    counts = np.full(G, -1)
    active, k, steps = np.arange(G), 0, {}
    while active.size and k <= top:
        step = steps[k] = _chain_step(s, k, draws, fpr) if norms is None else _step(s, k, norms, draws, fpr)
        t = sequential_statistic(ascending[active, : r - k], PROBS, step.quantiles, step.weights)
        reject = t > step.edge
        counts[active[~reject]] = k
        active = active[reject]
        k += 1
    erank_null, top_null = steps[0].erank, steps[0].top_energy
    results = []
    for g in range(G):
        ratios = (float(effective_rank[g] / erank_null) if erank_null > 0 else math.nan,
                  float(top_energy[g] / top_null) if top_null > 0 else math.nan)
        k = int(counts[g])
        if ascending[g, -1] <= 0:  # the zero form: no spike, and no bulk to check
            results.append(SpikeCount(0.0, None, math.nan, math.nan, *ratios))
            continue
        if k < 0:
            results.append(SpikeCount(math.nan, False, math.nan, math.nan, *ratios))
            continue
        step = steps[k]
        stat = float(anderson_darling(ascending[g, : r - k], PROBS, step.quantiles))
        threshold = step.threshold
        fits = stat <= threshold
        results.append(SpikeCount(float(k) if fits else math.nan, bool(fits), stat, threshold, *ratios))
    return results
