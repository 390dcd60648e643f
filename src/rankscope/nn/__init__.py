"""rankscope.nn: a small LLaMA-style decoder with switchable attention (MHA/GQA/MQA, MLA-PreRoPE, MLA-Decoupled).

``ModelConfig`` and its closed forms (``rankscope.nn.config``) need no torch; the modules are imported on first use,
so the command line's help and config checks stay fast."""

from rankscope.nn.config import ATTENTIONS, ModelConfig, describe, parameter_count_formula, summary_table

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
_MODULES = {"GPT": "gpt", "MHA": "attention", "MLA": "attention", "RMSNorm": "attention", "Rotary": "attention",
            "make_attention": "attention"}


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'rankscope.nn' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"rankscope.nn.{_MODULES[name]}"), name)
