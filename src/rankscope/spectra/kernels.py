"""Spectra of forms, computed without ever forming a d×d product.

A form's *spectrum* is the nonzero part of the eigenvalues of ``B Bᵀ`` (the squared singular values of B),
descending, float64: as many as the form's rank bound (``spectra.form``).

The trick (as in TransformerLens's ``FactoredMatrix``): split every chain at its narrowest inner dimension,
``C_c = X_c Y_c``; stack the blocks, ``Σ_c C_c = [X_1 … X_C] @ [Y_1; …; Y_C] = X Y`` with inner width
``K = Σ_c k_c`` (a shared left or right chain multiplies X or Y, or takes their place where it is narrower).
Two routes to the singular values of X Y from K×K matrices:

- the Gram route (the default where it applies): σ(XY)² = eig(Γ_X^{1/2} Γ_Y Γ_X^{1/2}) with the Grams
  Γ_X = XᵀX, Γ_Y = YYᵀ built factor by factor from the outside in, a shared factor's once for the batch, kept only
  where an a-posteriori Weyl bound proves the median and the top eigenvalue right to ``TOLERANCE`` (float32
  products where even they pass it, float64 else; the section "Gram route" below);
- the QR route (``route="qr"``, and the fallback per batch item): with ``X = Q_X T_X`` and ``Yᵀ = Q_Y T_Y``
  (thin QR), the singular values of B are those of the core ``T_X T_Yᵀ``.

Both equal the dense SVD up to float rounding.

Every function accepts a leading batch dimension on any factor (heads of one layer, draws of a null); a
factor without it is shared by the whole batch.

Scale. A spectrum is computed on the form scaled by powers of two (``normalized``: each factor divided by the power
of two just above its largest |entry|, and the small core or Grams again before the eigensolver; a factor already within
2^±``SAFE_EXPONENT`` is left as it is, so the common case costs no multiply), then scaled back
(``restore``): λ(c·B) = c²·λ(B), and a power-of-two scaling only changes exponents, so it is exact. Entries anywhere
in float64's range therefore give the eigenvalues to the precision of unit-size entries, or an ``InputError``
naming the form when the eigenvalues themselves lie outside float64's normal range; a non-finite intermediate
result is an error, never a zero.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.spectra.form import Chain, Form, Sum, product, reduced, split_at_bottleneck

# Conversion works in blocks of this many entries on the CPU: each block is converted and its min/max read while it is
# still in cache, so the overflow-safe rescaling's scan costs no second pass over a large factor.
BLOCK_ENTRIES = 2**16


def _as_float64(t: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the factor as float64 on its own device, (…,) its largest |entry| per matrix); refuses NaN/Inf and complex.

    One pass: the conversion and the min/max (``torch.aminmax``, which propagates NaN) read each block once, and a
    finite min and max prove every entry finite."""
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
    t, lo, hi = _converted_with_range(t)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise InputError(f"{where} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")
    return t, torch.maximum(hi, -lo)


def _converted_with_range(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t as float64, (…,) min, (…,) max per matrix), converting and scanning block by block on the CPU."""
    batch = t.shape[:-2]
    items = t.reshape(-1, *t.shape[-2:])  # (B, n, m), a view for a 2-D or 3-D factor
    rows = t.shape[-2]
    step = max(1, BLOCK_ENTRIES // t.shape[-1])
    if t.device.type != "cpu" or t.numel() <= BLOCK_ENTRIES:
        out = t.to(torch.float64)
        if out.numel() == 0:  # an empty batch
            empty = torch.empty(batch, dtype=torch.float64, device=out.device)
            return out, empty, empty
        lo, hi = torch.aminmax(out.flatten(-2), dim=-1) if batch else torch.aminmax(out)
        return out, lo, hi
    same = t.dtype == torch.float64
    out = t if same else torch.empty(t.shape, dtype=torch.float64)
    flat = out.reshape(-1, *t.shape[-2:])
    lo = torch.empty(items.shape[0], dtype=torch.float64)
    hi = torch.empty_like(lo)
    for b in range(items.shape[0]):
        l_b, h_b = math.inf, -math.inf
        for r0 in range(0, rows, step):
            block = flat[b, r0:r0 + step]
            if not same:
                block.copy_(items[b, r0:r0 + step])
            l, h = torch.aminmax(block)
            l_b, h_b = min(l_b, float(l)), max(h_b, float(h))  # float() keeps a NaN: min/max of NaN below
            if l != l or h != h:
                l_b = h_b = math.nan
                break
        lo[b], hi[b] = l_b, h_b
    return out, lo.reshape(batch), hi.reshape(batch)


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
            t, top = _as_float64(f, where)
            t = t.to(device)
            if scaled:
                e = _exponent_of(top).to(device)
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
    return _exponent_of(top)


def _exponent_of(top: torch.Tensor) -> torch.Tensor:
    """``_exponent`` from the largest |entry| of each matrix, (…,)."""
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
    On the CPU the Gram product is numpy's (a BLAS syrk is half a gemm's work) and the eigensolver torch's
    (``eigvalsh``: the faster of the two, benchmarks/spectra.py).
    """
    wide = X.shape[-2] <= X.shape[-1]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by the caller, by name
        gram = _gram(X.mT if wide else X)  # (…, k, k)
    return eigenvalues(gram)


def eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of symmetric matrices (…, k, k), descending, clamped at 0 (torch's ``eigvalsh``)."""
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)


def clamp_numerical_zeros(lam: torch.Tensor) -> torch.Tensor:
    """Set eigenvalues at rounding level of the Gram eigensolver (λ ≤ 8·r·eps·λ_max) to exactly zero."""
    tol = lam[..., :1] * (8 * lam.shape[-1] * torch.finfo(torch.float64).eps)
    return torch.where(lam > tol, lam, torch.zeros_like(lam))


# ---------------------------------------------------------------------------------------------- Gram route
#
# For B = L·(Σ_c X_c Y_c)·R, every chain split at its bottleneck (X_c = L·F_1…F_j, Y_c = F_{j+1}…F_k·R), the
# left Gram Γ_L = [X_1 … X_C]ᵀ[X_1 … X_C] (blocks X_aᵀX_b) and the right one Γ_R (blocks Y_a Y_bᵀ) are K×K,
# K = Σ_c k_c, and σ(B)² = eig(Γ_L^{1/2} Γ_R Γ_L^{1/2}) = eig(Lᵀ Γ_R L) for Γ_L = L Lᵀ (Cholesky; eigh where Γ_L is
# singular). Each Gram is built from the outside in, G ← F_1ᵀF_1, G ← F_iᵀ G F_i, or by multiplying its first
# factors out first where that is cheaper (``_plan``); a 2-D factor (shared by the batch) is multiplied once for
# all, batch items equal to the one before (a GQA layer's stacked key heads) share one Gram (``_unique``), and a
# large shared factor's Gram is kept for the next form that carries the same tensor (``_SHARED``: one MLA
# down-projection Gram per layer for every kind).
#
# Accuracy (Higham 2002, §3.5): a product with inner length k computed in unit roundoff u is off by at most
# γ_k·|A||B| entrywise, γ_k = k·u/(1 − k·u), so by γ_k·‖A‖_F‖B‖_F in Frobenius norm; ``_side`` follows this
# through each block's products (a Gram of one n-row factor: ‖ΔG‖_F ≤ γ_n·‖F‖_F²; an earlier error E carried through
# G ← FᵀGF: E·‖F‖₂²) to a bound ‖ΔΓ‖_F ≤ E per side. By Weyl, every eigenvalue of the core then moves by at most
#     δ = E_L·‖Γ_R‖₂ + ‖Γ_L‖₂·E_R + E_L·E_R + γ_{10K}(eps64)·tr(Γ_L)·‖Γ_R‖_F,
# the last term the K×K float64 core (factorisation, two products and the eigensolver, backward stable), ‖·‖₂
# bounded above by Frobenius norms and row sums.
# The rule: a result is kept only where δ ≤ TOLERANCE·median(λ) (so also ≤ TOLERANCE·λ_max): the eigenvalues that
# decide anything (the median sets the bulk edge; λ_max the spike strength and stable rank) are then right to a
# relative TOLERANCE. Float32 Grams (u = 2^−24; bf16/fp16/fp32 factors are exact in float32) are tried first
# where the rule can hold at all (δ ≥ (γ_n + γ_m)·λ_max/C for outer dimensions n, m and C chains, so
# γ_n + γ_m ≤ C·TOLERANCE is necessary: in float32 only forms with n + m below ~17 per chain); else, or where δ is
# too large, float64 Grams (u = 2^−53); where even those fail the rule (a median far below λ_max, cancellation
# between X and Y, or a zero median), the QR route (``two_factor``, ``triangular_core``), whose error grows with
# ‖X‖‖Y‖ instead of its square.

