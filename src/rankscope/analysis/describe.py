"""``describe``: what ``analyze`` would diagnose in a model, and roughly what it would cost, without any spectrum.

One row per form ``analyze_full`` would give a row (the same name, stack, layer, head_index, expert, kind and
offset; one row per form, not per null): its ``shapes`` (the form's ``Structure``), ``rank`` bound, ``n``×``m``,
``variant``, KV-cache floats per token, ``plain`` (a single weight matrix, not an attention form) and ``error`` (a
matrix that would be skipped). The attention forms come from the same probes as ``analyze``; for a transformers
layout they are built on ``meta`` tensors of the stored shapes (shapes from the checkpoint's headers, nothing read),
and only where a layout computes from the values (MLA's latent rms) are the weights read. Nothing is multiplied.

The cost estimate (``Estimate``) is a model, not a measurement:

- spectra (a warm cache: what every run after the first costs): per form ``FORM_SECONDS + ENTRY_SECONDS·entries
  + FLOP_SECONDS·work``, with ``entries`` the form's factor entries (copied to float64, checked, their kurtosis
  read) and ``work`` the eigensolver's: ``p·k² + k³`` for an n×m matrix (k = min, p = max: the Gram product and
  its eigenvalues), ``(n + m)·K² + K³`` for a chain or sum of rank bound K (thin QRs of the outer factors, then
  the K×K core).
- nulls (a cold cache; the disk cache makes them free afterwards): ``NULL_TIME_SCALE × budget.default_draws ×
  budget.seconds_per_draw`` (``spectra/budget.py``'s cost model) per null simulated. ``null_seconds_min`` counts
  step 0 of the spike count of each distinct structure, all a noise-like (untrained) spectrum needs;
  ``null_seconds`` adds the deflated nulls of every step ``nulls.deflation_grid`` allows, shared by every form of
  the structure, which a trained model's spike counts mostly read (MiniLM's did: 66 nulls for 7 structures). A sum
  of chains (decoupled heads) is counted at ``SUM_RATIO_POINTS`` block-norm ratio grid points per structure, though
  heads whose block norms differ may need more; ``permutation`` nulls are drawn per form.
- the constants were fitted on one core of the development machine (``benchmarks/describe_estimate.py`` prints
  estimated / measured: 0.6–1.3 on the five models it runs); other machines differ by their single-core speed,
  and BLAS threads (``--threads``) divide the large cases.
- memory: the float64 copies of the attention weights, which the forms hold for the whole run (they are built
  before the first is diagnosed), plus the largest single piece of work: a matrix's stored and float64 copies
  and its Gram matrix, or one batch of heads' float64 factors twice over (factors and QR). Not counted: a model
  passed in memory, the interpreter and libraries (a few hundred MB), and the null simulation of a sum of chains
  (chunks of up to 256 MB).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from rankscope.analysis import (
    _matrices,
    _no_layout_note,
    _source,
    _Weights,
    form_name,
    layer_of,
    layout_stacks,
    matrix_kind,
    parse_experts,
    selected_kinds,
    skip_reason,
    stack_of,
)
from rankscope.probes import NamedForm, detect_architecture, hf_forms
from rankscope.spectra import budget, permutation
from rankscope.spectra.form import Structure
from rankscope.spectra.nulls import _canonical, deflation_grid
from rankscope.vocab import ALL_GROUPS, ATTENTION_KINDS, ATTN_WEIGHT, PERMUTATION, PRODUCT, WEIGHT

# Fitted on one core of the development machine (benchmarks/describe_estimate.py: 2.2e-3, 2.1e-8, 4.1e-11, 1.8 on
# MiniLM and four random BERT/LLaMA models; 2.5 for the null scale in an earlier MiniLM run), rounded.
FORM_SECONDS = 2e-3  # per form: its diagnosis records, tail fit, spike count
ENTRY_SECONDS = 2e-8  # per factor entry: float64 copy, finiteness check, kurtosis
FLOP_SECONDS = 4e-11  # per unit of ``work``
NULL_TIME_SCALE = 2.0  # measured null simulation time / budget.seconds_per_draw's model
SUM_RATIO_POINTS = 2  # block-norm ratio grid points counted per structure of a sum of chains


@dataclass(frozen=True)
class Estimate:
    """Seconds (one core, cold null cache) and bytes ``analyze`` would take: a model (module docstring)."""

    spectra_seconds: float  # the forms' spectra and metrics
    null_seconds: float  # each distinct structure's null with every deflated null of the spike count (trained)
    null_seconds_min: float  # step 0 only: what noise-like (untrained) spectra need
    nulls: int  # distinct structures with a simulated null
    peak_bytes: int

    @property
    def seconds(self) -> float:
        """Spectra and every null a trained model's spike counts read, with a cold cache."""
        return self.spectra_seconds + self.null_seconds

    @property
    def seconds_min(self) -> float:
        """Spectra and the step-0 nulls: an untrained (noise-like) model, with a cold cache."""
        return self.spectra_seconds + self.null_seconds_min


