"""Exact samplers of null spectra: what a form's eigenvalues are when its factors are independent Gaussians.

All three are exact in distribution at any finite size, and cheap:

- ``wishart_t`` / ``wishart_spectra``: t = λ_max / median(λ), or the whole spectrum, of a single Gaussian n×m
  matrix, from the Dumitriu–Edelman (2002) bidiagonal model: O(p) per eigenvalue.
- ``two_factor_spectra``: the spectrum of A G for Gaussian A (n×k), G (k×m): only the law of A's singular
  values matters (σ(A G) = σ(S VᵀG), and VᵀG is Gaussian again), so A becomes the bidiagonal model and G a
  Bartlett triangle.
- ``simulate_spectra``: any structure (chains, sums, shared outer chains, block-norm ratios). A Gaussian G
  (N×k, N ≥ k) on the outside of a form enters its spectrum only through the R of its QR, which has Bartlett's
  law (R_ii ~ χ_{N−i}, R_ij ~ N(0, 1) above the diagonal), so tall outer factors are drawn as k×k triangles.

Everything is numpy except the final eigensolve: alternating with scipy's LAPACK (a second OpenBLAS with its
own thread pool) made small draws many times slower (benchmarks/spectra.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from rankscope.spectra.form import Structure
from rankscope.spectra.kernels import clamp_numerical_zeros, squared_singular_values


def gaussian(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    """Standard Gaussian entries, float64."""
    return torch.from_numpy(rng.standard_normal(shape))


def bartlett(k: int, dof: int, draws: int, rng: np.random.Generator) -> torch.Tensor:
    """R of the QR of a dof×k standard Gaussian (dof ≥ k): (draws, k, k), R_ii ~ χ_{dof−i}, N(0, 1) above."""
    upper = gaussian(rng, draws, k, k).triu(1)
    diag = np.sqrt(rng.chisquare(np.arange(dof, dof - k, -1), size=(draws, k)))
    return upper + torch.diag_embed(torch.from_numpy(diag))


def outer_factor(n: int, k: int, draws: int, rng: np.random.Generator) -> torch.Tensor:
    """An n×k Gaussian on the outside of a form, as its Bartlett R when tall: (draws, min(n, k)·, k)."""
    return bartlett(k, n, draws, rng) if n >= k else gaussian(rng, draws, n, k)


def wishart_bidiagonal(N: int, p: int, draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dumitriu & Edelman (2002): the lower bidiagonal B with diagonal χ_N, χ_{N−1}, …, χ_{N−p+1} and
    subdiagonal χ_{p−1}, …, χ_1 has the singular values of a Gaussian N×p matrix (B Bᵀ: a real Wishart).
    Returns its diagonal (draws, p) and subdiagonal (draws, p − 1)."""
    a = np.sqrt(rng.chisquare(np.arange(N, N - p, -1), size=(draws, p)))
    b = np.sqrt(rng.chisquare(np.arange(p - 1, 0, -1), size=(draws, p - 1)))
    return a, b


def wishart_t(n: int, m: int, draws: int, seed: int) -> np.ndarray:
    """t = λ_max / median(λ) of WᵀW for Gaussian W (n×m), sorted ascending, exact at any size.

    The eigenvalues of B Bᵀ (``wishart_bidiagonal``, a tridiagonal matrix): the top and middle ones come from
    LAPACK's bisection (dstebz) to 1e-9 relative.
    """
    from scipy.linalg import lapack

    N, p = max(n, m), min(n, m)
    if p == 1:  # one eigenvalue is its own median
        return np.ones(draws)
    a, b = wishart_bidiagonal(N, p, draws, np.random.default_rng(seed))
    diag = a**2 + np.pad(b**2, ((0, 0), (1, 0)))  # (draws, p) of B Bᵀ
    off = a[:, :-1] * b  # (draws, p − 1)
    tol = 1e-9 * (math.sqrt(N) + math.sqrt(p)) ** 2  # absolute, against λ_max ≈ (√N + √p)²
    lo, hi = (p - 1) // 2 + 1, p // 2 + 1  # 1-based ascending indices of the middle one or two
    t = np.empty(draws)
    for i in range(draws):
        _, top, _, _, info_top = lapack.dstebz(diag[i], off[i], 3, 0.0, 0.0, p, p, tol, b"E")
        count, mid, _, _, info_mid = lapack.dstebz(diag[i], off[i], 3, 0.0, 0.0, lo, hi, tol, b"E")
        if info_top or info_mid:
            raise RuntimeError(f"LAPACK dstebz failed (info {info_top or info_mid}) simulating a {N}×{p} null")
        t[i] = top[0] / mid[:count].mean()
    return np.sort(t)