TOLERANCE = 1e-6  # relative error allowed on the median and the top eigenvalue
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
ROUTES = ("gram", "qr")
ROUTE = "gram"  # spectrum's default route; "qr": the QR route throughout (the reference the Gram route is tested on)
SHARED_GRAM_ENTRIES = 2**20  # 2-D factors at least this large keep their Gram for the next form (``_SHARED``)
_SHARED: OrderedDict | None = None  # inside ``shared_grams()``: (data_ptr, shape, stride, dtype, device) →
#   (factor, Gram), LRU; None outside (no Gram outlives the block that computed it)
_SHARED_SLOTS = 4


@contextmanager
def shared_grams() -> Iterator[None]:
    """A block whose spectra keep the Grams of large shared 2-D factors for the next form carrying the same tensor
    (an MLA layer's down-projections: once for all its kinds). The caller promises not to change those tensors in
    place inside the block; the cache holds them, so their memory cannot be reused under the same address, and it
    is dropped at the end of the block (nested blocks share the outer one)."""
    global _SHARED
    if _SHARED is not None:
        yield
        return
    _SHARED = OrderedDict()
    try:
        yield
    finally:
        _SHARED = None


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n = n·u/(1 − n·u) for the unit roundoff u of ``dtype`` (inf where n·u ≥ 1)."""
    nu = n * UNIT_ROUNDOFF[dtype]
    return nu / (1 - nu) if nu < 1 else math.inf


def _gram(A: torch.Tensor) -> torch.Tensor:
    """AᵀA: (…, n, k) → (…, k, k); numpy's matmul on the CPU (a syrk for a 2-D A), on row-major operands (a
    transposed view is read as its row-major base: AᵀA = F Fᵀ for A = Fᵀ)."""
    if A.device.type == "cpu":
        if A.mT.is_contiguous() and not A.is_contiguous():
            f = A.mT.detach().numpy()  # (…, k, n)
            return torch.from_numpy(f @ np.swapaxes(f, -1, -2))
        a = A.detach().contiguous().numpy()
        return torch.from_numpy(np.swapaxes(a, -1, -2) @ a)
    return A.mT @ A


def _take(A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Batch items ``idx`` of a 3-D A, a transposed view taken from its row-major base (no transposing copy)."""
    if A.mT.is_contiguous() and not A.is_contiguous():
        return A.mT[idx].mT
    return A[idx]


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device))


def _shared_gram(A: torch.Tensor) -> torch.Tensor:
    """AᵀA of a 2-D factor; inside ``shared_grams()`` a large one's Gram is kept for the next form carrying the
    same tensor (the cache holds the tensor itself, so its memory cannot be reused under the same address)."""
    if _SHARED is None or A.ndim != 2 or A.numel() < SHARED_GRAM_ENTRIES:
        return _gram(A)
    key = _key(A)
    hit = _SHARED.get(key)
    if hit is not None:
        _SHARED.move_to_end(key)
        return hit[1]
    G = _gram(A)
    _SHARED[key] = (A, G)
    while len(_SHARED) > _SHARED_SLOTS:
        _SHARED.popitem(last=False)
    return G


def _unique(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(kept items, inverse) where some batch items of the 3-D ``tensors`` equal the item before in all of them
    (a GQA layer's stacked key heads): item b is computed as kept[inverse[b]]. None where all differ."""
    stacked = [t for t in tensors if t.ndim == 3 and t.shape[0] > 1]
    if not stacked:
        return None
    B = stacked[0].shape[0]
    same = torch.ones(B - 1, dtype=torch.bool, device=stacked[0].device)
    for t in stacked:  # a cheap first look at one row, then the full comparison of the candidates
        same &= (t[1:, 0] == t[:-1, 0]).all(-1)
    if not bool(same.any()):
        return None
    for b in same.nonzero().flatten().tolist():
        same[b] = all(torch.equal(t[b + 1], t[b]) for t in stacked)
    if not bool(same.any()):
        return None
    new = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])  # (B,)
    return new.nonzero().flatten(), new.cumsum(0) - 1