@dataclass
class Description:
    """What ``describe`` found: the table of forms and the model-level facts."""

    table: pd.DataFrame
    model_type: str  # the config's model_type, "rankscope" for rankscope's own models, or "unknown"
    family: str  # the probe family (bert, gpt2, llama, mla, …), "rankscope", "nn.MultiheadAttention" or "unknown"
    estimate: Estimate
    fallback: list[str] = field(default_factory=list)  # attention weights read only as plain matrices (no layout)
    not_understood: list[str] = field(default_factory=list)  # matrices whose kind is unknown ("weight")
    notes: list[str] = field(default_factory=list)


def _shapes_only(weights: _Weights) -> _Weights:
    """The same names, shapes and dtypes, with ``meta`` tensors for values: forms built on them read nothing."""
    return _Weights(list(weights), lambda n: torch.empty(weights.shape(n), dtype=weights.dtype(n), device="meta"),
                    weights.shape, weights.dtype)


def _layout_forms(config, weights: _Weights, per_head: bool, kinds: list[str]) -> list[NamedForm]:
    try:
        return list(hf_forms(config, _shapes_only(weights), heads=per_head, kinds=kinds))
    except (RuntimeError, NotImplementedError):  # the layout reads a value (e.g. MLA's latent rms): read them
        return list(hf_forms(config, weights, heads=per_head, kinds=kinds))


def _ordered(forms: list[NamedForm], kinds: list[str], per_head: bool) -> list[NamedForm]:
    """The forms ``analyze`` diagnoses, in its order: per (stack, layer), per kind, the layer form then the heads by
    offset."""
    out = []
    for _, group in itertools.groupby(forms, key=lambda f: (f.stack, f.layer)):
        group = [f for f in group if f.kind in kinds and (per_head or f.head < 0)]
        offsets = sorted({f.offset for f in group}, key=abs)
        for kind in kinds:
            of_kind = [f for f in group if f.kind == kind]
            out += [f for f in of_kind if f.head < 0]
            out += [f for o in offsets for f in of_kind if f.head >= 0 and f.offset == o]
    return out


def work(structure: Structure) -> float:
    """The eigensolver's work for one spectrum: ``p·k² + k³`` for a matrix, ``(n + m)·K² + K³`` for a chain or sum."""
    s = Structure.of(structure)
    k = s.rank_bound
    if s.is_matrix:
        return max(s.n, s.m) * k**2 + k**3
    return (s.n + s.m) * k**2 + k**3


def _entries(structure: Structure) -> int:
    s = Structure.of(structure)
    dims = [*([s.left] if s.left else []), *s.chains, *([s.right] if s.right else [])]
    return sum(a * b for d in dims for a, b in itertools.pairwise(d))


def form_seconds(structure: Structure) -> float:
    """The modelled seconds of one form's spectrum and metrics (module docstring)."""
    return FORM_SECONDS + ENTRY_SECONDS * _entries(structure) + FLOP_SECONDS * work(structure)


def _null_cost(s: Structure, fpr: float) -> tuple[float, float]:
    """(step-0 seconds, all-steps seconds) of the structure-matched null and the spike count's deflated nulls."""
    s = _canonical(s)
    points = SUM_RATIO_POINTS if len(s.chains) > 1 else 1
    first = budget.default_draws(s, fpr) * budget.seconds_per_draw(s) * points  # the count's step 0 uses this null
    rest = 0.0
    for k in deflation_grid(s.rank_bound)[1:]:
        if k > s.max_deflation:
            break
        deflated = s.deflated(k)
        draws = budget.MIN_DRAWS if budget.fitted(deflated) else budget.default_draws(deflated, fpr)
        rest += draws * budget.seconds_per_draw(deflated)
    return first, first + rest


def estimate(structures: Iterable[Structure], nulls: tuple[str, ...], fpr: float, peak_bytes: int) -> Estimate:
    """The cost of diagnosing forms of these structures (one per form) under ``nulls``."""
    structures = list(structures)
    spectra = sum(form_seconds(s) for s in structures)
    spectra += (len(nulls) - 1) * FORM_SECONDS * len(structures)  # each further null: its own diagnosis records
    low = high = 0.0
    distinct = {_canonical(s) for s in structures}
    if PRODUCT in nulls:
        for s in distinct:
            a, b = _null_cost(s, fpr)
            low, high = low + a, high + b
    if PERMUTATION in nulls:  # drawn for each form, never cached
        per_form = sum(permutation.default_draws(fpr) * budget.seconds_per_draw(s) for s in structures)
        low, high = low + per_form, high + per_form
    simulated = len(distinct) if PRODUCT in nulls else 0
    return Estimate(spectra, NULL_TIME_SCALE * high, NULL_TIME_SCALE * low, simulated, int(peak_bytes))