def wishart_spectra(n: int, m: int, draws: int, seed: int) -> torch.Tensor:
    """Eigenvalues (draws, p), descending, of WᵀW for Gaussian W (n×m), p = min(n, m): the whole spectrum of the
    Dumitriu–Edelman model, by LAPACK's tridiagonal eigensolver (O(p²) a draw)."""
    from scipy.linalg import eigvalsh_tridiagonal

    N, p = max(n, m), min(n, m)
    a, b = wishart_bidiagonal(N, p, draws, np.random.default_rng(seed))
    diag = a**2 + np.pad(b**2, ((0, 0), (1, 0)))  # (draws, p) of B Bᵀ
    off = a[:, :-1] * b  # (draws, p − 1)
    if p == 1:
        return torch.from_numpy(diag.copy())
    lam = np.empty((draws, p))
    for i in range(draws):
        lam[i] = eigvalsh_tridiagonal(diag[i], off[i], lapack_driver="stev")[::-1]
    return clamp_numerical_zeros(torch.from_numpy(lam).clamp_min(0))


def two_factor_spectra(n: int, k: int, m: int, draws: int, seed: int) -> torch.Tensor:
    """Squared singular values (draws, r), descending, of A G for Gaussian A (n×k) and G (k×m), exact in law.

    With A = U S Vᵀ, σ(A G) = σ(S · VᵀG), and VᵀG is Gaussian again, independent of S: A can be replaced by
    the p×p Dumitriu–Edelman bidiagonal B (p = min(n, k)) and G by a p×m Gaussian. When p ≤ m, G enters only
    through the Bartlett R of its transpose's QR (G Gᵀ = Rᵀ R), so the spectrum is that of U Uᵀ with
    U = R Bᵀ upper triangular, O(p²) to form.
    """
    rng = np.random.default_rng(seed)
    p, r = min(n, k), min(n, k, m)
    a, b = wishart_bidiagonal(max(n, k), p, draws, rng)  # (draws, p), (draws, p − 1)
    # small p: batches of draws, so numpy's per-call overhead is shared; large p: one draw at a time
    chunk = 1 if p > 64 else max(1, 2**22 // (p * max(p, m)))
    lam = np.empty((draws, r))
    for lo in range(0, draws, chunk):
        a_, b_ = a[lo : lo + chunk, None, :], b[lo : lo + chunk, None, :]  # (c, 1, p), (c, 1, p − 1)
        c = a_.shape[0]
        if p <= m:
            R = np.triu(rng.standard_normal((c, p, p)), 1)  # (c, p, p) Bartlett: N(0, 1) above the diagonal
            R[:, np.arange(p), np.arange(p)] = np.sqrt(rng.chisquare(np.arange(m, m - p, -1), size=(c, p)))
            U = R * a_  # (c, p, p) = R Bᵀ: column j is a_j R[:, j] + b_{j−1} R[:, j−1]
            U[..., 1:] += R[..., :-1] * b_
            lam[lo : lo + c] = np.linalg.eigvalsh(U @ U.swapaxes(-1, -2))[:, ::-1]  # (c, p)
        else:
            G = rng.standard_normal((c, p, m))
            X = G * a_.swapaxes(-1, -2)  # (c, p, m) = B G: row j is a_j G[j] + b_{j−1} G[j−1]
            X[:, 1:] += G[:, :-1] * b_.swapaxes(-1, -2)
            lam[lo : lo + c] = np.linalg.eigvalsh(X.swapaxes(-1, -2) @ X)[:, ::-1]  # (c, m)
    return clamp_numerical_zeros(torch.from_numpy(lam).clamp_min(0))


def _product(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = out @ f
    return out


def _shared_chain(dims: Sequence[int], side: str, draws: int, rng: np.random.Generator) -> torch.Tensor:
    """A shared outer chain of Gaussians, its outermost factor reduced to a Bartlett triangle when possible."""
    pairs = list(itertools.pairwise(dims))
    if side == "left":
        first = outer_factor(*pairs[0], draws, rng)  # (draws, ·, k1)
        return _product([first, *(gaussian(rng, draws, a, b) for a, b in pairs[1:])])
    last = outer_factor(pairs[-1][1], pairs[-1][0], draws, rng).mT  # (draws, k_last, ·)
    return _product([*(gaussian(rng, draws, a, b) for a, b in pairs[:-1]), last])


def reduced_chain(dims: Sequence[int], first_fixed: bool, last_fixed: bool) -> list[tuple[str, int, int, int]]:
    """A chain of independent Gaussians (dims (d0, …, dL)) as factors of the same law in distribution, each
    ("gauss", rows, cols, 0), ("lower", k, k, dof) or ("upper", k, k, dof), with no inner width above its
    neighbours'.

    A Gaussian G (a×k) with k > a before a Gaussian H (k×b): G = L Q (L the transposed Bartlett R of Gᵀ, Q a×k with
    orthonormal rows, independent of L), and Q H is an a×b Gaussian independent of L, so G H has the law of L H'
    with H' a×b (the left sweep). Likewise H (k×b) with k > b after a Gaussian G: H = Q R and G Q is Gaussian (the
    right sweep). The block's matrix keeps its law exactly, so its spectrum and its Frobenius norm do. A fixed end
    (a slice of the outer factor stacked over the blocks) is never replaced, but its inner width may shrink: the
    blocks' reduced outer factors are still independent Gaussians, stacked and then drawn as one Bartlett triangle.
    """
    f = [["gauss", a, b, 0] for a, b in itertools.pairwise(dims)]
    for i in range(1 if first_fixed else 0, len(f) - 1):  # left sweep
        if f[i][0] == "gauss" and f[i + 1][0] == "gauss" and f[i][2] > f[i][1]:
            a, k = f[i][1], f[i][2]
            f[i] = ["lower", a, a, k]
            f[i + 1][1] = a
    for i in range(len(f) - 1 - (1 if last_fixed else 0), 0, -1):  # right sweep
        if f[i][0] == "gauss" and f[i - 1][0] == "gauss" and f[i][1] > f[i][2]:
            k, b = f[i][1], f[i][2]
            f[i] = ["upper", b, b, k]
            f[i - 1][2] = b
    return [tuple(x) for x in f]


def _draw(kind: str, a: int, b: int, dof: int, draws: int, rng: np.random.Generator) -> torch.Tensor:
    if kind == "gauss":
        return gaussian(rng, draws, a, b)
    R = bartlett(a, dof, draws, rng)  # (draws, a, a) upper
    return R if kind == "upper" else R.mT


def simulate_spectra(structure, ratios: Sequence[float], draws: int, seed: int) -> torch.Tensor:
    """Spectra (draws, r) of random forms of this structure: every factor an independent standard Gaussian of
    its shape (a shared outer chain drawn once per draw for all blocks), block c scaled to Frobenius norm
    ``ratios[c]``. Inner widths wider than their neighbours are drawn reduced (``reduced_chain``): exact in law."""
    s = Structure.of(structure)
    rng = np.random.default_rng(seed)
    plain = any(len(d) == 2 for d in s.chains)  # a plain matrix inside a sum: simulate every block whole
    fix_left, fix_right = not (plain or s.left), not (plain or s.right)  # a stacked outer factor on that side
    recipes = [reduced_chain(d, fix_left, fix_right) if len(d) > 2 else [("gauss", *d, 0)] for d in s.chains]
    # The blocks' own outermost factors, stacked side by side (one Gaussian), when nothing is shared there.
    left_side = outer_factor(s.n, sum(r[0][2] for r in recipes), draws, rng) if fix_left else None
    right_side = outer_factor(s.m, sum(r[-1][1] for r in recipes), draws, rng) if fix_right else None
    left = _shared_chain(s.left, "left", draws, rng) if s.left else None  # (draws, ·, p)
    right = _shared_chain(s.right, "right", draws, rng) if s.right else None  # (draws, q, ·)
    core, col_l, col_r = 0, 0, 0
    for d, recipe, ratio in zip(s.chains, recipes, ratios, strict=True):
        if len(d) == 2:
            factors = [gaussian(rng, draws, *d)]
        else:
            if left_side is not None:
                first = left_side[..., col_l : col_l + recipe[0][2]]  # (draws, ·, k1)
                col_l += recipe[0][2]
            else:
                first = _draw(*recipe[0], draws, rng)
            mids = [_draw(*x, draws, rng) for x in recipe[1:-1]]
            if right_side is not None:
                last = right_side[..., col_r : col_r + recipe[-1][1]].mT  # (draws, k_last, ·)
                col_r += recipe[-1][1]
            else:
                last = _draw(*recipe[-1], draws, rng)
            factors = [first, *mids, last]
        block = _product(([left] if left is not None else []) + factors + ([right] if right is not None else []))
        norm = block.square().sum(dim=(-2, -1), keepdim=True).sqrt()
        core = core + block * (ratio / norm)
    return clamp_numerical_zeros(squared_singular_values(core)[..., : s.rank_bound])
