"""Layouts of models with several attention stacks (T5's encoder, decoder and cross-attention; CLIP's text and
vision towers), and of encoders whose names or config keys one ``MHALayout`` cannot read alone (DistilBERT, ViT).

A ``StackedLayout`` is a tuple of ``Stack``s. Its ``all_forms`` reads each stack with that stack's one-stack layout
and config (CLIP's towers have their own ``text_config`` / ``vision_config``: widths and heads differ), and sets
``NamedForm.stack`` to the stack's name; layers are numbered within their stack (T5's cross-attention of decoder
block i is layer i of stack "cross"). Stacks are read one after another, in the order listed.

- A stack may have several naming schemes: ViT's checkpoints on disk name ``encoder.layer.{i}.attention.attention.
  query``, transformers 5 renames them in memory to ``layers.{i}.attention.q_proj``. The first scheme whose anchor
  matches a parameter name is read.
- A stack may be optional: T5EncoderModel (model_type "t5") has no decoder, so T5's decoder and cross-attention
  stacks are read where present; a required stack that is missing is a ``CheckpointError``.
- ``prefix`` (``hf_forms(prefix=)``) is the *model's* prefix: what comes before every stack's own path
  (``encoder.block.``, ``text_model.encoder.layers.``), e.g. ``""`` for a T5Model, ``"transformer."`` for a
  wrapped one. Without it each stack's prefix is found from the names, and they must agree (a state dict
  holding two models needs ``prefix=``).
- ``aliases``: config keys under the names ``_mha_head_dims`` reads, from the model's own keys, for configs read as
  plain dicts (a checkpoint's config.json holds T5's ``num_heads``, not ``num_attention_heads``).

Cross-attention (T5's ``EncDecAttention``): queries from the decoder's hidden state y_dec, keys and values from
the encoder's output y_enc. The forms are still ``B_h = Wq_hᵀ Wk_h`` (score = y_dec,iᵀ B_h y_enc,j) and
``Wo_h Wv_h`` (applied to y_enc,j); only the vectors on the two sides differ. T5's head dim is ``d_kv`` (not
d_model / heads; the forms take it from the weights' shapes), its scores are not scaled (no 1/√d_kv), and its
relative position bias (``relative_attention_bias``, in each stack's first block, shared by the stack's layers; none
in cross-attention) is added to the scores outside the form, like every bias.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from rankscope.attention_forms import NamedForm
from rankscope.errors import CheckpointError, InputError
from rankscope.probes.layouts import MHALayout, _find_prefix, _OneStack


@dataclass(frozen=True)
class Stack:
    """One attention stack of a model: its label, naming schemes and config."""

    name: str  # NamedForm.stack: "encoder", "decoder", "cross", "text", "vision"; "" for a model's only stack
    layouts: tuple[_OneStack, ...]  # its naming schemes: the first whose anchor matches a name is read
    config: str | None = None  # the sub-config with this stack's sizes (CLIP's "text_config"); None: the top level
    required: bool = True  # False: the stack may be absent (T5EncoderModel has no decoder)


@dataclass(frozen=True)
class StackedLayout:
    """A layout of one or more attention stacks; forms carry their stack's name in ``NamedForm.stack``."""

    family: str
    stacks: tuple[Stack, ...]
    aliases: tuple[tuple[str, str], ...] = ()  # (key _mha_head_dims reads, the model's own key)

    def all_forms(self, state_dict: Mapping, cfg: dict, *, prefix: str | None, heads: bool,
                  kinds) -> Iterator[NamedForm]:
        found = []  # (stack, its layout, its prefix)
        for stack in self.stacks:
            read = _scheme(state_dict, stack, prefix)
            if read is not None:
                found.append((stack, *read))
            elif stack.required:
                looked = " or ".join(repr(layout.anchor) for layout in stack.layouts)
                under = "" if prefix is None else f" under prefix {prefix!r}"
                raise CheckpointError(f"state dict: no {self.family} {stack.name or 'attention'} stack{under} "
                                      f"(looked for names ending in {looked})")
        prefixes = {p for _, _, p in found}
        if len(prefixes) > 1:
            raise InputError(f"state dict: the {self.family} stacks {[s.name for s, _, _ in found]} sit under "
                             f"different prefixes {sorted(prefixes)}; pass prefix= to choose one model")
        for stack, layout, p in found:
            sub = self._config(cfg, stack)
            for f in layout.all_forms(state_dict, sub, prefix=p, heads=heads, kinds=kinds):
                yield replace(f, stack=stack.name)

    def _config(self, cfg: dict, stack: Stack) -> dict:
        """The stack's config (its sub-config, if any) with the aliased keys filled in."""
        sub = cfg if stack.config is None else cfg.get(stack.config)
        if not isinstance(sub, Mapping):
            raise InputError(f"config ({cfg.get('model_type')}): no {stack.config!r} for the {stack.name} stack")
        sub = dict(sub)
        if "quantization_config" in cfg:
            sub.setdefault("quantization_config", cfg["quantization_config"])
        for key, own in self.aliases:
            if sub.get(key) is None and sub.get(own) is not None:
                sub[key] = sub[own]
        return sub


