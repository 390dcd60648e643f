"""One vocabulary: the names of form kinds, kind groups, nulls and attention variants (docs/design.md §1).

Every module spells these names through the constants here, so a row's ``kind``, a diagnosis' ``null`` and a
run's ``variant`` mean one thing everywhere: in the probes, the monitor, the store, the CLI and the report.
"""

from __future__ import annotations

# ---- form kinds: the ``kind`` column of every row -------------------------------------------------------------
QK = "qk"  # an attention head's (or layer's) query–key form B with score(x_i, x_j) = x_iᵀ B x_j
QK_CONTENT = "qk_content"  # decoupled MLA: the content block of qk
QK_ROPE = "qk_rope"  # decoupled MLA: the rope block of qk (its key shared by all heads)
OV = "ov"  # the map x ↦ Wo_h Wv_h x a head writes into the residual stream
EMBEDDING, MLP_IN, MLP_OUT, ATTN_WEIGHT, WEIGHT = "embedding", "mlp_in", "mlp_out", "attn_weight", "weight"
ROUTER = "router"  # a mixture of experts' gate: token → expert scores (E, d)

QK_KINDS = (QK, QK_CONTENT, QK_ROPE)
ATTENTION_KINDS = (*QK_KINDS, OV)
MATRIX_KINDS = (EMBEDDING, MLP_IN, MLP_OUT, ROUTER, ATTN_WEIGHT, WEIGHT)  # plain weight matrices, by name

# ---- kind groups: what ``analyze(kinds=…)``, ``--kinds`` and ``Monitor(kinds=…)`` select ---------------------
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    "qk": QK_KINDS,
    "ov": (OV,),
    "mlp": (MLP_IN, MLP_OUT, ROUTER),
    "weights": (EMBEDDING, ATTN_WEIGHT, WEIGHT),
}
ALL_GROUPS = tuple(KIND_GROUPS)

# ---- nulls -------------------------------------------------------------------------------------------------------
PRODUCT = "product"  # structure-matched: every factor an independent Gaussian of its shape (the default)
MP = "mp"  # the naive Marchenko–Pastur fit of papers (σ² = mean λ), for comparison
TW = "tw"  # a single matrix's MP fit with Johnstone's analytic Tracy–Widom edge
PERMUTATION = "permutation"  # each (balanced) factor's own entries, permuted: robust to heavy tails
NULLS = (PRODUCT, MP, TW, PERMUTATION)
MONITOR_NULLS = (PRODUCT, MP)  # what a training run records, side by side

# ---- attention variants ---------------------------------------------------------------------------------------
MHA, GQA, MQA, MLA_PREROPE, MLA_DECOUPLED = "mha", "gqa", "mqa", "mla_prerope", "mla_decoupled"
MHA_DECOUPLED = "mha_decoupled"  # MHA's per-head content q/k plus one rope key shared by all heads (no latent)
ATTENTIONS = (MHA, GQA, MQA, MHA_DECOUPLED, MLA_PREROPE, MLA_DECOUPLED)  # ModelConfig.attention, HF form variants
DECOUPLED = (MHA_DECOUPLED, MLA_DECOUPLED)  # the variants whose RoPE acts only on a shared rope key's dims
ROPE_INPUT, ROPE_COUPLED = "input", "coupled"
ROPE_MODES = (ROPE_INPUT, ROPE_COUPLED)  # mla_prerope: rotate the token before compression, or the heads' q, k

# The study's variants: an attention variant with its rope mode. ``variant_of`` maps a model config back.
# Together they separate the three ways Decoupled differs from MHA: latent compression (mha → mla_prerope_coupled,
# mha_decoupled → mla_decoupled), how RoPE is applied (mla_prerope_input vs _coupled) and a shared rope key
# (mha → mha_decoupled, mla_prerope_coupled → mla_decoupled); gqa is the grouped-key design of LLaMA-2/3.
MLA_PREROPE_INPUT, MLA_PREROPE_COUPLED = "mla_prerope_input", "mla_prerope_coupled"
STUDY_VARIANTS: dict[str, dict[str, str]] = {
    MHA: {"attention": MHA},
    GQA: {"attention": GQA},
    MLA_PREROPE_INPUT: {"attention": MLA_PREROPE, "rope_mode": ROPE_INPUT},
    MLA_PREROPE_COUPLED: {"attention": MLA_PREROPE, "rope_mode": ROPE_COUPLED},
    MHA_DECOUPLED: {"attention": MHA_DECOUPLED},
    MLA_DECOUPLED: {"attention": MLA_DECOUPLED},
}
# Every variant by its one name, as ``train --attention``, ``study --variants``, the store's ``variant`` column and the
# report spell it: the study's six and MQA (all heads share one K/V head).
VARIANTS: dict[str, dict[str, str]] = {**STUDY_VARIANTS, MQA: {"attention": MQA}}
SPIKY_VARIANTS = (MHA, MLA_PREROPE_INPUT, MLA_PREROPE_COUPLED)  # the variants claims (i) and (ii) are about
REFERENCE_VARIANT = MLA_DECOUPLED  # the variant every other is compared with (the paper's claim iii)


def variant_of(attention: str, rope_mode: str | None = None) -> str:
    """The study variant of a model config: ``mla_prerope`` is split by its rope mode, the rest keep their name."""
    if attention == MLA_PREROPE:
        return MLA_PREROPE_COUPLED if rope_mode == ROPE_COUPLED else MLA_PREROPE_INPUT
    return attention
