"""Probes for rankscope's own models (``rankscope.nn.GPT`` or anything with ``attention_layers()``).

Each attention module builds its own chains (``qk_chains``/``ov_chains``, docs/design.md §4), so this probe never
switches on the attention variant and knows nothing of ``rankscope.nn`` beyond that duck-typed interface.
"""

from __future__ import annotations

from collections.abc import Sequence

from rankscope.attention_forms import NamedForm
from rankscope.errors import InputError
from rankscope.vocab import ATTENTION_KINDS, OV, QK_KINDS


def native_forms(model, heads: bool = True, kinds: Sequence[str] | None = None,
                 offsets: Sequence[int] = (0,)) -> list[NamedForm]:
    """NamedForms of every attention layer of ``model`` in layer order: per layer its qk forms (layer sum, then
    heads) then its ov forms; ``kinds`` ⊆ ATTENTION_KINDS filters (kinds a variant lacks are skipped).
    ``offsets``: the relative offsets Δ at which the per-head qk forms are read (``attention_forms``); the layer
    sums are read at Δ = 0 only (a secondary view), the ov forms do not depend on Δ."""
    if not hasattr(model, "attention_layers"):
        raise InputError(f"native_forms: {type(model).__name__} has no attention_layers(); "
                         "use probes.hf_forms for transformers models")
    wanted = set(ATTENTION_KINDS if kinds is None else kinds)
    bad = sorted(wanted - set(ATTENTION_KINDS))
    if bad:
        raise InputError(f"native_forms: unknown form kind(s) {bad}; known kinds are {list(ATTENTION_KINDS)}")
    offsets = [int(o) for o in offsets]
    if 0 not in offsets:
        raise InputError(f"native_forms: offsets {offsets} must include 0 (the layer forms are read there)")
    out: list[NamedForm] = []
    for attn in model.attention_layers():
        if wanted & set(QK_KINDS):
            out += [f for f in attn.qk_chains(heads=heads) if f.kind in wanted]
            for offset in (o for o in offsets if o != 0 and heads):
                out += [f for f in attn.qk_chains(heads=True, offset=offset) if f.kind in wanted and f.head >= 0]
        if OV in wanted:
            out += attn.ov_chains(heads=heads)
    return out
