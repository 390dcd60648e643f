"""Probes: models → named query–key / OV forms (docs/design.md §1, §4). Know model layouts, nothing of metrics."""

from rankscope.attention_forms import MLAWeights, NamedForm, latent_rms_isotropic, mha_forms, mla_forms, stack_heads
from rankscope.probes.hf import (
    FAMILIES,
    LAYOUTS,
    detect_architecture,
    hf_forms,
    hf_model_forms,
    layout_of,
    multihead_attention_forms,
)
from rankscope.probes.native import native_forms

__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "MLAWeights",
    "NamedForm",
    "detect_architecture",
    "hf_forms",
    "hf_model_forms",
    "latent_rms_isotropic",
    "layout_of",
    "mha_forms",
    "mla_forms",
    "multihead_attention_forms",
    "native_forms",
    "stack_heads",
]
