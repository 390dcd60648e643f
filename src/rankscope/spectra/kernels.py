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

Scale. A spectrum is computed on the form scaled by powers of two (``normalized``: each factor divided by the power
of two just above its largest |entry|, and the small core again before its Gram product; a factor already within
2^±``SAFE_EXPONENT`` is left as it is, so the common case costs no multiply), then scaled back
(``restore``): λ(c·B) = c²·λ(B), and a power-of-two scaling only changes exponents, so it is exact. Entries anywhere
in float64's range therefore give the eigenvalues to the precision of unit-size entries, or an ``InputError``
naming the form when the eigenvalues themselves lie outside float64's normal range; a non-finite intermediate
result is an error, never a zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.spectra.form import Chain, Form, Sum, product, reduced, split_at_bottleneck


def _as_float64(t: torch.Tensor, where: str) -> torch.Tensor:
    """One factor as float64 on its own device; refuses NaN/Inf and complex."""
    if t.is_meta:  # a form of meta tensors has a structure (``describe`` reads it), but no spectrum
        raise InputError(f"{where} is on the meta device: it has a shape {tuple(t.shape)} but no values")
    if t.device.type == "mps":  # Apple GPUs have no float64
        t = t.cpu()
    if t.is_quantized:
        t = t.dequantize()
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


def _rebuilt(form: Form, parts: dict[str, Chain]) -> Form:
    """``form`` with its chains replaced by ``parts`` (labelled "chain i", "left", "right")."""
    if isinstance(form, Chain):
        return parts["chain 0"]
    return Sum([parts[f"chain {c}"] for c in range(len(form.chains))], left=parts.get("left"), right=parts.get("right"))

def prepare(x, name: str = "form", batched: bool = False, *, scaled: bool = False):
    """``Form.of(x)`` checked and in float64: what the numerics read. ``InputError`` names the factor at fault.

    Without ``batched`` every factor must be 2-D; with it a factor may carry a leading batch axis. ``scaled``:
    ``(B̂, e)`` instead, the form ``normalized`` (B = 2^e·B̂), each factor scaled in place where this made its own
    float64 copy (no second copy of a large matrix).
    """
    form = Form.of(x, name)
    parts = [("left", form.left), *((f"chain {c}", ch) for c, ch in enumerate(form.chains)), ("right", form.right)]
    single = form.structure.is_matrix
    # one device for the whole form: the first accelerator a factor is on (numpy arrays beside CUDA tensors)
    device = next((f.device for f in form.factor_list if f.device.type not in ("cpu", "mps", "meta")),
                  torch.device("cpu"))
    out, exponents = {}, {}
    for label, chain in parts:
        if chain is None:
            continue
        factors, exps = [], []
        for i, f in enumerate(chain.factors):
            where = name if single else f"{name} ({label}, factor {i})"
            if f.ndim == 3 and not batched:
                raise InputError(f"{where} has shape {tuple(f.shape)}; a factor must be 2-D")
            t = _as_float64(f, where).to(device)
            if scaled:
                e = _exponent(t)
                t = _times_pow2(t, -e, inplace=t.data_ptr() != f.data_ptr())  # our own copy: scaled in place
                exps.append(e)
            factors.append(t)
        out[label] = Chain(*factors, shared=chain.shared)
        exponents[label] = sum(exps, torch.zeros((), dtype=torch.int64))
    prepared = _rebuilt(form, out)
    return _balanced_sum(prepared, exponents) if scaled else prepared


# ---------------------------------------------------------------------------------------------- scale


# Factors whose largest |entry| lies within 2^±SAFE_EXPONENT are left as they are (their exponent counts as 0): a
# chain of up to 8 such factors and its Gram product stay inside 2^±(2·8·48 + 200) < 2^±1022 with room for the
# dimensions' sums, so nothing overflows or leaves the normal range, and the common case pays no extra multiply.
SAFE_EXPONENT = 48


def _exponent(t: torch.Tensor) -> torch.Tensor:
    """(…,) int64: e with the largest |entry| of each matrix (the last two axes) in [2^(e−1), 2^e); 0 for zero,
    and 0 where |e| ≤ ``SAFE_EXPONENT`` (no rescaling needed)."""
    top = torch.maximum(t.amax(dim=(-2, -1)), -t.amin(dim=(-2, -1)))  # no |t| temporary of a large matrix
    e = torch.frexp(top.to(torch.float64)).exponent.to(torch.int64)
    return torch.where(e.abs() <= SAFE_EXPONENT, torch.zeros_like(e), e)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e exactly as float64, for integer e in [−1022, 1023] (the IEEE exponent bits)."""
    return ((e + 1023) << 52).view(torch.float64)


def _times_pow2(t: torch.Tensor, e: torch.Tensor, *, inplace: bool = False, axes: int = 2) -> torch.Tensor:
    """t · 2^e, e (…,) an integer per item of the leading axes (``axes`` trailing axes share it); exact wherever the
    result is a normal float64 (only exponents change). Steps of at most 2^±1000, so every power of two is normal."""
    e = e.to(t.device).clamp(-4000, 4000)
    steps = -(-int(e.abs().max()) // 1000) if e.numel() else 0  # 0 for e = 0: no multiply, no copy
    for j in range(steps):
        part = torch.div(e, steps - j, rounding_mode="trunc")
        e = e - part
        scale = _pow2(part).reshape(*part.shape, *(1,) * axes)
        t = t.mul_(scale) if inplace else t * scale
        inplace = True  # from the first product on the tensor is ours
    return t


def _balanced_sum(form: Form, exponents: dict[str, torch.Tensor]) -> tuple[Form, torch.Tensor]:
    """(B̂, e) from a form of normalized factors and each part's summed factor exponents (labels as in ``prepare``):
    a sum's chains keep their relative sizes (chain c is scaled by 2^(e_c − max e_c) more), so B = 2^e·B̂."""
    if isinstance(form, Chain):
        return form, exponents["chain 0"]
    chain_exps = [exponents[f"chain {c}"] for c in range(len(form.chains))]
    top = chain_exps[0]
    for e in chain_exps[1:]:
        top = torch.maximum(top, e)
    chains = []
    for chain, e in zip(form.chains, chain_exps, strict=True):
        d = (e - top).clamp_min(-2100)  # below 2^−2100 of the largest block a chain is zero in float64 anyway
        if bool(d.ne(0).any()):
            fs = list(chain.factors)
            i = 0 if d.ndim == 0 else next((j for j, f in enumerate(fs) if f.ndim == 3), 0)
            f = fs[i] if d.ndim == 0 or fs[i].ndim == 3 else fs[i].expand(d.shape[0], *fs[i].shape)
            fs[i] = _times_pow2(f, d)
            chain = Chain(*fs, shared=chain.shared)
        chains.append(chain)
    total = top + exponents.get("left", 0) + exponents.get("right", 0)
    return Sum(chains, left=form.left, right=form.right), total


