"""``diff``: what changed between a base checkpoint and a tuned one, per weight matrix and per attention head.

For each matrix W (and each layer's and head's attention form B) of two checkpoints of one architecture:

- the spectrum of the change ΔW = W_tuned − W_base under the null of ``rankscope.diagnose`` (MP for a matrix,
  the structure-matched product null for a form): how many directions of the change stand above noise
  (``dw_spikes``, ``dw_outliers``), and its size ``dw_norm`` = ‖ΔW‖_F (relative: ``dw_relative_norm``);
- the change of stable rank, effective rank and spike count from base to tuned (``*_change``);
- how far the top-k singular subspaces moved: ``overlap_left`` = ‖U_bᵀ U_t‖_F² / k (1: the same subspace, k/n:
  as aligned as two random k-dim subspaces of ℝⁿ, ``overlap_random_left``), likewise ``overlap_right`` with the
  right singular vectors; k = the base's outlier count (or a fixed k).

A form's change is itself a form, without densifying: for a chain B = F1 ⋯ Fk the telescoping sum
``B_t − B_b = Σ_i F1_b ⋯ F(i−1)_b · ΔFi · F(i+1)_t ⋯ Fk_t`` (exact) is a ``Sum`` of chains, one per factor that
changed; an MHA head's ``ΔB_h = ΔWq_hᵀ Wk_h,t + Wq_h,bᵀ ΔWk_h``. Its product null simulates every factor of each
block, with each block's Frobenius norm: for a change that is noise in every factor (to first order a sum of
products of independent Gaussians) that is the law of the change itself, so a spike is structure *in the change*.
Two caveats: a block's other factors are the checkpoints' own (a noisy ΔWq times a spiked trained Wk inherits
Wk's spectrum: ``ΔWq_hᵀ Wk`` has the singular-value profile of Wk), so the matrix rows are the ones that count
changed directions of the weights; and where the blocks share a factor (a chain of three or more factors with two
or more changed: MLA heads, or a shared outer chain expanded into each block) the null is not the change's law,
so those rows carry the change's size and rank measures but no count (``dw_note`` says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from itertools import groupby, zip_longest

import pandas as pd
import torch
from torch import nn

from rankscope.analysis import (
    _matrices,
    _no_layout_note,
    _source,
    check_options,
    form_name,
    layer_of,
    layout_stacks,
    matrix_kind,
    selected_kinds,
    skip_reason,
    stack_of,
)
from rankscope.errors import InputError
from rankscope.probes import NamedForm, detect_architecture, hf_forms
from rankscope.spectra import Diagnosis, diagnose_nulls, metrics, prepare, spectrum, stack
from rankscope.spectra.form import Chain, Form, Sum, split_at_bottleneck
from rankscope.spectra.threads import thread_budget
from rankscope.vocab import ALL_GROUPS, ATTENTION_KINDS, PRODUCT, TW

DIAGNOSIS_COLUMNS = ("outliers", "spikes", "bulk_fits", "spike_strength", "lambda_max", "bulk_edge", "stable_rank",
                     "effective_rank", "erank_vs_null", "rank")  # of ΔW's diagnosis, as dw_<column>
COMPARED = ("spikes", "outliers", "stable_rank", "effective_rank")  # base_<c>, tuned_<c> and <c>_change


# ---------------------------------------------------------------------------------------------- form algebra


def _term_shared(form: Form) -> list[frozenset[int]]:
    """The factor positions each term of ``form.terms()`` declares shared by the heads of a layer."""
    left = form.left.factors if form.left else ()
    out = []
    for c in form.chains:
        shared = set(form.left.shared) if form.left else set()
        shared |= {len(left) + i for i in c.shared}
        if form.right:
            shared |= {len(left) + len(c.factors) + i for i in form.right.shared}
        out.append(frozenset(shared))
    return out


def form_change(base: Form, tuned: Form) -> Form | None:
    """ΔB = B_tuned − B_base as a chain or a sum of chains (the telescoping sum over the factors that changed,
    each ``Chain(F1_b, …, ΔFi, …, Fk_t)``); None when no factor changed. Both forms: one structure, float64."""
    chains = []
    for fb, ft, shared in zip(base.terms(), tuned.terms(), _term_shared(base), strict=True):
        for i in range(len(fb)):
            change = ft[i] - fb[i]  # (…, rows, cols)
            if bool(torch.any(change != 0)):
                chains.append(Chain(*fb[:i], change, *ft[i + 1:], shared=shared))
    if not chains:
        return None
    return chains[0] if len(chains) == 1 else Sum(chains)


def shares_factors(form: Form) -> bool:
    """Whether two chains of the form hold the same factor: the change of a chain of three or more factors of
    which two or more changed (an MLA head). The product null draws every block's factors independently, so it is
    not the law of such a change (on pure noise it flags 1–4 outliers of 16 where it should flag none)."""
    seen: set[tuple] = set()
    for c in form.chains:
        keys = {(f.data_ptr(), tuple(f.shape), tuple(f.stride())) for f in c.factors}
        if keys & seen:
            return True
        seen |= keys
    return False


def top_singular_vectors(form: Form, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (n, k), V (m, k)): the top-k left and right singular vectors of the (unbatched, float64) form B, from
    B = X Y split at the chains' bottlenecks, thin QRs X = Q_X R_X, Yᵀ = Q_Y R_Y and the SVD of R_X R_Yᵀ."""
    terms = form.terms()
    if len(terms) == 1 and len(terms[0]) == 1:  # a plain matrix
        U, _, Vh = torch.linalg.svd(terms[0][0], full_matrices=False)
        return U[:, :k], Vh[:k].mT
    parts = [split_at_bottleneck(Chain(*t)) for t in terms]
    X = torch.cat([x for x, _ in parts], dim=-1)  # (n, K)
    Y = torch.cat([y for _, y in parts], dim=-2)  # (K, m)
    Qx, Rx = torch.linalg.qr(X)  # (n, p), (p, K)
    Qy, Ry = torch.linalg.qr(Y.mT)  # (m, q), (q, K)
    Uc, _, Vch = torch.linalg.svd(Rx @ Ry.mT, full_matrices=False)  # core (p, q)
    return Qx @ Uc[:, :k], Qy @ Vch[:k].mT


