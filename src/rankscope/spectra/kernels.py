"""Spectra of forms, computed without ever forming a d×d product.

A form's *spectrum* is the nonzero part of the eigenvalues of ``B Bᵀ`` (the squared singular values of B),
descending, float64: as many as the form's rank bound (``spectra.form``).

The trick (as in TransformerLens's ``FactoredMatrix``): split every chain at its narrowest inner dimension,
``C_c = X_c Y_c``; stack the blocks, ``Σ_c C_c = [X_1 … X_C] @ [Y_1; …; Y_C] = X Y`` with inner width
``K = Σ_c k_c`` (a shared left or right chain multiplies X or Y, or takes their place where it is narrower);
then with ``X = Q_X T_X`` and ``Yᵀ = Q_Y T_Y`` (thin QR), the singular values of B are those of the small
``K×K`` core ``T_X T_Yᵀ``. Equal to the dense SVD up to float rounding.

Every function accepts a leading batch dimension on any factor (heads of one layer, draws of a null); a
factor without it is shared by the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.spectra.form import Chain, Form, Sum, product, reduced, split_at_bottleneck


def _as_float64(t: torch.Tensor, where: str) -> torch.Tensor:
    """One factor as float64 on its own device; refuses NaN/Inf and complex."""
    if t.device.type == "mps":  # Apple GPUs have no float64
        t = t.cpu()
    if t.is_complex():
        raise InputError(f"{where} is complex ({t.dtype}); rankscope reads real matrices only")
    if t.dtype == torch.bool:
        t = t.to(torch.int8)
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


def prepare(x, name: str = "form", batched: bool = False) -> Form:
    """``Form.of(x)`` checked and in float64: what the numerics read. ``InputError`` names the factor at fault.

    Without ``batched`` every factor must be 2-D; with it a factor may carry a leading batch axis.
    """
    form = Form.of(x, name)
    parts = [("left", form.left), *((f"chain {c}", ch) for c, ch in enumerate(form.chains)), ("right", form.right)]
    single = form.structure.is_matrix
    # one device for the whole form: the first accelerator a factor is on (numpy arrays beside CUDA tensors)
    device = next((f.device for f in form.factor_list if f.device.type not in ("cpu", "mps")), torch.device("cpu"))
    out = {}
    for label, chain in parts:
        if chain is None:
            continue
        factors = []
        for i, f in enumerate(chain.factors):
            where = name if single else f"{name} ({label}, factor {i})"
            if f.ndim == 3 and not batched:
                raise InputError(f"{where} has shape {tuple(f.shape)}; a factor must be 2-D")
            factors.append(_as_float64(f, where).to(device))
        out[label] = Chain(*factors, shared=chain.shared)
    if isinstance(form, Chain):
        return out["chain 0"]
    return Sum([out[f"chain {c}"] for c in range(len(form.chains))], left=out.get("left"), right=out.get("right"))


def two_factor(form: Form) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, Y) with B = X @ Y, up to orthogonal factors on the outside, and the inner width as small as the
    factors allow: (…, n', K), (…, K, m'). Spectrum and block norms are those of B."""
    form = reduced(form)
    parts = [split_at_bottleneck(c) for c in form.chains]
    if len(parts) == 1:
        X, Y = parts[0]  # (…, p, K), (…, K, q)
    else:
        # numpy's broadcast_shapes: torch's imports sympy on first use, a noticeable part of a CLI start
        batch = np.broadcast_shapes(*(tuple(p.shape[:-2]) for xy in parts for p in xy))
        X = torch.cat([xy[0].expand(*batch, *xy[0].shape[-2:]) for xy in parts], dim=-1)  # (…, p, K)
        Y = torch.cat([xy[1].expand(*batch, *xy[1].shape[-2:]) for xy in parts], dim=-2)  # (…, K, q)
    if form.left is not None:
        A = product(form.left.factors)  # (…, n', p)
        X, Y = (A, X @ Y) if A.shape[-1] < X.shape[-1] else (A @ X, Y)  # through the narrower of p and K
    if form.right is not None:
        C = product(form.right.factors)  # (…, q, m')
        X, Y = (X @ Y, C) if C.shape[-2] < Y.shape[-2] else (X, Y @ C)
    return X, Y


def triangular_core(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """A small matrix with the singular values of X @ Y: T_X @ T_Yᵀ from thin QRs of X and Yᵀ."""
    if X.shape[-2] > X.shape[-1]:
        X = torch.linalg.qr(X, mode="r").R  # (…, K, K)
    if Y.shape[-1] > Y.shape[-2]:
        Y = torch.linalg.qr(Y.mT, mode="r").R.mT  # (…, K, K)
    return X @ Y


def squared_singular_values(X: torch.Tensor) -> torch.Tensor:
    """σ(X)², descending: (…, min(rows, cols)), as eigenvalues of the smaller Gram matrix.

    A symmetric eigensolver rather than an SVD: batched CPU SVDs are erratic under multithreading, while
    ``eigvalsh`` is steady and agrees to within ~k·eps·λ_max, which ``clamp_numerical_zeros`` treats as zero.
    On the CPU the Gram product and the eigensolver are numpy's (a BLAS syrk is half a gemm's work; see
    benchmarks/spectra.py); elsewhere torch's.
    """
    wide = X.shape[-2] <= X.shape[-1]
    if X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64):
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


def spectrum(form: Form) -> torch.Tensor:
    """Eigenvalues of B Bᵀ for the (prepared) form B, nonzero part, descending: (…, rank bound) float64."""
    r = form.rank_bound
    if form.structure.is_matrix:
        return clamp_numerical_zeros(squared_singular_values(form.chains[0].factors[0]))  # (…, min(n, m))
    X, Y = two_factor(form)
    return clamp_numerical_zeros(squared_singular_values(triangular_core(X, Y))[..., :r])  # (…, r)
