"""The analytic bulk edge of a two-factor chain: the free product of two Marchenko–Pastur laws.

A form B = X Y with X (n×k), Y (k×m) iid Gaussian has the nonzero eigenvalues of B Bᵀ / (n m) in common with
the k×k matrix P = (XᵀX / n)(Y Yᵀ / m), a product of two asymptotically free Wishart matrices of ratios
c₁ = k/n, c₂ = k/m. Its limiting law is MP(c₁) ⊠ MP(c₂) (Müller 2002; Burda, Jarosz, Livan, Nowak & Swiech 2010),
with S-transform S(w) = 1 / ((1 + c₁w)(1 + c₂w)). With ψ(z) = z G(z) − 1 (G the Stieltjes transform) the
inverse function is

    z(ψ) = f(ψ) / ψ = 1/ψ + a + bψ + cψ²,  f(ψ) = (1 + ψ)(1 + c₁ψ)(1 + c₂ψ),
    a = 1 + c₁ + c₂,  b = c₁ + c₂ + c₁c₂,  c = c₁c₂.

- Upper edge: z′(ψ) = 0, i.e. the cubic 2cψ³ + bψ² − 1 = 0, whose one positive root ψ₊ gives λ₊ = z(ψ₊)
  (square factors: ψ₊ = 1/2, λ₊ = 27/4, the Fuss–Catalan edge; k → ∞: λ₊/c₁ → (1 + √(n/m))², MP).
- The law along its support: with ψ = ρ e^{iθ}, z is real where 2c cos θ ρ³ + bρ² − 1 = 0 (the same cubic at
  θ = 0), so θ ∈ (0, π) sweeps the support from λ₊ down, and the density is Im ψ / (π z). Its mass above z(θ)
  is in closed form, M(θ) = [Σᵢ arg(1 + cᵢψ)/cᵢ − 2 Im ψ] / π over c₀ = 1, c₁, c₂ (the antiderivative of
  Im ψ d(log z) along the path), and the nonzero eigenvalues hold w = min(1, 1/c₁, 1/c₂) of it (the rest is
  the atom at 0). The median of the nonzero part solves M(θ) = w/2, by bisection in θ.
- Edge scale: near λ₊ the density is (C/π)√(λ₊ − z) with C = √(2 / z″(ψ₊)) / λ₊, so λ_max ≈ λ₊ + (C k)^{-2/3}
  TW₁ (GOE Tracy–Widom, real factors; for one factor this is Johnstone's 2001 scale; Liu, Wang & Zhang 2016
  for products).

``edge_ratio`` is the (1 − fpr) quantile of t = λ_max / median(λ) over the r = min(n, k, m) nonzero
eigenvalues: (λ₊ + σ(α + β·q_TW(1 − fpr))) / median. The finite-size location α and spread β (both → 0 and 1 as
r → ∞) are fitted once, by matching the mean and standard deviation of simulated t, on a grid of aspect-ratio
cells and ranks, and fitted per cell to the first two terms of their expansion in x = r^{-1/3}: α = a₁x + a₂x²,
β = 1 + b₁x + b₂x² (``benchmarks/calibrate_product_edge.py``, shipped in ``data/product_edge.json``); the
coefficients are interpolated bilinearly in (log₂ k/n, log₂ m/n) with n ≥ m. Outside the grid, or below its
smallest rank (``budget.FIT_MIN_RANK``), ``covers`` is false and the null is simulated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from rankscope.errors import InputError
from rankscope.spectra.laws import TW1_MEAN, TW1_SD, tracy_widom1_quantile

DATA = Path(__file__).with_name("data") / "product_edge.json"
BISECTIONS = 80  # halvings of a bracket: float64 resolution


@dataclass(frozen=True)
class ProductLaw:
    """The limiting law of P = (XᵀX/n)(YYᵀ/m) (k×k) for a two-factor chain (n, k, m)."""

    upper: float  # λ₊, the upper edge of the support
    median: float  # the median of the nonzero part
    tw_scale: float  # σ = (C k)^{-2/3}: λ_max ≈ λ₊ + σ TW₁
    nonzero: float  # w = min(n, k, m) / k, the mass of the nonzero part


def _coefficients(n: int, k: int, m: int) -> tuple[tuple[float, float, float], float, float, float]:
    c1, c2 = k / n, k / m
    return (1.0, c1, c2), 1 + c1 + c2, c1 + c2 + c1 * c2, c1 * c2


def _radius(theta: np.ndarray, b: float, c: float) -> np.ndarray:
    """The root ρ of 2c cos θ ρ³ + bρ² − 1 = 0 on the branch through θ = 0: the only positive one for cos θ ≥ 0
    (below 1/√b), else the smaller, below the cubic's maximum at ρ = b / (3c|cos θ|) (it exists: b³ ≥ 27c², AM–GM)
    and below 2/√b (there bρ² − 1 ≥ ¾bρ², so a root would lie past that maximum)."""
    cos = np.cos(theta)
    lo = np.zeros_like(theta)
    hi = np.where(cos >= 0, 1 / math.sqrt(b), np.minimum(2 / math.sqrt(b), b / (3 * c * np.maximum(-cos, 1e-300))))
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        below = (2 * c * cos * mid + b) * mid**2 < 1
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _along_support(theta: np.ndarray, n: int, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(z(θ), M(θ)): the point of the support at angle θ of ψ, and the law's mass above it."""
    cs, a, b, c = _coefficients(n, k, m)
    psi = _radius(theta, b, c) * np.exp(1j * theta)
    z = (1 / psi + a + b * psi + c * psi**2).real
    mass = (sum(np.angle(1 + ci * psi) / ci for ci in cs) - 2 * psi.imag) / math.pi
    return z, mass


