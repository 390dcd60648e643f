"""Spike statistics: a scale that survives half the spectrum being signal, a bulk goodness-of-fit, Onatski's count.

- ``bulk_scale``: a BEMA-style least-squares fit (Ke, Ma & Lin 2023, "Estimation of the number of spiked
  eigenvalues in a covariance matrix by bulk eigenvalue matching analysis", JASA) of the scale σ that matches the
  spectrum's lower quantiles to the null's: σ̂ = Σ x_(i) Q(p_i) / Σ Q(p_i)² over the plotting positions
  p_i = (i − ½)/m in ``FIT_RANGE``, with x_(i) the ascending spectrum and Q the null's quantile function (in
  units of its median). Spikes sit at the top, so up to ~65 % of the eigenvalues may be signal before the
  fitted range reaches them (the count goes to half the rank); the median breaks down at 50 % (masking: a null
  fitted by the median moves its edge up with the spikes).
- ``sequential_statistic``: t = x_max / σ̂(x), the statistic of one step of the sequential count (Kritchman &
  Nadler 2008, "Determining the number of components in a factor model from limited noisy data"): step k tests
  λ_{k+1} against the null of the form deflated by k (``Structure.deflated``), with σ̂ refitted on λ_{k+1..r}.
- ``anderson_darling``: A² = −m − (1/m) Σ_i (2i − 1) [ln F(z_(i)) + ln(1 − F(z_(m+1−i)))] with z = x/σ̂ and F the
  null's CDF (Anderson & Darling 1954): the distance of the bulk left after the spikes from the null's shape,
  weighted toward both ends, where a smoothly decaying or a stretched bulk departs first (it had the most power
  of Cramér–von Mises, Anderson–Darling, a log-quantile slope and an upper-quantile excess on decaying products,
  README); its threshold is calibrated on pure noise of the same structure (``nulls``).
- ``onatski_count``: the edge-distribution estimator of Onatski (2010, "Determining the number of factors from
  empirical distribution of eigenvalues", Rev. Econ. Stat. 92:1004), a gap test calibrated by the λ_i ~ i^{2/3}
  spacing at a soft edge: no null needed, and it flags fewer on smoothly decaying spectra. Its calibration is
  asymptotic, and on spectra of a few dozen eigenvalues it is not held at any fpr (README, measured): a
  cross-check of ``spikes``, not a test.

Everything takes spectra on the last axis and broadcasts over leading axes.
"""

from __future__ import annotations

import math

import numpy as np

FIT_RANGE = (0.05, 0.35)  # plotting positions of the lower quantiles the scale is fitted on
MIN_BULK = 4  # eigenvalues that must remain below the spikes (and at least half of the rank)


def plotting_positions(m: int) -> np.ndarray:
    """(i − ½)/m for i = 1..m: where the i-th smallest of m values sits in its distribution."""
    return (np.arange(m) + 0.5) / m


def max_spikes(rank: int) -> int:
    """The most spikes a spectrum of this rank can be counted to: half of it, as the bulk left must keep ``MIN_BULK``
    eigenvalues and half of the rank (beyond, "spikes on a noise bulk" has no bulk left to speak of)."""
    return max(0, rank - max(MIN_BULK, math.ceil(rank / 2)))


def fit_weights(m: int, grid: np.ndarray, quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights) with σ̂ = x_asc[..., indices] @ weights for spectra of m values: the plotting positions
    in ``FIT_RANGE`` and Q(p_i) / Σ Q(p_i)² there."""
    p = plotting_positions(m)
    lo, hi = FIT_RANGE
    idx = np.nonzero((p >= lo) & (p <= hi))[0]
    if idx.size == 0:  # a tiny spectrum: its lowest value
        idx = np.array([0])
    q = np.interp(p[idx], grid, quantiles)  # (n_fit,)
    denom = float(q @ q)
    return idx, (q / denom if denom > 0 else np.zeros_like(q))


def bulk_scale(x_asc: np.ndarray, grid: np.ndarray, quantiles: np.ndarray, weights=None) -> np.ndarray:
    """σ̂ (…,): the least-squares scale matching x's quantiles at ``FIT_RANGE`` to the null's, x (…, m) ascending.

    ``quantiles`` are the null's quantiles (in units of its median) at the probabilities ``grid``; ``weights``
    are ``fit_weights`` for this m, when already known."""
    idx, w = weights if weights is not None else fit_weights(x_asc.shape[-1], grid, quantiles)
    return x_asc[..., idx] @ w


def sequential_statistic(x_asc: np.ndarray, grid: np.ndarray, quantiles: np.ndarray, weights=None) -> np.ndarray:
    """t = x_max / σ̂(x) (…,); where σ̂ is 0, ∞ above a zero bulk and 0 for a spectrum of zeros."""
    scale = bulk_scale(x_asc, grid, quantiles, weights)
    top = x_asc[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, top / np.where(scale > 0, scale, 1.0), np.where(top > 0, np.inf, 0.0))


def anderson_darling(x_asc: np.ndarray, grid: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """A² (…,) of the ascending spectrum x against the null's distribution at x's fitted scale."""
    m = x_asc.shape[-1]
    scale = bulk_scale(x_asc, grid, quantiles)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale > 0, x_asc / np.where(scale > 0, scale, 1.0), 0.0)
    F = np.interp(z, quantiles, grid)  # the null's CDF at each value, through its quantile function
    F = np.clip(F, 1e-12, 1 - 1e-12)  # a value outside the null's range counts as a (large, finite) misfit
    weights = 2 * np.arange(1, m + 1) - 1  # (m,)
    return -m - (weights * (np.log(F) + np.log1p(-F[..., ::-1]))).sum(-1) / m


def onatski_count(lam_desc: np.ndarray, r_max: int | None = None, iterations: int = 20) -> float:
    """Onatski's (2010) ED estimate of the number of spikes of one spectrum (descending), NaN below 10 values.

    Step 1: j = r_max + 1. Step 2: δ = 2|β̂|, with β̂ the least-squares slope of λ_j, …, λ_{j+4} on
    (j − 1)^{2/3}, …, (j + 3)^{2/3}. Step 3: r̂ = max{i ≤ r_max : λ_i − λ_{i+1} ≥ δ} (0 if none); j = r̂ + 1.
    Repeat steps 2 and 3 until r̂ stops changing. ``r_max`` defaults to r/2, so half the spectrum can be counted
    (at most r − 5, for the five-point regression).
    """
    lam = np.asarray(lam_desc, dtype=np.float64)
    r = lam.size
    if r < 10:
        return math.nan
    r_max = min(r // 2 if r_max is None else r_max, r - 5)
    gaps = lam[:-1] - lam[1:]  # gaps[i − 1] = λ_i − λ_{i+1}
    j, found = r_max + 1, None
    for _ in range(iterations):
        x = np.arange(j - 1, j + 4, dtype=np.float64) ** (2 / 3)  # (j − 1)^{2/3}, …, (j + 3)^{2/3}
        y = lam[j - 1 : j + 4]  # λ_j, …, λ_{j+4} (1-based)
        slope = np.polyfit(x, y, 1)[0]
        delta = 2 * abs(slope)
        above = np.nonzero(gaps[:r_max] >= delta)[0]
        estimate = int(above[-1]) + 1 if above.size else 0
        if estimate == found:
            break
        found, j = estimate, estimate + 1
    return float(found)