def subspace_overlap(U_base: torch.Tensor, U_tuned: torch.Tensor) -> float:
    """‖U_bᵀ U_t‖_F² / k = the mean squared cosine of the principal angles between two k-dim subspaces (orthonormal
    columns (n, k)): 1 for the same subspace, k/n on average for independent random ones, 0 for orthogonal ones."""
    k = U_base.shape[-1]
    if k == 0:
        return math.nan
    return float((U_base.mT @ U_tuned).square().sum() / k)


# ---------------------------------------------------------------------------------------------- diagnosis


def _signature(form: Form) -> tuple:
    """What ``stack`` needs equal to batch forms: type, structure and shared declarations."""
    chains = (form.left, *form.chains, form.right)
    return type(form).__name__, form.structure, tuple(None if c is None else c.shared for c in chains)


def _diagnose_all(forms: list[Form | None], nulls: tuple[str, ...], fpr: float,
                  names: list[str]) -> list[dict[str, Diagnosis] | str | None]:
    """null → Diagnosis for each form (None stays None; an ``InputError`` becomes its message); forms of one
    structure (the heads of a layer) are diagnosed as one batch."""
    out: list = [None] * len(forms)
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(forms):
        if f is not None:
            groups.setdefault(_signature(f), []).append(i)
    for idx in groups.values():
        if len(idx) > 1:
            try:
                found = diagnose_nulls(stack([forms[i] for i in idx]), nulls, fpr=fpr, name=names[idx[0]],
                                       batched=True)
            except InputError:
                found = None  # one form is bad: one by one below, so the others still get their diagnoses
            if found is not None:
                for j, i in enumerate(idx):
                    out[i] = {null: found[null][j] for null in nulls}
                continue
        for i in idx:
            try:
                found = diagnose_nulls(forms[i], nulls, fpr=fpr, name=names[i])
            except InputError as exc:
                out[i] = str(exc)
                continue
            out[i] = {null: found[null][0] for null in nulls}
    return out


UNTESTED_NOTE = ("not counted: the blocks of this change share factors (a chain of ≥ 3 factors with two or more "
                 "changed), and the product null assumes independent ones; read the matrix rows")


def _untested(change: Form) -> dict:
    """The null-free columns of a change whose null is not known: its spectrum's size and rank measures."""
    lam = spectrum(prepare(change, name="change"))  # (r,)
    return {"untested": True, "lambda_max": float(lam[0]), "stable_rank": float(metrics.stable_rank(lam)),
            "effective_rank": float(metrics.effective_rank(lam)), "rank": int(lam.numel()),
            "norm": float(lam.sum().clamp_min(0).sqrt())}