def _cross(A: torch.Tensor, B: torch.Tensor, same: bool) -> torch.Tensor:
    """AᵀB (…, a, b) for A (…, n, a), B (…, n, b); repeated batch items computed once; ``same``: B is A."""
    runs = _unique([A] if same else [A, B])
    if runs is None:
        return (_shared_gram(A) if A.ndim == 2 else _gram(A)) if same else A.mT @ B
    keep, inverse = runs
    if same:  # one Gram per kept item, read in place (no copy of the kept items)
        return torch.stack([_gram(A[b]) for b in keep.tolist()])[inverse]
    A = _take(A, keep) if A.ndim == 3 and A.shape[0] > 1 else A  # a batch of one is shared by every item
    B = _take(B, keep) if B.ndim == 3 and B.shape[0] > 1 else B
    return (A.mT @ B)[inverse]


def _batch_of(t: torch.Tensor) -> int:
    return t.shape[0] if t.ndim == 3 else 1


def _plan(factors: list[torch.Tensor], start: torch.Tensor | None) -> int:
    """How many leading factors to multiply out before the Gram (then peel the rest, G ← FᵀGF): the cheapest by
    multiply–add count, batch sizes counted. ``start``: a shared Gram (p, p) the factors are applied to."""
    n = factors[0].shape[-2]
    dims = [f.shape[-1] for f in factors]
    batches = np.maximum.accumulate([_batch_of(f) for f in factors])
    if start is not None:
        batches = np.maximum(batches, _batch_of(start))
    best, best_cost = 1, math.inf
    for t in range(1, len(factors) + 1):
        cost = sum(batches[i] * n * dims[i - 1] * dims[i] for i in range(1, t))  # F_1 … F_t, left to right
        k = dims[t - 1]
        cost += batches[t - 1] * (n * k * k if start is None else n * n * k + n * k * k)
        cost += sum(batches[i] * (dims[i - 1] ** 2 * dims[i] + dims[i - 1] * dims[i] ** 2) for i in range(t, len(dims)))
        if cost < best_cost:
            best, best_cost = t, cost
    return best


def _trace(G: torch.Tensor) -> torch.Tensor:
    return G.diagonal(dim1=-2, dim2=-1).sum(-1)


@dataclass(frozen=True)
class Side:
    """One side's Gram: ``gram`` (…, K, K) float64 with blocks per chain, ‖computed − exact‖_F ≤ ``error``."""

    gram: torch.Tensor
    error: torch.Tensor  # (…,)
    dtype: torch.dtype  # the precision its products were computed in


def _norm2(t: torch.Tensor) -> torch.Tensor:
    """(…,) an upper bound on ‖t‖₂ for matrices (…, a, b): min(‖t‖_F, ``_sym_norm2`` of the smaller Gram^½), float64
    (the Gram's own rounding, relative γ_n ≪ 1e-9, covered by a margin)."""
    t = t.to(torch.float64)
    fro = torch.linalg.matrix_norm(t)
    small = t @ t.mT if t.shape[-2] <= t.shape[-1] else t.mT @ t
    return torch.minimum(fro, _sym_norm2(small).sqrt() * (1 + 1e-9))


def _sym_norm2(G: torch.Tensor) -> torch.Tensor:
    """(…,) an upper bound on ‖G‖₂ of symmetric G: min(‖G‖_F, largest absolute row sum)."""
    return torch.minimum(torch.linalg.matrix_norm(G), G.abs().sum(-1).amax(-1))


