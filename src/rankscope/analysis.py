"""``analyze``: the diagnosis of every attention head's and layer's query–key (and OV) form and of every other
weight matrix of a model or checkpoint, as one table (one row per (layer, head, kind, null)).

Attention-aware where the architecture is known (``probes.hf``, ``nn.MultiheadAttention``, rankscope's own
models and run directories); every other 2-D weight is a single matrix with the MP null. Nothing is skipped
silently: a matrix that cannot be diagnosed (NaN/Inf, too large) gets its row with the reason in ``error``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
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
from rankscope.spectra.threads import thread_budget
from rankscope.vocab import (
    ALL_GROUPS,
    ATTENTION_KINDS,
    ATTN_WEIGHT,
    EMBEDDING,
    KIND_GROUPS,
    MLP_IN,
    MLP_OUT,
    PRODUCT,
    WEIGHT,
)

MAX_ELEMENTS = 2**28  # a single matrix larger than this (2 GB in float64) is reported as skipped, by name

_PATTERNS = [  # (kind, regex on the parameter name)
    (EMBEDDING, r"embed|\bwte\b|\bwpe\b|word_embeddings|position_embeddings|token_type|lm_head"),
    (MLP_IN, r"c_fc|up_proj|gate_proj|intermediate\.dense|\bfc1\b|\bw1\b|\bw3\b|gate_up"),
    (MLP_OUT, r"mlp\.c_proj|down_proj|(?<!attention\.)output\.dense|\bfc2\b|\bw2\b"),
    (ATTN_WEIGHT, r"q_proj|k_proj|v_proj|o_proj|query|key|value|attention\.output\.dense|c_attn|attn\.c_proj"
                  r"|in_proj_weight|out_proj|q_a_proj|q_b_proj|kv_a_proj|kv_b_proj"),
]


def matrix_kind(name: str) -> str:
    """The kind of a plain weight matrix, from its parameter name ("weight" when not understood)."""
    for kind, pattern in _PATTERNS:
        if re.search(pattern, name):
            return kind
    return WEIGHT


def layer_of(name: str) -> int:
    """The layer index in a parameter name (the first ``.N.`` component), or −1."""
    match = re.search(r"\.(\d+)\.", f".{name}")
    return int(match.group(1)) if match else -1


def selected_kinds(kinds: Iterable[str]) -> set[str]:
    """The form kinds a selection names: each entry a kind group (``vocab.KIND_GROUPS``) or a single kind."""
    kinds = list(kinds)
    singles = {k for g in KIND_GROUPS.values() for k in g}
    unknown = [k for k in kinds if k not in KIND_GROUPS and k not in singles]
    if unknown or not kinds:
        raise InputError(f"unknown kinds {unknown or kinds}; choose from the groups {list(KIND_GROUPS)} "
                         f"or the kinds {sorted(singles)}")
    return {k for name in kinds for k in KIND_GROUPS.get(name, (name,))}


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


def _source(model_or_path, offsets: tuple[int, ...] = (0,)) -> tuple[dict | None, _Weights, list[NamedForm] | None]:
    """(config, weights, attention forms from the model itself, or None to read them by architecture)."""
    if isinstance(model_or_path, nn.Module):
        state = {k: v.detach() for k, v in model_or_path.state_dict().items()}
        config = getattr(model_or_path, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else config
        if hasattr(model_or_path, "attention_layers"):  # a rankscope model: each attention module gives its chains
            from rankscope.probes.native import native_forms

            return config, _weights_of(state), native_forms(model_or_path, offsets=offsets)
        mhas = [m for m in model_or_path.modules() if isinstance(m, nn.MultiheadAttention)]
        forms = [f for i, module in enumerate(mhas) for f in multihead_attention_forms(module, layer=i)]
        return config, _weights_of(state), forms or None
    from rankscope.nn import GPT
    from rankscope.probes.load import open_checkpoint

    native = GPT.from_run(model_or_path)  # a rankscope run directory or one of its checkpoints
    if native is not None:
        return _source(native, offsets)
    ckpt = open_checkpoint(Path(model_or_path))
    return ckpt.config, _Weights(list(ckpt.names), ckpt.tensor, ckpt.shape, ckpt.dtype), None


class _Rows:
    """The table under construction: one row per (form, null), with the diagnosis kept by row index."""

    def __init__(self, architecture: str | None):
        self.rows: list[dict] = []
        self.out = Analysis(pd.DataFrame(), architecture=architecture)

    def add(self, name: str, layer: int, head: int, kind: str, d: Diagnosis | None, *, form: NamedForm | None = None,
            shapes: str = "", error: str = "") -> None:
        row = {"name": name, "stack": form.stack if form else "", "layer": layer, "head": head, "kind": kind,
               "offset": form.offset if form else 0,
               "variant": form.variant if form else "",
               "kv_cache_floats": form.kv_cache_floats if form else None,
               "shapes": str(form.form.structure) if form else shapes, "error": error}
        if d is not None:
            row.update(d.as_dict())
            self.out.diagnoses[len(self.rows)] = d
        self.rows.append(row)


def _attention_rows(rows: _Rows, forms: Iterable[NamedForm], kinds: list[str], per_head: bool,
                    nulls: tuple[str, ...], fpr: float, tick: Callable[[str], None]) -> None:
    """Rows of every attention form, layer by layer: the layer's forms one by one, its heads as one batch."""
    for layer, layer_forms in groupby(forms, key=lambda f: f.layer):
        layer_forms = [f for f in layer_forms if f.kind in kinds and (per_head or f.head < 0)]
        offsets = sorted({f.offset for f in layer_forms}, key=abs)
        for kind in kinds:
            of_kind = [f for f in layer_forms if f.kind == kind]
            for f in [f for f in of_kind if f.head < 0]:
                _diagnose_forms(rows, [f], nulls, fpr, batched=False)
            for offset in offsets:
                heads = [f for f in of_kind if f.head >= 0 and f.offset == offset]
                if heads:
                    _diagnose_forms(rows, heads, nulls, fpr, batched=True)
        tick(f"layer {layer} attention")