def _check(n: int, k: int, m: int) -> tuple[int, int, int]:
    dims = tuple(int(x) for x in (n, k, m))
    if any(x < 1 for x in dims):
        raise InputError(f"a two-factor chain's dims (n, k, m) must be positive; got {dims}")
    return dims


def quantile(prob, n: int, k: int, m: int) -> np.ndarray:
    """Quantiles of the nonzero part of the limiting law of P: z(θ) with M(θ) = w(1 − prob), by bisection."""
    n, k, m = _check(n, k, m)
    prob = np.asarray(prob, dtype=np.float64)
    if np.any((prob <= 0) | (prob >= 1)):
        raise InputError(f"quantile probabilities must lie in (0, 1); got {prob}")
    w = min(n, k, m) / k
    lo, hi = np.zeros(prob.shape), np.full(prob.shape, math.pi)
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        below = _along_support(mid, n, k, m)[1] < w * (1 - prob)
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return _along_support(0.5 * (lo + hi), n, k, m)[0]


@lru_cache(maxsize=1024)
def product_law(n: int, k: int, m: int) -> ProductLaw:
    """λ₊, the median, the Tracy–Widom scale and the nonzero mass of MP(k/n) ⊠ MP(k/m) (module docstring)."""
    n, k, m = _check(n, k, m)
    _, a, b, c = _coefficients(n, k, m)
    psi = float(_radius(np.zeros(1), b, c)[0])  # the positive root of 2cψ³ + bψ² − 1
    upper = 1 / psi + a + b * psi + c * psi**2
    curvature = 2 / psi**3 + 2 * c  # z″(ψ₊)
    C = math.sqrt(2 / curvature) / upper  # density ≈ (C/π)√(λ₊ − z)
    return ProductLaw(upper=upper, median=float(quantile(0.5, n, k, m)), tw_scale=(C * k) ** (-2 / 3),
                      nonzero=min(n, k, m) / k)


# ----------------------------------------------------------------------------- the calibrated finite-size part


