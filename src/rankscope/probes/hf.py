"""Probes for Hugging Face transformers checkpoints: config + state dict → NamedForms, no model instantiated.

Supported ``model_type``s and the parameter names read (any prefix before them, e.g. ``bert.``,
``transformer.``, ``model.``, is found from the names):

- ``bert``, ``roberta``: ``encoder.layer.{i}.attention.self.{query,key,value}.weight``,
  ``encoder.layer.{i}.attention.output.dense.weight``.
- ``gpt2``: ``h.{i}.attn.c_attn.weight`` (Conv1D, ``[in, out]`` = [d, 3d], columns q | k | v),
  ``h.{i}.attn.c_proj.weight`` (Conv1D, ``[in, out]``).
- ``llama``, ``mistral``, ``qwen2``: ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``; GQA with query head
  h on KV group ``h // (H / H_kv)``; head dim from ``head_dim`` or hidden_size / heads.
- ``deepseek_v2``, ``deepseek_v3`` (MLA): ``layers.{i}.self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj,
  kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}``; block-wise FP8 weights (``weight_scale_inv``)
  are dequantised.

Each architecture is one row of the registry ``LAYOUTS`` (model_type → layout), read by one loop. Biases
(Qwen2's q/k/v, BERT's, GPT-2's) and the softmax scale are not part of the forms (see ``attention_forms``).
Anything else: ``detect_architecture`` returns None and ``hf_forms`` raises ``InputError``; analyse its
weights as plain matrices instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from rankscope.attention_forms import NamedForm, mha_forms
from rankscope.errors import InputError
from rankscope.probes.layouts import MHALayout, MLALayout, _config_dict

_BERT = MHALayout("bert", r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight",
                  q="encoder.layer.{i}.attention.self.query.weight",
                  k="encoder.layer.{i}.attention.self.key.weight",
                  v="encoder.layer.{i}.attention.self.value.weight",
                  o="encoder.layer.{i}.attention.output.dense.weight")
_GPT2 = MHALayout("gpt2", r"h\.(\d+)\.attn\.c_attn\.weight", fused_qkv="h.{i}.attn.c_attn.weight",
                  o="h.{i}.attn.c_proj.weight", conv1d=True)
_LLAMA = MHALayout("llama", r"layers\.(\d+)\.self_attn\.q_proj\.weight", q="layers.{i}.self_attn.q_proj.weight",
                   k="layers.{i}.self_attn.k_proj.weight", v="layers.{i}.self_attn.v_proj.weight",
                   o="layers.{i}.self_attn.o_proj.weight")
_DEEPSEEK = MLALayout("mla", r"layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.weight")

# model_type → layout: one row per architecture
LAYOUTS: dict[str, MHALayout | MLALayout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
}
FAMILIES = {model_type: layout.family for model_type, layout in LAYOUTS.items()}


def detect_architecture(config) -> str | None:
    """The probe family of a transformers config ("bert", "gpt2", "llama" or "mla"), None if unsupported."""
    return FAMILIES.get(_config_dict(config).get("model_type"))


def layout_of(config) -> MHALayout | MLALayout | None:
    """The registry's layout for a transformers config, None if its model_type is not in ``LAYOUTS``."""
    return LAYOUTS.get(_config_dict(config).get("model_type"))


def hf_forms(config, state_dict: Mapping, *, prefix: str | None = None, heads: bool = True,
             kinds: Sequence[str] | None = None) -> Iterator[NamedForm]:
    """NamedForms of every attention layer (and head) of a transformers checkpoint, from its config and
    state dict; layers in numeric order of their parameter names, per layer the sum (head −1) then heads.

    ``prefix``: the name prefix of the attention stack (found from the names when unique); ``heads=False``
    yields only the layer sums; ``kinds``: a subset of ``KINDS`` (kinds a variant lacks are skipped).
    BERT's optional relative-position scores and GPT-2's 1/(layer+1) scaling are outside the forms.
    """
    cfg = _config_dict(config)
    layout = layout_of(cfg)
    if layout is None:
        raise InputError(f"config: model_type {cfg.get('model_type')!r} has no attention probe "
                         f"(supported: {sorted(LAYOUTS)}); analyse its weight matrices instead")
    yield from layout.all_forms(state_dict, cfg, prefix=prefix, heads=heads, kinds=kinds)


def hf_model_forms(model: nn.Module, **kwargs) -> Iterator[NamedForm]:
    """``hf_forms(model.config, model.state_dict())`` for an instantiated transformers model."""
    return hf_forms(model.config, model.state_dict(), **kwargs)


def multihead_attention_forms(module: nn.MultiheadAttention, layer: int = 0, *, heads: bool = True,
                              kinds: Sequence[str] | None = None) -> Iterator[NamedForm]:
    """NamedForms of a PyTorch ``nn.MultiheadAttention`` (packed ``in_proj_weight`` or separate q/k/v
    weights when kdim/vdim differ); the qk form is d×kdim. Biases (``in_proj_bias``, ``bias_k``) are left out."""
    if not isinstance(module, nn.MultiheadAttention):
        raise InputError(f"multihead_attention_forms: expected nn.MultiheadAttention, got {type(module).__name__}")
    d = module.embed_dim
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.detach().split(d, dim=0)  # (3d, d) → 3 × (d, d)
    else:
        wq, wk, wv = (p.detach() for p in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
    wo = module.out_proj.weight.detach()
    return mha_forms(layer, wq, wk, wv, wo, module.num_heads, heads=heads, kinds=kinds)