def _diagnose_forms(rows: _Rows, forms: list[NamedForm], nulls: tuple[str, ...], fpr: float, batched: bool) -> None:
    """Diagnose the forms (the heads of one layer and kind as one batch); a bad head gets an error row."""
    name = f"layer {forms[0].layer} {forms[0].kind}" + (f" at offset {forms[0].offset}" if forms[0].offset else "")
    if batched:
        try:
            found = diagnose_nulls(stack_heads(forms), nulls, fpr=fpr, name=name, batched=True)
        except InputError:
            found = None  # one head is bad: diagnose them one by one below, so the others still get rows
        if found is not None:
            for null in nulls:
                for f, d in zip(forms, found[null], strict=True):
                    rows.add(f"{name} head {f.head}", f.layer, f.head, f.kind, d, form=f)
            return
    for f in forms:
        where = f"{name} head {f.head}" if f.head >= 0 else name
        try:
            found = diagnose_nulls(f.form, nulls, fpr=fpr, name=where)
        except InputError as exc:
            rows.add(where, f.layer, f.head, f.kind, None, form=f, error=str(exc))
            continue
        for null in nulls:
            rows.add(where, f.layer, f.head, f.kind, found[null][0], form=f)


def _matrix_rows(rows: _Rows, weights: _Weights, names: list[str], nulls: tuple[str, ...], fpr: float,
                 tick: Callable[[str], None]) -> None:
    """Rows of the plain weight matrices, each with the MP null (or the reason it was skipped)."""
    for name in names:
        shape = weights.shape(name)
        kind, layer, dims = matrix_kind(name), layer_of(name), "·".join(map(str, shape))
        if not weights.dtype(name).is_floating_point:  # e.g. BERT's position_ids buffer
            rows.add(name, layer, -1, kind, None, shapes=dims, error=f"skipped: {weights.dtype(name)} buffer, "
                                                                      "not a weight")
        elif shape[0] * shape[1] > MAX_ELEMENTS:
            rows.add(name, layer, -1, kind, None, shapes=dims,
                     error=f"skipped: {shape[0]}×{shape[1]} is larger than {MAX_ELEMENTS} elements")
        else:
            try:
                found = diagnose_nulls(weights[name], nulls, fpr=fpr, name=name)
            except InputError as exc:
                rows.add(name, layer, -1, kind, None, shapes=dims, error=str(exc))
            else:
                for n in nulls:
                    rows.add(name, layer, -1, kind, found[n][0], shapes=dims)
        tick(name)


def analyze_full(model_or_path, *, per_head: bool = True, kinds: Iterable[str] = ALL_GROUPS,
                 null: str | tuple[str, ...] = PRODUCT, fpr: float = 0.01, threads: int | None = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 offsets: Iterable[int] = (0,)) -> Analysis:
    """``analyze`` with the diagnoses kept (for figures). ``null`` may be a tuple of nulls: every form then gets
    one row per null, its spectrum computed once. ``offsets``: relative offsets Δ at which rankscope models'
    per-head qk forms are also read (an ``offset`` column; other models' forms are read at Δ = 0)."""
    nulls = (null,) if isinstance(null, str) else tuple(null)
    wanted = selected_kinds(kinds)
    with thread_budget(torch=1, blas=threads) if threads else nullcontext():
        config, weights, forms = _source(model_or_path, tuple(int(o) for o in offsets))
        arch = detect_architecture(config) if config else None
        matrices = [n for n in weights if len(weights.shape(n)) == 2 and matrix_kind(n) in wanted]
        attention_kinds = [k for k in ATTENTION_KINDS if k in wanted]
        if forms is None and arch and attention_kinds:
            forms = hf_forms(config, weights, heads=per_head, kinds=attention_kinds)
            layers = sorted({layer_of(n) for n in weights if matrix_kind(n) == ATTN_WEIGHT})
        else:
            layers = sorted({f.layer for f in forms or []})
        total, done = len(layers) + len(matrices), 0

        def tick(what: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total, what)

        rows = _Rows(arch)
        _attention_rows(rows, forms or [], attention_kinds, per_head, nulls, fpr, tick)
        _matrix_rows(rows, weights, matrices, nulls, fpr, tick)
    if arch is None and not forms:
        rows.out.not_understood = [n for n in matrices if matrix_kind(n) == WEIGHT]
    rows.out.table = pd.DataFrame(rows.rows)
    return rows.out


def analyze(model_or_path, *, per_head: bool = True, kinds: Iterable[str] = ALL_GROUPS, null: str = PRODUCT,
            fpr: float = 0.01, threads: int | None = None) -> pd.DataFrame:
    """One row per (layer, head, kind): the full diagnosis, shapes, variant and KV-cache floats per token.

    ``model_or_path``: an ``nn.Module`` (a transformers model, a rankscope model, or any model with
    ``nn.MultiheadAttention``), a Hugging Face model directory, a ``.safetensors`` file or sharded index, a
    ``.pt/.bin`` state dict, or a rankscope run directory. head = −1 marks a layer's sum over heads, or a plain
    matrix. ``kinds``: kind groups (qk, ov, mlp, weights) or single kinds. ``threads``: run the numerics with
    one torch thread and this many BLAS threads, restored after (process-wide; None leaves the process's
    settings alone).
    """
    return analyze_full(model_or_path, per_head=per_head, kinds=kinds, null=null, fpr=fpr, threads=threads).table
