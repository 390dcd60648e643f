"""``analyze``: the diagnosis of every attention head's and layer's query–key (and OV) form and of every
other weight matrix of a model or checkpoint, as one table (one row per (layer, head, kind)).

Attention-aware where the architecture is known (``probes.hf``, ``nn.MultiheadAttention``); every other
2-D weight is a single matrix with the MP null. Nothing is skipped silently: a matrix that cannot be
diagnosed (NaN/Inf, too large) gets its row with the reason in ``error``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from rankscope.errors import InputError
from rankscope.probes import NamedForm, detect_architecture, hf_forms, multihead_attention_forms, stack_heads
from rankscope.spectra import Diagnosis
from rankscope.spectra.diagnose import diagnose_nulls
from rankscope.spectra.threads import with_one_torch_thread

MAX_ELEMENTS = 2**28  # a single matrix larger than this (2 GB in float64) is reported as skipped, by name
ATTENTION_KINDS = ("qk", "qk_content", "qk_rope", "ov")
MATRIX_KINDS = ("embedding", "mlp_in", "mlp_out", "attn_weight", "weight")
KIND_GROUPS = {"qk": ("qk", "qk_content", "qk_rope"), "ov": ("ov",), "mlp": ("mlp_in", "mlp_out"),
               "weights": ("embedding", "attn_weight", "weight")}

_PATTERNS = [  # (kind, regex on the parameter name)
    ("embedding", r"embed|\bwte\b|\bwpe\b|word_embeddings|position_embeddings|token_type|lm_head"),
    ("mlp_in", r"c_fc|up_proj|gate_proj|intermediate\.dense|\bfc1\b|\bw1\b|\bw3\b|gate_up"),
    ("mlp_out", r"mlp\.c_proj|down_proj|(?<!attention\.)output\.dense|\bfc2\b|\bw2\b"),
    ("attn_weight", r"q_proj|k_proj|v_proj|o_proj|query|key|value|attention\.output\.dense|c_attn|attn\.c_proj"
                    r"|in_proj_weight|out_proj|q_a_proj|q_b_proj|kv_a_proj|kv_b_proj"),
]


def matrix_kind(name: str) -> str:
    """The kind of a plain weight matrix, from its parameter name ("weight" when not understood)."""
    for kind, pattern in _PATTERNS:
        if re.search(pattern, name):
            return kind
    return "weight"


def layer_of(name: str) -> int:
    """The layer index in a parameter name (the first ``.N.`` component), or −1."""
    match = re.search(r"\.(\d+)\.", f".{name}")
    return int(match.group(1)) if match else -1


def _dims_text(form) -> str:
    """"n·k·m" for a chain (n×k @ k×m), "a + b" for a sum, "n·m" for a matrix; per head, without a batch axis."""
    if isinstance(form, torch.Tensor):
        return "·".join(map(str, form.shape[-2:]))
    chains = form if isinstance(form[0], list | tuple) else [form]
    return " + ".join("·".join(map(str, [c[0].shape[-2], *(f.shape[-1] for f in c)])) for c in chains)


@dataclass
class Analysis:
    """What ``analyze`` found: the table, plus the diagnoses (with eigenvalues) by row index."""

    table: pd.DataFrame
    diagnoses: dict[int, Diagnosis] = field(default_factory=dict)
    not_understood: list[str] = field(default_factory=list)
    architecture: str | None = None


class _Weights(Mapping):
    """A read-only name → tensor mapping over a model's state dict or a lazily read checkpoint."""

    def __init__(self, names: list[str], get: Callable[[str], torch.Tensor], shape: Callable[[str], tuple],
                 dtype: Callable[[str], torch.dtype]):
        self._names, self._get, self.shape, self.dtype = names, get, shape, dtype
        self._set = set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _weights_of(state: dict[str, torch.Tensor]) -> _Weights:
    return _Weights(list(state), state.__getitem__, lambda n: tuple(state[n].shape), lambda n: state[n].dtype)


