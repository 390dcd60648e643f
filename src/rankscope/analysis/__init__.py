"""``analyze``: the diagnosis of every attention head's and layer's query–key (and OV) form and of every other
weight matrix of a model or checkpoint, as one table (one row per (layer, head, kind, null)).

Attention-aware where the architecture is known (``probes.hf``, ``nn.MultiheadAttention``, rankscope's own
models and run directories); every other 2-D weight is a single matrix with the MP null. Nothing is skipped
silently: a matrix that cannot be diagnosed (NaN/Inf, too large) gets its row with the reason in ``error``.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import groupby
from os import PathLike
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from rankscope.analysis.summary import warning_column
from rankscope.errors import CheckpointError, InputError
from rankscope.probes import NamedForm, detect_architecture, hf_forms, layout_of, multihead_attention_forms, stack_heads
from rankscope.spectra import Diagnosis, budget
from rankscope.spectra.diagnose import diagnose_nulls
from rankscope.spectra.kernels import shared_grams
from rankscope.spectra.threads import check_count, check_jobs, thread_budget
from rankscope.vocab import (
    ALL_GROUPS,
    ATTENTION_KINDS,
    ATTN_WEIGHT,
    EMBEDDING,
    KIND_GROUPS,
    MLP_IN,
    MLP_OUT,
    NULLS,
    PRODUCT,
    ROUTER,
    TW,
    WEIGHT,
)

MAX_ELEMENTS = 2**28  # a single matrix larger than this (2 GB in float64) is reported as skipped, by name

_PATTERNS = [  # (kind, regex on the parameter name), first match wins
    (ROUTER, r"(mlp|block_sparse_moe|moe|feed_forward)\.(gate|router)\.weight$|shared_expert_gate|\brouter\b"),
    (EMBEDDING, r"embed|\bwte\b|\bwpe\b|word_embeddings|position_embeddings|token_type|lm_head|^(\w+\.)?shared\."
                r"weight$|relative_attention_bias"),
    (MLP_IN, r"c_fc|up_proj|gate_proj|intermediate\.dense|\bfc1\b|\bw1\b|\bw3\b|gate_up|DenseReluDense\.wi|"
             r"\blin1\b|dense_h_to_4h|\bfc_in\b"),
    (MLP_OUT, r"mlp\.c_proj|down_proj|(?<!attention\.)output\.dense|\bfc2\b|\bw2\b|DenseReluDense\.wo|\blin2\b|"
              r"dense_4h_to_h|\bfc_out\b"),
    (ATTN_WEIGHT, r"q_proj|k_proj|v_proj|o_proj|query|key|value|attention\.output\.dense|c_attn|attn\.c_proj"
                  r"|in_proj_weight|out_proj|q_a_proj|q_b_proj|kv_a_proj|kv_b_proj|qkv_proj|(self_)?attention\.dense"
                  r"|(SelfAttention|EncDecAttention)\.[qkvo]\.|\b[qkv]_lin\b|out_lin"),
]


def matrix_kind(name: str) -> str:
    """The kind of a plain weight matrix, from its parameter name ("weight" when not understood)."""
    for kind, pattern in _PATTERNS:
        if re.search(pattern, name):
            return kind
    return WEIGHT


def expert_of(name: str) -> int:
    """The expert index in a per-expert module's parameter name (``…experts.5.w1.weight`` → 5), or −1."""
    match = re.search(r"experts\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def parse_experts(spec: str | int | None) -> int | None:
    """``experts=``: "all" (or None) → None, every expert; "none" → 0, no expert matrix; "sample:K" (or an int K)
    → K experts per layer, the same K for every expert tensor of a layer (a seeded draw, see ``_sampled``)."""
    if spec is None or spec == "all":
        return None
    if spec == "none":
        return 0
    k = spec
    if isinstance(spec, str):
        k = spec.removeprefix("sample:")
        if not spec.startswith("sample:") or not k.isdigit():
            raise InputError(f"experts must be all, none or sample:K with K a positive count, got {spec!r}")
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"experts must be all, none or sample:K with K a positive count, got {spec!r}")
    return k


def _sampled(n_experts: int, k: int | None, layer: int) -> list[int]:
    """The experts analysed in one layer: all, or K drawn without replacement with seed = the layer number
    (reproducible, and the same experts for a layer's gate, up and down tensors), in increasing order."""
    if k is None or k >= n_experts:
        return list(range(n_experts))
    import numpy as np

    return sorted(int(e) for e in np.random.default_rng(max(layer, 0)).choice(n_experts, size=k, replace=False))