def cell(n: int, k: int, m: int) -> tuple[float, float, int]:
    """(u, v, r) = (log₂ k/n, log₂ m/n, min(n, k, m)) with n ≥ m (B and Bᵀ share their spectrum)."""
    n, k, m = _check(n, k, m)
    n, m = max(n, m), min(n, m)
    return math.log2(k / n), math.log2(m / n), min(n, k, m)


@lru_cache(maxsize=1)
def calibration() -> dict:
    """The shipped finite-size corrections: grids ``u``, ``v``, ``ranks`` and coefficients ``alpha_coef``,
    ``beta_coef`` of shape (len(u), len(v), 2); {} when the file is absent (every edge is then simulated)."""
    try:
        raw = json.loads(DATA.read_text())
    except FileNotFoundError:
        return {}
    out = {name: np.asarray(raw[name], dtype=np.float64) for name in ("u", "v", "ranks", "alpha_coef", "beta_coef")}
    for a in out.values():
        a.flags.writeable = False
    return out


def covers(n: int, k: int, m: int) -> bool:
    """Whether the analytic edge holds here: (u, v) inside the calibrated grid and r at least its smallest rank
    (``budget.FIT_MIN_RANK``)."""
    cal = calibration()
    if not cal:
        return False
    u, v, r = cell(n, k, m)
    eps = 1e-9
    return (cal["u"][0] - eps <= u <= cal["u"][-1] + eps and cal["v"][0] - eps <= v <= cal["v"][-1] + eps
            and r >= cal["ranks"][0])


def _bracket(grid: np.ndarray, x: float) -> list[tuple[int, float]]:
    """Linear interpolation weights on an ascending grid, x clipped to it."""
    x = min(max(x, grid[0]), grid[-1])
    i = min(int(np.searchsorted(grid, x, side="right")) - 1, grid.size - 2)
    f = (x - grid[i]) / (grid[i + 1] - grid[i])
    return [(i, 1 - f), (i + 1, f)]


def correction(n: int, k: int, m: int) -> tuple[float, float]:
    """The finite-size (α, β) of this chain: α = a₁x + a₂x², β = 1 + b₁x + b₂x² at x = r^{-1/3}, the coefficients
    interpolated bilinearly between cells; ``InputError`` outside the calibrated grid."""
    if not covers(n, k, m):
        raise InputError(f"the two-factor chain {n}·{k}·{m} lies outside the calibrated analytic edge "
                         f"({DATA.name}): its null must be simulated")
    cal = calibration()
    u, v, r = cell(n, k, m)
    x = r ** (-1 / 3)
    powers = np.array([x, x * x])
    a, b = (sum(wu * wv * cal[name][iu, iv] for iu, wu in _bracket(cal["u"], u) for iv, wv in _bracket(cal["v"], v))
            for name in ("alpha_coef", "beta_coef"))
    return float(a @ powers), 1.0 + float(b @ powers)


def edge_ratio(n: int, k: int, m: int, fpr: float) -> float:
    """The (1 − fpr) quantile of t = λ_max / median for the two-factor chain (n, k, m):
    (λ₊ + σ(α + β·q_TW(1 − fpr))) / median, with α, β the calibrated finite-size correction."""
    law = product_law(n, k, m)
    alpha, beta = correction(n, k, m)
    return (law.upper + law.tw_scale * (alpha + beta * tracy_widom1_quantile(1 - fpr))) / law.median


def standardized(t: np.ndarray, n: int, k: int, m: int) -> np.ndarray:
    """s = (t·median − λ₊) / σ of simulated t = λ_max/median: TW₁ in the limit; ``calibrate`` fits α, β to it."""
    law = product_law(n, k, m)
    return (np.asarray(t) * law.median - law.upper) / law.tw_scale


def calibrate(s: np.ndarray) -> tuple[float, float]:
    """(α, β) with s ≈ α + β·TW₁, matched in mean and standard deviation."""
    beta = float(np.std(s, ddof=1)) / TW1_SD
    return float(np.mean(s)) - beta * TW1_MEAN, beta
