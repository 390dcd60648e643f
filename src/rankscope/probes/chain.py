"""Named forms: (layer, head, kind) → a chain of factors, and builders from attention weight matrices.

Conventions (DESIGN.md §1, §4), with PyTorch weights ``[out, in]`` and tokens as column vectors:

- ``qk``: the bilinear form ``B`` with ``score(x_i, x_j) = x_iᵀ B x_j = q_iᵀ k_j``. One head:
  chain ``[Wq_hᵀ, Wk_h]`` (d×dh @ dh×d). A layer (``head=-1``): ``Σ_h B_h``.
- ``ov``: the map ``x ↦ Wo[:, h] Wv_h x`` a head writes into the residual stream. One head: chain
  ``[Wo[:, h·dv:(h+1)·dv], Wv_h]`` (d×dv @ dv×d). A layer: ``Σ_h``.
- ``qk_content`` / ``qk_rope`` (decoupled MLA): the two blocks of the sum ``qk = content + rope``.

Forms are *unscaled*: the softmax scale (1/√dh, DeepSeek's 1/√(dn+dr)·mscale², GPT-2's optional
1/(layer+1)) is left out, as are all biases (q/k biases add terms linear in x and a constant, which a
bilinear form cannot hold) and RoPE (forms are read at relative offset 0, where the rotation is the
identity). A layer sum over grouped heads is written with the group's query (or output) heads summed,
``Σ_{h∈g} Wq_hᵀ Wk_g = (Σ_{h∈g} Wq_h)ᵀ Wk_g``: the same matrix, but the inner width is the true rank
bound ``H_kv·dh``, so the structure-matched null simulates the right shapes (a factor of repeated rows
is not a Gaussian matrix of its shape).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from rankscope.errors import InputError

KINDS = ("qk", "qk_content", "qk_rope", "ov")


@dataclass(frozen=True)
class NamedForm:
    """One form of one attention layer or head, ready for ``rankscope.diagnose``."""

    layer: int  # layer index, as numbered in the model's parameter names
    head: int  # query head, or -1 for the layer's sum over heads
    kind: str  # "qk", "qk_content", "qk_rope" or "ov"
    form: list = field(repr=False)  # a chain [F1, F2, …] or a sum of chains [[…], […]]
    variant: str  # "mha", "gqa", "mqa", "mla_prerope" or "mla_decoupled"
    kv_cache_floats: int | None  # floats cached per token in this layer (keys + values, or MLA's latent + rope key)

    @property
    def key(self) -> tuple[int, int, str]:
        """(layer, head, kind): the row key of the store."""
        return (self.layer, self.head, self.kind)


def latent_rms_isotropic(w_down: torch.Tensor) -> float:
    """ρ = ‖W‖_F / √rows: the rms of the latent W x for isotropic unit-variance x (E‖Wx‖² = ‖W‖_F²)."""
    return float(torch.linalg.matrix_norm(torch.as_tensor(w_down).detach().to(torch.float64)) / w_down.shape[0] ** 0.5)


def _f64(w, name: str, ndim: int = 2) -> torch.Tensor:
    t = torch.as_tensor(w).detach()
    if t.ndim != ndim:
        raise InputError(f"{name} has shape {tuple(t.shape)}; expected a {ndim}-D tensor")
    return t.to(torch.float64)


def _variant(n_heads: int, n_kv_heads: int) -> str:
    if n_kv_heads == n_heads:
        return "mha"
    return "mqa" if n_kv_heads == 1 else "gqa"


def _kinds(kinds: Sequence[str] | None, allowed: Sequence[str]) -> tuple[str, ...]:
    if kinds is None:
        return tuple(allowed)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InputError(f"unknown form kind(s) {bad}; known kinds are {list(KINDS)}")
    return tuple(k for k in kinds if k in allowed)


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
    variant = _variant(n_heads, n_kv_heads)
    todo = _kinds(kinds, ("qk", "ov"))
    wq = None if wq is None else _f64(wq, f"layer {layer} query weight")
    wk = None if wk is None else _f64(wk, f"layer {layer} key weight")
    wv = None if wv is None else _f64(wv, f"layer {layer} value weight")
    wo = None if wo is None else _f64(wo, f"layer {layer} output weight")
    dk = wk.shape[0] // n_kv_heads if wk is not None else (wq.shape[0] // n_heads if wq is not None else 0)
    dv = (wv.shape[0] if wv is not None else 0) // n_kv_heads
    cache = None if wk is None or wv is None else n_kv_heads * (dk + dv)
    for name, w, rows in (("query", wq, n_heads * dk), ("key", wk, n_kv_heads * dk),
                          ("value", wv, n_kv_heads * dv), ("output", None if wo is None else wo.mT, n_heads * dv)):
        if w is not None and w.shape[0] != rows:
            raise InputError(f"layer {layer}: {name} weight has {w.shape[0]} head rows, expected {rows} "
                             f"({n_heads} heads, {n_kv_heads} KV heads, dk={dk}, dv={dv})")

    def make(kind: str, head: int, form: list) -> NamedForm:
        return NamedForm(layer, head, kind, form, variant, cache)

    if "qk" in todo and wq is not None and wk is not None:
        d_in = wq.shape[1]
        q_grouped = wq.reshape(n_kv_heads, rep, dk, d_in).sum(1).reshape(n_kv_heads * dk, d_in)
        yield make("qk", -1, [q_grouped.mT, wk])  # (d, H_kv·dk) @ (H_kv·dk, d)
        if heads:
            for h in range(n_heads):
                g = h // rep
                yield make("qk", h, [wq[h * dk:(h + 1) * dk].mT, wk[g * dk:(g + 1) * dk]])  # (d, dk) @ (dk, d)
    if "ov" in todo and wo is not None and wv is not None:
        d_out = wo.shape[0]
        o_grouped = wo.reshape(d_out, n_kv_heads, rep, dv).sum(2).reshape(d_out, n_kv_heads * dv)
        yield make("ov", -1, [o_grouped, wv])  # (d, H_kv·dv) @ (H_kv·dv, d)
        if heads:
            for h in range(n_heads):
                g = h // rep
                yield make("ov", h, [wo[:, h * dv:(h + 1) * dv], wv[g * dv:(g + 1) * dv]])  # (d, dv) @ (dv, d)


def mla_forms(layer: int, *, n_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
              kv_a, kv_a_norm, kv_b, wo=None, q_a=None, q_a_norm=None, q_b=None, wq=None,
              rho_q: float | None = None, rho_kv: float | None = None,
              heads: bool = True, kinds: Sequence[str] | None = None,
              variant: str = "mla_decoupled", kv_cache_floats: int | None = None) -> Iterator[NamedForm]:
    """NamedForms (qk, qk_content, qk_rope, ov) of one MLA layer (DeepSeek-V2/V3 layout, DESIGN §4).

    ``kv_a`` (dc+dr, d) = [Wdkv; Wkr], ``kv_a_norm`` (dc,) = Dkv, ``kv_b`` (H·(dn+dv), dc) with rows per head
    [Wuk_h; Wuv_h], ``wo`` (d, H·dv). Queries: ``q_a`` (dq, d) = Wdq, ``q_a_norm`` (dq,) = Dq, ``q_b``
    (H·(dn+dr), dq) with rows per head [Wuq_h; Wqr_h]; or, uncompressed, ``wq`` (H·(dn+dr), d).

    The latent RMSNorm ``c = D·Wx/rms(Wx)`` is folded in as ``D·W/ρ``; ρ defaults to the isotropic-input
    value ``‖W‖_F/√rows`` (pass a measured ``rho_q``/``rho_kv`` to override). Per head:
    content ``[Wdqᵀ/ρq, Dq·Wuq_hᵀ, Wuk_h·Dkv, Wdkv/ρkv]`` (d, dq, dn, dc, d), rope ``[Wdqᵀ/ρq, Dq·Wqr_hᵀ, Wkr]``
    (d, dq, dr, d), qk = content + rope (a sum of two chains), ov ``[Wo_h, Wuv_h·Dkv, Wdkv/ρkv]``.
    The rope key is shared by all heads and carries no norm (as in DeepSeek).

    ``qk_rope_head_dim=0`` (MLA without a decoupled rope part, e.g. ``mla_prerope``): ``kv_a`` is just Wdkv,
    the queries have dn rows per head, and only ``qk`` (= the content chain, not a sum) and ``ov`` exist.
    ``variant`` labels the forms; ``kv_cache_floats`` overrides the per-layer cache size (default dc + dr).
    """
    H, dn, dr, dv = n_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    todo = _kinds(kinds, ("qk", "qk_content", "qk_rope", "ov") if dr else ("qk", "ov"))
    where = f"layer {layer}"
    kv_a = _f64(kv_a, f"{where} kv_a_proj_with_mqa")
    dc = kv_a.shape[0] - dr
    if dc <= 0 or dr < 0:
        raise InputError(f"{where}: kv_a_proj_with_mqa has {kv_a.shape[0]} rows, not more than qk_rope_head_dim={dr}")
    w_dkv, w_kr = kv_a[:dc], kv_a[dc:]  # (dc, d), (dr, d)
    d_kv = _f64(kv_a_norm, f"{where} kv_a_layernorm", ndim=1)
    kv_b = _f64(kv_b, f"{where} kv_b_proj")
    if kv_b.shape != (H * (dn + dv), dc) or d_kv.shape != (dc,):
        raise InputError(f"{where}: kv_b_proj {tuple(kv_b.shape)} / kv_a_layernorm {tuple(d_kv.shape)} do not fit "
                         f"H={H}, dn={dn}, dv={dv}, dc={dc}")
    kv_b = kv_b.reshape(H, dn + dv, dc)
    w_uk = kv_b[:, :dn] * d_kv  # (H, dn, dc): Wuk_h·diag(Dkv)
    w_uv = kv_b[:, dn:] * d_kv  # (H, dv, dc): Wuv_h·diag(Dkv)
    rho_kv = latent_rms_isotropic(w_dkv) if rho_kv is None else float(rho_kv)
    key_latent = w_dkv / rho_kv  # (dc, d)

    if q_a is not None:
        w_dq = _f64(q_a, f"{where} q_a_proj")
        dq = w_dq.shape[0]
        d_q = _f64(q_a_norm, f"{where} q_a_layernorm", ndim=1) if q_a_norm is not None else torch.ones(dq).double()
        q_b = _f64(q_b, f"{where} q_b_proj")
        if q_b.shape != (H * (dn + dr), dq) or d_q.shape != (dq,):
            raise InputError(f"{where}: q_b_proj {tuple(q_b.shape)} / q_a_layernorm {tuple(d_q.shape)} do not fit "
                             f"H={H}, dn={dn}, dr={dr}, dq={dq}")
        rho_q = latent_rms_isotropic(w_dq) if rho_q is None else float(rho_q)
        q_first = [w_dq.mT / rho_q]  # (d, dq): shared by every head (one tensor object)
        q_b = q_b.reshape(H, dn + dr, dq)
        q_nope = q_b[:, :dn].mT * d_q[:, None]  # (H, dq, dn): diag(Dq)·Wuq_hᵀ
        q_rope = q_b[:, dn:].mT * d_q[:, None]  # (H, dq, dr): diag(Dq)·Wqr_hᵀ
    else:
        if wq is None:
            raise InputError(f"{where}: MLA needs q_a_proj/q_b_proj (compressed queries) or q_proj")
        wq = _f64(wq, f"{where} q_proj")
        if wq.shape[0] != H * (dn + dr):
            raise InputError(f"{where}: q_proj has {wq.shape[0]} rows, expected H·(dn+dr) = {H * (dn + dr)}")
        q_first = []
        wq = wq.reshape(H, dn + dr, -1)
        q_nope = wq[:, :dn].mT  # (H, d, dn)
        q_rope = wq[:, dn:].mT  # (H, d, dr)
    cache = dc + dr if kv_cache_floats is None else int(kv_cache_floats)
    if "ov" in todo and wo is not None:
        wo = _f64(wo, f"{where} o_proj")
        if wo.shape[1] != H * dv:
            raise InputError(f"{where}: o_proj has {wo.shape[1]} columns, expected H·dv = {H * dv}")

    def make(kind: str, head: int, form: list) -> NamedForm:
        return NamedForm(layer, head, kind, form, variant, cache)

    def qk_blocks(h: int | None) -> tuple[list, list]:
        if h is None:  # layer sum: content Σ_h over the concatenated heads, rope with the query heads summed
            qn = q_nope.permute(1, 0, 2).reshape(q_nope.shape[1], H * dn)  # (dq or d, H·dn)
            kn = w_uk.reshape(H * dn, dc)  # (H·dn, dc)
            qr = q_rope.sum(0)  # (dq or d, dr)
        else:
            qn, kn, qr = q_nope[h], w_uk[h], q_rope[h]
        return [*q_first, qn, kn, key_latent], [*q_first, qr, w_kr]

    for h in [None, *range(H)] if heads else [None]:
        head = -1 if h is None else h
        content, rope = qk_blocks(h)
        if "qk" in todo:
            yield make("qk", head, [content, rope] if dr else content)
        if "qk_content" in todo:
            yield make("qk_content", head, content)
        if "qk_rope" in todo:
            yield make("qk_rope", head, rope)
        if "ov" in todo and wo is not None:
            if h is None:
                yield make("ov", -1, [wo, w_uv.reshape(H * dv, dc), key_latent])  # (d, H·dv, dc, d)
            else:
                yield make("ov", h, [wo[:, h * dv:(h + 1) * dv], w_uv[h], key_latent])  # (d, dv, dc, d)


def stack_heads(forms: Sequence[NamedForm]) -> list:
    """The per-head forms of one (layer, kind) as one batched form for ``rankscope.diagnose_batch``.

    Factor i of every chain is stacked along a new leading head axis, except where all heads share the
    very same tensor (e.g. MLA's Wdqᵀ/ρq or the rope key Wkr), which stays 2-D and broadcasts.
    """
    if not forms:
        raise InputError("stack_heads: no forms given")
    if len({(f.layer, f.kind) for f in forms}) > 1 or any(f.head < 0 for f in forms):
        raise InputError("stack_heads: give the per-head forms (head ≥ 0) of a single (layer, kind)")
    is_sum = isinstance(forms[0].form[0], list | tuple)
    sums = [f.form if is_sum else [f.form] for f in forms]
    out = []
    for c in range(len(sums[0])):
        chain = []
        for i in range(len(sums[0][c])):
            factors = [s[c][i] for s in sums]
            shared = all(f is factors[0] for f in factors)
            chain.append(factors[0] if shared else torch.stack(factors))
        out.append(chain)
    return out if is_sum else out[0]