def normalized(form: Form) -> tuple[Form, torch.Tensor]:
    """(B̂, e) with B = 2^e·B̂ exactly, e (…,) int64 per batch item: every factor of the (prepared) form divided by
    the power of two just above its largest |entry|, a sum's chains keeping their relative sizes."""
    exponents, parts = {}, {}
    for label, chain in (("left", form.left), *((f"chain {c}", ch) for c, ch in enumerate(form.chains)),
                         ("right", form.right)):
        if chain is None:
            continue
        exps = [_exponent(f) for f in chain.factors]
        parts[label] = Chain(*(_times_pow2(f, -e) for f, e in zip(chain.factors, exps, strict=True)),
                             shared=chain.shared)
        exponents[label] = sum(exps, torch.zeros((), dtype=torch.int64))
    return _balanced_sum(_rebuilt(form, parts), exponents)


def restore(lam: torch.Tensor, k: torch.Tensor, name: str = "form") -> torch.Tensor:
    """λ = λ̂·2^k exactly (λ̂ (…, r), k (…,)); ``InputError`` naming the form when λ is not a normal float64: an
    overflow past 1.8e308, or a nonzero eigenvalue below 2.2e−308 (which would lose its digits)."""
    out = _times_pow2(lam, k, axes=1)
    if lam.numel() == 0:
        return out
    if not torch.isfinite(out).all():
        raise InputError(f"{name}: the spectrum overflows float64: λ_max ≈ {_decimal(lam, k, max)} is beyond "
                         f"{torch.finfo(torch.float64).max:.3g}; rescale the factors")
    if bool(((lam > 0) & (out < torch.finfo(torch.float64).tiny)).any()):
        raise InputError(f"{name}: the spectrum underflows float64: eigenvalues down to "
                         f"≈ {_decimal(lam, k, min)} are below {torch.finfo(torch.float64).tiny:.3g}, the smallest "
                         "normal float64, and would lose their digits; rescale the factors")
    return out


def _decimal(lam: torch.Tensor, k: torch.Tensor, pick) -> str:
    """The largest (``max``) or smallest nonzero (``min``) λ̂·2^k as a decimal power, without overflow: "1e+400"."""
    logs = torch.where(lam > 0, lam.clamp_min(1e-300).log10() + k.to(torch.float64)[..., None] * math.log10(2),
                       torch.full_like(lam, math.nan))
    value = pick(float(x) for x in logs.flatten() if x == x)
    return f"1e{math.floor(value):+d}" if abs(value) > 300 else f"{10 ** value:.3g}"


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


def spectrum(form: Form, name: str = "form", *, scaled: bool = False, normalized_already: bool = False):
    """Eigenvalues of B Bᵀ for the (prepared) form B, nonzero part, descending: (…, rank bound) float64.

    Computed on the ``normalized`` form, its core scaled again before the Gram product, so no intermediate result
    overflows or underflows; ``InputError`` naming the form where one is not finite all the same, or where the
    eigenvalues are outside float64's normal range (``restore``). ``scaled=True``: ``(λ̂, k)`` with λ = λ̂·2^k,
    λ̂ finite and normal (k = 0 where no factor needed rescaling, ``SAFE_EXPONENT``), for work that only needs λ
    up to a common factor. ``normalized_already``: ``form`` is ``prepare(..., scaled=True)``'s (its factors within
    2^±``SAFE_EXPONENT`` already), so it is not passed over again.
    """
    r = form.rank_bound
    form, e = (form, torch.zeros((), dtype=torch.int64)) if normalized_already else normalized(form)
    if form.structure.is_matrix:
        core = form.chains[0].factors[0]  # (…, n, m), largest |entry| in [1/2, 1) already
    else:
        core = triangular_core(*two_factor(form))  # (…, K, K)
    c = _exponent(core)
    core = _times_pow2(core, -c)
    lam = squared_singular_values(core)[..., :r]  # (…, r)
    if not torch.isfinite(lam).all():
        raise InputError(f"{name}: the spectrum is not finite even with the factors rescaled (a NaN or Inf inside "
                         "the computation)")
    lam = clamp_numerical_zeros(lam)
    k = (2 * (e + c)).expand(lam.shape[:-1]).to(lam.device)
    return (lam, k) if scaled else restore(lam, k, name)