def stack_of(name: str, stacks: set[str]) -> str:
    """The attention stack a plain matrix belongs to, when the model's forms have stacks (T5's encoder, decoder
    and cross-attention, CLIP's text and vision towers): the first of them the parameter name points to, or ""."""
    hints = (("cross", "EncDecAttention"), ("text", "text_model."), ("vision", "vision_model."),
             ("encoder", "encoder."), ("decoder", "decoder."))
    return next((stack for stack, hint in hints if stack in stacks and hint in name), "")


def layer_of(name: str) -> int:
    """The layer index in a parameter name (the first ``.N.`` component), or −1."""
    match = re.search(r"\.(\d+)\.", f".{name}")
    return int(match.group(1)) if match else -1


def selected_kinds(kinds: Iterable[str]) -> set[str]:
    """The form kinds a selection names: each entry a kind group (``vocab.KIND_GROUPS``) or a single kind."""
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
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
    notes: list[str] = field(default_factory=list)  # what the caller should be told (e.g. no attention layout)


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


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | None) -> str | None:
    """``device``: None (tensors where they are: a checkpoint's on the CPU, a model's on its own device), "cpu",
    "cuda" (``InputError`` where torch sees no CUDA device) or "auto" (CUDA when present, else the CPU)."""
    if device is None:
        return None
    if not isinstance(device, str) or device.split(":")[0] not in DEVICES or (device.startswith("auto:")):
        raise InputError(f"device must be one of {', '.join(DEVICES)} (or cuda:N); got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: torch sees no CUDA device here (torch {torch.__version__}, "
                             "torch.cuda.is_available() is False); use cpu or auto")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise InputError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _source(model_or_path, offsets: tuple[int, ...] = (0,),
            device: str | None = None) -> tuple[dict | None, _Weights, list[NamedForm] | None]:
    """(config, weights, attention forms from the model itself, or None to read them by architecture); with a
    ``device``, every tensor is moved there as it is read (a checkpoint's one at a time)."""
    if isinstance(model_or_path, nn.Module):
        state = {k: v.detach() if device is None else v.detach().to(device)
                 for k, v in model_or_path.state_dict().items()}
        _check_dense(type(model_or_path).__name__, state)
        config = getattr(model_or_path, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else config
        if hasattr(model_or_path, "attention_layers"):  # a rankscope model: each attention module gives its chains
            from rankscope.probes.native import native_forms

            return config, _weights_of(state), _on(native_forms(model_or_path, offsets=offsets), device)
        mhas = [m for m in model_or_path.modules() if isinstance(m, nn.MultiheadAttention)]
        forms = [f for i, module in enumerate(mhas) for f in multihead_attention_forms(module, layer=i)]
        return config, _weights_of(state), _on(forms, device) or None
    if not isinstance(model_or_path, str | PathLike):
        raise InputError("expected a model (nn.Module) or the path of a checkpoint, got "
                         f"{type(model_or_path).__name__}")
    from rankscope.nn import GPT
    from rankscope.probes.load import open_checkpoint

    native = GPT.from_run(model_or_path)  # a rankscope run directory or one of its checkpoints
    if native is not None:
        return _source(native, offsets, device)
    ckpt = open_checkpoint(Path(model_or_path))
    read = ckpt.tensor if device is None else (lambda name: ckpt.tensor(name).to(device))
    return ckpt.config, _Weights(list(ckpt.names), read, ckpt.shape, ckpt.dtype), None


def _on(forms: list[NamedForm], device: str | None) -> list[NamedForm]:
    """The forms with their factors on ``device`` (None: as they are)."""
    return forms if device is None else [replace(f, form=f.form.to(device)) for f in forms]


def _check_dense(model: str, state: dict[str, torch.Tensor]) -> None:
    """``InputError`` naming the first parameter or buffer that is sparse or on the meta device (no values)."""
    for name, t in state.items():
        if t.layout != torch.strided:
            raise InputError(f"{model}: '{name}' is a {t.layout} tensor; rankscope reads dense weights")
        if t.is_meta:
            raise InputError(f"{model}: '{name}' is on the meta device: it has a shape {tuple(t.shape)} but no values "
                             "(load the weights first)")


class _Rows:
    """Rows under construction: one per (form, null), with the diagnosis kept by row index."""

    def __init__(self, spectra: bool = False):
        self.rows: list[dict] = []
        self.diagnoses: dict[int, Diagnosis] = {}
        self.spectra = spectra

    def add(self, name: str, layer: int, head: int, kind: str, d: Diagnosis | None, *, form: NamedForm | None = None,
            shapes: str = "", error: str = "", expert: int = -1, stack: str = "") -> None:
        row = {"name": name, "stack": form.stack if form else stack, "layer": layer, "head_index": head,
               "expert": expert, "kind": kind, "offset": form.offset if form else 0,
               "variant": form.variant if form else "",
               "kv_cache_floats": form.kv_cache_floats if form else None,
               "shapes": str(form.form.structure) if form else shapes, "error": error}
        if d is not None:
            row.update(d.as_dict())
            if self.spectra:
                row["eigenvalues"] = d.eigenvalues.tolist()
            self.diagnoses[len(self.rows)] = d
        self.rows.append(row)

    def extend(self, other: _Rows) -> None:
        """Append another piece's rows, its diagnoses re-indexed."""
        base = len(self.rows)
        self.diagnoses.update({base + i: d for i, d in other.diagnoses.items()})
        self.rows += other.rows


@dataclass(frozen=True)
class _Options:
    """What decides an analysis' rows, checked; plain values, so a worker process derives the same rows."""

    per_head: bool
    wanted: frozenset[str]  # the kinds selected
    attention_kinds: tuple[str, ...]  # those of them that are attention kinds, in ``ATTENTION_KINDS`` order
    explicit: bool  # kinds were asked for (not None)
    nulls: tuple[str, ...]
    fpr: float
    offsets: tuple[int, ...]
    experts: int | None  # ``parse_experts``
    spectra: bool
    device: str | None = None  # ``resolve_device``'s


def _options(per_head: bool, kinds: Iterable[str] | None, null, fpr: float, offsets: Iterable[int],
             experts, spectra: bool) -> _Options:
    """``analyze_full``'s options, checked before any work (``InputError`` naming the option)."""
    nulls = (null,) if isinstance(null, str) or not isinstance(null, Iterable) else tuple(null)
    fpr = check_options(nulls, fpr)
    explicit = kinds is not None
    wanted = selected_kinds(kinds if explicit else ALL_GROUPS)
    attention_kinds = tuple(k for k in ATTENTION_KINDS if k in wanted)
    if TW in nulls and attention_kinds:
        raise InputError('null "tw" (the Tracy–Widom edge) is defined for a single matrix, and attention forms are '
                         'products of matrices: use null "product" or "mp", or kinds mlp,weights')
    return _Options(bool(per_head), frozenset(wanted), attention_kinds, explicit, nulls, fpr,
                    tuple(int(o) for o in offsets), parse_experts(experts), bool(spectra))


@dataclass
class _Model:
    """What the rows are read from, derived the same way by the process that analyses and by each worker."""

    config: dict | None
    weights: _Weights
    forms: Iterable[NamedForm] | None  # a list (the model's own modules), read lazily (a layout), or None
    architecture: str | None
    matrices: list[tuple[str, int, str]]  # ``_matrices``
    stacks: set[str]  # the named attention stacks a plain matrix's row may belong to (``stack_of``)
    layers: int  # attention layers (counted from the attention weights' names where the forms are read lazily)
    notes: list[str]


def _open(model_or_path, o: _Options) -> _Model:
    """The model's weights, attention forms and plain matrices; ``InputError`` when nothing is to be diagnosed."""
    config, weights, forms = _source(model_or_path, o.offsets, o.device)
    arch = detect_architecture(config) if config else None
    matrices = _matrices(weights, set(o.wanted), o.experts)
    named_stacks = layout_stacks(config)
    notes: list[str] = []
    if forms is None and o.attention_kinds:
        forms = _hf_forms_or_note(model_or_path, config, weights, arch, o.per_head, list(o.attention_kinds),
                                  o.explicit, notes)
    if not matrices and forms is None:
        raise InputError(f"{_what(model_or_path)}: nothing to diagnose for kinds {sorted(o.wanted)} "
                         f"(no 2-D weight matrix of those kinds{'' if arch else ' and no attention layout'})")
    if isinstance(forms, list):  # a rankscope model's or nn.MultiheadAttention's forms: the layers are known
        layers = len([key for key, _ in groupby(forms, key=lambda f: (f.stack, f.layer))])
        shown = {f.stack for f in forms if f.kind in o.attention_kinds and (o.per_head or f.head < 0)}
    else:  # read lazily, layer by layer: count the layers from the attention weights' names
        layers = len({(stack_of(n, named_stacks), layer_of(n)) for n in weights
                      if matrix_kind(n) == ATTN_WEIGHT and layer_of(n) >= 0})
        shown = set()  # a layout's forms carry its stacks' names, which are ``named_stacks``
    return _Model(config, weights, forms, arch, matrices, (shown | named_stacks) - {""}, layers, notes)


def _everything(_: int) -> bool:
    return True


def _attention_part(forms: Iterable[NamedForm], o: _Options, owns: Callable[[int], bool],
                    tick: Callable[[str], None]) -> tuple[dict[int, _Rows], int]:
    """The rows of the attention layers ``owns`` picks by ordinal (a layer's position in the forms' order), by
    ordinal: per kind the layer's forms one by one, its heads as one batch; and the number of layers."""
    out: dict[int, _Rows] = {}
    count = 0
    for k, ((stack, layer), layer_forms) in enumerate(groupby(forms, key=lambda f: (f.stack, f.layer))):
        count = k + 1
        if not owns(k):
            continue
        rows = out[k] = _Rows(o.spectra)
        layer_forms = [f for f in layer_forms if f.kind in o.attention_kinds and (o.per_head or f.head < 0)]
        offsets = sorted({f.offset for f in layer_forms}, key=abs)
        with shared_grams():  # the layer's shared factors (MLA's down-projections): one Gram for all its forms
            for kind in o.attention_kinds:
                of_kind = [f for f in layer_forms if f.kind == kind]
                for f in [f for f in of_kind if f.head < 0]:
                    _diagnose_forms(rows, [f], o.nulls, o.fpr, batched=False)
                for offset in offsets:
                    heads = [f for f in of_kind if f.head >= 0 and f.offset == offset]
                    if heads:
                        _diagnose_forms(rows, heads, o.nulls, o.fpr, batched=True)
        tick(f"{stack + ' ' if stack else ''}layer {layer} attention")
    return out, count


def form_name(f: NamedForm) -> str:
    """A form's row name: "[stack ]layer L kind[ at offset Δ][ head h]"."""
    name = f"{f.stack + ' ' if f.stack else ''}layer {f.layer} {f.kind}"
    name += f" at offset {f.offset}" if f.offset else ""
    return f"{name} head {f.head}" if f.head >= 0 else name


def _diagnose_forms(rows: _Rows, forms: list[NamedForm], nulls: tuple[str, ...], fpr: float, batched: bool) -> None:
    """Diagnose the forms (the heads of one layer and kind as one batch); a bad head gets an error row."""
    name = form_name(replace(forms[0], head=-1))  # the batch's name; each head's row adds " head h"
    if batched:
        try:
            found = diagnose_nulls(stack_heads(forms), nulls, fpr=fpr, name=name, batched=True)
        except InputError:
            found = None  # one head is bad: diagnose them one by one below, so the others still get rows
        if found is not None:
            for null in nulls:
                for f, d in zip(forms, found[null], strict=True):
                    rows.add(form_name(f), f.layer, f.head, f.kind, d, form=f)
            return
    for f in forms:
        where = form_name(f)
        try:
            found = diagnose_nulls(f.form, nulls, fpr=fpr, name=where)
        except InputError as exc:
            rows.add(where, f.layer, f.head, f.kind, None, form=f, error=str(exc))
            continue
        for null in nulls:
            rows.add(where, f.layer, f.head, f.kind, found[null][0], form=f)


def _is_expert_stack(name: str, shape: tuple) -> bool:
    """A mixture of experts' matrices stored as one 3-D tensor [E, out, in] (``mlp.experts.gate_up_proj``, or a GGUF
    file's ``ffn_gate_exps``)."""
    return len(shape) == 3 and ("expert" in name or "_exps" in name)


def _matrices(weights: _Weights, wanted: set[str], experts: int | None) -> list[tuple[str, int, str]]:
    """(tensor name, expert or −1, shown name) of every plain matrix to diagnose, in the checkpoint's order: each
    2-D weight, and each expert's slice of a 3-D expert stack; experts sampled per layer (``parse_experts``)."""
    names = [n for n in weights if matrix_kind(n) in wanted]
    per_layer: dict[int, int] = {}  # layer → number of experts stored as modules (…experts.{e}.…)
    for n in names:
        if len(weights.shape(n)) == 2 and expert_of(n) >= 0:
            per_layer[layer_of(n)] = max(per_layer.get(layer_of(n), 0), expert_of(n) + 1)
    out = []
    for name in names:
        shape, layer = weights.shape(name), layer_of(name)
        if _is_expert_stack(name, shape):
            for e in ([] if experts == 0 else _sampled(shape[0], experts, layer)):
                out.append((name, e, f"{name}[{e}]"))
        elif len(shape) == 2:
            e = expert_of(name)
            if e < 0 or (experts != 0 and e in _sampled(per_layer[layer], experts, layer)):
                out.append((name, e, name))
    return out


def layout_stacks(config) -> set[str]:
    """The named attention stacks of a model's layout (T5's encoder, decoder, cross; CLIP's text, vision), or none."""
    layout = layout_of(config) if isinstance(config, dict) else None
    return {st.name for st in getattr(layout, "stacks", ())} - {""}


def skip_reason(weights: _Weights, name: str) -> str:
    """Why a plain matrix (or an expert's slice) is not diagnosed ("" when it is): an integer buffer, or more than
    ``MAX_ELEMENTS`` entries. The one rule of ``analyze``, ``describe`` and ``diff``."""
    n, m = weights.shape(name)[-2:]
    if not weights.dtype(name).is_floating_point:  # e.g. BERT's position_ids buffer
        return f"skipped: {weights.dtype(name)} buffer, not a weight"
    if n * m > MAX_ELEMENTS:
        return f"skipped: {n}×{m} is larger than {MAX_ELEMENTS} elements"
    return ""


def spectra_rows(found: Analysis, **keys) -> list[dict]:
    """The ``spectra`` table's rows of an analysis: each attention form's eigenvalues, bulk edge and null quantiles,
    with its (stack, layer, head_index, kind, offset, null) and the given ``keys`` (e.g. ``step``)."""
    import numpy as np

    table = found.table
    kinds, stacks, layers, heads, offsets = (table[c].to_numpy()
                                             for c in ("kind", "stack", "layer", "head_index", "offset"))
    return [{**keys, "stack": stacks[i], "layer": int(layers[i]), "head_index": int(heads[i]), "kind": kinds[i],
             "offset": int(offsets[i]), "null": d.null, "bulk_edge": d.bulk_edge,
             "eigenvalues": d.eigenvalues.tolist(),
             "null_quantiles": None if d.null_quantiles is None else
             np.asarray(d.null_quantiles, dtype=np.float64).tolist()}
            for i, d in found.diagnoses.items() if kinds[i] in ATTENTION_KINDS]  # keys: row positions


def _matrix_part(weights: _Weights, matrices: list[tuple[str, int, str]], o: _Options, owns: Callable[[int], bool],
                 tick: Callable[[str], None], stacks: set[str]) -> dict[int, _Rows]:
    """The rows of the plain weight matrices ``owns`` picks by index in ``matrices``, by index: each with its nulls
    (or the reason it was skipped). An expert stack is read once for all its experts (the matrices of one tensor
    are consecutive)."""
    held: tuple[str, torch.Tensor] | None = None
    out: dict[int, _Rows] = {}
    for j, (name, expert, shown) in enumerate(matrices):
        if not owns(j):
            continue
        rows = out[j] = _Rows(o.spectra)
        full = weights.shape(name)
        shape = full[-2:]
        add = partial(rows.add, shown, layer_of(name), -1, matrix_kind(name), shapes="·".join(map(str, shape)),
                      expert=expert, stack=stack_of(name, stacks))
        skipped = skip_reason(weights, name)
        if skipped:
            add(None, error=skipped)
        else:
            if held is None or held[0] != name:
                held = (name, weights[name])
            w = held[1][expert] if len(full) == 3 else held[1]  # (out, in): one expert of a stacked [E, out, in]
            try:
                found = diagnose_nulls(w, o.nulls, fpr=o.fpr, name=shown)
            except InputError as exc:
                add(None, error=str(exc))
            else:
                for n in o.nulls:
                    add(found[n][0])
        tick(shown)
    return out


# ---- worker processes over the layers (``jobs`` > 1) --------------------------------------------------------------

_TICKS = None  # in a worker process: the queue its progress ticks go to


def _listen(ticks) -> None:
    global _TICKS
    _TICKS = ticks


def _tick_to_parent(what: str) -> None:
    if _TICKS is not None:
        _TICKS.put(what)


def _part(model_or_path, o: _Options, attention: frozenset[int], first_spare: int, jobs: int, worker: int,
          matrices: frozenset[int]) -> bytes:
    """A worker's share: it opens the checkpoint itself and diagnoses the attention layers of the ordinals in
    ``attention`` (and, past the ``first_spare`` layers the parent counted, those with ordinal % jobs = worker) and
    the plain matrices of the indices in ``matrices``. Returns (attention rows by ordinal, the number of layers,
    matrix rows by index, the number of matrices), for the parent to check and assemble, pickled here by value
    (multiprocessing's own pickler would send each eigenvalue tensor through shared memory, a file descriptor
    apiece)."""
    import pickle

    m = _open(model_or_path, o)

    def owns(k: int) -> bool:
        return k in attention or (k >= first_spare and k % jobs == worker)

    found, layers = _attention_part(m.forms or [], o, owns, _tick_to_parent)
    plain = _matrix_part(m.weights, m.matrices, o, matrices.__contains__, _tick_to_parent, m.stacks)
    return pickle.dumps((found, layers, plain, len(m.matrices)), protocol=pickle.HIGHEST_PROTOCOL)


def _shares(m: _Model, o: _Options, jobs: int) -> list[tuple[frozenset[int], frozenset[int]]]:
    """Each worker's (attention layer ordinals, matrix indices): the units by estimated cost, largest first, each to
    the least loaded worker (LPT scheduling). The costs are rough: n·m·min(n, m) for an n×m matrix (its Gram
    product and eigensolve); an attention layer, that of its q/k/v/o weights per attention kind."""
    def cost(name: str) -> float:
        if skip_reason(m.weights, name):
            return 0.0
        n, k = m.weights.shape(name)[-2:]
        return float(n * k * min(n, k))

    matrix_costs = [cost(name) for name, _, _ in m.matrices]
    attention = sum(cost(n) for n in m.weights if matrix_kind(n) == ATTN_WEIGHT and len(m.weights.shape(n)) == 2
                    and layer_of(n) >= 0) * len(o.attention_kinds) / max(m.layers, 1)
    if attention <= 0:  # no attention weight recognised by name: as an average matrix
        attention = max(sum(matrix_costs) / max(len(matrix_costs), 1), 1.0)
    units = [(attention, "a", k) for k in range(m.layers)] + [(c, "m", j) for j, c in enumerate(matrix_costs)]
    load = [0.0] * jobs
    owned: list[tuple[set[int], set[int]]] = [(set(), set()) for _ in range(jobs)]
    for c, what, i in sorted(units, key=lambda u: -u[0]):
        w = min(range(jobs), key=lambda w: load[w])
        load[w] += c
        owned[w][0 if what == "a" else 1].add(i)
    return [(frozenset(a), frozenset(b)) for a, b in owned]


def _in_workers(model_or_path, o: _Options, m: _Model, jobs: int, blas: int,
                tick: Callable[[str], None]) -> tuple[dict[int, _Rows], dict[int, _Rows]]:
    """The attention layers' and plain matrices' rows (by ordinal, by index) from ``jobs`` worker processes of one
    torch and ``blas`` BLAS threads, each opening the checkpoint by its path (``_part``); their progress ticks come
    back through a queue. The pieces must cover every layer and matrix once, or the checkpoint changed."""
    import concurrent.futures as cf
    import pickle
    import queue

    from rankscope.spectra.threads import worker_context, worker_pool

    context = worker_context(["rankscope.analysis"])
    ticks = context.Queue()
    shares = _shares(m, o, jobs)
    with worker_pool(jobs, blas=blas, context=context, initializer=_listen, initargs=(ticks,)) as pool:
        futures = [pool.submit(_part, model_or_path, o, a, m.layers, jobs, w, b) for w, (a, b) in enumerate(shares)]
        pending = set(futures)
        heard = 0
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    f.result()  # a worker's error, raised here
                while True:
                    try:
                        tick(ticks.get_nowait())
                        heard += 1
                    except queue.Empty:
                        break
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    pieces = [pickle.loads(f.result()) for f in futures]
    attention = {k: r for found, _, _, _ in pieces for k, r in found.items()}
    matrices = {j: r for _, _, found, _ in pieces for j, r in found.items()}
    layers, n_matrices = {p[1] for p in pieces}, {p[3] for p in pieces}
    if (len(layers) != 1 or len(n_matrices) != 1 or set(attention) != set(range(layers.pop()))
            or set(matrices) != set(range(n_matrices.pop()))):
        raise CheckpointError(f"{_what(model_or_path)}: the worker processes read different layers or matrices "
                              "(did the checkpoint change while it was read?)")
    try:  # the last ticks may still be on their way
        for _ in range(len(attention) + len(matrices) - heard):
            tick(ticks.get(timeout=1.0))
    except queue.Empty:
        pass
    return attention, matrices


def _no_layout_note(config: dict | None, n_matrices: int) -> str:
    """The one line that says why a model's attention is read as plain matrices."""
    from rankscope.probes import LAYOUTS

    model_type = (config or {}).get("model_type")
    what = f"model_type {model_type!r}" if model_type else "no config.json (model_type unknown)"
    return (f"{what}: per-head attention forms need a layout of its q/k/v/o weights, and there is none for it; "
            f"its {n_matrices} 2-D weights are analysed as single matrices (layouts exist for: "
            f"{', '.join(sorted(LAYOUTS))})")


def check_options(nulls: tuple[str, ...], fpr: float) -> float:
    """Validate the nulls and the false-positive rate before any work (``InputError`` naming the allowed values:
    fpr in (0, 0.5] and not below ``spectra.budget.MIN_FPR``, what a null's draws can place); returns fpr."""
    for null in nulls:
        if not isinstance(null, str) or null not in NULLS:
            raise InputError(f"null must be one of {', '.join(NULLS)}; got {null!r}")
    return budget.check_fpr(fpr)


def analyze_full(model_or_path, *, per_head: bool = True, kinds: Iterable[str] | None = None,
                 null: str | tuple[str, ...] = PRODUCT, fpr: float = 0.01, threads: int | None = 1, jobs: int = 1,
                 progress: Callable[[int, int, str], None] | None = None,
                 offsets: Iterable[int] = (0,), experts: str | int | None = "all", spectra: bool = False,
                 device: str | None = None) -> Analysis:
    """``analyze`` with the diagnoses kept (for figures). ``null`` may be a tuple of nulls: every form then gets
    one row per null, its spectrum computed once. ``offsets``: relative offsets Δ at which rankscope models'
    per-head qk forms are also read (an ``offset`` column; other models' forms are read at Δ = 0).

    ``kinds=None`` means every kind group; attention kinds asked for explicitly on a model with no attention
    layout are an ``InputError`` (with None they fall back to plain matrices, and ``notes`` says so).
    ``experts``: "all", "none" or "sample:K" (``parse_experts``). ``spectra``: add each row's eigenvalues.
    ``threads`` (default 1): the numerics run on one torch thread and this many BLAS threads, the caller's counts
    restored after; None leaves the process's threads alone. ``jobs`` > 1 (at most the usable cores): that many
    worker processes, each of one torch and ``threads`` (or 1) BLAS threads, open a checkpoint by its path and
    diagnose a share of its attention layers and matrices; the table is the one of ``jobs=1`` (same rows, same
    order). A model in memory is analysed in this process (jobs=1). ``progress(done, total, what)``: after each
    attention layer and each matrix. ``device``: where the spectra are computed (``resolve_device``: None, "cpu",
    "cuda", "cuda:N" or "auto"); the tensors are moved there as they are read, the nulls stay cached arrays.
    """
    o = replace(_options(per_head, kinds, null, fpr, offsets, experts, spectra),
                device=resolve_device(device))
    if jobs > 1 and o.device is not None and o.device.startswith("cuda"):
        raise InputError(f"jobs={jobs} with device {o.device!r}: the worker processes share the CPU's cores; on a "
                         "GPU one process does the work (jobs=1)")
    if threads is not None:
        check_count(threads, "threads")
    check_jobs(jobs)
    if jobs > 1 and isinstance(model_or_path, nn.Module):
        raise InputError(f"jobs={jobs}: worker processes open a checkpoint by its path, and a model in memory "
                         f"({type(model_or_path).__name__}) is analysed in this process: use jobs=1, or save it "
                         "(save_pretrained) and pass the path")
    with thread_budget(torch=1, blas=threads) if threads is not None else nullcontext():
        m = _open(model_or_path, o)
        total, done = m.layers + len(m.matrices), 0

        def tick(what: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, max(total, done), what)

        workers = min(jobs, total)  # no more workers than layers and matrices
        if workers <= 1:
            attention, _ = _attention_part(m.forms or [], o, _everything, tick)
            matrices = _matrix_part(m.weights, m.matrices, o, _everything, tick, m.stacks)
        else:
            attention, matrices = _in_workers(model_or_path, o, m, workers, threads or 1, tick)
    rows = _Rows(o.spectra)
    for piece in [*(attention[k] for k in sorted(attention)), *(matrices[j] for j in sorted(matrices))]:
        rows.extend(piece)
    weights = m.weights
    for name in weights:  # a convolution's kernel, say: not a matrix, but not passed over in silence either
        shape = weights.shape(name)
        if len(shape) > 2 and not _is_expert_stack(name, shape) and matrix_kind(name) in o.wanted:
            rows.add(name, layer_of(name), -1, matrix_kind(name), None, shapes="·".join(map(str, shape)),
                     error=f"skipped: a {len(shape)}-D tensor, not a matrix", stack=stack_of(name, m.stacks))
    if not any(r["error"] == "" or not r["error"].startswith("skipped: a ") for r in rows.rows):
        raise InputError(f"{_what(model_or_path)}: nothing to diagnose for kinds {sorted(o.wanted)} (no attention "
                         "form and no 2-D weight matrix of those kinds)")
    out = Analysis(pd.DataFrame(), diagnoses=rows.diagnoses, architecture=m.architecture, notes=m.notes)
    if m.architecture is None and not any(r["kind"] in ATTENTION_KINDS for r in rows.rows):
        out.not_understood = [n for n, _, _ in m.matrices if matrix_kind(n) == WEIGHT]
    table = integer_columns(pd.DataFrame(rows.rows))
    table["warning"] = warning_column(table)
    out.table = table
    return out


# Columns that hold whole numbers: positions, shapes and counts. ``spikes`` and ``spikes_gap`` are counts too, but
# NaN where no count exists (the bulk is not noise-shaped; too few eigenvalues): they stay float, NaN meaning
# "no count", so the arithmetic of summaries and figures on them stays numpy's.
INTEGER_COLUMNS = ("layer", "head_index", "expert", "offset", "kv_cache_floats", "n", "m", "rank", "outliers")


def integer_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its ``INTEGER_COLUMNS`` as integers: int64, or pandas' nullable Int64 where some rows have no
    value (an error row has no diagnosis)."""
    for col in INTEGER_COLUMNS:
        if col in table and table[col].dtype.kind in "fO":
            values = pd.to_numeric(table[col], errors="coerce")
            table[col] = values.astype("int64") if values.notna().all() else values.astype("Int64")
    return table


def _hf_forms_or_note(model_or_path, config, weights, arch, per_head: bool, attention_kinds: list[str],
                      explicit: bool, notes: list[str]) -> Iterator[NamedForm] | None:
    """The attention forms of a transformers checkpoint, read lazily (layer by layer), or None with a note when
    it has no layout or its layout cannot be read; attention kinds asked for explicitly then raise instead."""
    n_matrices = sum(len(weights.shape(n)) == 2 for n in weights)
    if arch is None:
        note = _no_layout_note(config, n_matrices)
        if explicit:
            raise InputError(f"{_what(model_or_path)}: cannot read kinds {', '.join(attention_kinds)}: "
                             + note.split(": ", 1)[0] + ": per-head attention forms need a layout, and "
                             f"there is none for it (layouts exist for: {note.rsplit('for: ', 1)[1]}")
        notes.append(note)
        return None
    forms = hf_forms(config, weights, heads=per_head, kinds=attention_kinds)
    try:
        first = next(forms, None)  # finds the stack's prefix and reads layer 0: a layout that does not fit fails here
    except (InputError, CheckpointError) as exc:
        if explicit:
            raise
        notes.append(f"model_type {config.get('model_type')!r}: its attention layout could not be read ({exc}); "
                     f"its {n_matrices} 2-D weights are analysed as single matrices")
        return None
    return itertools.chain([first], forms) if first is not None else iter(())


def _what(model_or_path) -> str:
    return type(model_or_path).__name__ if isinstance(model_or_path, nn.Module) else str(model_or_path)


def analyze(model_or_path, *, per_head: bool = True, kinds: Iterable[str] | None = None, null: str = PRODUCT,
            fpr: float = 0.01, threads: int | None = 1, jobs: int = 1, experts: str | int | None = "all",
            spectra: bool = False, device: str | None = None) -> pd.DataFrame:
    """One row per (layer, head_index, kind): the full diagnosis, shapes, variant and KV-cache floats per token.

    ``model_or_path``: an ``nn.Module`` (a transformers model, a rankscope model, or any model with
    ``nn.MultiheadAttention``), a Hugging Face model directory, a ``.safetensors`` file or sharded index, a
    ``.pt/.bin`` state dict, or a rankscope run directory. ``head_index`` −1 marks a layer's sum over heads, or a plain
    matrix. ``kinds``: kind groups (qk, ov, mlp, weights) or single kinds (None: all). ``threads`` (default 1):
    run the numerics with one torch thread and this many BLAS threads, the caller's counts restored after
    (process-wide; None leaves the process's settings alone). ``jobs``: worker processes over the layers of a
    checkpoint given by its path, each of one torch and ``threads`` BLAS threads (the same table as ``jobs=1``).
    ``experts``: "all", "none" or "sample:K" experts per layer of a mixture of experts
    (an ``expert`` column; −1 elsewhere). ``spectra=True`` adds each row's ``eigenvalues``. ``device``: "cpu",
    "cuda", "auto" or None (where the tensors are; ``resolve_device``).
    What ``analyze_full(...).notes`` holds (e.g. "no attention layout") is issued as a ``UserWarning``.
    """
    found = analyze_full(model_or_path, per_head=per_head, kinds=kinds, null=null, fpr=fpr, threads=threads,
                         jobs=jobs, experts=experts, spectra=spectra, device=device)
    for note in found.notes:
        warnings.warn(note, stacklevel=2)
    return found.table