def _source(model_or_path) -> tuple[dict | None, _Weights, list[NamedForm]]:
    """(config, weights, extra forms) of a module or a path."""
    if isinstance(model_or_path, nn.Module):
        state = {k: v.detach() for k, v in model_or_path.state_dict().items()}
        config = getattr(model_or_path, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else config
        extra: list[NamedForm] = []
        if hasattr(model_or_path, "attention_layers"):  # a rankscope model: each attention module gives its chains
            from rankscope.probes.native import native_forms

            return config, _weights_of(state), native_forms(model_or_path)
        mhas = [m for m in model_or_path.modules() if isinstance(m, nn.MultiheadAttention)]
        for i, module in enumerate(mhas):  # layer = the module's position in module order
            extra.extend(multihead_attention_forms(module, layer=i))
        return config, _weights_of(state), extra
    from rankscope.probes.load import open_checkpoint
    from rankscope.probes.native import open_native_run

    native = open_native_run(model_or_path)  # a rankscope run directory or one of its checkpoints
    if native is not None:
        return _source(native)

    ckpt = open_checkpoint(Path(model_or_path) if not isinstance(model_or_path, Path) else model_or_path)
    return ckpt.config, _Weights(list(ckpt.names), ckpt.tensor, ckpt.shape, ckpt.dtype), []


@with_one_torch_thread  # see spectra.threads: 2× faster on 2 cores
def analyze_full(model_or_path, *, per_head: bool = True, kinds=("qk", "ov", "mlp", "weights"),
                 null: str | tuple[str, ...] = "product", fpr: float = 0.01,
                 progress: Callable[[int, int, str], None] | None = None) -> Analysis:
    """``analyze`` with the diagnoses and forms kept (for figures). ``null`` may be a tuple of nulls: every
    form then gets one row per null, its spectrum computed once."""
    nulls = (null,) if isinstance(null, str) else tuple(null)
    unknown = [k for k in kinds if k not in KIND_GROUPS]
    if unknown:
        raise InputError(f"unknown kinds {unknown}; choose from {list(KIND_GROUPS)}")
    wanted = {k for g in kinds for k in KIND_GROUPS[g]}
    config, weights, extra = _source(model_or_path)
    arch = detect_architecture(config) if config else None
    matrices = [n for n in weights if len(weights.shape(n)) == 2 and matrix_kind(n) in wanted]
    attention_layers = sorted({layer_of(n) for n in weights if matrix_kind(n) == "attn_weight"}) if arch else []
    if extra:
        attention_layers = sorted({f.layer for f in extra})
    total, done = len(attention_layers) + len(matrices), 0
    rows: list[dict] = []
    out = Analysis(pd.DataFrame(), architecture=arch)

    def add(form: NamedForm | None, name: str, layer: int, head: int, kind: str, variant: str,
            d: Diagnosis | None, error: str = "", form_obj=None, shape=None) -> None:
        row = {"name": name, "layer": layer, "head": head, "kind": kind, "variant": variant,
               "kv_cache_floats": form.kv_cache_floats if form else None,
               "shapes": _dims_text(form_obj) if form_obj is not None else "·".join(map(str, shape or ())),
               "error": error}
        if d is not None:
            row.update(d.as_dict())
            out.diagnoses[len(rows)] = d
        rows.append(row)

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    attention_kinds = [k for k in ATTENTION_KINDS if k in wanted]
    forms: Iterator[NamedForm] = iter(extra)
    if arch and attention_kinds and not extra:
        forms = hf_forms(config, weights, heads=per_head, kinds=attention_kinds)
    for layer, layer_forms in groupby(forms, key=lambda f: f.layer):
        layer_forms = [f for f in layer_forms if f.kind in attention_kinds and (per_head or f.head < 0)]
        for kind in attention_kinds:
            of_kind = [f for f in layer_forms if f.kind == kind]
            for f in [f for f in of_kind if f.head < 0]:
                _diagnose_rows(add, [f], nulls, fpr, batched=False)
            heads = [f for f in of_kind if f.head >= 0]
            if heads:
                _diagnose_rows(add, heads, nulls, fpr, batched=True)
        tick(f"layer {layer} attention")
    for name in matrices:
        shape = weights.shape(name)
        kind = matrix_kind(name)
        if not weights.dtype(name).is_floating_point:  # e.g. BERT's position_ids buffer
            add(None, name, layer_of(name), -1, kind, "", None, f"skipped: {weights.dtype(name)} buffer, "
                "not a weight", shape=shape)
        elif shape[0] * shape[1] > MAX_ELEMENTS:
            add(None, name, layer_of(name), -1, kind, "", None, f"skipped: {shape[0]}×{shape[1]} is larger "
                f"than {MAX_ELEMENTS} elements", shape=shape)
        else:
            W = weights[name]
            try:
                found = diagnose_nulls(W, nulls, fpr=fpr, name=name)
            except InputError as exc:
                add(None, name, layer_of(name), -1, kind, "", None, str(exc), shape=shape)
            else:
                for n in nulls:
                    add(None, name, layer_of(name), -1, kind, "", found[n][0], form_obj=W)
        tick(name)
    if arch is None and not extra:
        out.not_understood = [n for n in matrices if matrix_kind(n) == "weight"]
    out.table = pd.DataFrame(rows)
    return out


def _diagnose_rows(add, forms: list[NamedForm], nulls: tuple[str, ...], fpr: float, batched: bool) -> None:
    """Diagnose the forms (the heads of one layer and kind as one batch); a bad head gets an error row."""
    name = f"layer {forms[0].layer} {forms[0].kind}"
    if batched:
        try:
            found = diagnose_nulls(stack_heads(forms), nulls, fpr=fpr, name=name, batched=True)
        except InputError:
            found = None  # one head is bad: diagnose them one by one below, so the others still get rows
        if found is not None:
            for null in nulls:
                for f, d in zip(forms, found[null], strict=True):
                    add(f, f"{name} head {f.head}", f.layer, f.head, f.kind, f.variant, d, form_obj=f.form)
            return
    for f in forms:
        where = f"{name} head {f.head}" if f.head >= 0 else name
        try:
            found = diagnose_nulls(f.form, nulls, fpr=fpr, name=where)
        except InputError as exc:
            add(f, where, f.layer, f.head, f.kind, f.variant, None, str(exc), form_obj=f.form)
            continue
        for null in nulls:
            add(f, where, f.layer, f.head, f.kind, f.variant, found[null][0], form_obj=f.form)


def analyze(model_or_path, *, per_head: bool = True, kinds=("qk", "ov", "mlp", "weights"), null: str = "product",
            fpr: float = 0.01) -> pd.DataFrame:
    """One row per (layer, head, kind): the full diagnosis, shapes, variant and KV-cache floats per token.

    ``model_or_path``: an ``nn.Module`` (a transformers model, or any model with ``nn.MultiheadAttention``),
    a Hugging Face model directory, a ``.safetensors`` file or sharded index, or a ``.pt/.bin`` state dict.
    head = −1 marks a layer's sum over heads, or a plain matrix.
    """
    return analyze_full(model_or_path, per_head=per_head, kinds=kinds, null=null, fpr=fpr).table
