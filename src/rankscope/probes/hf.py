"""Probes for Hugging Face transformers checkpoints: config + state dict → NamedForms, no model instantiated.

Supported ``model_type``s and the parameter names read (any prefix before them, e.g. ``bert.``,
``transformer.``, ``model.``, is found from the names):

- ``bert``, ``roberta``: ``encoder.layer.{i}.attention.self.{query,key,value}.weight``,
  ``encoder.layer.{i}.attention.output.dense.weight``.
- ``gpt2``: ``h.{i}.attn.c_attn.weight`` (Conv1D, ``[in, out]`` = [d, 3d], columns q | k | v),
  ``h.{i}.attn.c_proj.weight`` (Conv1D, ``[in, out]``).
- ``llama``, ``mistral``, ``qwen2``, ``mixtral``, ``qwen2_moe``, ``gemma``, ``gemma2``:
  ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``; GQA with query head h on KV group ``h // (H / H_kv)``
  (H_kv = ``num_key_value_heads``); head dim from ``head_dim`` or hidden_size / heads. The MoE experts of
  Mixtral / Qwen2-MoE are not read here. Gemma2/3 scale scores by ``query_pre_attn_scalar``^-½ and Gemma2
  softcaps them (c·tanh(s/c), ``attn_logit_softcapping``): both act on the form's score, outside it.
- ``qwen3`` and ``gemma3_text``: as LLaMA plus ``layers.{i}.self_attn.{q_norm,k_norm}.weight``, RMSNorms over
  each head's dh dims, their gains folded into the factors (Gemma3's as 1 + g); ``olmo2``: the same names, the
  norms over the whole projected q and k (H·dh and H_kv·dh gains). The forms are exact up to the per-token
  scalars 1/(r_q(x_i)·r_k(x_j)) (``layouts.MHALayout``).
- ``phi3``: ``layers.{i}.self_attn.qkv_proj.weight`` (rows [q; k; v] of H·dh, H_kv·dh, H_kv·dh),
  ``layers.{i}.self_attn.o_proj.weight``.
- ``opt``: ``decoder.layers.{i}.self_attn.{q,k,v,out}_proj.weight`` (OPT multiplies q by dh^-½ inside: the
  softmax scale, outside the form).
- ``gpt_neox``: ``layers.{i}.attention.query_key_value.weight`` (rows (H, 3, dh): per head [q_h; k_h; v_h]),
  ``layers.{i}.attention.dense.weight``; partial rotary does not act at offset 0.
- ``gptj``: ``h.{i}.attn.{q,k,v,out}_proj.weight``.
- ``falcon``: ``h.{i}.self_attention.query_key_value.weight``, ``h.{i}.self_attention.dense.weight``; the fused
  rows as transformers' ``FalconAttention`` reads them: ``new_decoder_architecture`` → (H_kv, H/H_kv + 2, dh)
  per KV group (H_kv = ``num_kv_heads``), else ``multi_query`` (default true) → [q (H·dh); k (dh); v (dh)],
  else (H, 3, dh) per head. ALiBi (``alibi``), if on, is a bias outside the form.
- ``bloom``: ``h.{i}.self_attention.query_key_value.weight`` (rows (H, 3, dh)), ``h.{i}.self_attention.dense
  .weight``; ALiBi is a bias added to the scores, outside the form.
- ``deepseek_v2``, ``deepseek_v3`` (MLA): ``layers.{i}.self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj,
  kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}``; block-wise FP8 weights (``weight_scale_inv``)
  are dequantised.
- ``distilbert``, ``vit``, ``t5``/``mt5`` (encoder, decoder, cross stacks), ``clip`` (text, vision towers),
  ``clip_text_model``, ``clip_vision_model``: ``probes.stacks`` (``NamedForm.stack`` names the stack).

Each architecture is one row of the registry ``LAYOUTS`` (model_type → layout), read by one loop. Biases
(Qwen2's q/k/v, BERT's, GPT-2's) and the softmax scale are not part of the forms (see ``attention_forms``).
Anything else: ``detect_architecture`` returns None and ``hf_forms`` raises ``InputError``; analyse its
weights as plain matrices instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from torch import nn

from rankscope.attention_forms import NamedForm, mha_forms
from rankscope.errors import InputError
from rankscope.probes.layouts import ByConfig, MHALayout, MLALayout, _config_dict
from rankscope.probes.stacks import CLIP, CLIP_TEXT, CLIP_VISION, DISTILBERT, T5, VIT

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
_QWEN3 = replace(_LLAMA, family="qwen3", q_norm="layers.{i}.self_attn.q_norm.weight",
                 k_norm="layers.{i}.self_attn.k_norm.weight")  # RMSNorm over each head's dh dims
_GEMMA3 = replace(_QWEN3, family="gemma3", norm_offset=1.0)  # Gemma's RMSNorm multiplies by 1 + g
_OLMO2 = replace(_QWEN3, family="olmo2", norm_over="all")  # RMSNorm over the whole projected q (k)
_PHI3 = MHALayout("phi3", r"layers\.(\d+)\.self_attn\.qkv_proj\.weight",
                  fused_qkv="layers.{i}.self_attn.qkv_proj.weight", o="layers.{i}.self_attn.o_proj.weight")
_OPT = MHALayout("opt", r"decoder\.layers\.(\d+)\.self_attn\.q_proj\.weight",
                 q="decoder.layers.{i}.self_attn.q_proj.weight", k="decoder.layers.{i}.self_attn.k_proj.weight",
                 v="decoder.layers.{i}.self_attn.v_proj.weight", o="decoder.layers.{i}.self_attn.out_proj.weight")
_GPT_NEOX = MHALayout("gpt_neox", r"layers\.(\d+)\.attention\.query_key_value\.weight",
                      fused_qkv="layers.{i}.attention.query_key_value.weight", o="layers.{i}.attention.dense.weight",
                      qkv_split="heads")
_GPTJ = MHALayout("gptj", r"h\.(\d+)\.attn\.q_proj\.weight", q="h.{i}.attn.q_proj.weight", k="h.{i}.attn.k_proj.weight",
                  v="h.{i}.attn.v_proj.weight", o="h.{i}.attn.out_proj.weight")
_BLOOM = MHALayout("bloom", r"h\.(\d+)\.self_attention\.query_key_value\.weight",
                   fused_qkv="h.{i}.self_attention.query_key_value.weight", o="h.{i}.self_attention.dense.weight",
                   qkv_split="heads")
_FALCON_MHA = replace(_BLOOM, family="falcon", kv_heads="num_attention_heads")
_FALCON = ByConfig("falcon", (("new_decoder_architecture", False,  # modeling_falcon's order and config defaults
                               replace(_FALCON_MHA, qkv_split="groups", kv_heads="num_kv_heads")),
                              ("multi_query", True, replace(_FALCON_MHA, qkv_split="blocks", kv_heads=1))),
                   otherwise=_FALCON_MHA)

# model_type → layout: one row per architecture
LAYOUTS: dict[str, MHALayout | MLALayout | ByConfig] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2_moe": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "qwen3": _QWEN3,
    "gemma3_text": _GEMMA3,
    "olmo2": _OLMO2,
    "phi3": _PHI3,
    "opt": _OPT,
    "gpt_neox": _GPT_NEOX,
    "gptj": _GPTJ,
    "falcon": _FALCON,
    "bloom": _BLOOM,
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
    "distilbert": DISTILBERT,
    "vit": VIT,
    "t5": T5,
    "mt5": T5,
    "clip": CLIP,
    "clip_text_model": CLIP_TEXT,
    "clip_vision_model": CLIP_VISION,
}
FAMILIES = {model_type: layout.family for model_type, layout in LAYOUTS.items()}


def detect_architecture(config) -> str | None:
    """The probe family of a transformers config (``FAMILIES``: "bert", "gpt2", "llama", "mla", "falcon", …), None if
    unsupported."""
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
