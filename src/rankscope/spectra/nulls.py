"""Null spectra: what a form's eigenvalues look like when it holds no learned structure (docs/design.md §5).

Every null here is *scale-free*: it describes ``λ / ref(λ)`` where ``ref`` is the median (or, for the naive
fit, the mean) of the same spectrum. Fitting a null to an observed spectrum is then just
``edge = ref(λ_obs) × edge_ratio(fpr)``, with no variance to estimate separately.

- ``product_null`` of a single n×m matrix: the MP law (median matching, σ² = median(λ)/median MP(q, 1)) with
  the edge at the exact finite-size (1 − fpr) quantile of t = λ_max/median (``sampling.wishart_spectra``). The
  median's own noise is part of t, so the false-positive rate holds even for small matrices.
- ``TracyWidomNull``: the same MP fit with Johnstone's Tracy–Widom edge (analytic; over-flags on small
  matrices because it ignores the median's noise).
- ``NaiveMPNull``: what papers usually do, σ² = mean(λ) and edge σ²(1 + √q)², with q = rank / max(n, m).
  Wrong for products of matrices; kept for comparison.
- ``ProductNull``: the structure-matched null of a chain or a sum of chains. Every factor is an independent
  Gaussian of its shape (a shared outer chain drawn once), each block of a sum gets the observed block's
  Frobenius norm, and the edge is the (1 − fpr) quantile of ``t = λ_max / median(λ)`` over the draws, counted or
  by a Tracy–Widom fit (``budget``). A two-factor chain of rank ≥ ``FIT_MIN_RANK`` inside the calibrated cells
  of ``product_edge`` takes its edge from the free product of two MP laws instead (``edge_source``); its draws
  still give everything else.

Every simulated null also keeps what the spike count needs (``spikes``): the law of the sequential statistic
x_max / σ̂ and of the bulk's Anderson–Darling distance, both with the BEMA-fitted scale σ̂. The k-th step of the
count reads the null of the form deflated by k (``spike_null``): exactly for ranks below ``FIT_MIN_RANK``, and
above it from a grid of deflations, interpolated (a 768-wide layer form costs seconds a null).

Sums of chains are simulated on a 0.1-decade grid of block-norm ratios and interpolated (``InterpolatedNull``).
Simulated nulls are cached (``nullcache``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.spectra import budget, metrics, product_edge
from rankscope.spectra.form import Structure
from rankscope.spectra.laws import (
    TW1_MEAN,
    TW1_SD,
    mp_cdf,
    mp_edges,
    mp_median,
    mp_quantile,
    mp_tracy_widom_edge,
    tracy_widom1_quantile,
)
from rankscope.spectra.nullcache import CACHE, key, seed
from rankscope.spectra.sampling import simulate_spectra, two_factor_spectra, wishart_spectra
from rankscope.spectra.spikes import anderson_darling, max_spikes, sequential_statistic
from rankscope.vocab import MP, PRODUCT, TW

RATIO_GRID = 0.1  # block-norm ratios are rounded to this step in log10
QUANTILE_POINTS = 1025  # resolution of the stored λ/median distribution (KS distance, bulk scale and fit)
PROBS = np.linspace(0, 1, QUANTILE_POINTS)
DEFLATION_STEP = 2.0  # from rank FIT_MIN_RANK on, deflations are simulated at k = 0, 1, 2, 4, 8, …
# what ``_simulate`` stores: a cached null lacking any of them (an older format) is simulated again
NULL_ARRAYS = ("t", "ratio_quantiles", "mean_ratio", "t_seq", "gof", "erank", "top_energy")
GOF_COUNTED_EXCEEDANCES = 20  # fewer null draws than this above the bulk threshold: an exponential tail fit


def median(lam: torch.Tensor) -> torch.Tensor:
    """Median along the last axis, the mean of the two middle values for an even count."""
    return torch.quantile(lam, 0.5, dim=-1)


# ----------------------------------------------------------------------------- analytic nulls


@dataclass(frozen=True)
class TracyWidomNull:
    """MP(q, σ²) for a single n×m matrix, σ² by median matching, Johnstone's Tracy–Widom edge.

    The classical analytic test. Exact for a known σ², but the median's own noise makes it over-flag on small
    matrices, hence the simulated edge of ``product_null`` by default.
    """

    n: int
    m: int
    name: str = TW
    reference: str = "median"

    @property
    def q(self) -> float:
        return min(self.n, self.m) / max(self.n, self.m)

    def edge_ratio(self, fpr: float) -> float:
        return mp_tracy_widom_edge(self.n, self.m, fpr) / mp_median(self.q)

    @property
    def mean_ratio(self) -> float:
        return 1.0 / mp_median(self.q)  # MP(q, 1) has mean 1

    def cdf(self, ratio: np.ndarray) -> np.ndarray:
        return mp_cdf(np.asarray(ratio) * mp_median(self.q), self.q)

    @property
    def ratio_quantiles(self) -> np.ndarray:
        return _mp_quantiles(self.q) / mp_median(self.q)


@dataclass(frozen=True)
class NaiveMPNull:
    """The naive MP fit: σ² = mean(λ), edge σ²(1+√q)² with q = rank/max(n, m). For comparison only."""

    q: float
    name: str = MP
    reference: str = "mean"

    def edge_ratio(self, fpr: float) -> float:  # the naive fit has no false-positive control
        return mp_edges(self.q)[1]

    mean_ratio: float = 1.0

    def cdf(self, ratio: np.ndarray) -> np.ndarray:
        return mp_cdf(ratio, self.q)

    @property
    def ratio_quantiles(self) -> np.ndarray:
        return _mp_quantiles(self.q)


@lru_cache(maxsize=1024)
def _mp_quantiles(q: float) -> np.ndarray:
    """QUANTILE_POINTS quantiles of MP(q, 1), computed once per aspect ratio (a training run repeats shapes)."""
    out = mp_quantile(PROBS, q)
    out.flags.writeable = False
    return out


# ----------------------------------------------------------------------------- the product null


def tracy_widom_fit_quantile(t: np.ndarray, prob: float) -> float:
    """The prob-quantile of a + b·TW₁, with a and b matching the sample mean and standard deviation of t."""
    b = float(np.std(t, ddof=1)) / TW1_SD
    return float(np.mean(t)) + b * (tracy_widom1_quantile(prob) - TW1_MEAN)


def upper_quantile(samples: np.ndarray, fpr: float, fitted: bool) -> float:
    """The (1 − fpr) quantile of a statistic's null draws: by the Tracy–Widom fit (at least ``MIN_DRAWS`` draws),
    or the empirical quantile (at least ``MIN_EXCEEDANCES`` draws above it)."""
    needed = budget.MIN_DRAWS if fitted else math.ceil(budget.MIN_EXCEEDANCES / fpr)
    if samples.size < needed:
        how = "Tracy–Widom fit" if fitted else "empirical quantile"
        raise InputError(f"{samples.size} null draws are too few to place the edge at fpr={fpr} by the {how}: "
                         f"at least {needed}")
    if fitted:
        return tracy_widom_fit_quantile(samples, 1 - fpr)
    return float(np.quantile(samples, 1 - fpr))


def exponential_tail_quantile(samples: np.ndarray, fpr: float, tail: float = 0.1) -> float:
    """The (1 − fpr) quantile from an exponential fit of the draws' top ``tail`` (peaks over threshold): u + β
    ln(tail/fpr), with u the (1 − tail) quantile and β the mean excess above it. A goodness-of-fit statistic's
    tail is near-exponential; a log-normal fit of it was measured 2.5–3 times too liberal at fpr 0.01."""
    u = float(np.quantile(samples, 1 - tail))
    excess = samples[samples > u] - u
    return u + (float(excess.mean()) if excess.size else 0.0) * math.log(tail / fpr)


@dataclass(frozen=True)
class ProductNull:
    """Simulated null of a form: per draw t = λ_max/median, the sequential statistic and the bulk's distance, and
    the pooled law of λ/median."""

    t: np.ndarray  # (draws,) sorted ascending
    ratio_quantiles: np.ndarray  # (QUANTILE_POINTS,) quantiles of λ/median, pooled over draws
    mean_ratio: float  # E[λ / median]
    fitted: bool = False  # edges from the Tracy–Widom fit (rank ≥ FIT_MIN_RANK), else counted quantiles
    t_seq: np.ndarray | None = None  # (draws,) sorted: λ_max / σ̂ with the bulk scale (spikes.bulk_scale)
    gof: np.ndarray | None = None  # (draws,) sorted: Anderson–Darling A² of the draw's spectrum against the null
    erank: float = math.nan  # the null's mean effective rank
    top_energy: float = math.nan  # the null's mean share of Σλ in the top ⌈r/10⌉ eigenvalues (metrics.top_energy)
    name: str = PRODUCT
    reference: str = "median"
    chain: tuple[int, int, int] | None = None  # a two-factor chain (n, k, m) with the analytic edge, else None

    @property
    def edge_source(self) -> str:
        """Where ``edge_ratio`` comes from: "analytic" (``product_edge``) or "simulated" (the draws of t)."""
        return "simulated" if self.chain is None else "analytic"

    def edge_ratio(self, fpr: float) -> float:
        """The (1 − fpr) quantile of t = λ_max/median (the ``outliers`` test): analytic for a two-factor chain
        inside ``product_edge``'s calibrated range, else from the simulated t."""
        if self.chain is not None:
            return product_edge.edge_ratio(*self.chain, fpr)
        return upper_quantile(self.t, fpr, self.fitted)

    def seq_edge(self, fpr: float) -> float:
        """The (1 − fpr) quantile of λ_max / σ̂ (one step of the sequential spike count)."""
        return upper_quantile(self.t_seq, fpr, self.fitted)

    def gof_threshold(self, fpr: float) -> float:
        """The (1 − fpr) quantile of the bulk's A²: counted where 20 draws lie above it, else from an exponential
        fit of the top tenth (more precise than counting a handful)."""
        if self.gof.size * fpr >= GOF_COUNTED_EXCEEDANCES or fpr >= 0.1:
            return float(np.quantile(self.gof, 1 - fpr))
        return exponential_tail_quantile(self.gof, fpr)

    def cdf(self, ratio: np.ndarray) -> np.ndarray:
        return np.interp(ratio, self.ratio_quantiles, PROBS, left=0.0, right=1.0)