def _fro(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(t.to(torch.float64))


def _side(pieces: list[list[torch.Tensor]], shared: list[torch.Tensor], dtype: torch.dtype,
          diagonal_only: bool = False) -> Side | list[torch.Tensor]:
    """The Gram of [X_1 … X_C], X_c = S·product(pieces[c]) (S = product(shared), or none): its blocks X_aᵀX_b.

    ``diagonal_only``: the diagonal blocks only (a list), what block norms need. The error bound follows each block's
    products (Higham 2002, §3.5: a product rounded in unit roundoff u with inner length k is off by at most
    γ_k·|A||B| entrywise, so by γ_k·‖A‖_F‖B‖_F in Frobenius norm):
    start QᵀQ' over n rows: γ_n·‖Q‖_F‖Q'‖_F; start Qᵀ(M0 Q') on a shared Gram M0 with error E0:
    E0·‖Q‖₂‖Q'‖₂ + γ_2p·‖Q‖_F‖M0‖_F‖Q'‖_F; a peel G ← FᵀG F': E·‖F‖₂‖F'‖₂ + γ_(k+k')·‖F‖_F‖G‖_F‖F'‖_F; a factor
    product multiplied out first carries γ_(Σk)·Π‖F_i‖_F more. ‖·‖₂ is bounded above by ``_norm2``."""
    pieces = [[f.to(dtype) for f in p] for p in pieces]
    shared = [f.to(dtype) for f in shared]
    start = None
    if shared:  # the shared outer chain's own Gram, once for every chain and block
        lone = _side([shared], [], dtype)
        start, start_error = lone.gram.to(dtype), lone.error
    plans = [_plan(p, start) for p in pieces]
    heads = [product(p[:t]) for p, t in zip(pieces, plans, strict=True)]  # Q_c (…, p, k_t)
    rests = [p[t:] for p, t in zip(pieces, plans, strict=True)]
    applied = [None if start is None else start @ h for h in heads]  # M0·Q_c, once per chain

    traces = {}

    def block(a: int, b: int) -> torch.Tensor:
        if start is None:
            G = _cross(heads[a], heads[b], same=a == b)  # (…, k_a, k_b)
            if a == b:
                traces[a] = _trace(G).to(torch.float64)  # ‖Q_a‖_F², for the error bound
        else:
            G = heads[a].mT @ applied[b]
        for i in range(max(len(rests[a]), len(rests[b]))):  # peeled from the outside in
            if i < len(rests[a]):
                G = rests[a][i].mT @ G
            if i < len(rests[b]):
                G = G @ rests[b][i]
        return (G + G.mT) / 2 if a == b else G

    C = len(pieces)
    diag = [block(c, c) for c in range(C)]
    if diagonal_only:
        return [d.to(torch.float64) for d in diag]
    rows = [[None] * C for _ in range(C)]
    for a in range(C):
        rows[a][a] = diag[a]
        for b in range(a + 1, C):
            rows[a][b] = block(a, b)
            rows[b][a] = rows[a][b].mT
    error = _side_error(pieces, plans, heads, rests, start, None if start is None else start_error, traces, dtype)
    return Side(_assembled(rows).to(torch.float64), error, dtype)


def _assembled(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    batch = np.broadcast_shapes(*(tuple(x.shape[:-2]) for row in rows for x in row))
    return torch.cat([torch.cat([x.expand(*batch, *x.shape[-2:]) for x in row], dim=-1) for row in rows], dim=-2)


def _side_error(pieces, plans, heads, rests, start, start_error, traces, dtype) -> torch.Tensor:
    """(…,) the bound on ‖ΔΓ‖_F of ``_side`` (its docstring): each block's bound, summed in quadrature."""
    C = len(pieces)
    q_fro, q_err, q_two = [], [], []
    for c in range(C):
        if plans[c] == 1:
            q_fro.append(traces[c].clamp_min(0).sqrt() * (1 + 1e-9) if c in traces else _fro(heads[c]))
            q_err.append(torch.zeros((), dtype=torch.float64))
        else:  # multiplied out first: Π‖F_i‖_F bounds both its norm and (times γ) its rounding error
            bound = math.prod((_fro(f) for f in pieces[c][: plans[c]]), start=torch.ones((), dtype=torch.float64))
            q_fro.append(bound)
            q_err.append(gamma(sum(f.shape[-1] for f in pieces[c][: plans[c] - 1]), dtype) * bound)
        q_two.append(_norm2(heads[c]) + q_err[-1] if start is not None else None)
    if start is not None:
        m_fro = _fro(start)
        p = start.shape[-1]
    total = 0
    for a in range(C):
        for b in range(a, C):
            fa, fb = q_fro[a] + q_err[a], q_fro[b] + q_err[b]
            if start is None:
                E = gamma(heads[a].shape[-2], dtype) * fa * fb + q_err[a] * fb + fa * q_err[b]
                G_fro = fa * fb
            else:
                E = (start_error * q_two[a] * q_two[b] + gamma(2 * p, dtype) * fa * m_fro * fb
                     + m_fro * (q_err[a] * fb + fa * q_err[b]))
                G_fro = fa * m_fro * fb
            for i in range(max(len(rests[a]), len(rests[b]))):
                Fa = rests[a][i] if i < len(rests[a]) else None
                Fb = rests[b][i] if i < len(rests[b]) else None
                two = (_norm2(Fa) if Fa is not None else 1) * (_norm2(Fb) if Fb is not None else 1)
                fro_a = _fro(Fa) if Fa is not None else 1
                fro_b = _fro(Fb) if Fb is not None else 1
                k = (Fa.shape[-2] if Fa is not None else 0) + (Fb.shape[-2] if Fb is not None else 0)
                E = E * two + gamma(k, dtype) * fro_a * G_fro * fro_b
                G_fro = G_fro * fro_a * fro_b
            total = total + (1 if a == b else 2) * E.square()
    return total.sqrt()


def _pieces(form: Form) -> tuple[list, list, list, list]:
    """(left pieces, left shared, right pieces, right shared): each chain split at its bottleneck; the right side
    transposed and reversed, so that both are Grams of their pieces' columns (``_side``)."""
    left, right = [], []
    for chain in form.chains:
        fs = list(chain.factors)
        if len(fs) == 1:
            fs.append(torch.eye(fs[0].shape[-1], dtype=fs[0].dtype, device=fs[0].device))
        dims = (fs[0].shape[-2], *(f.shape[-1] for f in fs))
        j = 1 + int(np.argmin(dims[1:-1]))  # split after factor j − 1, as split_at_bottleneck
        left.append(fs[:j])
        right.append([f.mT for f in reversed(fs[j:])])
    shared_left = list(form.left.factors) if form.left is not None else []
    shared_right = [f.mT for f in reversed(form.right.factors)] if form.right is not None else []
    return left, shared_left, right, shared_right


def gram_applies(form: Form) -> bool:
    """The Gram route computes this form's spectrum: a chain or sum (not one matrix) whose split width K equals its
    rank bound (no shared outer chain or outer dimension narrower than K)."""
    s = form.structure
    if s.is_matrix:
        return False
    K = sum(min(d[1:-1]) if len(d) > 2 else d[-1] for d in s.chains)
    return K == s.rank_bound


def grams(form: Form, dtype: torch.dtype = torch.float64) -> tuple[Side, Side]:
    """(left, right) Grams of a form (``_side``), float64 results of products in ``dtype``."""
    left, shared_left, right, shared_right = _pieces(form)
    return _side(left, shared_left, dtype), _side(right, shared_right, dtype)


def _remember(form: Form, sides: tuple[Side, Side]) -> None:
    """Leave a sum's block norms, from the Grams just computed, on the form for the next ``Form.block_norms``
    (which reads them once: ``spectrum(..., remember=True)``, for the sum null that ``diagnose`` draws next)."""
    if len(form.chains) > 1:
        object.__setattr__(form, "_memo", _norms_from(form, sides))


def _norms_from(form: Form, sides: tuple[Side, Side]) -> torch.Tensor:
    """‖L C_c R‖_F = tr(Γ_L,cc Γ_R,cc)^½ per chain c from the diagonal blocks of the two Grams, (…, C)."""
    widths = [min(d[1:-1]) if len(d) > 2 else d[-1] for d in form.structure.chains]
    edges = np.cumsum([0, *widths])
    norms = [(sides[0].gram[..., a:b, a:b] * sides[1].gram[..., a:b, a:b]).sum(dim=(-2, -1)).clamp_min(0).sqrt()
             for a, b in itertools.pairwise(edges)]  # tr(G_L G_R) of symmetric blocks
    return torch.stack(torch.broadcast_tensors(*norms), dim=-1)


def block_norms(form: Form) -> torch.Tensor:
    """``Form.block_norms`` by Grams: ‖X_c Y_c‖_F² = tr(Γ_L,cc Γ_R,cc), the diagonal blocks only (a shared factor's
    Gram once for the batch, a large one's kept for the next form, ``_SHARED``), (…, C) float64."""
    form = form.double() if any(f.dtype != torch.float64 for f in form.factor_list) else form
    left, shared_left, right, shared_right = _pieces(form)
    norms = [(GL * GR).sum(dim=(-2, -1)).clamp_min(0).sqrt()
             for GL, GR in zip(_side(left, shared_left, torch.float64, diagonal_only=True),
                               _side(right, shared_right, torch.float64, diagonal_only=True), strict=True)]
    return torch.stack(torch.broadcast_tensors(*norms), dim=-1)


def _scaled_down(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G·2^−c, c): each matrix's largest |entry| brought to [1/2, 1) (exact)."""
    top = G.abs().amax(dim=(-2, -1))
    c = torch.frexp(top).exponent.to(torch.int64)
    c = torch.where(top > 0, c, torch.zeros_like(c))
    return _times_pow2(G, -c), c


def core_eigenvalues(GL: torch.Tensor, GR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(λ̂ (…, K) descending, cL, cR (…,)) with eig(Γ_L Γ_R) = λ̂·2^(cL + cR): eig(Lᵀ Γ̂_R L) for Γ̂_L = L Lᵀ
    (Cholesky, or V·diag(√w) from eigh where Γ̂_L is singular), Γ̂ = Γ·2^−c scaled to a largest entry near 1."""
    GL, cl = _scaled_down(GL)
    GR, cr = _scaled_down(GR)
    L, info = torch.linalg.cholesky_ex(GL)
    bad = info != 0
    if bool(bad.any()):
        w, V = torch.linalg.eigh(GL[bad] if GL.ndim == 3 else GL)
        root = V * w.clamp_min(0).sqrt()[..., None, :]
        if GL.ndim == 3:
            L = L.clone()
            L[bad] = root
        else:
            L = root
    M = L.mT @ GR @ L  # (…, K, K)
    return eigenvalues((M + M.mT) / 2), cl, cr


def error_bound(left: Side, right: Side, cl: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """δ (…,): Weyl's bound on every core eigenvalue's error (the Gram route's section), in units of λ̂
    (the Grams scaled by 2^−cL, 2^−cR as in ``core_eigenvalues``)."""
    eL = torch.ldexp(left.error, -cl)
    eR = torch.ldexp(right.error, -cr)
    nL = torch.ldexp(_sym_norm2(left.gram), -cl)
    tL = torch.ldexp(_trace(left.gram), -cl)
    nR = torch.ldexp(_sym_norm2(right.gram), -cr)
    fR = torch.ldexp(torch.linalg.matrix_norm(right.gram), -cr)
    K = left.gram.shape[-1]
    return eL * nR + nL * eR + eL * eR + gamma(10 * K, torch.float64) * tL * fR


def _float32_exact(form: Form) -> bool:
    return all(torch.equal(f, f.float().double()) for f in form.factor_list)


def float32_possible(form: Form) -> bool:
    """The necessary condition for float32 Grams to pass the rule: γ_n + γ_m ≤ TOLERANCE in float32 for the outer
    dimensions n, m, times the number of chains C (each side's first product runs over them, so its error bound is
    at least γ_n·‖Γ‖₂/C, and δ ≥ (γ_n + γ_m)·λ_max/C). Never on CUDA unless float32 matmuls are IEEE there (TF32 or
    bf16 products, ``torch.set_float32_matmul_precision`` "high"/"medium", have a unit roundoff of 2^−11 or worse)."""
    on_cuda = any(f.device.type == "cuda" for f in form.factor_list)
    if on_cuda and (torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32):
        return False
    return gamma(form.n, torch.float32) + gamma(form.m, torch.float32) <= len(form.chains) * TOLERANCE


def gram_spectrum(form: Form, precision: str | None = None, remember: bool = False):
    """(λ̂ (…, K), c (…,), accepted (…,) bool, dtype) by the Gram route on a normalized form: eig(Γ_L Γ_R) = λ̂·2^c.

    ``precision`` None: the rule of the section comment (float32 where it can hold and the factors are exact in
    float32, else float64); "float32" or "float64" to force one. ``accepted``: δ ≤ TOLERANCE·median(λ).
    ``remember``: leave a sum's block norms on the form for the next ``Form.block_norms`` (``_remember``)."""
    if precision is None:
        tries = [torch.float32, torch.float64] if float32_possible(form) and _float32_exact(form) else [torch.float64]
    else:
        tries = [{"float32": torch.float32, "float64": torch.float64}[precision]]
    for i, dtype in enumerate(tries):
        sides = grams(form, dtype)
        lam, cl, cr = core_eigenvalues(sides[0].gram, sides[1].gram)
        delta = error_bound(*sides, cl, cr)
        if lam.numel() == 0:  # an empty batch: nothing to accept or refuse
            return lam, cl + cr, torch.ones(lam.shape[:-1], dtype=torch.bool, device=lam.device), dtype
        accepted = delta <= TOLERANCE * torch.quantile(lam[..., : form.rank_bound], 0.5, dim=-1)
        if bool(accepted.all()) or i == len(tries) - 1:
            if dtype == torch.float64 and remember:
                _remember(form, sides)
            return lam, cl + cr, accepted, dtype
    raise AssertionError("unreachable")


def _qr_spectrum(form: Form) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ̂ (…, r'), c (…,)) by the QR route: λ = λ̂·2^c (``two_factor``, ``triangular_core``)."""
    if form.structure.is_matrix:
        core = form.chains[0].factors[0]  # (…, n, m), largest |entry| in [1/2, 1) already
    else:
        core = triangular_core(*two_factor(form))  # (…, K, K)
    c = _exponent(core)
    core = _times_pow2(core, -c)
    return squared_singular_values(core), 2 * c


def _items(form: Form, idx: torch.Tensor) -> Form:
    """Batch items ``idx`` of a batched form (2-D and size-1 factors stay as they are)."""
    return form.map(lambda f: f[idx.to(f.device)] if f.ndim == 3 and f.shape[0] > 1 else f)


def spectrum(form: Form, name: str = "form", *, scaled: bool = False, normalized_already: bool = False,
             route: str | None = None, remember: bool = False):
    """Eigenvalues of B Bᵀ for the (prepared) form B, nonzero part, descending: (…, rank bound) float64.

    Computed on the ``normalized`` form, its Grams (or core) scaled again before the eigensolver, so no intermediate
    result overflows or underflows; ``InputError`` naming the form where one is not finite all the same, or where
    the eigenvalues are outside float64's normal range (``restore``). ``scaled=True``: ``(λ̂, k)`` with λ = λ̂·2^k,
    λ̂ finite and normal (k = 0 where no factor needed rescaling, ``SAFE_EXPONENT``), for work that only needs λ
    up to a common factor. ``normalized_already``: ``form`` is ``prepare(..., scaled=True)``'s (its factors within
    2^±``SAFE_EXPONENT`` already), so it is not passed over again.

    ``route``: "gram" (default, ``ROUTE``): the Gram route where it applies and its error bound holds (see the Gram
    route's section), the QR route for the batch items where it does not; "qr": the QR route throughout.
    ``remember``: a sum's block norms from its Grams are left for the next ``form.block_norms()`` (``diagnose``, on
    the form it prepared itself).
    """
    route = ROUTE if route is None else route
    if route not in ROUTES:
        raise InputError(f"route must be one of {', '.join(ROUTES)}; got {route!r}")
    r = form.rank_bound
    form, e = (form, torch.zeros((), dtype=torch.int64)) if normalized_already else normalized(form)
    if route == "gram" and gram_applies(form):
        lam, c, accepted, _ = gram_spectrum(form, remember=remember)
        lam = lam[..., :r]
        if not bool(accepted.all()):  # the rule failed: the QR route for those items
            if accepted.ndim == 0:
                lam, c = _qr_spectrum(form)
            else:
                idx = (~accepted).nonzero().flatten()
                lam_q, c_q = _qr_spectrum(_items(form, idx))
                lam, c = lam.clone(), c.clone()
                lam[idx.to(lam.device)], c[idx.to(c.device)] = lam_q[..., :r].to(lam.dtype), c_q.to(c.device)
    else:
        lam, c = _qr_spectrum(form)
    lam = lam[..., :r]  # (…, r)
    if not torch.isfinite(lam).all():
        raise InputError(f"{name}: the spectrum is not finite even with the factors rescaled (a NaN or Inf inside "
                         "the computation)")
    lam = clamp_numerical_zeros(lam)
    k = (2 * e + c).expand(lam.shape[:-1]).to(lam.device)
    return (lam, k) if scaled else restore(lam, k, name)