def _scheme(state_dict: Mapping, stack: Stack, prefix: str | None) -> tuple[_OneStack, str] | None:
    """(the first of the stack's layouts with names in the state dict, its prefix), or None if none has."""
    for layout in stack.layouts:
        try:
            found, _ = _find_prefix(state_dict, layout, prefix)
        except CheckpointError:  # no name matches this scheme (under this prefix)
            continue
        return layout, found
    return None


def _mha(family: str, layer: str, q: str, k: str, v: str, o: str) -> MHALayout:
    """An MHALayout of separate q/k/v/o ``[out, in]`` weights: ``layer`` is the layer's module path with ``{i}``,
    the others are module paths below it; the anchor is the query weight."""
    names = [f"{layer}{p}.weight" for p in (q, k, v, o)]
    anchor = re.escape(names[0]).replace(re.escape("{i}"), r"(\d+)")
    return MHALayout(family, anchor, q=names[0], k=names[1], v=names[2], o=names[3])


def _clip_tower(path: str) -> MHALayout:
    return _mha("clip", path + "encoder.layers.{i}.self_attn.", "q_proj", "k_proj", "v_proj", "out_proj")


_T5_KEYS = (("hidden_size", "d_model"), ("num_attention_heads", "num_heads"), ("head_dim", "d_kv"))

DISTILBERT = StackedLayout("distilbert", (Stack("", (
    _mha("distilbert", "transformer.layer.{i}.attention.", "q_lin", "k_lin", "v_lin", "out_lin"),)),),
    aliases=(("hidden_size", "dim"), ("num_attention_heads", "n_heads")))
VIT = StackedLayout("vit", (Stack("", (
    _mha("vit", "encoder.layer.{i}.attention.", "attention.query", "attention.key", "attention.value",
         "output.dense"),  # checkpoints on disk
    _mha("vit", "layers.{i}.attention.", "q_proj", "k_proj", "v_proj", "o_proj"),  # transformers 5, in memory
)),))
T5 = StackedLayout("t5", (
    Stack("encoder", (_mha("t5", "encoder.block.{i}.layer.0.SelfAttention.", "q", "k", "v", "o"),)),
    Stack("decoder", (_mha("t5", "decoder.block.{i}.layer.0.SelfAttention.", "q", "k", "v", "o"),), required=False),
    Stack("cross", (_mha("t5", "decoder.block.{i}.layer.1.EncDecAttention.", "q", "k", "v", "o"),), required=False),
), aliases=_T5_KEYS)
CLIP = StackedLayout("clip", (
    Stack("text", (_clip_tower("text_model."),), config="text_config"),
    Stack("vision", (_clip_tower("vision_model."),), config="vision_config"),
))
# CLIPTextModel / CLIPVisionModel (and …WithProjection): one tower, a flat config; its prefix ("", "text_model.",
# "vision_model.") is found from the names. Labelled as the tower of a full CLIP, so their rows compare.
CLIP_TEXT = StackedLayout("clip", (Stack("text", (_clip_tower(""),)),))
CLIP_VISION = StackedLayout("clip", (Stack("vision", (_clip_tower(""),)),))
