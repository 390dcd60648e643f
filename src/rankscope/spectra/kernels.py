"""Spectra of forms, computed without ever forming a d×d product.

A *form* is a sum of chains, each chain a product of factors: ``B = Σ_c F_c1 @ F_c2 @ … @ F_ck``.
A plain matrix is the form with one chain of one factor. Its *spectrum* is the nonzero part of the
eigenvalues of ``B Bᵀ`` (the squared singular values of B), descending, float64.

The trick (as in TransformerLens's ``FactoredMatrix``): split every chain at its narrowest inner
dimension, ``F_c = L_c R_c``; stack the blocks, ``B = [L_1 … L_C] @ [R_1; …; R_C] = L R`` with inner width
``K = Σ_c k_c``; then with ``L = Q_L T_L`` and ``Rᵀ = Q_R T_R`` (thin QR), the singular values of B are
those of the small ``K×K`` core ``T_L T_Rᵀ``. Equal to the dense SVD up to float rounding.

All functions accept a leading batch dimension on any factor (heads of one layer, draws of a null);
a factor without it is shared by the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.spectra.threads import with_one_torch_thread

Chain = tuple[torch.Tensor, ...]
Form = tuple[Chain, ...]  # a sum of chains


def _is_matrix_like(x) -> bool:
    return isinstance(x, torch.Tensor | np.ndarray)


def _as_float64(x, where: str, batched: bool) -> torch.Tensor:
    """One factor as a float64 tensor on its own device; refuses NaN/Inf, complex, wrong rank."""
    t = torch.as_tensor(x).detach()  # model parameters: read their values, never their autograd graph
    if t.device.type == "mps":  # Apple GPUs have no float64
        t = t.cpu()
    if t.is_complex():
        raise InputError(f"{where} is complex ({t.dtype}); rankscope reads real matrices only")
    if t.dtype == torch.bool:
        t = t.to(torch.int8)
    ndim_ok = (2, 3) if batched else (2,)
    if t.ndim not in ndim_ok:
        want = "2-D (or 3-D with a leading batch dimension)" if batched else "2-D"
        raise InputError(f"{where} has shape {tuple(t.shape)}; a factor must be {want}")
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise InputError(f"{where} has an empty dimension: shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    # A NaN or Inf makes the sum non-finite; a finite sum proves every entry finite (one cheap reduction;
    # an overflowing sum of finite entries falls through to the elementwise check).
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise InputError(f"{where} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")
    return t


def as_form(x, name: str = "matrix", batched: bool = False) -> Form:
    """Normalise a matrix, a chain ``[F1, F2, …]`` or a sum of chains ``[[A1, C1], [A2, C2]]`` to a Form.

    Checks that factors chain (columns of one = rows of the next), that every chain of a sum has the
    same outer shape, and that no factor holds NaN or Inf. Raises ``InputError`` naming the factor.
    """
    if _is_matrix_like(x):
        chains_in = [[x]]
    elif isinstance(x, Sequence) and len(x) > 0 and all(_is_matrix_like(f) for f in x):
        chains_in = [list(x)]
    elif (
        isinstance(x, Sequence)
        and len(x) > 0
        and all(isinstance(c, Sequence) and len(c) > 0 and all(_is_matrix_like(f) for f in c) for c in x)
    ):
        chains_in = [list(c) for c in x]
    else:
        raise InputError(
            f"{name}: expected a matrix, a chain [F1, F2, ...] or a sum of chains [[A1, C1], [A2, C2]] "
            f"of tensors or arrays, got {type(x).__name__}"
        )
    form = []
    for c, chain in enumerate(chains_in):
        factors = []
        for i, f in enumerate(chain):
            where = name if len(chains_in) == 1 and len(chain) == 1 else f"{name} (chain {c}, factor {i})"
            t = _as_float64(f, where, batched)
            if factors and t.device != factors[0].device:
                t = t.to(factors[0].device)  # e.g. a numpy array beside CUDA tensors
            if factors and factors[-1].shape[-1] != t.shape[-2]:
                raise InputError(
                    f"{name}: chain {c} does not multiply: factor {i - 1} has {factors[-1].shape[-1]} columns "
                    f"but factor {i} has {t.shape[-2]} rows"
                )
            factors.append(t)
        form.append(tuple(factors))
    n, m = form[0][0].shape[-2], form[0][-1].shape[-1]
    for c, chain in enumerate(form):
        if (chain[0].shape[-2], chain[-1].shape[-1]) != (n, m):
            raise InputError(
                f"{name}: chain {c} is {chain[0].shape[-2]}×{chain[-1].shape[-1]} but chain 0 is {n}×{m}; "
                "the chains of a sum must have one shape"
            )
    if batched:
        sizes = {f.shape[0] for chain in form for f in chain if f.ndim == 3} - {1}  # size 1 broadcasts
        if len(sizes) > 1:
            raise InputError(f"{name}: factors have different batch sizes {sorted(sizes)}")
    return tuple(form)


def form_shape(form: Form) -> tuple[int, int]:
    """(n, m) of the form's product."""
    return form[0][0].shape[-2], form[0][-1].shape[-1]


