"""Collapse measures for many imbalanced classes (Wu & Papyan 2024, "Linguistic Collapse"): CDNV, GNC2, UNC3.

Built for C up to a vocabulary (~50k): class statistics are O(C·D); pairwise quantities are computed in row
chunks of (chunk, C) and reduced on the fly, never as a dense C×C matrix. Conventions as in collapse.py
(μ_G = the sample mean, m_c = μ_c − μ_G).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankscope.errors import InputError, UndefinedMeasure
from rankscope.representations import _input
from rankscope.representations.collapse import (
    CHUNK,
    NC2,
    NC3,
    ClassMoments,
    ClassStats,
    _moments,
    _pair_stats,
    _unit_rows,
    nc1,
    nc2,
    nc3,
)


def cdnv(H, y=None, chunk: int = CHUNK) -> float:
    """Mean over pairs c ≠ c' of (σ_c² + σ_c'²) / (2‖μ_c − μ_c'‖²) (Galanti et al. 2022). Lower = more collapse.

    σ_c² = mean ‖h − μ_c‖² within class c. Accepts (H, y) or a ClassMoments.
    """
    m = _moments(H, y)
    mu, var = m.means, m.class_var  # (C, D), (C,)
    C = mu.shape[0]
    total = 0.0
    for i in range(0, C, chunk):
        d2 = torch.cdist(mu[i:i + chunk], mu).square()  # (b, C)
        rows = torch.arange(d2.shape[0])
        d2[rows, rows + i] = 1.0  # c == c' is left out below
        if (d2 == 0).any():
            raise UndefinedMeasure("H: two classes have identical means; their CDNV is infinite")
        block = (var[i:i + chunk, None] + var[None, :]) / (2 * d2)
        block[rows, rows + i] = 0.0
        total += float(block.sum())
    return total / (C * (C - 1))


@dataclass(frozen=True)
class GNC2:
    """Hyperspherical uniformity of the centred, normalised class means under the log inverse-distance kernel."""

    energy: float  # mean over pairs of log(1/‖u_c − u_c'‖): lower = more spread out (uniform)
    variation: float  # std over pairs of the same kernel: lower = more uniform (0 for a simplex ETF)


def gnc2(H, y=None, chunk: int = CHUNK) -> GNC2:
    """GNC2 (Liu et al. 2023; Wu & Papyan 2024): log(1/‖u_c − u_c'‖) over pairs, u_c = m_c/‖m_c‖. Lower = collapse."""
    m = _moments(H, y)
    U = _unit_rows(m.centred_means, "direction")  # (C, D)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # (b, C), exact zeros on the diagonal
        if int((d == 0).sum()) > a.shape[0]:
            raise UndefinedMeasure("H: two classes share a mean direction; the log kernel is infinite")
        return -torch.log(torch.where(d > 0, d, torch.ones_like(d)))  # the diagonal is dropped by _pair_stats

    energy, variation = _pair_stats(U, kernel, chunk)
    return GNC2(energy=energy, variation=variation)


def linguistic_collapse(features, next_tokens, top_k: int = 1000, W=None, chunk: int = CHUNK) -> dict[str, float]:
    """NC1, CDNV, NC2 equinorm/equiangularity, GNC2 (and NC3, UNC3 given the unembedding W (V, D)) of top-layer
    embeddings (N, D) classed by next-token id (N,), restricted to the `top_k` most frequent tokens.

    One streaming pass over the kept rows; memory O(top_k·D + D²). Returns a flat dict of floats. A measure that is
    undefined on these features (two kept classes with the same mean or mean direction: an infinite CDNV or GNC2
    kernel; all means equal) is NaN, with one warning naming it, and the others are still computed: a training
    run's probe batch can hit this by chance, and it must not end the run.
    """
    H = _input.features(features, "features")
    y = _input.labels(next_tokens, H.shape[0], "next_tokens", min_classes=2)
    if top_k < 2:
        raise InputError(f"top_k: needs at least 2 classes, got {top_k}")
    values, counts = torch.unique(y, return_counts=True)
    top = values[torch.argsort(counts, descending=True, stable=True)[:top_k]]  # token ids kept
    keep = torch.isin(y, top)
    sorted_top, order = top.sort()
    acc = ClassStats()
    acc.update(H[keep], order[torch.searchsorted(sorted_top, y[keep])])  # classes 0..k−1 by frequency rank
    m0 = acc.compute()
    m = ClassMoments(top[m0.classes], m0.counts, m0.means, m0.global_mean, m0.within, m0.class_var)
    nan = float("nan")
    parts = _defined("nc2", lambda: nc2(m), lambda: NC2(nan, nan, nan, nan))
    g = _defined("gnc2", lambda: gnc2(m, chunk=chunk), lambda: GNC2(nan, nan))
    out = {"classes": float(m.classes.numel()), "samples": float(m.counts.sum()),
           "nc1": _defined("nc1", lambda: nc1(m), lambda: nan),
           "cdnv_mean": _defined("cdnv", lambda: cdnv(m, chunk=chunk), lambda: nan), "nc2_equinorm": parts.equinorm,
           "nc2_equiangularity": parts.equiangularity, "gnc2_energy": g.energy, "gnc2_variation": g.variation}
    if W is not None:
        d = _defined("nc3", lambda: nc3(m, W=W), lambda: NC3(nan, nan, nan))
        out.update({"nc3": d.distance, "nc3_mean_cosine": d.mean_cosine, "unc3": d.unc3})
    return out


def _defined(name: str, compute, undefined):
    """``compute()``, or ``undefined()`` with a warning when the measure is undefined on these features."""
    try:
        return compute()
    except UndefinedMeasure as exc:  # a bad input (a W of the wrong shape, …) still raises
        import warnings

        warnings.warn(f"linguistic_collapse: {name} is undefined here, recorded as NaN ({exc})", stacklevel=3)
        return undefined()
