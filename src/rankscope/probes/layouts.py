"""Layouts of attention stacks in checkpoints: where one layer's q/k/v/o (or MLA) weights live, and how to read them.

A layout has ``family`` (the probe family: "bert", "gpt2", "llama", "mla", …) and
``all_forms(state_dict, cfg, prefix=, heads=, kinds=)`` → NamedForms. One-stack layouts (``_OneStack``) find
the stack's name prefix and layer numbers from an ``anchor`` regex, then yield each layer's ``forms``. The
registry of model types (``probes.hf.LAYOUTS``) is a table of these.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from rankscope.attention_forms import MLAWeights, NamedForm, mha_forms, mla_forms
from rankscope.errors import CheckpointError, InputError


class _OneStack:
    """A layout of one attention stack: ``all_forms`` finds the stack's prefix and layers, then yields each
    layer's ``forms``. Every layout in ``LAYOUTS`` has ``family`` and ``all_forms`` (a layout of several stacks,
    e.g. an encoder–decoder, implements ``all_forms`` itself and sets ``NamedForm.stack``)."""

    family: str
    anchor: str

    def forms(self, i: int, w, has, cfg: dict, heads: bool, kinds) -> Iterator[NamedForm]:
        raise NotImplementedError

    def all_forms(self, state_dict: Mapping, cfg: dict, *, prefix: str | None, heads: bool,
                  kinds) -> Iterator[NamedForm]:
        prefix, layers = _find_prefix(state_dict, self, prefix)

        def w(name: str) -> torch.Tensor:
            return _weight(state_dict, prefix + name, cfg)

        def has(name: str) -> bool:
            return prefix + name in state_dict

        for i in layers:
            yield from self.forms(i, w, has, cfg, heads, kinds)


@dataclass(frozen=True)
class MHALayout(_OneStack):
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
class MLALayout(_OneStack):
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
