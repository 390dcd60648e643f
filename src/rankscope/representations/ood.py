"""Out-of-distribution scores from features: NECO (Ammar et al. 2024) and (relative) Mahalanobis (Lee et al. 2018;
Ren et al. 2021) with Ledoit–Wolf shrinkage. Fit on training features, score test features.
"""

from __future__ import annotations

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.representations import _input
from rankscope.representations.collapse import class_moments


def neco(H_train, H_test, dim: int, logits=None) -> torch.Tensor:
    """NECO score (N_test,) = ‖P_d z‖ / ‖z‖ (Ammar et al. 2024), higher = more in-distribution.

    z = features standardised with the training mean and std (as in the authors' code), P_d the projection on the
    first `dim` principal axes of the standardised training features. With `logits` (N_test, C) the score is
    multiplied by the max logit, the variant the paper uses for ViTs.
    """
    A = _input.features(H_train, "H_train", min_rows=2)
    B = _input.features(H_test, "H_test")
    _input.same_width(A, B, "H_train", "H_test")
    if not 1 <= dim <= A.shape[1]:
        raise InputError(f"dim: must lie in [1, {A.shape[1]}] (the feature dimension), got {dim}")
    mean, std = A.mean(0), A.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant features: leave unscaled
    Za, Zb = (A - mean) / std, (B - mean) / std  # (N, D)
    V = torch.linalg.svd(Za, full_matrices=False).Vh[:dim]  # (dim, D) principal axes
    norms = Zb.norm(dim=1)
    if (norms == 0).any():
        raise InputError("H_test: a test feature equals the training mean; its NECO ratio is 0/0")
    score = (Zb @ V.T).norm(dim=1) / norms
    if logits is not None:
        L = _input.features(logits, "logits")
        if L.shape[0] != B.shape[0]:
            raise InputError(f"logits: {L.shape[0]} rows but H_test has {B.shape[0]}")
        score = score * L.amax(1)
    return score


def mahalanobis(H_train, y_train, H_test, relative: bool = False) -> torch.Tensor:
    """Mahalanobis OOD score (N_test,): min_c (h − μ_c)ᵀ Σ⁻¹ (h − μ_c), Σ the shared within-class covariance fitted
    by Ledoit–Wolf (sklearn) on class-centred training features (Lee et al. 2018). Higher = more out-of-distribution.

    relative=True gives the relative Mahalanobis distance (Ren et al. 2021): min_c [MD_c(h) − MD_0(h)], MD_0 the
    distance to one Gaussian (mean and Ledoit–Wolf covariance) fitted to all training features.
    """
    from sklearn.covariance import LedoitWolf

    A = _input.features(H_train, "H_train", min_rows=2)
    B = _input.features(H_test, "H_test")
    _input.same_width(A, B, "H_train", "H_test")
    m = class_moments(A, y_train)
    y = _input.labels(y_train, A.shape[0], "y_train")
    centred = A - m.means[torch.searchsorted(m.classes, y)]  # (N, D)
    shared = LedoitWolf(assume_centered=True).fit(centred.numpy())
    P = torch.from_numpy(np.asarray(shared.precision_, dtype=np.float64))  # (D, D)
    md = _min_distance(B, m.means, P)
    if not relative:
        return md[0]
    background = LedoitWolf().fit(A.numpy())
    P0 = torch.from_numpy(np.asarray(background.precision_, dtype=np.float64))
    mu0 = torch.from_numpy(np.asarray(background.location_, dtype=np.float64))
    d0 = _quad(B - mu0, P0)  # (N_test,)
    return (md[1] - d0[:, None]).amin(1)


def _quad(X: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Row-wise xᵀ P x for X (N, D)."""
    return ((X @ P) * X).sum(1)


def _min_distance(B: torch.Tensor, means: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min over classes, all) squared Mahalanobis distances of rows of B (N, D) to class means (C, D) under P."""
    BP, MP = B @ P, means @ P  # (N, D), (C, D)
    d = _quad(B, P)[:, None] - 2 * BP @ means.T + (MP * means).sum(1)[None, :]  # (N, C)
    return d.amin(1), d