@dataclass(frozen=True)
class InterpolatedNull:
    """A sum-of-chains null between grid points of block-norm ratio: log-linear in the edge.

    The edge of a sum moves like ratio² once one block dominates, so rounding the ratio to a grid would shift it
    by a quarter per 0.1 decade; interpolating between the bracketing grid nulls (simulated with common random
    numbers, so t varies smoothly from one to the next) removes that error.
    """

    parts: tuple[tuple[ProductNull, float], ...]  # (null at a grid corner, multilinear weight)
    name: str = PRODUCT
    reference: str = "median"
    edge_source: str = "simulated"

    def _log_mean(self, value) -> float:
        return math.exp(sum(w * math.log(value(p)) for p, w in self.parts))

    def edge_ratio(self, fpr: float) -> float:
        return self._log_mean(lambda p: p.edge_ratio(fpr))

    def seq_edge(self, fpr: float) -> float:
        return self._log_mean(lambda p: p.seq_edge(fpr))

    def gof_threshold(self, fpr: float) -> float:
        return self._log_mean(lambda p: p.gof_threshold(fpr))

    @property
    def mean_ratio(self) -> float:
        return sum(w * p.mean_ratio for p, w in self.parts)

    @property
    def erank(self) -> float:
        return sum(w * p.erank for p, w in self.parts)

    @property
    def top_energy(self) -> float:
        return sum(w * p.top_energy for p, w in self.parts)

    def cdf(self, ratio: np.ndarray) -> np.ndarray:
        return sum(w * p.cdf(ratio) for p, w in self.parts)

    @property
    def ratio_quantiles(self) -> np.ndarray:
        return sum(w * p.ratio_quantiles for p, w in self.parts)