def _norm(d: Diagnosis) -> float:
    """‖B‖_F = √(Σ λ), from the spectrum of B Bᵀ."""
    return float(d.eigenvalues.sum().clamp_min(0).sqrt())


def _row_values(null: str, base: Diagnosis, tuned: Diagnosis, change: dict | str | None,
                forms: tuple[Form, Form], k: int | None) -> dict:
    """The columns of one row (one null) from the three diagnoses and the two forms."""
    row: dict = {"null": null, "dw_note": ""}
    for c in COMPARED:
        b, t = float(getattr(base, c)), float(getattr(tuned, c))
        row.update({f"base_{c}": b, f"tuned_{c}": t, f"{c}_change": t - b})
    base_norm = _norm(base)
    row["base_norm"] = base_norm
    if change is None:  # no factor changed: the change is exactly zero
        row.update({f"dw_{c}": math.nan for c in DIAGNOSIS_COLUMNS})
        row.update(dw_norm=0.0, dw_relative_norm=0.0, dw_outliers=0, dw_spikes=0.0, dw_rank=0, changed=False)
    elif isinstance(change, str):
        row.update({f"dw_{c}": math.nan for c in DIAGNOSIS_COLUMNS}, dw_norm=math.nan, dw_relative_norm=math.nan,
                   changed=True, error=change)
    elif change.get("untested"):
        row.update({f"dw_{c}": change.get(c, math.nan) for c in DIAGNOSIS_COLUMNS}, changed=True,
                   dw_norm=change["norm"], dw_note=UNTESTED_NOTE)
        row["dw_relative_norm"] = change["norm"] / base_norm if base_norm > 0 else math.nan
    else:
        d = change[null]
        row.update({f"dw_{c}": getattr(d, c) for c in DIAGNOSIS_COLUMNS}, changed=True)
        row["dw_norm"] = _norm(d)
        row["dw_relative_norm"] = row["dw_norm"] / base_norm if base_norm > 0 else math.nan
    n, m = base.n, base.m
    dim = min(int(base.outliers) if k is None else k, base.rank)
    row.update(overlap_k=dim, overlap_random_left=dim / n, overlap_random_right=dim / m)
    if dim > 0:
        Ub, Vb = top_singular_vectors(forms[0], dim)
        Ut, Vt = top_singular_vectors(forms[1], dim)
        row.update(overlap_left=subspace_overlap(Ub, Ut), overlap_right=subspace_overlap(Vb, Vt))
    else:  # the base has no outlier: no top subspace to compare
        row.update(overlap_left=math.nan, overlap_right=math.nan)
    return row


def _rows(meta: list[dict], base: list[Form], tuned: list[Form], nulls: tuple[str, ...], fpr: float,
          k: int | None) -> list[dict]:
    """Rows of paired forms (base[i], tuned[i]) described by meta[i]: one per (form, null)."""
    names = [m["name"] for m in meta]
    base, tuned = [f.double() for f in base], [f.double() for f in tuned]
    changes = [form_change(b, t) for b, t in zip(base, tuned, strict=True)]
    tested = [c if c is not None and not shares_factors(c) else None for c in changes]
    found_b = _diagnose_all(base, nulls, fpr, names)
    found_t = _diagnose_all(tuned, nulls, fpr, names)
    found_d = _diagnose_all(tested, nulls, fpr, [f"{n} (change)" for n in names])
    for i, c in enumerate(changes):  # a change whose null would be wrong: its spectrum only, no count
        if c is not None and tested[i] is None:
            found_d[i] = _untested(c)
    rows = []
    for i, m in enumerate(meta):
        error = next((x for x in (found_b[i], found_t[i]) if isinstance(x, str)), None)
        if error is not None:
            rows.append({**m, "error": error})
            continue
        change = found_d[i] if changes[i] is not None else None
        for null in nulls:
            rows.append({**m, "error": "", **_row_values(null, found_b[i][null], found_t[i][null], change,
                                                         (base[i], tuned[i]), k)})
    return rows


# ---------------------------------------------------------------------------------------------- checkpoints


