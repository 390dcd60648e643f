"""Power-law tail exponent α of an eigenvalue spectrum (Clauset, Shalizi & Newman 2009, SIAM Review 51:661).

The tail x ≥ xmin is modelled as a continuous power law p(x) ∝ x^(−α); for each candidate xmin, α is the
maximum-likelihood estimate α = 1 + n / Σ ln(x_i / xmin) over the n values ≥ xmin, and xmin is the candidate
whose fitted CDF 1 − (x/xmin)^(1−α) has the smallest Kolmogorov–Smirnov distance D to the tail's empirical
CDF. For the eigenvalues of WᵀW (Martin & Mahoney 2021, JMLR 22:165) 2 < α < 4 marks a heavy-tailed,
"well trained" layer, while a large α (≳ 6) means a spectrum close to that of a random matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_EIGENVALUES = 10
_CHUNK_ELEMENTS = 2**18  # candidates × eigenvalues per chunk: 2 MB per float64 temporary


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float  # NaN when too few eigenvalues
    xmin: float
    ks: float  # KS distance D at the chosen xmin
    n_tail: int


_NO_FIT = PowerLawFit(alpha=math.nan, xmin=math.nan, ks=math.nan, n_tail=0)


def power_law_fit(eigenvalues: torch.Tensor) -> PowerLawFit:
    """Fit the power-law tail of ``eigenvalues`` (1-D, any order, any device); values <= 0 are dropped.

    The choices are those of ``powerlaw.Fit(x, discrete=False)`` (powerlaw 2.0, no xmax):

    * candidate xmins are the distinct values except the two largest (the package drops the maximum and
      then the last remaining distinct value); fewer than 2 candidates gives no fit;
    * the empirical CDF of the tail at a value u is #{tail values < u} / n (so 0 at xmin; tied values
      share one step, and n counts every copy); D = max |fitted CDF − empirical CDF| over the tail;
    * α is the plain continuous MLE at every candidate (no finite-size correction, no xmax truncation);
    * the smallest D wins, ties going to the smallest xmin.

    One deliberate difference: powerlaw 2.0 only accepts 0 < α < 3 by default (and refits α outside
    (1.5, 3] numerically), so it can never report the α > 3 typical of weight spectra. Here every
    candidate with α > 1 (a normalisable law; always true for the MLE) is valid, as in powerlaw 1.x and
    in WeightWatcher's own fitter.

    With fewer than ``MIN_EIGENVALUES`` positive values the result is NaN: the tail would hold a handful
    of points, whose α has a standard error (α − 1)/√n of about 0.5 or more, and WeightWatcher skips
    such layers too (its ``min_evals`` is 10).
    """
    x = eigenvalues.detach().flatten().to(torch.float64)
    if x.device.type == "mps":  # no float64 on Apple GPUs
        x = x.cpu()
    x = torch.sort(x[x > 0]).values  # (N,) ascending
    N = x.numel()
    if N < MIN_EIGENVALUES:
        return _NO_FIT
    candidates = torch.unique(x)[:-2]  # (C,) sorted distinct values, largest two dropped
    if candidates.numel() < 2:
        return _NO_FIT

    alpha, dist, start = _scan(x, candidates)
    valid = torch.isfinite(alpha) & (alpha > 1) & torch.isfinite(dist)
    dist = torch.where(valid, dist, math.inf)
    best = int(torch.argmin(dist))  # first minimum: the smallest xmin among ties
    if not valid[best]:
        return _NO_FIT
    return PowerLawFit(
        alpha=float(alpha[best]),
        xmin=float(candidates[best]),
        ks=float(dist[best]),
        n_tail=N - int(start[best]),
    )


def _scan(x: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """α, KS distance D and number of values below xmin for each candidate, from sorted positive ``x``."""
    N = x.numel()
    below = torch.searchsorted(x, x).to(torch.float64)  # (N,) number of values < x_j
    start = torch.searchsorted(x, candidates)  # (C,) number of values < xmin
    # (C,) results, written in place: small per-chunk tensors kept in a list fragment the heap
    alpha_out = torch.empty_like(candidates)
    dist_out = torch.empty_like(candidates)
    chunk = max(1, _CHUNK_ELEMENTS // N)
    for lo in range(0, candidates.numel(), chunk):
        hi = lo + chunk
        xmin = candidates[lo:hi, None]  # (c, 1)
        s = start[lo:hi, None].to(torch.float64)  # (c, 1)
        n = N - s  # (c, 1) tail sizes
        log_ratio = (x / xmin).clamp(min=1).log()  # (c, N) ln(x / xmin) in the tail, 0 below it
        alpha = 1 + n / log_ratio.sum(dim=1, keepdim=True)  # (c, 1)
        cdf_fit = -torch.expm1((1 - alpha) * log_ratio)  # (c, N) 1 − (x/xmin)^(1−α), 0 below the tail
        cdf_emp = (below - s).clamp(min=0) / n  # (c, N) 0 below the tail
        alpha_out[lo:hi] = alpha[:, 0]
        dist_out[lo:hi] = (cdf_fit - cdf_emp).abs().amax(dim=1)
    return alpha_out, dist_out, start
