"""Attention forms by variant: which chain each head's query–key and OV form is, from its weight matrices.

Conventions (docs/design.md §1, §4), with PyTorch weights ``[out, in]`` and tokens as column vectors:

- ``qk``: the bilinear form ``B`` with ``score(x_i, x_j) = x_iᵀ B x_j = q_iᵀ k_j``. One head: the chain
  ``Wq_hᵀ @ Wk_h`` (d×dh @ dh×d). A layer (``head=-1``): ``Σ_h B_h``.
- ``ov``: the map ``x ↦ Wo[:, h] Wv_h x`` a head writes into the residual stream. One head: the chain
  ``Wo[:, h·dv:(h+1)·dv] @ Wv_h`` (d×dv @ dv×d). A layer: ``Σ_h``.
- ``qk_content`` / ``qk_rope`` (decoupled MLA): the two blocks of the sum ``qk = content + rope``.

Forms are *unscaled*: the softmax scale (1/√dh, DeepSeek's 1/√(dn+dr)·mscale², GPT-2's optional 1/(layer+1))
is left out, as are all biases (q/k biases add terms linear in x and a constant, which a bilinear form cannot
hold). RoPE makes the form depend on the relative offset Δ = j − i of key j to query i (Δ ≤ 0 under a causal
mask): with q_i = R_i q, k_j = R_j k, q_iᵀ k_j = qᵀ R_{j−i} k, so ``B_h(Δ) = Wq_hᵀ R_Δ Wk_h`` (``rope_matrix``).
Forms are read at ``offset`` Δ (default 0, where the rotation is the identity); R_Δ is folded into the key-side
factor, so a form keeps its structure (and a Gaussian factor rotated stays Gaussian: the null is unchanged).
Where RoPE rotates the token before the projections (``mla_prerope`` with ``rope_mode="input"``) the score is
x_iᵀ R_iᵀ B R_j x_j = x_iᵀ R_iᵀ (B R_Δ) R_i x_j: the form at position i is R_iᵀ B(Δ) R_i with
``B(Δ) = B R_Δ``, whose spectrum depends neither on i nor on Δ (R_Δ is orthogonal). A layer sum over
grouped heads is written with the group's query (or output) heads summed,
``Σ_{h∈g} Wq_hᵀ Wk_g = (Σ_{h∈g} Wq_h)ᵀ Wk_g``: the same matrix, but the inner width is the true rank bound
``H_kv·dh``, so the structure-matched null simulates the right shapes.

Per-head chains declare the factors that every head of the layer shares (MQA's key, MLA's ``Wdkv``, the rope
key, ``Wdq``), so ``stack_heads`` batches them without copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rankscope.errors import InputError
from rankscope.spectra.form import Chain, Form, Sum, stack
from rankscope.vocab import (
    ATTENTION_KINDS,
    GQA,
    MHA,
    MHA_DECOUPLED,
    MLA_DECOUPLED,
    MQA,
    OV,
    QK,
    QK_CONTENT,
    QK_ROPE,
    ROPE_COUPLED,
    ROPE_INPUT,
)


@dataclass(frozen=True)
class NamedForm:
    """One form of one attention layer or head, ready for ``rankscope.diagnose``."""

    layer: int  # layer index, as numbered in the model's parameter names
    head: int  # query head, or -1 for the layer's sum over heads
    kind: str  # vocab.ATTENTION_KINDS
    form: Form
    variant: str  # vocab.ATTENTIONS
    kv_cache_floats: int | None  # floats cached per token in this layer (keys + values, or MLA's latent + rope key)
    offset: int = 0  # the relative offset Δ = j − i at which RoPE was applied (0: no rotation)
    stack: str = ""  # which attention stack of a model with several ("encoder", "decoder", "cross", "text", …)

    @property
    def key(self) -> tuple[int, int, str]:
        """(layer, head, kind): the form's key at one offset (the store's rows add ``offset``)."""
        return (self.layer, self.head, self.kind)


def rope_matrix(dim: int, offset: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """R_Δ (dim, dim) float64: RoPE's rotation by Δ positions in LLaMA's rotate-half convention,
    R_Δ v = v·cos(Δθ) + rotate_half(v)·sin(Δθ), θ_i = theta^(−2i/dim) for the pair (i, i + dim/2)
    (RoFormer, arXiv 2104.09864). R_0 = I, R_aᵀ = R_−a, R_a R_b = R_{a+b}."""
    if dim % 2:
        raise InputError(f"rope_matrix: RoPE rotates pairs; dim={dim} is odd")
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = torch.cat((inv_freq, inv_freq)) * offset  # (dim,)
    half = dim // 2
    rotate_half = torch.zeros(dim, dim, dtype=torch.float64)  # rotate_half(v) = P v = [−v2; v1]
    rotate_half[:half, half:] = -torch.eye(half, dtype=torch.float64)
    rotate_half[half:, :half] = torch.eye(half, dtype=torch.float64)
    return (torch.diag(angles.cos()) + torch.diag(angles.sin()) @ rotate_half).to(device)


def _rotate_rows(w: torch.Tensor, dim: int, offset: int, theta: float) -> torch.Tensor:
    """Each consecutive block of ``dim`` rows of w (…, n·dim, m) rotated by R_Δ: blockdiag(R_Δ) @ w."""
    if offset == 0:
        return w
    r = rope_matrix(dim, offset, theta, device=w.device)
    shape = w.shape
    return (r @ w.reshape(*shape[:-2], shape[-2] // dim, dim, shape[-1])).reshape(shape)


def stack_heads(forms: Sequence[NamedForm]) -> Form:
    """The per-head forms of one (layer, kind) as one batched form for ``rankscope.diagnose_batch``; the factors
    the heads declare shared stay one 2-D factor."""
    if not forms:
        raise InputError("stack_heads: no forms given")
    if len({(f.layer, f.kind) for f in forms}) > 1 or any(f.head < 0 for f in forms):
        raise InputError("stack_heads: give the per-head forms (head ≥ 0) of a single (layer, kind)")
    return stack([f.form for f in forms])


def latent_rms_isotropic(w_down: torch.Tensor) -> float:
    """ρ = ‖W‖_F / √rows: the rms of the latent W x for isotropic unit-variance x (E‖Wx‖² = ‖W‖_F²)."""
    return float(torch.linalg.matrix_norm(torch.as_tensor(w_down).detach().to(torch.float64)) / w_down.shape[0] ** 0.5)


def _f64(w, name: str, ndim: int = 2) -> torch.Tensor:
    t = torch.as_tensor(w).detach()
    if t.ndim != ndim:
        raise InputError(f"{name} has shape {tuple(t.shape)}; expected a {ndim}-D tensor")
    return t.to(torch.float64)


def _kinds(kinds: Sequence[str] | None, allowed: Sequence[str]) -> tuple[str, ...]:
    if kinds is None:
        return tuple(allowed)
    bad = [k for k in kinds if k not in ATTENTION_KINDS]
    if bad:
        raise InputError(f"unknown form kind(s) {bad}; known kinds are {list(ATTENTION_KINDS)}")
    return tuple(k for k in kinds if k in allowed)


# ---------------------------------------------------------------------------------------------- MHA, GQA, MQA


def mha_variant(n_heads: int, n_kv_heads: int) -> str:
    if n_kv_heads == n_heads:
        return MHA
    return MQA if n_kv_heads == 1 else GQA


def mha_forms(layer: int, wq, wk, wv, wo, n_heads: int, n_kv_heads: int | None = None, *,
              heads: bool = True, kinds: Sequence[str] | None = None, offset: int = 0,
              rope_theta: float = 10000.0) -> Iterator[NamedForm]:
    """NamedForms (qk, ov) of one MHA/GQA/MQA layer from ``[out, in]`` weights; query head h uses KV group
    ``h // (H / H_kv)`` (the layout of LLaMA's ``repeat_kv``).

    ``wq`` (H·dk, d), ``wk`` (H_kv·dk, dkv_in), ``wv`` (H_kv·dv, dkv_in), ``wo`` (d_out, H·dv); any may be None
    to skip the forms that need it. Yields the layer sum (head −1) then each head, per kind. ``offset`` Δ: the
    qk forms ``Wq_hᵀ R_Δ Wk_g`` with RoPE over each key head's dk dims (ov forms do not depend on Δ).
    """
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_heads % n_kv_heads:
        raise InputError(f"layer {layer}: {n_heads} query heads do not split into {n_kv_heads} KV groups")
    rep = n_heads // n_kv_heads
    variant = mha_variant(n_heads, n_kv_heads)
    todo = _kinds(kinds, (QK, OV))
    wq = None if wq is None else _f64(wq, f"layer {layer} query weight")
    wk = None if wk is None else _f64(wk, f"layer {layer} key weight")
    wv = None if wv is None else _f64(wv, f"layer {layer} value weight")
    wo = None if wo is None else _f64(wo, f"layer {layer} output weight")
    dk = wk.shape[0] // n_kv_heads if wk is not None else (wq.shape[0] // n_heads if wq is not None else 0)
    dv = (wv.shape[0] if wv is not None else 0) // n_kv_heads
    cache = None if wk is None or wv is None else n_kv_heads * (dk + dv)
    output = None if wo is None or wv is None else wo.mT  # its head columns are known from the values
    for name, w, rows in ((("query", wq, n_heads * dk), ("key", wk, n_kv_heads * dk),
                           ("value", wv, n_kv_heads * dv), ("output", output, n_heads * dv))):
        if w is not None and w.shape[0] != rows:
            raise InputError(f"layer {layer}: {name} weight has {w.shape[0]} head rows, expected {rows} "
                             f"({n_heads} heads, {n_kv_heads} KV heads, dk={dk}, dv={dv})")
    one_kv = {1} if n_kv_heads == 1 else set()  # MQA: one key and one value for every head

    def make(kind: str, head: int, form: Form) -> NamedForm:
        return NamedForm(layer, head, kind, form, variant, cache, offset if kind == QK else 0)

    if QK in todo and wq is not None and wk is not None:
        wk = _rotate_rows(wk, dk, offset, rope_theta)  # (H_kv·dk, d): R_Δ Wk_g per key head
        d_in = wq.shape[1]
        q_grouped = wq.reshape(n_kv_heads, rep, dk, d_in).sum(1).reshape(n_kv_heads * dk, d_in)
        yield make(QK, -1, Chain(q_grouped.mT, wk))  # (d, H_kv·dk) @ (H_kv·dk, d)
        if heads:
            for h in range(n_heads):
                g = h // rep
                yield make(QK, h, Chain(wq[h * dk:(h + 1) * dk].mT, wk[g * dk:(g + 1) * dk], shared=one_kv))
    if OV in todo and wo is not None and wv is not None:
        d_out = wo.shape[0]
        o_grouped = wo.reshape(d_out, n_kv_heads, rep, dv).sum(2).reshape(d_out, n_kv_heads * dv)
        yield make(OV, -1, Chain(o_grouped, wv))  # (d, H_kv·dv) @ (H_kv·dv, d)
        if heads:
            for h in range(n_heads):
                g = h // rep
                yield make(OV, h, Chain(wo[:, h * dv:(h + 1) * dv], wv[g * dv:(g + 1) * dv], shared=one_kv))


# ---------------------------------------------------------------------------------------------- MLA


@dataclass(frozen=True)
class MLAWeights:
    """One MLA layer in DeepSeek-V2/V3's layout (``[out, in]``; docs/design.md §4).

    ``kv_a`` (dc+dr, d) = [Wdkv; Wkr], ``kv_a_norm`` (dc,) = Dkv, ``kv_b`` (H·(dn+dv), dc) with rows per head
    [Wuk_h; Wuv_h], ``wo`` (d, H·dv). Queries: ``q_a`` (dq, d) = Wdq, ``q_a_norm`` (dq,) = Dq, ``q_b``
    (H·(dn+dr), dq) with rows per head [Wuq_h; Wqr_h]; or, uncompressed, ``wq`` (H·(dn+dr), d). ``rho_q`` and
    ``rho_kv``: the latents' measured rms (default: the isotropic-input value ‖W‖_F/√rows).
    ``qk_rope_head_dim=0`` is MLA without a decoupled rope part (``mla_prerope``): ``kv_a`` is just Wdkv.
    """

    n_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    kv_a: torch.Tensor
    kv_a_norm: torch.Tensor
    kv_b: torch.Tensor
    wo: torch.Tensor | None = None
    q_a: torch.Tensor | None = None
    q_a_norm: torch.Tensor | None = None
    q_b: torch.Tensor | None = None
    wq: torch.Tensor | None = None
    rho_q: float | None = None
    rho_kv: float | None = None


@dataclass(frozen=True)
class _MLAFactors:
    """An MLA layer's weights cut into the factors of its chains (float64, norms and ρ folded in)."""

    q_left: Chain | None  # (d, dq) Wdqᵀ/ρq, shared by every head and both blocks; None for uncompressed queries
    q_nope: torch.Tensor  # (H, dq or d, dn): Dq·Wuq_hᵀ (or Wq_hᵀ)
    q_rope: torch.Tensor  # (H, dq or d, dr): Dq·Wqr_hᵀ
    w_uk: torch.Tensor  # (H, dn, dc): Wuk_h·Dkv
    w_uv: torch.Tensor  # (H, dv, dc): Wuv_h·Dkv
    key_latent: torch.Tensor  # (dc, d): Wdkv/ρkv
    w_kr: torch.Tensor  # (dr, d): the rope key, shared by every head, no norm (as in DeepSeek)
    wo: torch.Tensor | None  # (d, H·dv)


