"""ModelConfig: the frozen configuration of the rankscope decoder, its parameter count and KV-cache size.

The closed forms here (``parameter_count_formula``, ``kv_cache_floats_per_token``) are written from the
weight shapes of docs/design.md §4, independently of the module code, so tests can compare the two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rankscope.errors import InputError
from rankscope.vocab import (
    ATTENTIONS,
    DECOUPLED,
    GQA,
    MHA,
    MLA_DECOUPLED,
    MLA_PREROPE,
    MQA,
    ROPE_INPUT,
    ROPE_MODES,
    variant_of,
)


def _default_d_ff(d_model: int) -> int:
    """The multiple of 32 nearest 8/3·d_model (LLaMA's SwiGLU width rule, rounded for kernels)."""
    return max(32, 32 * round(8 * d_model / 3 / 32))


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style decoder with switchable attention (``attention`` ∈ ATTENTIONS, docs/design.md §4).

    ``None`` fields are resolved at construction (``head_dim`` → d_model // n_head; ``n_kv_head`` → n_head for
    mha and mha_decoupled, n_head // 2 for gqa, 1 for mqa, n_head for MLA; ``d_ff`` → the multiple of 32 nearest
    8/3·d_model), so
    ``to_dict`` saves the resolved config. ``dataclasses.replace`` keeps resolved values: to change
    ``n_head``/``d_model``/``attention``, set the dependent fields back to ``None`` as well.
    MLA only: ``kv_lora_rank`` (dc), ``q_lora_rank`` (dq, None = uncompressed queries), ``rope_mode``
    (``mla_prerope``: "input" rotates the token representation before the down-projections, "coupled" rotates
    the up-projected per-head q and k). ``qk_rope_dim``: dr, the rope width of ``mla_decoupled`` and
    ``mha_decoupled``.
    """

    vocab_size: int = 512  # BPE vocabulary trained on the corpus
    n_layer: int = 4  # decoder blocks
    d_model: int = 128  # residual width d
    n_head: int = 4  # query heads H
    head_dim: int | None = None  # dh (none: d_model // n_head)
    n_kv_head: int | None = None  # K/V heads (none: the variant's own: H for mha, H/2 for gqa, 1 for mqa)
    attention: str = MHA  # the model's attention (train --attention sets it, with rope_mode, from the variant)
    kv_lora_rank: int = 64  # dc, the KV latent rank of MLA
    q_lora_rank: int | None = None  # dq, the query latent rank of MLA (none: uncompressed queries)
    qk_rope_dim: int = 16  # dr, the rope key's width of the decoupled variants
    rope_mode: str = ROPE_INPUT  # mla_prerope: "input" (rotate before compression) or "coupled" (per head q, k)
    d_ff: int | None = None  # SwiGLU width (none: the multiple of 32 nearest 8/3·d_model)
    max_seq_len: int = 128  # context length T
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output head shares the token embedding
    init_std: float = 0.02  # std of the normal initialisation

    def __post_init__(self):
        def bad(msg: str):
            raise InputError(f"ModelConfig: {msg}")

        def set_(name, value):
            object.__setattr__(self, name, value)

        if self.attention not in ATTENTIONS:
            bad(f"unknown attention {self.attention!r}; choose one of {list(ATTENTIONS)}")
        if self.rope_mode not in ROPE_MODES:
            bad(f"unknown rope_mode {self.rope_mode!r}; choose one of {list(ROPE_MODES)}")
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        if not all(0 < v < float("inf") for v in (self.rope_theta, self.norm_eps, self.init_std)):
            bad(f"rope_theta, norm_eps and init_std must be positive and finite, got {self.rope_theta}, "
                f"{self.norm_eps}, {self.init_std}")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                bad(f"n_head={self.n_head} does not divide d_model={self.d_model}; set head_dim explicitly")
            set_("head_dim", self.d_model // self.n_head)
        if self.head_dim <= 0 or self.head_dim % 2:
            bad(f"head_dim must be a positive even number (RoPE rotates pairs), got {self.head_dim}")
        H, kv = self.n_head, self.n_kv_head
        if self.attention == GQA:
            kv = H // 2 if kv is None else kv
            if kv < 1 or H % kv:
                bad(f"gqa: n_kv_head={kv} must divide n_head={H} (query head h uses KV group h // (H/H_kv))")
        else:
            want = 1 if self.attention == MQA else H
            if kv is not None and kv != want:
                bad(f"{self.attention}: n_kv_head must be {want} (or None), got {kv}; use attention='gqa' for "
                    "grouped heads")
            kv = want
        set_("n_kv_head", kv)
        if self.d_ff is None:
            set_("d_ff", _default_d_ff(self.d_model))
        if self.d_ff <= 0:
            bad(f"d_ff must be positive, got {self.d_ff}")
        if self.is_mla:
            if self.kv_lora_rank <= 0:
                bad(f"{self.attention}: kv_lora_rank (dc) must be > 0, got {self.kv_lora_rank}")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                bad(f"{self.attention}: q_lora_rank (dq) must be > 0 or None, got {self.q_lora_rank}")
        if self.attention in DECOUPLED and (self.qk_rope_dim <= 0 or self.qk_rope_dim % 2):
            bad(f"{self.attention}: qk_rope_dim (dr) must be a positive even number, got {self.qk_rope_dim}")
        if self.attention == MLA_PREROPE and self.rope_mode == ROPE_INPUT and self.d_model % 2:
            bad(f"mla_prerope with rope_mode='input' rotates d_model pairs; d_model={self.d_model} is odd")

    @property
    def is_mla(self) -> bool:
        return self.attention in (MLA_PREROPE, MLA_DECOUPLED)

    @property
    def rope_dim(self) -> int:
        """dr: the per-head decoupled rope width (0 unless ``mla_decoupled`` or ``mha_decoupled``)."""
        return self.qk_rope_dim if self.attention in DECOUPLED else 0

    def kv_cache_floats_per_layer(self) -> int:
        """Floats cached per token in one layer: 2·H_kv·dh (MHA/GQA/MQA), 2·H·dh + dr (mha_decoupled: keys, values
        and the shared rope key), dc + dr (MLA, docs/design.md §4)."""
        if not self.is_mla:
            return 2 * self.n_kv_head * self.head_dim + self.rope_dim
        return self.kv_lora_rank + self.rope_dim

    def kv_cache_floats_per_token(self) -> int:
        """Floats cached per token by the whole model: n_layer × ``kv_cache_floats_per_layer``."""
        return self.n_layer * self.kv_cache_floats_per_layer()

    def to_dict(self) -> dict:
        """The resolved config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """The config from ``to_dict`` output (e.g. a run's config.json); unknown keys are an InputError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"ModelConfig.from_dict: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**d)


def parameter_count_formula(cfg: ModelConfig) -> int:
    """The number of parameters of ``GPT(cfg)`` from the weight shapes (tied embeddings counted once).

    Embedding V·d (+ V·d untied head) + final norm d + per layer: 2 norms 2d, SwiGLU 3·d·d_ff, attention:
    MHA/GQA/MQA d·H·dh + 2·d·H_kv·dh + H·dh·d (mha_decoupled adds d·H·dr rope queries and d·dr for the shared
    rope key); MLA queries d·H·(dh+dr) or d·dq + dq + dq·H·(dh+dr),
    kv_a d·(dc+dr), latent norm dc, kv_b dc·H·2dh, output H·dh·d.
    """
    V, d, H, dh, L = cfg.vocab_size, cfg.d_model, cfg.n_head, cfg.head_dim, cfg.n_layer
    if cfg.is_mla:
        dc, dr, dq = cfg.kv_lora_rank, cfg.rope_dim, cfg.q_lora_rank
        q = d * H * (dh + dr) if dq is None else d * dq + dq + dq * H * (dh + dr)
        attn = q + d * (dc + dr) + dc + dc * H * 2 * dh + H * dh * d
    else:
        attn = d * H * (dh + cfg.rope_dim) + 2 * d * cfg.n_kv_head * dh + d * cfg.rope_dim + H * dh * d
    per_layer = 2 * d + 3 * d * cfg.d_ff + attn
    return V * d * (1 if cfg.tie_embeddings else 2) + d + L * per_layer


def describe(cfg: ModelConfig) -> dict:
    """One summary row: variant, parameters (formula), KV-cache floats per token (whole model and per layer)."""
    return {
        "variant": variant_of(cfg.attention, cfg.rope_mode),  # the one name of train, study, store and report
        "attention": cfg.attention,
        "params": parameter_count_formula(cfg),
        "kv_cache_floats_per_token": cfg.kv_cache_floats_per_token(),
        "kv_cache_floats_per_layer": cfg.kv_cache_floats_per_layer(),
    }


def _variant_configs(cfg: ModelConfig) -> list[ModelConfig]:
    base = {**cfg.to_dict(), "n_kv_head": None}
    out = []
    for attention in ATTENTIONS:
        modes = ROPE_MODES if attention == MLA_PREROPE else (cfg.rope_mode,)
        out += [ModelConfig.from_dict({**base, "attention": attention, "rope_mode": m}) for m in modes]
    return out


def summary_table(cfg: ModelConfig | None = None) -> str:
    """A text table of ``describe`` for every attention variant at ``cfg``'s sizes (default sizes if None)."""
    rows = [describe(c) for c in _variant_configs(cfg or ModelConfig())]
    head = f"{'variant':<20} {'params':>12} {'KV floats/token':>16} {'per layer':>10} {'vs mha':>7}"
    mha = rows[0]["kv_cache_floats_per_token"]
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r["kv_cache_floats_per_token"] / mha
        lines.append(f"{r['variant']:<20} {r['params']:>12,} {r['kv_cache_floats_per_token']:>16,} "
                     f"{r['kv_cache_floats_per_layer']:>10,} {ratio:>7.3f}")
    return "\n".join(lines)


__all__ = ["ATTENTIONS", "ROPE_MODES", "ModelConfig", "describe", "parameter_count_formula", "summary_table"]
