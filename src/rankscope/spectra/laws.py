"""Closed-form laws of random-matrix theory: Marchenko–Pastur, Tracy–Widom (β=1), and the BBP transition.

Conventions. A noise matrix W (n×m) with iid entries of variance s² has, with N = max(n, m),
p = min(n, m) and aspect ratio q = p / N, nonzero eigenvalues of WᵀW that follow the Marchenko–Pastur
law MP(q, σ²) with σ² = N s²: support ``σ²(1 ± √q)²`` and mean σ². Functions also take q > 1: the law
of the nonzero eigenvalues of XᵀX/N for X of N×p with p = qN (support σ²(1 ± √q)², mean qσ²), so any
aspect ratio works.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

# ----------------------------------------------------------------------------- Marchenko–Pastur


def mp_edges(q: float, sigma2: float = 1.0) -> tuple[float, float]:
    """Support [λ₋, λ₊] = σ²(1 ∓ √q)² of MP(q, σ²) (nonzero part)."""
    if q <= 0:
        raise ValueError(f"aspect ratio q must be > 0, got {q}")
    return sigma2 * (1 - math.sqrt(q)) ** 2, sigma2 * (1 + math.sqrt(q)) ** 2


def mp_density(x, q: float, sigma2: float = 1.0) -> np.ndarray:
    """Density √((λ₊−x)(x−λ₋)) / (2π σ² min(q, 1) x) of MP(q, σ²), zero outside the support."""
    x = np.asarray(x, dtype=np.float64)
    a, b = mp_edges(q, sigma2)
    inside = (x > a) & (x < b) & (x > 0)
    xs = np.where(inside, x, 1.0)
    dens = np.sqrt(np.clip((b - xs) * (xs - a), 0, None)) / (2 * math.pi * sigma2 * min(q, 1.0) * xs)
    return np.where(inside, dens, 0.0)


def mp_cdf(x, q: float, sigma2: float = 1.0) -> np.ndarray:
    """CDF of MP(q, σ²) in closed form.

    With c = 1+q, h = 2√q and x = σ²(c − h cos θ):
    F = [cθ + h sin θ − 2|1−q| arctan(√(λ₊/λ₋) tan(θ/2))] / (2π min(q, 1)).
    """
    x = np.asarray(x, dtype=np.float64) / sigma2
    a, b = mp_edges(q)
    c, h = 1 + q, 2 * math.sqrt(q)
    theta = np.arccos(np.clip((c - np.clip(x, a, b)) / h, -1.0, 1.0))
    if abs(1 - q) < 1e-15:
        last = 0.0
    else:
        with np.errstate(over="ignore"):
            last = 2 * abs(1 - q) * np.arctan(math.sqrt(b / a) * np.tan(theta / 2))
    F = (c * theta + h * np.sin(theta) - last) / (2 * math.pi * min(q, 1.0))
    return np.clip(np.where(x >= b, 1.0, np.where(x <= a, 0.0, F)), 0.0, 1.0)


def mp_quantile(prob, q: float, sigma2: float = 1.0) -> np.ndarray:
    """Inverse CDF of MP(q, σ²), by bisection on the closed-form CDF (to float64 precision)."""
    prob = np.asarray(prob, dtype=np.float64)
    if np.any((prob < 0) | (prob > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    a, b = mp_edges(q)
    lo, hi = np.full(prob.shape, a), np.full(prob.shape, b)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        below = mp_cdf(mid, q) < prob
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return sigma2 * 0.5 * (lo + hi)


@lru_cache(maxsize=4096)
def mp_median(q: float) -> float:
    """Median of MP(q, 1); median matching fits σ² = median(λ) / mp_median(q)."""
    return float(mp_quantile(0.5, q))


# ----------------------------------------------------------------------------- Tracy–Widom

TW1_MEAN, TW1_SD = -1.2065335745820, math.sqrt(1.6077810345810)  # GOE Tracy–Widom (Bornemann 2010, table 4)


def tracy_widom1_cdf(s: float, nodes: int = 80) -> float:
    """GOE Tracy–Widom CDF F₁(s) = det(I − K_s) on L²(0, ∞), K_s(x, y) = Ai(x + y + s).

    Ferrari & Spohn (2005) determinant, evaluated by Gauss–Legendre quadrature (Bornemann 2010).
    The Airy function is torch's (scipy.special would add half a second to a command's start).
    """
    if s > 12:
        return 1.0
    if s < -14:
        return 0.0
    length = 14.0 + max(0.0, -s)  # Ai(t) < 1e-30 for t > 12: the kernel is negligible past this
    t, w = np.polynomial.legendre.leggauss(nodes)
    x = 0.5 * length * (t + 1)
    w = 0.5 * length * w
    sw = np.sqrt(w)
    K = torch.special.airy_ai(torch.from_numpy(x[:, None] + x[None, :] + s)).numpy()
    return float(np.clip(np.linalg.det(np.eye(nodes) - sw[:, None] * K * sw[None, :]), 0.0, 1.0))


@lru_cache(maxsize=256)
def tracy_widom1_quantile(prob: float) -> float:
    """s with F₁(s) = prob (e.g. 0.95 → 0.9793, 0.99 → 2.0234), by the Illinois method (root to 1e-12).

    F₁ is as accurate as torch's Airy function: from s = −2 up (every quantile above 0.27, so every bulk
    edge) it equals the same determinant with scipy's Ai to float precision; below, torch's Ai is off by up
    to 3e-6 near −2.1, and F₁ by 3e-6 relative at s = −3, 5e-5 at −4 and 1.7 % (of 2.7e-6) at −6."""
    if not 0 < prob < 1:
        raise ValueError(f"probability must lie in (0, 1), got {prob}")
    lo, hi = -10.0, 10.0  # F₁(−10) < 1e-30 and 1 − F₁(10) < 1e-13
    f_lo, f_hi = -prob, 1.0 - prob
    side = 0
    while hi - lo > 1e-12:
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo)  # regula falsi, halving the stale end's value (Illinois)
        f_mid = tracy_widom1_cdf(mid) - prob
        if f_mid == 0:
            return mid
        if f_mid < 0:
            lo, f_lo = mid, f_mid
            f_hi, side = (f_hi / 2, side) if side == -1 else (f_hi, -1)
        else:
            hi, f_hi = mid, f_mid
            f_lo, side = (f_lo / 2, side) if side == 1 else (f_lo, 1)
        if abs(f_mid) < 1e-13:  # the quadrature's own accuracy; s within ~1e-11
            return mid
    return 0.5 * (lo + hi)


def johnstone_center_scale(n: int, p: int) -> tuple[float, float]:
    """Johnstone (2001): λ_max(XᵀX) ≈ μ + σ·TW₁ for X (n×p) iid N(0, 1).

    μ = (√(n−1) + √p)², σ = (√(n−1) + √p)(1/√(n−1) + 1/√p)^(1/3), with n ≥ p (the larger side).
    """
    n, p = max(n, p), min(n, p)
    n1 = max(n - 1, 1)  # guard: a 1×1 matrix has no n − 1
    root = math.sqrt(n1) + math.sqrt(p)
    return root**2, root * (1 / math.sqrt(n1) + 1 / math.sqrt(p)) ** (1 / 3)


def mp_tracy_widom_edge(n: int, m: int, fpr: float) -> float:
    """Bulk edge of MP(q, 1) for an n×m noise matrix at false-positive rate fpr: (μ + σ s₁₋fpr) / N."""
    mu, sigma = johnstone_center_scale(n, m)
    return (mu + sigma * tracy_widom1_quantile(1 - fpr)) / max(n, m)


# ----------------------------------------------------------------------------- BBP


def bbp_threshold(q: float) -> float:
    """Signal strength θ above which a rank-one spike separates from MP(q, 1): θ_c = q^(1/4).

    Benaych-Georges & Nadakuditi (2012), for W = θ u vᵀ + X, X with MP(q, 1) spectrum, q ≤ 1.
    """
    return min(q, 1 / q) ** 0.25


def bbp_outlier(theta, q: float, sigma2: float = 1.0):
    """Eigenvalue an above-threshold spike θ produces: σ²(1 + θ²)(q + θ²)/θ² (the bulk edge below θ_c).

    θ is the spike's singular value in units of the noise scale √σ² (W = √σ²·(θ u vᵀ + X))."""
    q = min(q, 1 / q)
    theta = np.asarray(theta, dtype=np.float64)
    above = theta > bbp_threshold(q)
    th = np.where(above, theta, 1.0)
    loc = sigma2 * (1 + th**2) * (q + th**2) / th**2
    return np.where(above, loc, mp_edges(q, sigma2)[1])