def chain_dims(chain: Chain) -> tuple[int, ...]:
    """(n, k1, …, m): the outer and inner dimensions of a chain."""
    return (chain[0].shape[-2], *(f.shape[-1] for f in chain))


def structural_rank(dims_per_chain: Sequence[Sequence[int]]) -> int:
    """Largest possible rank of a sum of chains: min(n, m, Σ_c narrowest dim of chain c)."""
    n, m = dims_per_chain[0][0], dims_per_chain[0][-1]
    if len(dims_per_chain) == 1 and len(dims_per_chain[0]) == 2:
        return min(n, m)
    return min(n, m, sum(min(d) for d in dims_per_chain))


def _product(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """F1 @ … @ Fk, left to right."""
    out = factors[0]
    for f in factors[1:]:
        out = out @ f
    return out


def split_at_bottleneck(chain: Chain) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with chain = L @ R and the inner width of L R the chain's narrowest dimension."""
    dims = chain_dims(chain)
    if len(chain) == 1:  # a plain matrix inside a sum: W = W @ I
        m = dims[-1]
        return chain[0], torch.eye(m, dtype=chain[0].dtype, device=chain[0].device)
    j = 1 + int(np.argmin(dims[1:-1]))  # split after factor j-1
    return _product(chain[:j]), _product(chain[j:])


def _stack(form: Form) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of chains as one two-factor product L @ R: (…, n, K) and (…, K, m)."""
    parts = [split_at_bottleneck(chain) for chain in form]
    # numpy's broadcast_shapes: torch's imports sympy on first use (0.3 s of a CLI start)
    batch = np.broadcast_shapes(*(tuple(p.shape[:-2]) for lr in parts for p in lr))
    L = torch.cat([lr[0].expand(*batch, *lr[0].shape[-2:]) for lr in parts], dim=-1)  # (…, n, K)
    R = torch.cat([lr[1].expand(*batch, *lr[1].shape[-2:]) for lr in parts], dim=-2)  # (…, K, m)
    return L, R


def triangular_core(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """A small matrix with the singular values of L @ R: T_L @ T_Rᵀ from thin QRs of L and Rᵀ."""
    if L.shape[-2] > L.shape[-1]:
        L = torch.linalg.qr(L, mode="r").R  # (…, K, K)
    if R.shape[-1] > R.shape[-2]:
        R = torch.linalg.qr(R.mT, mode="r").R.mT  # (…, K, K)
    return L @ R


def squared_singular_values(X: torch.Tensor) -> torch.Tensor:
    """σ(X)², descending: (…, min(rows, cols)), as eigenvalues of the smaller Gram matrix.

    A symmetric eigensolver rather than an SVD: batched CPU SVDs are erratic under multithreading
    (MKL's gesdd ran 100× slower with 2 threads than with 1 here), while ``eigvalsh`` is steady and
    agrees to within ~k·eps·λ_max, which ``clamp_numerical_zeros`` treats as zero.
    """
    wide = X.shape[-2] <= X.shape[-1]
    if X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64):
        # numpy on CPU: its A·Aᵀ is a BLAS syrk (half a gemm's work) and its eigvalsh ran 1.7× faster than
        # torch's at 384–768 here (equal on small batched matrices); the eigenvalues agree to ~1e-14 relative.
        A = X.detach().numpy()
        At = np.swapaxes(A, -1, -2)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by the caller, by name
            gram = A @ At if wide else At @ A  # (…, k, k)
        return torch.from_numpy(np.linalg.eigvalsh(gram)[..., ::-1].copy()).clamp_min(0)
    gram = X @ X.mT if wide else X.mT @ X  # (…, k, k)
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)


def clamp_numerical_zeros(lam: torch.Tensor) -> torch.Tensor:
    """Set eigenvalues at rounding level of the Gram eigensolver (λ ≤ 8·r·eps·λ_max) to exactly zero."""
    tol = lam[..., :1] * (8 * lam.shape[-1] * torch.finfo(torch.float64).eps)
    return torch.where(lam > tol, lam, torch.zeros_like(lam))


@with_one_torch_thread  # torch's small steps between numpy's BLAS calls: see spectra.threads
def spectrum(form: Form) -> torch.Tensor:
    """Eigenvalues of B Bᵀ for the form B, nonzero part (structural rank r), descending: (…, r) float64."""
    if len(form) == 1 and len(form[0]) == 1:
        return clamp_numerical_zeros(squared_singular_values(form[0][0]))  # (…, min(n, m))
    L, R = _stack(form)
    return clamp_numerical_zeros(squared_singular_values(triangular_core(L, R)))  # (…, min(n, m, K))


def block_norms(form: Form) -> torch.Tensor:
    """Frobenius norm of each chain of the sum: (…, C), via ‖LR‖_F² = Σ (LᵀL) ∘ (RRᵀ)."""
    norms = []
    for chain in form:
        L, R = split_at_bottleneck(chain)
        gram = (L.mT @ L) * (R @ R.mT)  # (…, k, k)
        norms.append(gram.sum(dim=(-2, -1)).clamp_min(0).sqrt())
    return torch.stack(torch.broadcast_tensors(*norms), dim=-1)
