"""The permutation null: the spectrum of the form with each factor's own entries shuffled (docs/design.md §5).

The structure-matched null assumes Gaussian-like entries; trained weights are often heavy-tailed, and heavy tails
alone lift λ_max (Student-t₅ factors over-flag 13–28 % at a nominal 1 % against the Gaussian null). Shuffling a
factor's entries keeps their distribution and destroys any structure, so the edge of the shuffled spectra is a
null for "iid entries of this factor's own law".

The gauge first: ``A·D, D⁻¹·C`` is the same form for any diagonal D, but not the same permutation null. Unbalanced,
a spike whose weight sits in one factor is shuffled into many large entries of that factor and masks itself.
Each inner junction of a chain is balanced so that column j of the left factor and row j of the right one have
the same robust size (median absolute value; a few sweeps): invariant to D, and — unlike balancing by norms, or
the SVD split ``UΣ^{1/2}, Σ^{1/2}Vᵀ``, which mixes the entries toward Gaussian — blind to a few heavy entries, so
heavy tails are kept (README, "What an outlier means on a trained matrix", for the measured rates). Junctions
between a sum's shared outer chain and its blocks are left as they are.

The null depends on the factors, so it is drawn per form (not cached): ``draws`` shuffles, in chunks. A
two-factor chain's shuffled spectra are the eigenvalues of Lᵀ (C Cᵀ) L with L Lᵀ = AᵀA (two k×k Grams and a
Cholesky factor, O(n k²) a draw); any other form goes through the same kernel as the observed spectrum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.spectra import budget
from rankscope.spectra.form import Chain, Form, Sum
from rankscope.spectra.kernels import spectrum
from rankscope.spectra.nulls import PROBS, upper_quantile
from rankscope.vocab import PERMUTATION

MIN_PERMUTATION_DRAWS = 400
BALANCE_SWEEPS = 3
CHUNK_ELEMENTS = 2**22  # shuffled entries held at once


@dataclass(frozen=True)
class PermutationNull:
    """The shuffled spectra of one form: sorted t = λ_max/median and the pooled law of λ/median."""

    t: np.ndarray
    ratio_quantiles: np.ndarray
    mean_ratio: float
    name: str = PERMUTATION
    reference: str = "median"

    def edge_ratio(self, fpr: float) -> float:
        return upper_quantile(self.t, fpr, fitted=False)

    def cdf(self, ratio: np.ndarray) -> np.ndarray:
        return np.interp(ratio, self.ratio_quantiles, PROBS, left=0.0, right=1.0)


def default_draws(fpr: float) -> int:
    """Shuffles for an edge at this fpr: at least ``MIN_EXCEEDANCES`` above it, and at least 400."""
    return max(MIN_PERMUTATION_DRAWS, math.ceil(budget.MIN_EXCEEDANCES / fpr))


MAX_GAUGE = 1e6  # a junction's rescaling is clamped to [1/MAX_GAUGE, MAX_GAUGE] per sweep


def balanced(chain: Chain) -> Chain:
    """The chain with the diagonal gauge at each inner junction fixed by robust sizes (see the module docstring).

    Where either side of a junction has a zero robust size (a mostly-zero column or row, e.g. a pruned factor),
    that junction is left as it is."""
    fs = list(chain.factors)
    for _ in range(BALANCE_SWEEPS):
        for j in range(len(fs) - 1):
            left, right = fs[j].abs().median(dim=0).values, fs[j + 1].abs().median(dim=1).values  # (k_j,) each
            ok = (left > 0) & (right > 0)
            d = torch.where(ok, (right / torch.where(ok, left, 1.0)).sqrt(), torch.ones_like(left))
            d = d.clamp(1 / MAX_GAUGE, MAX_GAUGE)
            fs[j], fs[j + 1] = fs[j] * d, fs[j + 1] / d[:, None]
    return Chain(*fs)


def _shuffled(f: torch.Tensor, draws: int, rng: torch.Generator) -> torch.Tensor:
    """(draws, rows, cols): ``draws`` independent shuffles of the entries of the 2-D factor f."""
    flat = f.reshape(-1)
    return torch.stack([flat[torch.randperm(flat.numel(), generator=rng)] for _ in range(draws)]).reshape(
        draws, *f.shape)


def _spectra(form: Form) -> torch.Tensor:
    """Spectra (draws, r) of a batch of shuffled forms."""
    if isinstance(form, Chain) and len(form.factors) == 2:
        A, C = form.factors  # (draws, n, k), (draws, k, m)
        try:
            L = torch.linalg.cholesky(A.mT @ A)  # (draws, k, k)
        except torch.linalg.LinAlgError:  # a rank-deficient draw: the exact kernel
            return spectrum(form)
        core = L.mT @ (C @ C.mT) @ L  # (draws, k, k), symmetric: the eigenvalues of (AC)(AC)ᵀ
        return torch.linalg.eigvalsh(core).flip(-1).clamp_min(0)[..., : form.rank_bound]
    return spectrum(form)


def _shuffled_form(form: Form, draws: int, rng: torch.Generator) -> Form:
    def shuffle(chain: Chain | None) -> Chain | None:
        return None if chain is None else Chain(*(_shuffled(f, draws, rng) for f in chain.factors))

    if isinstance(form, Chain):
        return shuffle(form)
    return Sum([shuffle(c) for c in form.chains], left=shuffle(form.left), right=shuffle(form.right))


def permutation_null(form: Form, draws: int, seed: int) -> PermutationNull:
    """The permutation null of one unbatched, prepared (float64) form."""
    form = form.to("cpu")
    if isinstance(form, Chain):
        form = balanced(form)
    else:
        form = Sum([balanced(c) for c in form.chains], left=form.left and balanced(form.left),
                   right=form.right and balanced(form.right))
    rng = torch.Generator().manual_seed(seed)
    per_draw = sum(f.numel() for f in form.factor_list)
    chunk = max(1, CHUNK_ELEMENTS // per_draw)
    try:
        lam = torch.cat([_spectra(_shuffled_form(form, min(chunk, draws - start), rng))
                         for start in range(0, draws, chunk)])  # (draws, r)
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError) as exc:
        raise InputError(f"the permutation null's spectra overflow float64 ({exc}); rescale the factors") from None
    med = torch.quantile(lam, 0.5, dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    ratio = lam / med[:, None]
    pooled = ratio.flatten()
    if pooled.numel() > 2**24:
        pooled = pooled[:: math.ceil(pooled.numel() / 2**24)]
    return PermutationNull(t=np.sort(ratio[:, 0].numpy()),
                           ratio_quantiles=torch.quantile(pooled, torch.from_numpy(PROBS)).numpy(),
                           mean_ratio=float(ratio.mean()))