def ratio_grid_corners(norms: Sequence[float]) -> list[tuple[tuple[float, ...], float]]:
    """Grid points (0.1 decade) of block-norm ratio (to the largest block) around the observed ones, with their
    multilinear interpolation weights. Ratios below 1e-6 count as 1e-6."""
    top = max(norms)
    if top <= 0:
        return [((1.0,) * len(norms), 1.0)]
    steps = [max(-6.0, math.log10(max(x, 1e-300) / top)) / RATIO_GRID for x in norms]
    low = [math.floor(v) for v in steps]
    frac = [v - lo for v, lo in zip(steps, low, strict=True)]
    corners = []
    for bits in itertools.product((0, 1), repeat=len(norms)):
        weight = math.prod(f if b else 1 - f for f, b in zip(frac, bits, strict=True))
        if weight > 0:
            corners.append((tuple(10 ** ((lo + b) * RATIO_GRID) for lo, b in zip(low, bits, strict=True)), weight))
    return corners


def _canonical(structure) -> Structure:
    """One null per distinct law: W and Wᵀ share their spectrum, and a lone chain with a shared outer chain is just
    a longer chain."""
    s = Structure.of(structure)
    if s.is_matrix:
        return Structure((tuple(sorted(s.chains[0], reverse=True)),))
    if len(s.chains) == 1 and (s.left or s.right):
        return Structure(((*s.left[:-1], *s.chains[0], *s.right[1:]),))
    return s


