"""Probes: models → named query–key / OV chains (DESIGN.md §1, §4). Knows model layouts, nothing of metrics."""

from rankscope.probes.chain import KINDS, NamedForm, latent_rms_isotropic, mha_forms, mla_forms, stack_heads
from rankscope.probes.hf import FAMILIES, detect_architecture, hf_forms, hf_model_forms, multihead_attention_forms
from rankscope.probes.native import native_forms

__all__ = [
    "FAMILIES",
    "KINDS",
    "NamedForm",
    "detect_architecture",
    "hf_forms",
    "hf_model_forms",
    "latent_rms_isotropic",
    "mha_forms",
    "mla_forms",
    "multihead_attention_forms",
    "native_forms",
    "stack_heads",
]