def _peak_bytes(forms: list[NamedForm], weights: _Weights, matrices: list[tuple[str, int, str]],
                in_memory: bool) -> int:
    """Resident float64 attention factors plus the largest single piece of work (module docstring)."""
    attention = sum(8 * math.prod(weights.shape(n)) for n in weights
                    if matrix_kind(n) == ATTN_WEIGHT and len(weights.shape(n)) == 2) if forms else 0
    largest = 0
    for name, _, _ in matrices:
        n, m = weights.shape(name)[-2:]
        stored = 0 if in_memory else n * m * weights.dtype(name).itemsize
        largest = max(largest, stored + 16 * n * m + 8 * min(n, m) ** 2)
    batches: dict[tuple, int] = {}
    for f in forms:
        if f.head >= 0:
            key = (f.stack, f.layer, f.kind, f.offset)
            batches[key] = batches.get(key, 0) + 16 * _entries(f.form.structure)
    return attention + max([largest, *batches.values()])


def describe_full(model_or_path, *, per_head: bool = True, kinds: Iterable[str] | None = None,
                  null: str | tuple[str, ...] = PRODUCT, fpr: float = 0.01, offsets: Iterable[int] = (0,),
                  experts: str | int | None = "all") -> Description:
    """``describe`` with the model-level facts: architecture, fallbacks, notes and the cost ``Estimate``. The options
    are ``analyze_full``'s; attention kinds asked of a model without a layout give a note here, not an error."""
    nulls = (null,) if isinstance(null, str) else tuple(null)
    wanted = selected_kinds(kinds if kinds is not None else ALL_GROUPS)
    n_experts = parse_experts(experts)
    attention_kinds = [k for k in ATTENTION_KINDS if k in wanted]
    config, weights, forms = _source(model_or_path, tuple(int(o) for o in offsets))
    arch = detect_architecture(config) if config else None
    model_type = str((config or {}).get("model_type") or "unknown") if isinstance(config, dict) else "unknown"
    matrices = _matrices(weights, wanted, n_experts)
    notes: list[str] = []
    if forms is not None:  # the model's own modules gave the forms
        native = hasattr(model_or_path, "attention_layers") or not isinstance(model_or_path, nn.Module)
        family = "rankscope" if native else "nn.MultiheadAttention"
        model_type = "rankscope" if native else model_type
    elif arch:
        family = arch
        forms = _layout_forms(config, weights, per_head, attention_kinds) if attention_kinds else []
    else:
        family = "unknown"
        if attention_kinds:
            notes.append(_no_layout_note(config, sum(len(weights.shape(n)) == 2 for n in weights)))
    forms = _ordered(forms or [], attention_kinds, per_head)
    rows = [{"name": form_name(f), "stack": f.stack, "layer": f.layer, "head_index": f.head, "expert": -1,
             "kind": f.kind, "offset": f.offset, "variant": f.variant, "kv_cache_floats": f.kv_cache_floats,
             "shapes": str(f.form.structure), "rank": f.form.rank_bound, "n": f.form.n, "m": f.form.m,
             "plain": False, "error": ""} for f in forms]
    structures = [f.form.structure for f in forms]
    stacks = ({f.stack for f in forms} | layout_stacks(config)) - {""}  # as analyze
    for name, expert, shown in matrices:
        n, m = weights.shape(name)[-2:]
        error = skip_reason(weights, name)
        if not error:
            structures.append(Structure(((n, m),)))
        rows.append({"name": shown, "stack": stack_of(name, stacks), "layer": layer_of(name), "head_index": -1,
                     "expert": expert, "kind": matrix_kind(name), "offset": 0, "variant": "", "kv_cache_floats": None,
                     "shapes": f"{n}·{m}", "rank": min(n, m), "n": n, "m": m, "plain": True, "error": error})
    table = pd.DataFrame(rows)
    peak = _peak_bytes(forms, weights, matrices, isinstance(model_or_path, nn.Module))
    fallback = [] if forms or not attention_kinds else [n for n, _, _ in matrices if matrix_kind(n) == ATTN_WEIGHT]
    not_understood = [n for n, _, _ in matrices if matrix_kind(n) == WEIGHT] if arch is None and not forms else []
    return Description(table, model_type, family, estimate(structures, nulls, fpr, peak), fallback, not_understood,
                       notes)


def describe(model_or_path, **options) -> pd.DataFrame:
    """One row per form ``rs.analyze`` would diagnose (shapes, rank bound, variant, plain matrix or not), computed
    without any spectrum. ``table.attrs`` holds ``model_type``, ``family``, ``fallback``, ``notes`` and the cost
    ``estimate`` (a dict of seconds on one core with a cold null cache, and bytes). Options as ``describe_full``."""
    found = describe_full(model_or_path, **options)
    table = found.table
    table.attrs.update(model_type=found.model_type, family=found.family, fallback=found.fallback,
                       notes=found.notes, estimate={**found.estimate.__dict__, "seconds": found.estimate.seconds,
                                                    "seconds_min": found.estimate.seconds_min})
    return table
