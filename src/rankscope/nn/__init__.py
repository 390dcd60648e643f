"""rankscope.nn: a small LLaMA-style decoder with switchable attention (MHA/GQA/MQA, MLA-PreRoPE, MLA-Decoupled)."""

from rankscope.nn.attention import MHA, MLA, RMSNorm, Rotary, make_attention
from rankscope.nn.config import ATTENTIONS, ModelConfig, describe, parameter_count_formula, summary_table
from rankscope.nn.gpt import GPT

__all__ = [
    "ATTENTIONS",
    "GPT",
    "MHA",
    "MLA",
    "ModelConfig",
    "RMSNorm",
    "Rotary",
    "describe",
    "make_attention",
    "parameter_count_formula",
    "summary_table",
]