def _check_same(where_b: str, where_t: str, config_b: dict | None, config_t: dict | None, weights_b,
                weights_t) -> None:
    """The same architecture (model_type), the same weight names and shapes; else ``InputError`` naming one."""
    type_b, type_t = (c.get("model_type") if isinstance(c, dict) else type(c).__name__ for c in (config_b, config_t))
    if type_b != type_t:
        raise InputError(f"{where_t}: model_type {type_t!r} but the base {where_b} has {type_b!r}; base and tuned "
                         "must have the same architecture")
    names_b, names_t = set(weights_b), set(weights_t)
    for missing, have, lacks in ((sorted(names_b - names_t), where_b, where_t),
                                 (sorted(names_t - names_b), where_t, where_b)):
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"{missing[0]}: in {have} but not in {lacks}{more}; base and tuned must have the same "
                             "weights")
    for name in weights_b:
        sb, st = tuple(weights_b.shape(name)), tuple(weights_t.shape(name))
        if sb != st:
            raise InputError(f"{name}: shape {list(sb)} in the base {where_b} but {list(st)} in the tuned "
                             f"{where_t}; base and tuned must have the same shapes")


def _form_meta(f: NamedForm) -> dict:
    return {"name": form_name(f), "stack": f.stack, "layer": f.layer, "head_index": f.head, "expert": -1,
            "kind": f.kind, "offset": f.offset, "variant": f.variant, "shapes": str(f.form.structure)}


def _attention_rows(forms_b: Iterable[NamedForm], forms_t: Iterable[NamedForm], kinds: list[str], per_head: bool,
                    nulls: tuple[str, ...], fpr: float, k: int | None, tick: Callable[[str], None]) -> list[dict]:
    """Rows of every attention form, a layer of each checkpoint at a time (heads of one kind as one batch)."""
    rows = []
    by_layer = (groupby(forms, key=lambda f: (f.stack, f.layer)) for forms in (forms_b, forms_t))
    for one_b, one_t in zip_longest(*by_layer):
        if one_b is None or one_t is None or one_b[0] != one_t[0]:
            which = (one_b or one_t)[0]
            raise InputError(f"layer {which[1]}{' of ' + which[0] if which[0] else ''}: the attention layers of base "
                             "and tuned differ; base and tuned must have the same architecture")
        layer_b, layer_t = ({(f.kind, f.offset, f.head): f for f in one[1]
                             if f.kind in kinds and (per_head or f.head < 0)} for one in (one_b, one_t))
        for key in layer_b:
            fb, ft = layer_b[key], layer_t.get(key)
            if ft is None or ft.form.structure != fb.form.structure:
                shown = "missing" if ft is None else str(ft.form.structure)
                raise InputError(f"{form_name(fb)}: form {fb.form.structure} in the base but {shown} in the tuned; "
                                 "base and tuned must have the same architecture")
        for kind in kinds:
            keys = [key for key in layer_b if key[0] == kind]
            keys.sort(key=lambda key: (abs(key[1]), key[2]))  # offsets by |Δ|, the layer form before the heads
            for _, group in groupby(keys, key=lambda key: key[1]):
                group = list(group)
                meta = [_form_meta(layer_b[key]) for key in group]
                rows += _rows(meta, [layer_b[key].form for key in group], [layer_t[key].form for key in group],
                              nulls, fpr, k)
        tick(f"layer {one_b[0][1]} attention")
    return rows


def _matrix_rows(weights_b, weights_t, matrices: list[tuple[str, int, str]], nulls: tuple[str, ...], fpr: float,
                 k: int | None, tick: Callable[[str], None], stacks: set[str]) -> list[dict]:
    """Rows of the plain weight matrices (float64), each with its nulls, or the reason it was skipped."""
    rows = []
    held: tuple | None = None
    for name, expert, shown in matrices:
        shape = weights_b.shape(name)[-2:]
        meta = {"name": shown, "stack": stack_of(name, stacks), "layer": layer_of(name), "head_index": -1,
                "expert": expert, "kind": matrix_kind(name), "offset": 0, "variant": "",
                "shapes": "·".join(map(str, shape))}
        skipped = skip_reason(weights_b, name)
        if skipped:
            rows.append({**meta, "error": skipped})
        else:
            if held is None or held[0] != name:  # an expert stack is read once for all its experts
                held = (name, weights_b[name], weights_t[name])
            pair = [Chain((w[expert] if w.dim() == 3 else w).to(torch.float64)) for w in held[1:]]  # (out, in)
            rows += _rows([meta], [pair[0]], [pair[1]], nulls, fpr, k)
        tick(shown)
    return rows


