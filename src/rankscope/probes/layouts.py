"""Layouts of attention stacks in checkpoints: where one layer's q/k/v/o (or MLA) weights live, and how to read them.

A layout has ``family`` (the probe family: "bert", "gpt2", "llama", "mla", …) and
``all_forms(state_dict, cfg, prefix=, heads=, kinds=)`` → NamedForms. One-stack layouts (``_OneStack``) find
the stack's name prefix and layer numbers from an ``anchor`` regex, then yield each layer's ``forms``. The
registry of model types (``probes.hf.LAYOUTS``) is a table of these. An architecture's quirks are declarative
fields of its layout (``MHALayout``: fused q/k/v row orders, the KV head count, q/k RMSNorm gains to fold),
never a branch on ``model_type``; ``ByConfig`` picks one of several layouts from config flags (Falcon).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from rankscope.attention_forms import MLAWeights, NamedForm, mha_forms, mla_forms
from rankscope.errors import CheckpointError, InputError
from rankscope.probes.load import FP8_DTYPES, dequantize_fp8, fp8_block


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


QKV_SPLITS = ("blocks", "heads", "groups")  # how a fused q/k/v weight's rows hold the heads (MHALayout.qkv_split)
NORM_OVER = ("head", "all")  # what a q/k RMSNorm normalises (MHALayout.norm_over)


@dataclass(frozen=True)
class MHALayout(_OneStack):
    """Where an MHA/GQA/MQA checkpoint keeps one layer's attention weights (names after the stack's prefix, with
    ``{i}`` for the layer), and how to read them. All weights are read ``[out, in]`` (after a transpose where
    ``conv1d``).

    ``fused_qkv``: one weight holding q, k and v, its rows (H + 2·H_kv)·dh split by ``qkv_split``:
    "blocks" [q; k; v] of H·dh, H_kv·dh, H_kv·dh rows (GPT-2's Conv1D columns, Phi-3, Falcon multi-query);
    "heads" (H, 3, dh) rows, per head [q_h; k_h; v_h] (GPT-NeoX, BLOOM, Falcon MHA; needs H_kv = H);
    "groups" (H_kv, H/H_kv + 2, dh) rows, per KV group its H/H_kv query heads then k_g, v_g (Falcon's new
    decoder architecture). Query head h uses KV group h // (H/H_kv) in every split.

    ``kv_heads``: H_kv, as a config key (a missing or null value means H, as in transformers), a fixed count,
    or "" (``num_key_value_heads``, else H).

    ``q_norm`` / ``k_norm``: gains g of an RMSNorm on the projected queries / keys (Qwen3, Gemma3, OLMo2), over
    each head's dh dims (``norm_over="head"``, one (dh,) gain for every head) or over the whole projection
    (``"all"``, one (H·dh,) or (H_kv·dh,) gain). The norm multiplies by o + g, o = ``norm_offset`` (Gemma: 1 + g):
    q = (o + g_q) ⊙ Wq x / r_q(x), r_q(x) = √(mean((Wq x)²) + eps) over the normed dims (likewise k): the gains are
    folded into the factors, diag(o + g_q)·Wq_h and diag(o + g_k)·Wk_g, and the form is exact up to the per-token
    scalars: q_h(x_i)·k_h(x_j) = x_iᵀ B_h x_j / (r_q(x_i)·r_k(x_j)), with r per head ("head"; then r_q, r_k
    differ between heads, and the layer sum Σ_h B_h weighs each head by its un-normalised scale, not as the
    model does) or shared by all heads ("all").
    """

    family: str
    anchor: str  # the parameter whose name carries the layer number (a regex, one group)
    q: str = ""
    k: str = ""
    v: str = ""
    o: str = ""
    fused_qkv: str = ""
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    qkv_split: str = "blocks"  # QKV_SPLITS: the row order of fused_qkv
    kv_heads: str | int = ""  # H_kv: a config key, a fixed count, or "" (num_key_value_heads, else H)
    q_norm: str = ""  # RMSNorm gains on the projected queries (folded into Wq)
    k_norm: str = ""  # RMSNorm gains on the projected keys (folded into Wk)
    norm_over: str = "head"  # NORM_OVER: each head's dh dims, or the whole projection
    norm_offset: float = 0.0  # the norm multiplies by norm_offset + g (Gemma's RMSNorm: 1 + g)

    def __post_init__(self):
        if self.qkv_split not in QKV_SPLITS or self.norm_over not in NORM_OVER:
            raise ValueError(f"MHALayout {self.family}: qkv_split must be one of {QKV_SPLITS} and norm_over one of "
                             f"{NORM_OVER}, got {self.qkv_split!r}, {self.norm_over!r}")

    def n_kv_heads(self, cfg: dict) -> int:
        """H_kv of this layout for a config."""
        _, H, H_kv, _ = _mha_head_dims(cfg)
        if isinstance(self.kv_heads, int):
            return self.kv_heads
        return int(cfg.get(self.kv_heads) or H) if self.kv_heads else H_kv

    def forms(self, i: int, w, has, cfg: dict, heads: bool, kinds) -> Iterator[NamedForm]:
        d, H, _, dh = _mha_head_dims(cfg)
        H_kv = self.n_kv_heads(cfg)
        orient = (lambda t: t.mT) if self.conv1d else (lambda t: t)
        if self.fused_qkv:
            name = self.fused_qkv.format(i=i)
            wq, wk, wv = self._split(name, orient(w(name)), d, H, H_kv, dh)
        else:
            wq, wk, wv = (orient(w(t.format(i=i))) for t in (self.q, self.k, self.v))
        if self.q_norm:
            wq = wq * self._gain(w, self.q_norm.format(i=i), H, wq.shape[0])[:, None]  # diag(o + g_q)·Wq
        if self.k_norm:
            wk = wk * self._gain(w, self.k_norm.format(i=i), H_kv, wk.shape[0])[:, None]  # diag(o + g_k)·Wk
        return mha_forms(i, wq, wk, wv, orient(w(self.o.format(i=i))), H, H_kv, heads=heads, kinds=kinds)

    def _split(self, name: str, qkv: torch.Tensor, d: int, H: int, H_kv: int, dh: int):
        """(Wq, Wk, Wv) [out, in] from a fused weight qkv ((H + 2·H_kv)·dh, d), rows as ``qkv_split`` says."""
        rows = (H + 2 * H_kv) * dh
        if qkv.shape != (rows, d) or H % H_kv or (self.qkv_split == "heads" and H_kv != H):
            stored = tuple(reversed(qkv.shape)) if self.conv1d else tuple(qkv.shape)
            want = (d, rows) if self.conv1d else (rows, d)
            raise CheckpointError(f"state dict: {name} is {stored}, expected {want} ({H} heads, {H_kv} KV heads, "
                                  f"head dim {dh}, rows split as {self.qkv_split!r})")
        if self.qkv_split == "blocks":
            return qkv.split([H * dh, H_kv * dh, H_kv * dh], dim=0)
        if self.qkv_split == "heads":
            t = qkv.reshape(H, 3, dh, d)
            return tuple(t[:, j].reshape(H * dh, d) for j in range(3))
        t = qkv.reshape(H_kv, H // H_kv + 2, dh, d)  # per group: its query heads, then k_g, v_g
        return t[:, :-2].reshape(H * dh, d), t[:, -2].reshape(H_kv * dh, d), t[:, -1].reshape(H_kv * dh, d)

    def _gain(self, w, name: str, n_heads: int, rows: int) -> torch.Tensor:
        """The norm's multiplier per projected row (rows,): o + g, tiled over the heads where ``norm_over="head"``."""
        g = w(name)
        want = rows // n_heads if self.norm_over == "head" else rows
        if g.shape != (want,):
            raise CheckpointError(f"state dict: {name} is {tuple(g.shape)}, expected ({want},) (an RMSNorm over "
                                  f"{'each head' if self.norm_over == 'head' else 'the whole projection'})")
        g = g + self.norm_offset
        return g.repeat(n_heads) if self.norm_over == "head" else g


@dataclass(frozen=True)
class ByConfig:
    """A layout chosen by boolean config flags, read in order: the layout of the first ``(key, default, layout)``
    whose flag (``default`` where the config lacks it) is true, else ``otherwise``. Falcon: its fused q/k/v rows
    follow ``new_decoder_architecture``, then ``multi_query``, as transformers' ``FalconAttention`` reads them."""

    family: str
    choices: tuple[tuple[str, bool, MHALayout], ...]
    otherwise: MHALayout

    def choose(self, cfg: dict) -> MHALayout:
        for key, default, layout in self.choices:
            if cfg.get(key, default):
                return layout
        return self.otherwise

    def all_forms(self, state_dict: Mapping, cfg: dict, *, prefix: str | None, heads: bool,
                  kinds) -> Iterator[NamedForm]:
        return self.choose(cfg).all_forms(state_dict, cfg, prefix=prefix, heads=heads, kinds=kinds)


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


def _weight(state_dict: Mapping, name: str, cfg: dict) -> torch.Tensor:
    """One tensor as float64; FP8 weights with a ``weight_scale_inv`` are dequantised block-wise (a checkpoint read
    through ``open_checkpoint`` gives them dequantised already)."""
    if name not in state_dict:
        raise CheckpointError(f"state dict: missing parameter {name!r}")
    w = torch.as_tensor(state_dict[name]).detach()
    if w.dtype in FP8_DTYPES:
        scale_name = name[: -len("weight")] + "weight_scale_inv"
        if scale_name not in state_dict:
            raise CheckpointError(f"state dict: {name!r} is {w.dtype} without {scale_name!r}; cannot dequantise")
        w = dequantize_fp8(w, torch.as_tensor(state_dict[scale_name]), fp8_block(cfg), f"state dict: {name!r}",
                           torch.float64)
    if not (w.is_floating_point()):
        raise CheckpointError(f"state dict: {name!r} has dtype {w.dtype}; expected floating-point weights")
    return w.to(torch.float64)


def _mha_head_dims(cfg: dict) -> tuple[int, int, int, int]:
    d = _get(cfg, "hidden_size", "n_embd", "n_embed", "d_model")  # n_embed: BLOOM's and old Falcon's config.json
    H = _get(cfg, "num_attention_heads", "n_head")
    H_kv = _get(cfg, "num_key_value_heads", default=H)
    dh = _get(cfg, "head_dim", default=d // H)
    return d, H, H_kv, dh
