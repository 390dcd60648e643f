"""Neural collapse (Papyan, Han & Donoho 2020) and the Variability Collapse Index (Xu & Liu 2023).

Features H (N, D), integer labels y (N,). Conventions used by every metric here:

- class means μ_c and the *global mean μ_G = the sample mean of all N rows* (so with imbalanced classes μ_G is the
  count-weighted average of the class means, not their plain average);
- Σ_W = (1/N) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ, the within-class covariance averaged over samples;
- centred means m_c = μ_c − μ_G, stacked as M (C, D).

Everything is float64. Class statistics come from one streaming pass (`ClassStats.update/compute`); the
functional metrics run that pass on the whole input. Pairwise class quantities are computed in row chunks, so
memory stays O(C·D + D² + chunk·C) even for C ~ 50k classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankscope.errors import InputError, UndefinedMeasure
from rankscope.representations import _input

CHUNK = 2048  # rows of a pairwise block: chunk × C float64 at a time


@dataclass(frozen=True)
class ClassMoments:
    """First and second moments of labelled features, enough for every collapse metric."""

    classes: torch.Tensor  # (C,) int64 label values, ascending
    counts: torch.Tensor  # (C,) float64 samples per class
    means: torch.Tensor  # (C, D) class means μ_c
    global_mean: torch.Tensor  # (D,) sample mean μ_G
    within: torch.Tensor  # (D, D) Σ_W
    class_var: torch.Tensor  # (C,) σ_c² = mean ‖h − μ_c‖² over class c (= Tr Σ_c)

    @property
    def centred_means(self) -> torch.Tensor:
        """M (C, D): rows μ_c − μ_G."""
        return self.means - self.global_mean


class ClassStats:
    """Streaming class moments: `update(H, y)` per batch, `compute()` → ClassMoments (torchmetrics style).

    Labels must be non-negative integers (e.g. token ids); the per-class arrays grow to the largest label seen.
    Memory: O(C·D + D²). Second moments are accumulated about the first batch's mean to limit cancellation.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None  # (D,)
        self.sums = torch.zeros(0, 0, dtype=torch.float64)  # (C, D) Σ (h − shift) per class
        self.counts = torch.zeros(0, dtype=torch.float64)  # (C,)
        self.sq = torch.zeros(0, dtype=torch.float64)  # (C,) Σ ‖h − shift‖² per class
        self.second = torch.zeros(0, 0, dtype=torch.float64)  # (D, D) Σ (h − shift)(h − shift)ᵀ

    def update(self, H, y) -> None:
        """Add a batch: H (B, D) features, y (B,) non-negative integer labels."""
        H = _input.features(H, "H")
        y = _input.labels(y, H.shape[0], "y", min_classes=1)
        if (y < 0).any():
            raise InputError("y: streaming labels must be non-negative integers (class or token ids)")
        if self.shift is None:
            D = H.shape[1]
            self.shift = H.mean(0)
            self.sums = torch.zeros(0, D, dtype=torch.float64)
            self.second = torch.zeros(D, D, dtype=torch.float64)
        elif H.shape[1] != self.shift.shape[0]:
            raise InputError(f"H: batch has {H.shape[1]} columns, earlier batches had {self.shift.shape[0]}")
        C = int(y.max()) + 1
        if C > self.counts.shape[0]:
            grow = C - self.counts.shape[0]
            self.sums = torch.cat([self.sums, self.sums.new_zeros(grow, self.sums.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
            self.sq = torch.cat([self.sq, self.sq.new_zeros(grow)])
        X = H - self.shift  # (B, D)
        self.sums.index_add_(0, y, X)
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.sq.index_add_(0, y, X.square().sum(1))
        self.second += X.T @ X
        self.n += H.shape[0]

    def compute(self) -> ClassMoments:
        """ClassMoments of everything seen so far (classes with no sample are left out)."""
        if self.shift is None:
            raise InputError("ClassStats: compute() called before any update()")
        keep = self.counts > 0
        classes = keep.nonzero().squeeze(1)
        n_c = self.counts[keep]  # (C,)
        mu = self.sums[keep] / n_c[:, None]  # (C, D) class means about the shift
        within = (self.second - (mu.T * n_c) @ mu) / self.n  # (D, D)
        within = (within + within.T) / 2
        class_var = (self.sq[keep] / n_c - mu.square().sum(1)).clamp_min(0)
        return ClassMoments(classes, n_c, mu + self.shift, self.sums.sum(0) / self.n + self.shift, within, class_var)


def class_moments(H, y) -> ClassMoments:
    """ClassMoments of features H (N, D) with integer labels y (N,), at least two classes."""
    H = _input.features(H, "H")
    y = _input.labels(y, H.shape[0], "y", min_classes=2)
    values, inverse = torch.unique(y, return_inverse=True)
    acc = ClassStats()
    acc.update(H, inverse)
    m = acc.compute()
    return ClassMoments(values, m.counts, m.means, m.global_mean, m.within, m.class_var)


def _moments(H, y) -> ClassMoments:
    return H if isinstance(H, ClassMoments) else class_moments(H, y)


def _psd_pinv_trace(A: torch.Tensor, B: torch.Tensor) -> tuple[float, int]:
    """(Tr(B A⁺), rank A) for symmetric PSD A, B (D, D); eigenvalues below D·eps·λ_max count as zero."""
    lam, U = torch.linalg.eigh(A)  # ascending
    tol = lam.amax().clamp_min(0) * A.shape[0] * torch.finfo(A.dtype).eps
    keep = lam > tol
    Uk = U[:, keep]  # (D, r)
    return float(((Uk.T @ B @ Uk).diagonal() / lam[keep]).sum()), int(keep.sum())


def nc1(H, y=None) -> float:
    """NC1 = Tr(Σ_W Σ_B⁺)/C with Σ_B = (1/C) Σ_c m_c m_cᵀ (Papyan et al. 2020). Lower = more collapse; 0 at collapse.

    Accepts (H, y) or a ClassMoments. μ_G is the sample mean (see the module docstring); Σ_B is the plain class
    average of m_c m_cᵀ, as in Papyan et al.
    """
    m = _moments(H, y)
    M = m.centred_means  # (C, D)
    C = M.shape[0]
    sigma_b = M.T @ M / C  # (D, D)
    tr, rank = _psd_pinv_trace(sigma_b, m.within)
    if rank == 0:
        raise UndefinedMeasure("H: all class means coincide (Σ_B = 0); NC1 is undefined")
    return tr / C


def vci(H, y=None) -> float:
    """VCI = 1 − Tr(Σ_T⁺ Σ_B)/rank(Σ_B) (Xu & Liu 2023, ICML). In [0, 1]; lower = more collapse; 0 at collapse.

    Σ_T = (1/N) Σ_i (h_i − μ_G)(h_i − μ_G)ᵀ and Σ_B = Σ_c (n_c/N) m_c m_cᵀ, so Σ_T = Σ_W + Σ_B exactly (for balanced
    classes this Σ_B is the paper's (1/C) Σ_c m_c m_cᵀ). Invariant under invertible linear maps h ↦ A h when Σ_T
    has full rank.
    """
    m = _moments(H, y)
    M = m.centred_means  # (C, D)
    sigma_b = (M.T * (m.counts / m.counts.sum())) @ M  # (D, D)
    sigma_t = m.within + sigma_b
    rank_b = _psd_pinv_trace(sigma_b, sigma_b)[1]
    if rank_b == 0:
        raise UndefinedMeasure("H: all class means coincide (Σ_B = 0); VCI is undefined")
    return 1.0 - _psd_pinv_trace(sigma_t, sigma_b)[0] / rank_b


@dataclass(frozen=True)
class NC2:
    """NC2 parts (Papyan et al. 2020): all 0 for class means forming a simplex ETF. Lower = more collapse."""

    equinorm: float  # std/mean of ‖m_c‖ over classes
    equiangularity: float  # std of cos(m_c, m_c') over pairs c ≠ c'
    max_angle: float  # mean |cos(m_c, m_c') + 1/(C−1)| over pairs c ≠ c'
    etf_distance: float  # ‖MMᵀ/‖MMᵀ‖_F − (I − 11ᵀ/C)/√(C−1)‖_F


def _unit_rows(M: torch.Tensor, what: str) -> torch.Tensor:
    norms = M.norm(dim=1, keepdim=True)  # (C, 1)
    if (norms == 0).any():
        raise UndefinedMeasure(f"H: a class mean equals the global mean, so its {what} is undefined")
    return M / norms


def _pair_stats(U: torch.Tensor, fn, chunk: int = CHUNK) -> tuple[float, float]:
    """Mean and std of fn(block) over off-diagonal pairs of rows of U (C, D), in row chunks of (chunk, C)."""
    C = U.shape[0]
    s = s2 = 0.0
    for i in range(0, C, chunk):
        block = fn(U[i:i + chunk], U)  # (b, C)
        rows = torch.arange(block.shape[0])
        block[rows, rows + i] = 0.0  # drop c == c'
        s += float(block.sum())
        s2 += float(block.square().sum())
    n = C * (C - 1)
    mean = s / n
    return mean, max(s2 / n - mean * mean, 0.0) ** 0.5


def nc2(H, y=None) -> NC2:
    """NC2: equinorm, equiangularity and distance to the simplex ETF of the centred means. Lower = more collapse."""
    m = _moments(H, y)
    M = m.centred_means  # (C, D)
    C = M.shape[0]
    norms = M.norm(dim=1)
    U = _unit_rows(M, "angle")
    _, ang_std = _pair_stats(U, lambda a, b: a @ b.T)
    max_angle, _ = _pair_stats(U, lambda a, b: (a @ b.T + 1.0 / (C - 1)).abs())
    gram_fro = (M.T @ M).norm()  # ‖MMᵀ‖_F = ‖MᵀM‖_F, no C×C matrix
    inner = (M.square().sum() - M.sum(0).square().sum() / C) / (gram_fro * (C - 1) ** 0.5)
    return NC2(equinorm=float(norms.std(correction=0) / norms.mean()), equiangularity=ang_std,
               max_angle=max_angle, etf_distance=float((2 - 2 * inner).clamp_min(0).sqrt()))


def _classifier(W, m: ClassMoments, name: str = "W") -> torch.Tensor:
    """Rows of the classifier W (K, D) (PyTorch [out, in]) for the classes present, indexed by label value."""
    W = _input.features(W, name)
    if W.shape[1] != m.means.shape[1]:
        raise InputError(f"{name}: has {W.shape[1]} columns but the features have {m.means.shape[1]}")
    if int(m.classes.min()) < 0 or int(m.classes.max()) >= W.shape[0]:
        raise InputError(f"{name}: has {W.shape[0]} rows but the labels run from {int(m.classes.min())} "
                         f"to {int(m.classes.max())}; row c must be the classifier of label c")
    return W[m.classes]  # (C, D)


@dataclass(frozen=True)
class NC3:
    """NC3 self-duality (Papyan et al. 2020) and its uniformity UNC3 (Wu & Papyan 2024). Lower = more collapse."""

    distance: float  # ‖W/‖W‖_F − M/‖M‖_F‖_F², 0 when W ∝ M
    mean_cosine: float  # mean over classes of cos(w_c, m_c); 1 at collapse
    unc3: float  # coefficient of variation (std/mean) of cos(w_c, m_c) over classes


def nc3(H, y=None, W=None) -> NC3:
    """NC3: alignment of classifier rows w_c (W (C, D), [out, in]) with the centred means. Lower = more collapse."""
    m = _moments(H, y)
    if W is None:
        raise InputError("W: nc3 needs the classifier weights (C, D)")
    Wc = _classifier(W, m)
    M = m.centred_means
    if float(Wc.norm()) == 0 or float(M.norm()) == 0:
        raise UndefinedMeasure("W: zero classifier or coincident class means; NC3 is undefined")
    dist = float((Wc / Wc.norm() - M / M.norm()).square().sum())
    cos = (_unit_rows(Wc, "direction") * _unit_rows(M, "direction")).sum(1)  # (C,)
    mean = float(cos.mean())
    return NC3(distance=dist, mean_cosine=mean, unc3=float(cos.std(correction=0)) / abs(mean) if mean else float("inf"))


def unc3(H, y, W) -> float:
    """UNC3 = std/mean over classes of cos(w_c, μ_c − μ_G) (Wu & Papyan 2024). Lower = more uniform duality."""
    return nc3(H, y, W).unc3


def nc4(H, y, W, b=None, chunk: int = CHUNK) -> float:
    """NC4: fraction of samples where argmax(W h + b) ≠ the nearest class mean. Lower = more collapse; 0 at collapse."""
    Hf = _input.features(H, "H")
    m = class_moments(Hf, y)
    W = _input.features(W, "W")
    if W.shape[1] != Hf.shape[1]:
        raise InputError(f"W: has {W.shape[1]} columns but H has {Hf.shape[1]}")
    bias = torch.zeros(W.shape[0], dtype=torch.float64) if b is None else torch.as_tensor(b, dtype=torch.float64)
    if bias.shape != (W.shape[0],):
        raise InputError(f"b: expected shape ({W.shape[0]},) to match W, got {tuple(bias.shape)}")
    pred = torch.cat([(Hf[i:i + chunk] @ W.T + bias).argmax(1) for i in range(0, Hf.shape[0], chunk)])  # (N,)
    return ncc_disagreement(Hf, m, pred, chunk)


def ncc_disagreement(H, m: ClassMoments, pred, chunk: int = CHUNK) -> float:
    """Fraction of rows of H whose predicted label `pred` (N,) differs from the nearest-class-centre label."""
    H = _input.features(H, "H")
    pred = torch.as_tensor(pred).reshape(-1)
    if pred.shape[0] != H.shape[0]:
        raise InputError(f"predictions: {pred.shape[0]} of them for {H.shape[0]} feature rows")
    ncc = torch.cat([m.classes[torch.cdist(H[i:i + chunk], m.means).argmin(1)]
                     for i in range(0, H.shape[0], chunk)])  # (N,)
    return float((ncc != pred.to(ncc.dtype)).double().mean())