def diff(base, tuned, *, per_head: bool = True, kinds: Iterable[str] | None = None,
         null: str | tuple[str, ...] = PRODUCT, fpr: float = 0.01, k: int | None = None, threads: int | None = None,
         progress: Callable[[int, int, str], None] | None = None) -> pd.DataFrame:
    """One row per (matrix or attention form, null): the spectrum of ΔW = W_tuned − W_base under the null
    (``dw_*``), base's and tuned's spikes, outliers, stable and effective rank with their ``*_change``, and the
    top-k subspace overlaps ‖U_bᵀ U_t‖_F² / k (``overlap_left``/``_right``, reference k/n ``overlap_random_*``).

    ``base``, ``tuned``: whatever ``rs.analyze`` reads (a model, an HF dir, a weights file, a run dir), of one
    architecture and the same shapes (else ``InputError`` naming the matrix and both shapes). ``kinds``: kind
    groups or kinds (None: all). ``k``: the subspace dimension (None: each row's base outlier count; 0 outliers →
    NaN overlaps). A change that is exactly zero has ``changed`` False, ``dw_norm`` 0 and no spikes.
    ``threads``: one torch thread and this many BLAS threads for the numerics (None: leave the process's).
    """
    nulls = (null,) if isinstance(null, str) else tuple(null)
    check_options(nulls, fpr)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"k must be a positive subspace dimension (or None: the base's outlier count), got {k!r}")
    wanted = selected_kinds(kinds if kinds is not None else ALL_GROUPS)
    attention_kinds = [kd for kd in ATTENTION_KINDS if kd in wanted]
    if TW in nulls and attention_kinds:
        raise InputError('null "tw" is defined for a single matrix, and attention forms are products of matrices: '
                         'use null "product" or "mp", or kinds mlp,weights')
    with thread_budget(torch=1, blas=threads) if threads else nullcontext():
        where = [type(x).__name__ if isinstance(x, nn.Module) else str(x) for x in (base, tuned)]
        (config_b, weights_b, native_b), (config_t, weights_t, native_t) = _source(base), _source(tuned)
        _check_same(where[0], where[1], config_b, config_t, weights_b, weights_t)
        matrices = _matrices(weights_b, wanted, None)
        arch = detect_architecture(config_b) if config_b else None
        forms = [native_b, native_t]
        if attention_kinds and native_b is None and arch:
            forms = [hf_forms(c, w, heads=per_head, kinds=attention_kinds)
                     for c, w in ((config_b, weights_b), (config_t, weights_t))]
        if forms[0] is None and attention_kinds and kinds is not None:
            raise InputError(f"{where[0]}: cannot compare kinds {', '.join(attention_kinds)}: per-head attention forms "
                             f"need a layout of its q/k/v/o weights, and there is none for model_type "
                             f"{(config_b or {}).get('model_type') if isinstance(config_b, dict) else None!r}")
        if forms[0] is None and not matrices:
            raise InputError(f"{where[0]}: nothing to compare for kinds {sorted(wanted)} (no 2-D weight matrix of "
                             f"those kinds{'' if arch else ' and no attention layout'})")
        # the forms are read a layer at a time, so their layers are counted from the weight names (an estimate)
        n_layers = len({layer_of(n) for n in weights_b} - {-1}) if forms[0] is not None and attention_kinds else 0
        total, done = n_layers + len(matrices), 0

        def tick(what: str) -> None:
            nonlocal done, total
            done += 1
            total = max(total, done)
            if progress:
                progress(done, total, what)

        rows = []
        if forms[0] is not None and attention_kinds:
            rows += _attention_rows(forms[0], forms[1], attention_kinds, per_head, nulls, fpr, k, tick)
        stacks = layout_stacks(config_b)  # the stacks of a model with several
        stacks |= {f.stack for f in forms[0]} if isinstance(forms[0], list) else set()
        rows += _matrix_rows(weights_b, weights_t, matrices, nulls, fpr, k, tick, stacks - {""})
    table = pd.DataFrame(rows)
    no_layout = forms[0] is None and attention_kinds
    table.attrs["notes"] = [_no_layout_note(config_b, len(matrices))] if no_layout else []
    return table

