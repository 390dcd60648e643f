"""Causal self-attention with switchable variants (docs/design.md §4), each exposing its own query–key and OV chains.

- ``MHA``: multi-head attention and its grouped forms GQA / MQA (LLaMA layout, ``repeat_kv`` grouping), and
  ``mha_decoupled``: MHA plus DeepSeek's decoupled rope part (a shared rope key) without latent compression.
- ``MLA``: multi-head latent attention (DeepSeek-V2, arXiv 2405.04434) with either decoupled RoPE
  (``mla_decoupled``) or RoPE without a decoupled part (``mla_prerope``, ``rope_mode`` "input" or "coupled").

RoPE is RoFormer's rotary embedding (Su et al., arXiv 2104.09864) in LLaMA's rotate-half convention. Every
module has ``qk_chains(heads, offset)`` and ``ov_chains(heads)`` returning ``NamedForm``s (``attention_forms``), so
probes and the monitor never switch on the variant. Forms are unscaled and read at a relative offset Δ = j − i
(default 0, RoPE = identity; ``attention_forms`` for B(Δ)).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.attention_forms import MLAWeights, NamedForm, decoupled_mha_forms, mha_forms, mla_forms
from rankscope.nn.config import ModelConfig
from rankscope.vocab import MLA_DECOUPLED, OV, QK, QK_CONTENT, QK_ROPE, ROPE_COUPLED, ROPE_INPUT, variant_of


class RMSNorm(nn.Module):
    """y = g ⊙ x / √(mean(x²) + eps) (Zhang & Sennrich 2019); half-precision inputs are normalised in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] → [−x2, x1] over the last dim (LLaMA's pairing of dim i with dim i + n/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """RoPE over the last dim of a (…, T, dim) tensor at positions 0..T−1: x·cos θ_t + rotate_half(x)·sin θ_t,
    θ_t,i = t·theta^(−2i/dim) (RoFormer, arXiv 2104.09864). The cos/sin tables are non-persistent buffers."""

    def __init__(self, dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T_max, dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T_max, dim)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)  # (T, dim)
        return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, H_kv, T, dh) → (B, H_kv·rep, T, dh): query head h reads KV group h // rep (LLaMA's ``repeat_kv``)."""
    if rep == 1:
        return x
    B, G, T, dh = x.shape
    return x[:, :, None].expand(B, G, rep, T, dh).reshape(B, G * rep, T, dh)


def _measured(rho: torch.Tensor | None) -> float | None:
    """A measured latent rms, or None when not measured yet (NaN/0) so the chain uses the isotropic value."""
    if rho is None:
        return None
    value = float(rho)
    return value if math.isfinite(value) and value > 0 else None


class MHA(nn.Module):
    """Multi-head attention with H_kv KV heads (mha: H_kv = H, gqa: 1 < H_kv < H, mqa: H_kv = 1).

    q_h = RoPE(Wq_h x), k_g = RoPE(Wk_g x), v_g = Wv_g x; head h attends with KV group g = h // (H/H_kv);
    y = Wo [softmax(q_h·k_g/√dh) v_g]_h. Weights ``q_proj`` (H·dh, d), ``k_proj``/``v_proj`` (H_kv·dh, d),
    ``o_proj`` (d, H·dh), as in LLaMA. Per-head qk chain ``[Wq_hᵀ, Wk_g]``.

    ``mha_decoupled`` (H_kv = H): q_h = [Wq_h x; RoPE(Wqr_h x)] (dh + dr, ``q_proj`` rows per head [Wq_h; Wqr_h]),
    k_h = [Wk_h x; RoPE(Wkr x)] with one rope key ``kr_proj`` (dr, d) shared by all heads, as in MLA-Decoupled
    but with per-head keys and values instead of a latent; scale 1/√(dh + dr); caches 2·H·dh + dr.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.variant = variant_of(cfg.attention, cfg.rope_mode)  # the study's name: mla_prerope_input, ...
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.rope_dim = cfg.rope_dim  # dr: 0 unless mha_decoupled
        self.kv_cache_floats = cfg.kv_cache_floats_per_layer()
        self.rope_theta = cfg.rope_theta
        d, H, G, dh, dr = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.rope_dim
        self.q_proj = nn.Linear(d, H * (dh + dr), bias=False)
        self.k_proj = nn.Linear(d, G * dh, bias=False)
        self.v_proj = nn.Linear(d, G * dh, bias=False)
        self.o_proj = nn.Linear(H * dh, d, bias=False)
        if dr:
            self.kr_proj = nn.Linear(d, dr, bias=False)
        self.rotary = Rotary(dr or dh, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, dh, dr = self.n_head, self.n_kv_head, self.head_dim, self.rope_dim
        q = self.q_proj(x).view(B, T, H, dh + dr).transpose(1, 2)  # (B, H, T, dh + dr)
        k = self.k_proj(x).view(B, T, G, dh).transpose(1, 2)  # (B, H_kv, T, dh)
        v = self.v_proj(x).view(B, T, G, dh).transpose(1, 2)  # (B, H_kv, T, dh)
        if dr:  # decoupled: RoPE only on the rope dims, one rope key for all heads
            q_nope, q_rope = q.split([dh, dr], dim=-1)  # (B, H, T, dh), (B, H, T, dr)
            k_rope = self.rotary(self.kr_proj(x).unsqueeze(1))  # (B, 1, T, dr)
            q = torch.cat((q_nope, self.rotary(q_rope)), dim=-1)  # (B, H, T, dh + dr)
            k = torch.cat((k, k_rope.expand(B, H, T, dr)), dim=-1)  # (B, H, T, dh + dr)
        else:
            q, k = self.rotary(q), self.rotary(k)
        k, v = repeat_kv(k, H // G), repeat_kv(v, H // G)  # (B, H, T, ·)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, dh), scale 1/√(q width)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dh))

    def _forms(self, heads: bool, kinds: list[str], offset: int = 0) -> list[NamedForm]:
        if self.rope_dim:
            return list(decoupled_mha_forms(self.layer_idx, self.q_proj.weight, self.k_proj.weight,
                                            self.kr_proj.weight, self.v_proj.weight, self.o_proj.weight,
                                            self.n_head, self.rope_dim, heads=heads, kinds=kinds, offset=offset,
                                            rope_theta=self.rope_theta))
        forms = mha_forms(self.layer_idx, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                          self.o_proj.weight, self.n_head, self.n_kv_head, heads=heads, kinds=kinds, offset=offset,
                          rope_theta=self.rope_theta)
        return [dataclasses.replace(f, variant=self.variant, kv_cache_floats=self.kv_cache_floats) for f in forms]

    def qk_chains(self, heads: bool = True, offset: int = 0) -> list[NamedForm]:
        """The ``qk`` forms ``B_h(Δ) = Wq_hᵀ R_Δ Wk_g(h)`` at offset Δ: the layer sum (head −1), then each head if
        ``heads``; ``mha_decoupled`` adds ``qk_content`` ``Wq_hᵀ Wk_h`` and ``qk_rope`` ``Wqr_hᵀ R_Δ Wkr``."""
        return self._forms(heads, [QK, QK_CONTENT, QK_ROPE] if self.rope_dim else [QK], offset)

    def ov_chains(self, heads: bool = True) -> list[NamedForm]:
        """The ``ov`` forms ``Wo_h Wv_g(h)``: the layer sum (head −1), then each head if ``heads``."""
        return self._forms(heads, [OV])


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 §2.1), DeepSeek parameter layout.

    c_kv = Dkv ⊙ RMSNorm(Wdkv x) (dc), k_h = Wuk_h c_kv, v_h = Wuv_h c_kv (dh each; ``kv_b_proj`` rows per head
    [Wuk_h; Wuv_h]). Queries q_h = Wq_h x (``q_proj``) or, with ``q_lora_rank``, c_q = Dq ⊙ RMSNorm(Wdq x),
    q_h = Wuq_h c_q (``q_a_proj``, ``q_a_norm``, ``q_b_proj``). ``kv_a_proj`` = [Wdkv; Wkr] (dc + dr, d).

    - ``mla_decoupled``: q_h = [q_nope_h; RoPE(q_rope_h)] (dh + dr), one rope key k_R = RoPE(Wkr x) (dr) shared
      by all heads; score = q_nope_h·k_h + q_rope_h·k_R, softmax scale 1/√(dh + dr). Caches dc + dr per token.
    - ``mla_prerope``, ``rope_mode="input"``: RoPE (over d-dim pairs) is applied to the token representation x
      before the down-projections: rotary *before* compression, taken literally. Keys and values share the one
      latent of the rotated token, c_kv = Wdkv RoPE(x), so an inference cache holds dc (the point of MLA);
      the values therefore carry the rotation too. The query–key form at position i and offset Δ is
      R_iᵀ B(Δ) R_i with B(Δ) = B R_Δ (same spectrum at every i; ``attention_forms``), not B itself.
    - ``mla_prerope``, ``rope_mode="coupled"``: RoPE on the up-projected per-head q_h and k_h (dh), the usual
      small-model "MLA + RoPE"; caches dc (the up-projection cannot be absorbed, but the cache is still c_kv).
    Scale 1/√dh for both prerope modes.

    Latent RMSNorm folding (docs/design.md §4): the chains use Dkv·Wdkv/ρkv (and Dq·Wdq/ρq). ``rho_kv``/``rho_q`` are
    non-persistent float64 buffers holding an EMA (momentum 0.99, started at the first batch) of the latents'
    per-token rms √(mean(c²) + eps), updated in ``forward`` while training; NaN = not measured, then the chains
    use the isotropic value ‖W‖_F/√rows.
    """

    rho_momentum = 0.99

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.variant = variant_of(cfg.attention, cfg.rope_mode)  # the study's name: mla_prerope_input, ...
        self.mode = "decoupled" if cfg.attention == MLA_DECOUPLED else cfg.rope_mode
        self.kv_cache_floats = cfg.kv_cache_floats_per_layer()
        self.rope_theta = cfg.rope_theta
        d, H, dh, dc, dr, dq = (cfg.d_model, cfg.n_head, cfg.head_dim, cfg.kv_lora_rank, cfg.rope_dim,
                                cfg.q_lora_rank)
        self.n_head, self.head_dim, self.kv_lora_rank, self.rope_dim = H, dh, dc, dr
        if dq is None:
            self.q_proj = nn.Linear(d, H * (dh + dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(d, dq, bias=False)
            self.q_a_norm = RMSNorm(dq, cfg.norm_eps)
            self.q_b_proj = nn.Linear(dq, H * (dh + dr), bias=False)
        self.compressed_q = dq is not None
        self.kv_a_proj = nn.Linear(d, dc + dr, bias=False)
        self.kv_a_norm = RMSNorm(dc, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(dc, H * 2 * dh, bias=False)
        self.o_proj = nn.Linear(H * dh, d, bias=False)
        rope_width = {"decoupled": dr, ROPE_COUPLED: dh, ROPE_INPUT: d}[self.mode]
        self.rotary = Rotary(rope_width, cfg.max_seq_len, cfg.rope_theta)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        self.register_buffer("rho_kv", nan.clone(), persistent=False)
        self.register_buffer("rho_q", nan.clone() if self.compressed_q else None, persistent=False)

    @torch.no_grad()
    def _track_rms(self, rho: torch.Tensor, latent: torch.Tensor, eps: float) -> None:
        """EMA of the batch-mean per-token rms of ``latent`` into ``rho`` (no host sync: torch.where)."""
        c = latent.detach()
        c = c.float() if c.dtype in (torch.float16, torch.bfloat16) else c  # (B, T, dc)
        r = c.pow(2).mean(-1).add(eps).sqrt().mean().to(rho.dtype)
        seen = torch.isfinite(rho) & (rho > 0)
        rho.copy_(torch.where(seen, self.rho_momentum * rho + (1 - self.rho_momentum) * r, r))

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) → (B, H, T, dh + dr), before any RoPE on the query heads."""
        B, T, _ = x.shape
        if self.compressed_q:
            c_q = self.q_a_proj(x)  # (B, T, dq)
            if self.training:
                self._track_rms(self.rho_q, c_q, self.q_a_norm.eps)
            q = self.q_b_proj(self.q_a_norm(c_q))
        else:
            q = self.q_proj(x)
        return q.view(B, T, self.n_head, self.head_dim + self.rope_dim).transpose(1, 2)

    def _up(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised latent (B, T, dc) → k_nope, v, each (B, H, T, dh)."""
        B, T, _ = c.shape
        kv = self.kv_b_proj(self.kv_a_norm(c)).view(B, T, self.n_head, 2 * self.head_dim).transpose(1, 2)
        return kv.split(self.head_dim, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, dh, dc = self.n_head, self.head_dim, self.kv_lora_rank
        x_qk = self.rotary(x) if self.mode == ROPE_INPUT else x  # (B, T, d): rotated before compression
        q = self._queries(x_qk)  # (B, H, T, dh + dr)
        kv_a = self.kv_a_proj(x_qk)  # (B, T, dc + dr)
        c_kv = kv_a[..., :dc]  # (B, T, dc)
        if self.training:
            self._track_rms(self.rho_kv, c_kv, self.kv_a_norm.eps)
        k, v = self._up(c_kv)  # (B, H, T, dh) each
        if self.mode == ROPE_COUPLED:
            q, k = self.rotary(q), self.rotary(k)
        elif self.mode == "decoupled":
            q_nope, q_rope = q.split([dh, self.rope_dim], dim=-1)  # (B, H, T, dh), (B, H, T, dr)
            k_rope = self.rotary(kv_a[..., dc:].unsqueeze(1))  # (B, 1, T, dr): one rope key for all heads
            q = torch.cat((q_nope, self.rotary(q_rope)), dim=-1)  # (B, H, T, dh + dr)
            k = torch.cat((k, k_rope.expand(B, H, T, self.rope_dim)), dim=-1)  # (B, H, T, dh + dr)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, dh), scale 1/√(q width)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dh))

    def _forms(self, heads: bool, kinds: list[str], offset: int = 0) -> list[NamedForm]:
        q = (dict(q_a=self.q_a_proj.weight, q_a_norm=self.q_a_norm.weight, q_b=self.q_b_proj.weight)
             if self.compressed_q else dict(wq=self.q_proj.weight))
        weights = MLAWeights(n_heads=self.n_head, qk_nope_head_dim=self.head_dim, qk_rope_head_dim=self.rope_dim,
                             v_head_dim=self.head_dim, kv_a=self.kv_a_proj.weight, kv_a_norm=self.kv_a_norm.weight,
                             kv_b=self.kv_b_proj.weight, wo=self.o_proj.weight, **q,
                             rho_q=_measured(self.rho_q), rho_kv=_measured(self.rho_kv))
        return list(mla_forms(self.layer_idx, weights, heads=heads, kinds=kinds, variant=self.variant,
                              kv_cache_floats=self.kv_cache_floats, offset=offset, rope=self.mode,
                              rope_theta=self.rope_theta))

    def qk_chains(self, heads: bool = True, offset: int = 0) -> list[NamedForm]:
        """``qk`` forms at offset Δ (layer sum, then heads); ``mla_decoupled`` adds ``qk_content`` and ``qk_rope``
        and its ``qk`` is their sum. Per head: content ``[Wdqᵀ/ρq, Dq·Wuq_hᵀ, Wuk_h·Dkv, Wdkv/ρkv]``, rope
        ``[Wdqᵀ/ρq, Dq·Wqr_hᵀ, Wkr]`` (no Wdq factor for uncompressed queries)."""
        return self._forms(heads, [QK, QK_CONTENT, QK_ROPE], offset)

    def ov_chains(self, heads: bool = True) -> list[NamedForm]:
        """``ov`` forms ``Wo_h · Wuv_h·Dkv · Wdkv/ρkv``: the layer sum (head −1), then each head if ``heads``."""
        return self._forms(heads, [OV])


def make_attention(cfg: ModelConfig, layer_idx: int = 0) -> MHA | MLA:
    """The attention module of ``cfg.attention`` for layer ``layer_idx``."""
    return MLA(cfg, layer_idx) if cfg.is_mla else MHA(cfg, layer_idx)
