"""Probes for rankscope's own models (``rankscope.nn.GPT`` or anything with ``attention_layers()``).

Each attention module builds its own chains (``qk_chains``/``ov_chains``, docs/design.md §4), so this probe never
switches on the attention variant and knows nothing of ``rankscope.nn`` beyond that duck-typed interface.
"""

from __future__ import annotations

from collections.abc import Sequence

from rankscope.attention_forms import NamedForm
from rankscope.errors import InputError
from rankscope.vocab import ATTENTION_KINDS, OV, QK_KINDS


def native_forms(model, heads: bool = True, kinds: Sequence[str] | None = None) -> list[NamedForm]:
    """NamedForms of every attention layer of ``model`` in layer order: per layer its qk forms (layer sum, then
    heads) then its ov forms; ``kinds`` ⊆ ATTENTION_KINDS filters (kinds a variant lacks are skipped)."""
    if not hasattr(model, "attention_layers"):
        raise InputError(f"native_forms: {type(model).__name__} has no attention_layers(); "
                         "use probes.hf_forms for transformers models")
    wanted = set(ATTENTION_KINDS if kinds is None else kinds)
    bad = sorted(wanted - set(ATTENTION_KINDS))
    if bad:
        raise InputError(f"native_forms: unknown form kind(s) {bad}; known kinds are {list(ATTENTION_KINDS)}")
    out: list[NamedForm] = []
    for attn in model.attention_layers():
        if wanted & set(QK_KINDS):
            out += [f for f in attn.qk_chains(heads=heads) if f.kind in wanted]
        if OV in wanted:
            out += attn.ov_chains(heads=heads)
    return out
