"""Dimension of a representation: spectral ranks (RankMe, LiDAR, stable rank) and intrinsic dimension from
nearest-neighbour distances (TwoNN, Levina–Bickel MLE, local LID). Lower = more (dimensional) collapse.

kNN distances are computed with torch.cdist in row chunks of (chunk, N): memory O(chunk·N), not O(N²).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankscope.errors import InputError
from rankscope.representations import _input

RANKME_EPS = 1e-7  # Garrido et al. 2023
LIDAR_DELTA = 1e-4  # Thilak et al. 2023: ridge on the within-class covariance
LIDAR_EPS = 1e-7  # Thilak et al. 2023: added to the normalised eigenvalues


def _entropy_rank(values: torch.Tensor, eps: float) -> float:
    """exp(−Σ p log p) with p_k = v_k/‖v‖₁ + ε (the RankMe / LiDAR smoothing)."""
    p = values / values.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def rankme(Z, eps: float = RANKME_EPS) -> float:
    """RankMe = exp(−Σ p_k log p_k), p_k = σ_k/‖σ‖₁ + ε, σ the singular values of the raw embeddings Z (N, D)
    (Garrido et al. 2023, ε = 1e-7; no centring). In [~1, min(N, D)]; lower = more collapse."""
    Z = _input.features(Z, "Z")
    s = torch.linalg.svdvals(Z)  # (min(N, D),)
    if float(s.sum()) == 0:
        raise InputError("Z: all embeddings are zero; RankMe is undefined")
    return _entropy_rank(s, eps)


def lidar(Z, groups, delta: float = LIDAR_DELTA, eps: float = LIDAR_EPS) -> float:
    """LiDAR (Thilak et al. 2023): smoothed entropy rank of the LDA matrix Σ_w^{-½} Σ_b Σ_w^{-½}. Lower = more collapse.

    Z (N, D) embeddings of augmented views; `groups` (N,) the source sample of each view (the surrogate classes).
    Σ_b = 1/(n−1) Σ_x (μ_x − μ)(μ_x − μ)ᵀ over the n samples; Σ_w = 1/(n·q) Σ_x Σ_j (z_xj − μ_x)(z_xj − μ_x)ᵀ + δ I
    (q views per sample, δ = 1e-4); LiDAR = exp(−Σ p log p), p_k = λ_k/‖λ‖₁ + ε (ε = 1e-7).
    """
    from rankscope.representations.collapse import class_moments

    m = class_moments(Z, groups)
    n, D = m.means.shape
    M = m.means - m.means.mean(0)  # (n, D): the grand mean of the sample means, as in the paper
    sigma_b = M.T @ M / (n - 1)  # (D, D)
    sigma_w = m.within + delta * torch.eye(D, dtype=torch.float64)  # within is (1/N) Σ over all N = n·q views
    lam_w, U = torch.linalg.eigh(sigma_w)
    inv_sqrt = (U / lam_w.sqrt()) @ U.T  # Σ_w^{-1/2}
    lam = torch.linalg.eigvalsh(inv_sqrt @ sigma_b @ inv_sqrt).clamp_min(0)
    return _entropy_rank(lam, eps)


def stable_rank(H) -> float:
    """‖H‖_F² / ‖H‖₂² of the hidden-state matrix H (N, D), uncentred (as in SR-GRPO). Lower = more collapse."""
    H = _input.features(H, "H")
    s = torch.linalg.svdvals(H)
    if float(s[0]) == 0:
        raise InputError("H: the zero matrix has no stable rank")
    return float(s.square().sum() / s[0].square())


def knn_distances(X, k: int, chunk: int = 1024) -> torch.Tensor:
    """(N, k) distances from each row of X (N, D) to its k nearest other rows, ascending; chunked cdist."""
    X = _input.features(X, "X", min_rows=k + 1)
    out = []
    for i in range(0, X.shape[0], chunk):
        d = torch.cdist(X[i:i + chunk], X, compute_mode="donot_use_mm_for_euclid_dist")  # (b, N), exact
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = float("inf")  # not its own neighbour
        out.append(d.topk(k, dim=1, largest=False).values)
    return torch.cat(out)


def _no_duplicates(r: torch.Tensor, name: str = "X") -> None:
    if (r[:, 0] <= 0).any():
        raise InputError(f"{name}: {int((r[:, 0] <= 0).sum())} rows have an exact duplicate (zero nearest-neighbour "
                         "distance); deduplicate the data first")


def twonn(X, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017): slope through 0 of −log(1 − F(μ)) against log μ, μ = r₂/r₁,
    with the largest `discard_fraction` of μ dropped (as in the paper and scikit-dimension). Lower = more collapse."""
    r = knn_distances(X, 2)  # (N, 2)
    _no_duplicates(r)
    N = r.shape[0]
    mu = (r[:, 1] / r[:, 0]).sort().values
    keep = int(N * (1 - discard_fraction))
    if keep < 2:
        raise InputError(f"X: {N} rows leave fewer than 2 ratios after discarding {discard_fraction:.0%}")
    x = mu[:keep].log()
    y = -torch.log1p(-torch.arange(1, keep + 1, dtype=torch.float64) / N)  # empirical CDF, F_i = i/N
    return float((x * y).sum() / x.square().sum())


def mle_dimension(X, k: int = 20) -> float:
    """Levina–Bickel MLE with the MacKay–Ghahramani aggregate: d = [mean_i 1/m_k(x_i)]⁻¹,
    m_k(x) = [(1/(k−1)) Σ_{j<k} log(T_k/T_j)]⁻¹ (T_j the j-th neighbour distance). Lower = more collapse."""
    if k < 2:
        raise InputError(f"k: needs at least 2 neighbours, got {k}")
    T = knn_distances(X, k)  # (N, k)
    _no_duplicates(T)
    inv_m = torch.log(T[:, -1:] / T[:, :-1]).mean(1)  # (N,) = 1/m_k(x_i)
    return float(1.0 / inv_m.mean())


@dataclass(frozen=True)
class LID:
    """Local intrinsic dimensions and their geometric mean (the aggregate used by LDReg, Huang et al. 2024)."""

    local: torch.Tensor  # (N,)
    geometric_mean: float


def lid(X, k: int = 20) -> LID:
    """Local LID by MLE (Amsaleg et al. 2015): LID(x) = −[(1/k) Σ_{j≤k} log(r_j/r_k)]⁻¹; aggregate exp(mean log LID)
    (LDReg, Huang et al. 2024). Lower = more collapse."""
    if k < 2:
        raise InputError(f"k: needs at least 2 neighbours, got {k}")
    r = knn_distances(X, k)  # (N, k)
    _no_duplicates(r)
    local = -1.0 / torch.log(r / r[:, -1:]).mean(1)  # (N,)
    if not torch.isfinite(local).all():
        raise InputError("X: some points have all k neighbours at the same distance; their LID is infinite")
    return LID(local=local, geometric_mean=float(local.log().mean().exp()))
