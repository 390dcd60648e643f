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

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankscope.attention_forms import MLAWeights, NamedForm, mha_forms, mla_forms
from rankscope.errors import CheckpointError, InputError


@dataclass(frozen=True)
class MHALayout:
    """Where an MHA/GQA/MQA checkpoint keeps one layer's attention weights (names after the stack's prefix, with
    ``{i}`` for the layer). ``fused_qkv``: one ``[in, out]`` Conv1D with columns q | k | v (GPT-2)."""

    family: str
    anchor: str  # the parameter whose name carries the layer number (a regex, one group)
    q: str = ""
    k: str = ""
    v: str = ""
    o: str = ""
    fused_qkv: str = ""
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)

    def forms(self, i: int, w, has, cfg: dict, heads: bool, kinds) -> Iterator[NamedForm]:
        d, H, H_kv, _ = _mha_head_dims(cfg)
        orient = (lambda t: t.mT) if self.conv1d else (lambda t: t)
        if self.fused_qkv:
            name = self.fused_qkv.format(i=i)
            qkv = w(name)  # Conv1D (d, 3d): y = x @ W
            if qkv.shape != (d, 3 * d):
                raise CheckpointError(f"state dict: {name} is {tuple(qkv.shape)}, expected ({d}, {3 * d})")
            wq, wk, wv = (qkv[:, j * d:(j + 1) * d].mT for j in range(3))  # each (out, in)
        else:
            wq, wk, wv = (orient(w(t.format(i=i))) for t in (self.q, self.k, self.v))
        return mha_forms(i, wq, wk, wv, orient(w(self.o.format(i=i))), H, H_kv, heads=heads, kinds=kinds)


@dataclass(frozen=True)
class MLALayout:
    """Where a DeepSeek-V2/V3 checkpoint keeps one MLA layer (``{a}`` is the layer's attention prefix)."""

    family: str
    anchor: str
    attention: str = "layers.{i}.self_attn."

    def forms(self, i: int, w, has, cfg: dict, heads: bool, kinds) -> Iterator[NamedForm]:
        a = self.attention.format(i=i)
        compressed = has(a + "q_a_proj.weight")
        weights = MLAWeights(
            n_heads=_get(cfg, "num_attention_heads"), qk_nope_head_dim=_get(cfg, "qk_nope_head_dim"),
            qk_rope_head_dim=_get(cfg, "qk_rope_head_dim"), v_head_dim=_get(cfg, "v_head_dim"),
            kv_a=w(a + "kv_a_proj_with_mqa.weight"), kv_a_norm=w(a + "kv_a_layernorm.weight"),
            kv_b=w(a + "kv_b_proj.weight"), wo=w(a + "o_proj.weight") if has(a + "o_proj.weight") else None,
            q_a=w(a + "q_a_proj.weight") if compressed else None,
            q_a_norm=w(a + "q_a_layernorm.weight") if compressed else None,
            q_b=w(a + "q_b_proj.weight") if compressed else None,
            wq=None if compressed else w(a + "q_proj.weight"))
        return mla_forms(i, weights, heads=heads, kinds=kinds)


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


def _config_dict(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        d = config.to_dict()
        for name in ("hidden_size", "num_attention_heads", "num_hidden_layers"):  # GPT-2's attribute_map
            if name not in d and hasattr(config, name):
                d[name] = getattr(config, name)
        return d
    raise InputError(f"config: expected a transformers config or a dict of config.json, got {type(config).__name__}")


def _get(cfg: dict, *names: str, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if default is None:
        raise InputError(f"config ({cfg.get('model_type')}) has none of {list(names)}")
    return default


def detect_architecture(config) -> str | None:
    """The probe family of a transformers config ("bert", "gpt2", "llama" or "mla"), None if unsupported."""
    return FAMILIES.get(_config_dict(config).get("model_type"))


def layout_of(config) -> MHALayout | MLALayout | None:
    """The registry's layout for a transformers config, None if its model_type is not in ``LAYOUTS``."""
    return LAYOUTS.get(_config_dict(config).get("model_type"))


def _find_prefix(state_dict: Mapping, layout, prefix: str | None) -> tuple[str, list[int]]:
    """The name prefix of the attention stack and its layer numbers, sorted numerically."""
    family = layout.family
    pattern = re.compile(r"^(.*?)" + layout.anchor + "$")
    found: dict[str, set[int]] = {}
    for name in state_dict:
        m = pattern.match(name)
        if m and (m.group(1) == "" or m.group(1).endswith(".")):
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if prefix is not None:
        prefix = prefix if prefix == "" or prefix.endswith(".") else prefix + "."
        if prefix not in found:
            raise CheckpointError(f"state dict: no {family} attention weights under prefix {prefix!r}; "
                                  f"found prefixes {sorted(found)}")
    elif not found:
        raise CheckpointError(f"state dict: no parameter matches the {family} attention layout "
                              f"(looked for names ending in {layout.anchor!r})")
    elif len(found) > 1:
        raise InputError(f"state dict: {family} attention weights under several prefixes {sorted(found)}; "
                         "pass prefix= to choose one")
    else:
        prefix = next(iter(found))
    return prefix, sorted(found[prefix])


def _fp8_block(cfg: dict) -> tuple[int, int]:
    q = cfg.get("quantization_config") or {}
    block = q.get("weight_block_size") if isinstance(q, Mapping) else getattr(q, "weight_block_size", None)
    return tuple(block) if block else (128, 128)


def _weight(state_dict: Mapping, name: str, cfg: dict) -> torch.Tensor:
    """One tensor as float64; FP8 weights with a ``weight_scale_inv`` are dequantised block-wise."""
    if name not in state_dict:
        raise CheckpointError(f"state dict: missing parameter {name!r}")
    w = torch.as_tensor(state_dict[name]).detach()
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale_name = name[: -len("weight")] + "weight_scale_inv"
        if scale_name not in state_dict:
            raise CheckpointError(f"state dict: {name!r} is {w.dtype} without {scale_name!r}; cannot dequantise")
        scale = torch.as_tensor(state_dict[scale_name]).to(torch.float64)  # (⌈out/bo⌉, ⌈in/bi⌉)
        bo, bi = _fp8_block(cfg)
        scale = scale.repeat_interleave(bo, 0)[: w.shape[0]].repeat_interleave(bi, 1)[:, : w.shape[1]]
        return w.to(torch.float64) * scale
    if not (w.is_floating_point()):
        raise CheckpointError(f"state dict: {name!r} has dtype {w.dtype}; expected floating-point weights")
    return w.to(torch.float64)


def _mha_head_dims(cfg: dict) -> tuple[int, int, int, int]:
    d = _get(cfg, "hidden_size", "n_embd", "d_model")
    H = _get(cfg, "num_attention_heads", "n_head")
    H_kv = _get(cfg, "num_key_value_heads", default=H)
    dh = _get(cfg, "head_dim", default=d // H)
    return d, H, H_kv, dh


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
    prefix, layers = _find_prefix(state_dict, layout, prefix)

    def w(name: str) -> torch.Tensor:
        return _weight(state_dict, prefix + name, cfg)

    def has(name: str) -> bool:
        return prefix + name in state_dict

    for i in layers:
        yield from layout.forms(i, w, has, cfg, heads, kinds)


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