def _mla_factors(layer: int, w: MLAWeights) -> _MLAFactors:
    H, dn, dr, dv = w.n_heads, w.qk_nope_head_dim, w.qk_rope_head_dim, w.v_head_dim
    where = f"layer {layer}"
    kv_a = _f64(w.kv_a, f"{where} kv_a_proj_with_mqa")
    dc = kv_a.shape[0] - dr
    if dc <= 0 or dr < 0:
        raise InputError(f"{where}: kv_a_proj_with_mqa has {kv_a.shape[0]} rows, not more than qk_rope_head_dim={dr}")
    d_kv = _f64(w.kv_a_norm, f"{where} kv_a_layernorm", ndim=1)
    kv_b = _f64(w.kv_b, f"{where} kv_b_proj")
    if kv_b.shape != (H * (dn + dv), dc) or d_kv.shape != (dc,):
        raise InputError(f"{where}: kv_b_proj {tuple(kv_b.shape)} / kv_a_layernorm {tuple(d_kv.shape)} do not fit "
                         f"H={H}, dn={dn}, dv={dv}, dc={dc}")
    kv_b = kv_b.reshape(H, dn + dv, dc)
    rho_kv = latent_rms_isotropic(kv_a[:dc]) if w.rho_kv is None else float(w.rho_kv)
    if w.q_a is not None:
        w_dq = _f64(w.q_a, f"{where} q_a_proj")
        dq = w_dq.shape[0]
        d_q = (_f64(w.q_a_norm, f"{where} q_a_layernorm", ndim=1) if w.q_a_norm is not None
               else torch.ones(dq, dtype=torch.float64))
        q_b = _f64(w.q_b, f"{where} q_b_proj")
        if q_b.shape != (H * (dn + dr), dq) or d_q.shape != (dq,):
            raise InputError(f"{where}: q_b_proj {tuple(q_b.shape)} / q_a_layernorm {tuple(d_q.shape)} do not fit "
                             f"H={H}, dn={dn}, dr={dr}, dq={dq}")
        rho_q = latent_rms_isotropic(w_dq) if w.rho_q is None else float(w.rho_q)
        q_left = Chain(w_dq.mT / rho_q, shared={0})
        q_heads = q_b.reshape(H, dn + dr, dq).mT * d_q[:, None]  # (H, dq, dn + dr): diag(Dq)·[Wuq_h; Wqr_h]ᵀ
    else:
        if w.wq is None:
            raise InputError(f"{where}: MLA needs q_a_proj/q_b_proj (compressed queries) or q_proj")
        wq = _f64(w.wq, f"{where} q_proj")
        if wq.shape[0] != H * (dn + dr):
            raise InputError(f"{where}: q_proj has {wq.shape[0]} rows, expected H·(dn+dr) = {H * (dn + dr)}")
        q_left = None
        q_heads = wq.reshape(H, dn + dr, -1).mT  # (H, d, dn + dr)
    wo = None if w.wo is None else _f64(w.wo, f"{where} o_proj")
    if wo is not None and wo.shape[1] != H * dv:
        raise InputError(f"{where}: o_proj has {wo.shape[1]} columns, expected H·dv = {H * dv}")
    return _MLAFactors(q_left=q_left, q_nope=q_heads[..., :dn], q_rope=q_heads[..., dn:],
                       w_uk=kv_b[:, :dn] * d_kv, w_uv=kv_b[:, dn:] * d_kv, key_latent=kv_a[:dc] / rho_kv,
                       w_kr=kv_a[dc:], wo=wo)


