"""Rank and shape metrics of a spectrum λ (eigenvalues of B Bᵀ, descending), batched on the last axis.

Each metric is a closed form; a zero spectrum (the zero matrix) has every rank metric equal to 0.
Lower rank metrics = more collapse.
"""

from __future__ import annotations

import math

import torch


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, and 0 where b == 0 (an empty or zero spectrum has no rank)."""
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def stable_rank(lam: torch.Tensor) -> torch.Tensor:
    """Σλ / λ_max = ‖B‖_F² / ‖B‖₂² (Rudelson & Vershynin 2007). Lower = more collapse."""
    return _safe_div(lam.sum(-1), lam.amax(-1))


def participation_ratio(lam: torch.Tensor) -> torch.Tensor:
    """(Σλ)² / Σλ²: the number of eigenvalues that carry the energy. Lower = more collapse."""
    return _safe_div(lam.sum(-1).square(), lam.square().sum(-1))


def _entropy(weights: torch.Tensor) -> torch.Tensor:
    """−Σ p log p with p = w / Σw (0 log 0 = 0)."""
    p = _safe_div(weights, weights.sum(-1, keepdim=True))
    return -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)).sum(-1)


def spectral_entropy(lam: torch.Tensor) -> torch.Tensor:
    """−Σ p log p with p = λ/Σλ; exp() of it is the Shannon rank. Lower = more collapse."""
    return _entropy(lam)


def effective_rank(lam: torch.Tensor) -> torch.Tensor:
    """exp(−Σ p log p) with p = σ/Σσ over singular values σ = √λ (Roy & Vetterli 2007); 0 for B = 0."""
    sigma = lam.clamp_min(0).sqrt()
    return torch.where(sigma.sum(-1) > 0, torch.exp(_entropy(sigma)), torch.zeros_like(sigma[..., 0]))


def top_energy(lam: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Σ_{i ≤ k} λ_(i) / Σλ: the share of ‖B‖_F² in the k largest eigenvalues, k = ⌈r/10⌉ by default (r = the
    spectrum's length, the structural rank). Higher = energy more concentrated; 0 for B = 0."""
    r = lam.shape[-1]
    k = min(math.ceil(r / 10) if k is None else int(k), r)
    return _safe_div(torch.topk(lam, k, dim=-1).values.sum(-1), lam.sum(-1))


def outlier_count(lam: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """Number of eigenvalues strictly above the bulk edge."""
    return (lam > edge[..., None]).sum(-1)


def outlier_energy(lam: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """Σ_{λ > edge} λ / Σλ: the share of ‖B‖_F² in the spikes. Higher = more structure outside the bulk."""
    return _safe_div(torch.where(lam > edge[..., None], lam, torch.zeros_like(lam)).sum(-1), lam.sum(-1))


def spike_strength(lam: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """λ_max / bulk edge, the "MP gap": > 1 when the top eigenvalue is an outlier; 0 for B = 0."""
    top = lam.amax(-1)
    return torch.where(top > 0, top / edge, torch.zeros_like(top))


def mp_soft_rank(lam: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """bulk edge / λ_max (Martin & Mahoney 2021), in [0, ∞); lower = spikier. 0 for B = 0."""
    return _safe_div(edge, lam.amax(-1))