def product_null(structure, ratios: Sequence[float] | None = None, draws: int | None = None) -> ProductNull:
    """The structure-matched null of a form of this structure (and block-norm ratios), cached."""
    s = _canonical(structure)
    ratios = tuple(ratios) if ratios is not None else (1.0,) * len(s.chains)
    draws = draws or budget.default_draws(s)
    arrays = CACHE.get(key(PRODUCT, s, ratios, draws), lambda: _simulate(s, ratios, draws, seed(s, draws)),
                       required=NULL_ARRAYS)
    return ProductNull(t=arrays["t"], ratio_quantiles=arrays["ratio_quantiles"],
                       mean_ratio=float(arrays["mean_ratio"]), fitted=budget.fitted(s), t_seq=arrays["t_seq"],
                       gof=arrays["gof"], erank=float(arrays["erank"]), top_energy=float(arrays["top_energy"]),
                       chain=_analytic_chain(s))


def _analytic_chain(s: Structure) -> tuple[int, int, int] | None:
    """The dims of a two-factor chain whose edge ``product_edge`` gives (rank ≥ ``FIT_MIN_RANK``, inside its
    calibrated cells), else None."""
    if s.is_chain and len(s.chains[0]) == 3 and budget.fitted(s) and product_edge.covers(*s.chains[0]):
        return s.chains[0]
    return None


def sum_null(structure, norms: Sequence[float], draws: int | None = None) -> InterpolatedNull:
    """The structure-matched null of a sum of chains whose blocks have the given Frobenius norms."""
    return InterpolatedNull(tuple((product_null(structure, r, draws), w) for r, w in ratio_grid_corners(norms)))


def deflation_grid(rank: int) -> list[int]:
    """The deflations k simulated for a form of this rank: every k below ``FIT_MIN_RANK``; above it 0, 1 and then
    steps of ``DEFLATION_STEP``, up to ``spikes.max_spikes(rank)``."""
    top = max_spikes(rank)
    if rank < budget.FIT_MIN_RANK:
        return list(range(top + 1))
    grid, k = [0, 1], 2.0
    while k < top:
        grid.append(round(k))
        k *= DEFLATION_STEP
    return sorted({g for g in grid if g <= top} | {top})