def mla_forms(layer: int, weights: MLAWeights, *, heads: bool = True, kinds: Sequence[str] | None = None,
              variant: str = MLA_DECOUPLED, kv_cache_floats: int | None = None, offset: int = 0,
              rope: str = "decoupled", rope_theta: float = 10000.0) -> Iterator[NamedForm]:
    """NamedForms (qk, qk_content, qk_rope, ov) of one MLA layer: the layer sum (head −1), then each head.

    The latent RMSNorm ``c = D·Wx/rms(Wx)`` is folded in as ``D·W/ρ``. Per head: content
    ``Wdqᵀ/ρq · Dq·Wuq_hᵀ · Wuk_h·Dkv · Wdkv/ρkv`` (d, dq, dn, dc, d), rope ``Wdqᵀ/ρq · Dq·Wqr_hᵀ · Wkr``
    (d, dq, dr, d), qk = ``Wdqᵀ/ρq · (content + rope)`` (a sum of two chains sharing the left factor), ov
    ``Wo_h · Wuv_h·Dkv · Wdkv/ρkv``; without compressed queries, no ``Wdq`` factor.
    Without a decoupled rope part only ``qk`` (the content chain) and ``ov`` exist. ``variant`` labels the
    forms; ``kv_cache_floats`` overrides the per-layer cache size (default dc + dr).

    ``offset`` Δ with ``rope`` saying where RoPE acts: "decoupled" (on the rope dims: ``Wqr_hᵀ R_Δ Wkr``),
    "coupled" (on the up-projected heads: ``R_Δ Wuk_h``) or "input" (on the token: ``Wdkv R_Δ``, the form at
    position i being ``R_iᵀ B(Δ) R_i``, module docstring).
    """
    if rope not in ("decoupled", ROPE_COUPLED, ROPE_INPUT):
        raise InputError(f"mla_forms: rope must be 'decoupled', {ROPE_COUPLED!r} or {ROPE_INPUT!r}, got {rope!r}")
    f = plain = _mla_factors(layer, weights)
    if offset:
        if rope == "decoupled":
            f = dataclasses.replace(f, w_kr=_rotate_rows(f.w_kr, f.w_kr.shape[0], offset, rope_theta))
        elif rope == ROPE_COUPLED:
            f = dataclasses.replace(f, w_uk=_rotate_rows(f.w_uk, f.w_uk.shape[1], offset, rope_theta))
        else:  # the key latent reads R_Δ x: (dc, d) @ (d, d)
            r = rope_matrix(f.key_latent.shape[1], offset, rope_theta, device=f.key_latent.device)
            f = dataclasses.replace(f, key_latent=f.key_latent @ r)
    H, dn, dr, dv = weights.n_heads, weights.qk_nope_head_dim, weights.qk_rope_head_dim, weights.v_head_dim
    todo = _kinds(kinds, (QK, QK_CONTENT, QK_ROPE, OV) if dr else (QK, OV))
    cache = f.key_latent.shape[0] + dr if kv_cache_floats is None else int(kv_cache_floats)

    def make(kind: str, head: int, form: Form) -> NamedForm:
        return NamedForm(layer, head, kind, form, variant, cache, 0 if kind == OV else offset)

    def with_queries(form: Form) -> Form:
        return form if f.q_left is None else f.q_left @ form

    for h in [None, *range(H)] if heads else [None]:
        head = -1 if h is None else h
        if h is None:  # layer sum: content over the concatenated heads, rope with the query heads summed
            content = Chain(f.q_nope.permute(1, 0, 2).reshape(f.q_nope.shape[1], H * dn),  # (dq or d, H·dn)
                            f.w_uk.reshape(H * dn, -1), f.key_latent)  # (H·dn, dc), (dc, d)
            rope = Chain(f.q_rope.sum(0), f.w_kr)  # (dq or d, dr), (dr, d)
        else:
            content = Chain(f.q_nope[h], f.w_uk[h], f.key_latent, shared={2})
            rope = Chain(f.q_rope[h], f.w_kr, shared={1})
        if QK in todo:
            yield make(QK, head, with_queries(Sum([content, rope]) if dr else content))
        if QK_CONTENT in todo:
            yield make(QK_CONTENT, head, with_queries(content))
        if QK_ROPE in todo:
            yield make(QK_ROPE, head, with_queries(rope))
        if OV in todo and f.wo is not None:  # the values' latent, unrotated (ov forms do not depend on Δ)
            if h is None:
                yield make(OV, -1, Chain(f.wo, f.w_uv.reshape(H * dv, -1), plain.key_latent))  # (d, H·dv, dc, d)
            else:
                yield make(OV, h, Chain(f.wo[:, h * dv:(h + 1) * dv], f.w_uv[h], plain.key_latent, shared={2}))

