"""Attention forms by variant: which chain each head's query–key and OV form is, from its weight matrices.

Conventions (docs/design.md §1, §4), with PyTorch weights ``[out, in]`` and tokens as column vectors:

- ``qk``: the bilinear form ``B`` with ``score(x_i, x_j) = x_iᵀ B x_j = q_iᵀ k_j``. One head: the chain
  ``Wq_hᵀ @ Wk_h`` (d×dh @ dh×d). A layer (``head=-1``): ``Σ_h B_h``.
- ``ov``: the map ``x ↦ Wo[:, h] Wv_h x`` a head writes into the residual stream. One head: the chain
  ``Wo[:, h·dv:(h+1)·dv] @ Wv_h`` (d×dv @ dv×d). A layer: ``Σ_h``.
- ``qk_content`` / ``qk_rope`` (decoupled MLA): the two blocks of the sum ``qk = content + rope``.

Forms are *unscaled*: the softmax scale (1/√dh, DeepSeek's 1/√(dn+dr)·mscale², GPT-2's optional 1/(layer+1))
is left out, as are all biases (q/k biases add terms linear in x and a constant, which a bilinear form cannot
hold) and RoPE (forms are read at relative offset 0, where the rotation is the identity). A layer sum over
grouped heads is written with the group's query (or output) heads summed,
``Σ_{h∈g} Wq_hᵀ Wk_g = (Σ_{h∈g} Wq_h)ᵀ Wk_g``: the same matrix, but the inner width is the true rank bound
``H_kv·dh``, so the structure-matched null simulates the right shapes.

Per-head chains declare the factors that every head of the layer shares (MQA's key, MLA's ``Wdkv``, the rope
key, ``Wdq``), so ``stack_heads`` batches them without copies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rankscope.errors import InputError
from rankscope.spectra.form import Chain, Form, Sum, stack
from rankscope.vocab import (
    ATTENTION_KINDS,
    GQA,
    MHA,
    MLA_DECOUPLED,
    MQA,
    OV,
    QK,
    QK_CONTENT,
    QK_ROPE,
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

    @property
    def key(self) -> tuple[int, int, str]:
        """(layer, head, kind): the row key of the store."""
        return (self.layer, self.head, self.kind)


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
              heads: bool = True, kinds: Sequence[str] | None = None) -> Iterator[NamedForm]:
    """NamedForms (qk, ov) of one MHA/GQA/MQA layer from ``[out, in]`` weights; query head h uses KV group
    ``h // (H / H_kv)`` (the layout of LLaMA's ``repeat_kv``).

    ``wq`` (H·dk, d), ``wk`` (H_kv·dk, dkv_in), ``wv`` (H_kv·dv, dkv_in), ``wo`` (d_out, H·dv); any may be None
    to skip the forms that need it. Yields the layer sum (head −1) then each head, per kind.
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
        return NamedForm(layer, head, kind, form, variant, cache)

    if QK in todo and wq is not None and wk is not None:
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
              variant: str = MLA_DECOUPLED, kv_cache_floats: int | None = None) -> Iterator[NamedForm]:
    """NamedForms (qk, qk_content, qk_rope, ov) of one MLA layer: the layer sum (head −1), then each head.

    The latent RMSNorm ``c = D·Wx/rms(Wx)`` is folded in as ``D·W/ρ``. Per head: content
    ``Wdqᵀ/ρq · Dq·Wuq_hᵀ · Wuk_h·Dkv · Wdkv/ρkv`` (d, dq, dn, dc, d), rope ``Wdqᵀ/ρq · Dq·Wqr_hᵀ · Wkr``
    (d, dq, dr, d), qk = ``Wdqᵀ/ρq · (content + rope)`` (a sum of two chains sharing the left factor), ov
    ``Wo_h · Wuv_h·Dkv · Wdkv/ρkv``; without compressed queries, no ``Wdq`` factor.
    Without a decoupled rope part only ``qk`` (the content chain) and ``ov`` exist. ``variant`` labels the
    forms; ``kv_cache_floats`` overrides the per-layer cache size (default dc + dr).
    """
    f = _mla_factors(layer, weights)
    H, dn, dr, dv = weights.n_heads, weights.qk_nope_head_dim, weights.qk_rope_head_dim, weights.v_head_dim
    todo = _kinds(kinds, (QK, QK_CONTENT, QK_ROPE, OV) if dr else (QK, OV))
    cache = f.key_latent.shape[0] + dr if kv_cache_floats is None else int(kv_cache_floats)

    def make(kind: str, head: int, form: Form) -> NamedForm:
        return NamedForm(layer, head, kind, form, variant, cache)

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
        if OV in todo and f.wo is not None:
            if h is None:
                yield make(OV, -1, Chain(f.wo, f.w_uv.reshape(H * dv, -1), f.key_latent))  # (d, H·dv, dc, d)
            else:
                yield make(OV, h, Chain(f.wo[:, h * dv:(h + 1) * dv], f.w_uv[h], f.key_latent, shared={2}))