def spike_null(structure, k: int, norms: Sequence[float] | None = None, draws: int | None = None,
               fpr: float = 0.01):
    """The null of step k of the sequential spike count: the form deflated by k (``Structure.deflated``), at the
    block-norm ratios of ``norms`` for a sum; between grid deflations, interpolated in k (edges and thresholds
    log-linearly, quantiles linearly). ``draws`` (when given) is raised where a later step's estimator needs more.

    Only step 0 decides whether a noise spectrum shows a spike; for a sum the later steps take the nearest ratio
    grid point instead of the interpolation (one null a step, not four). Below ``FIT_MIN_RANK`` their draws are
    not cut: each step of a smoothly decaying spectrum sits near its edge, so a counted edge placed a little low
    peels more and leaves a bulk that fits (a quarter of the draws cut the bulk check's power on decaying products
    by a sixth). From it on, where a draw costs O(r³) and the edges come from fits, they get ``MIN_DRAWS``."""
    s = Structure.of(structure)
    grid = deflation_grid(s.rank_bound)
    if k in grid:
        corners = [(k, 1.0)]
    else:
        hi = next(g for g in grid if g > k)
        lo = max(g for g in grid if g < k)
        corners = [(lo, (hi - k) / (hi - lo)), (hi, (k - lo) / (hi - lo))]
    if len(s.chains) == 1 or norms is None:
        ratio_corners = [(None, 1.0)]
    else:
        ratio_corners = ratio_grid_corners(norms)
        if k > 0:
            ratio_corners = [(max(ratio_corners, key=lambda c: c[1])[0], 1.0)]
    parts = []
    for kk, wk in corners:
        deflated = s.deflated(kk)
        if draws and kk > 0:  # the caller's draws, but never fewer than this step's estimator needs
            n_draws = max(draws, budget.MIN_DRAWS if budget.fitted(deflated) else
                          math.ceil(budget.MIN_EXCEEDANCES / fpr))
        else:
            n_draws = draws or (budget.MIN_DRAWS if kk > 0 and budget.fitted(deflated) else
                                budget.default_draws(deflated, fpr))
        parts += [(product_null(deflated, r, n_draws), wk * wr) for r, wr in ratio_corners]
    return parts[0][0] if len(parts) == 1 else InterpolatedNull(tuple(parts))


def _simulate(s: Structure, ratios, draws: int, seed: int, chunk_bytes: float = 2**28) -> dict[str, np.ndarray]:
    """Draw the null's spectra and keep what the edges, the KS distance and the spike count need."""
    if s.is_matrix:  # a single matrix: the Dumitriu–Edelman model, exact in law
        lam = wishart_spectra(*s.chains[0], draws, seed)  # (draws, p)
    elif s.is_chain and len(s.chains[0]) == 3:  # one two-factor chain (a layer's or a head's form)
        lam = two_factor_spectra(*s.chains[0], draws, seed)  # (draws, r)
    else:
        width = max(sum(d[1] for d in s.chains), *(s.left[1:2] or (1,)))
        chunk = max(1, int(chunk_bytes // (8 * 4 * width * max(width, min(s.n, s.m)))))
        lam = torch.cat([
            simulate_spectra(s, ratios, min(chunk, draws - start), seed + start)
            for start in range(0, draws, chunk)
        ])  # (draws, r)
    med = median(lam).clamp_min(torch.finfo(torch.float64).tiny)
    ratio = lam / med[:, None]  # (draws, r)
    pooled = ratio.flatten()
    if pooled.numel() > 2**24:  # torch.quantile's input limit
        pooled = pooled[:: math.ceil(pooled.numel() / 2**24)]
    quantiles = torch.quantile(pooled, torch.from_numpy(PROBS)).numpy()
    ascending = ratio.numpy()[:, ::-1]  # (draws, r)
    return {"t": np.sort(ratio[:, 0].numpy()), "ratio_quantiles": quantiles,
            "mean_ratio": np.array(float(ratio.mean())),
            "t_seq": np.sort(sequential_statistic(ascending, PROBS, quantiles)),
            "gof": np.sort(anderson_darling(ascending, PROBS, quantiles)),
            "erank": np.array(float(metrics.effective_rank(lam).mean())),
            "top_energy": np.array(float(metrics.top_energy(lam).mean()))}