# ---------------------------------------------------------------------------------------------- MHA + rope key


def decoupled_mha_forms(layer: int, wq, wk, wkr, wv, wo, n_heads: int, rope_dim: int, *, heads: bool = True,
                        kinds: Sequence[str] | None = None, offset: int = 0,
                        rope_theta: float = 10000.0) -> Iterator[NamedForm]:
    """NamedForms of one ``mha_decoupled`` layer: MHA's per-head content queries/keys plus DeepSeek's decoupled
    rope part (per-head rope queries, one rope key shared by all heads), without MLA's latent compression.

    ``wq`` (H·(dh+dr), d) with rows per head [Wq_h; Wqr_h], ``wk`` (H·dh, d), ``wkr`` (dr, d), ``wv`` (H·dv, d),
    ``wo`` (d, H·dv). Per head: content ``Wq_hᵀ Wk_h``, rope ``Wqr_hᵀ R_Δ Wkr`` (the key shared), qk = their
    sum; the layer sum concatenates the content heads and sums the rope queries. ov as in ``mha_forms``.
    """
    todo = _kinds(kinds, (QK, QK_CONTENT, QK_ROPE, OV))
    H, dr = n_heads, rope_dim
    wq = _f64(wq, f"layer {layer} query weight")
    wk = _f64(wk, f"layer {layer} key weight")
    wkr = _rotate_rows(_f64(wkr, f"layer {layer} rope key weight"), dr, offset, rope_theta)  # (dr, d)
    dh = wk.shape[0] // H
    if wq.shape[0] != H * (dh + dr) or wkr.shape[0] != dr:
        raise InputError(f"layer {layer}: query weight has {wq.shape[0]} rows and rope key {wkr.shape[0]}; expected "
                         f"H·(dh+dr) = {H * (dh + dr)} and dr = {dr}")
    q = wq.reshape(H, dh + dr, -1)  # (H, dh + dr, d)
    q_nope, q_rope = q[:, :dh], q[:, dh:]  # (H, dh, d), (H, dr, d)
    cache = 2 * wk.shape[0] + dr

    def make(kind: str, head: int, form: Form) -> NamedForm:
        return NamedForm(layer, head, kind, form, MHA_DECOUPLED, cache, offset)

    for h in [None, *range(H)] if heads else [None]:
        if h is None:
            content = Chain(q_nope.reshape(H * dh, -1).mT, wk)  # (d, H·dh) @ (H·dh, d)
            rope = Chain(q_rope.sum(0).mT, wkr)  # (d, dr) @ (dr, d)
        else:
            content = Chain(q_nope[h].mT, wk[h * dh:(h + 1) * dh])
            rope = Chain(q_rope[h].mT, wkr, shared={1})
        head = -1 if h is None else h
        if QK in todo:
            yield make(QK, head, Sum([content, rope]))
        if QK_CONTENT in todo:
            yield make(QK_CONTENT, head, content)
        if QK_ROPE in todo:
            yield make(QK_ROPE, head, rope)
    if OV in todo:
        for f in mha_forms(layer, None, None, wv, wo, H, H, heads=heads, kinds=[OV]):
            yield dataclasses.replace(f, variant=MHA_DECOUPLED, kv_cache_floats=cache)
