"""Probes for rankscope's own models (``rankscope.nn.GPT`` or anything with ``attention_layers()``).

Each attention module builds its own chains (``qk_chains``/``ov_chains``, DESIGN §4), so this probe never
switches on the attention variant and knows nothing of ``rankscope.nn`` beyond that duck-typed interface.
"""

from __future__ import annotations

from collections.abc import Sequence

from rankscope.errors import InputError
from rankscope.probes.chain import KINDS, NamedForm

_QK_KINDS = ("qk", "qk_content", "qk_rope")


def native_forms(model, heads: bool = True, kinds: Sequence[str] | None = None) -> list[NamedForm]:
    """NamedForms of every attention layer of ``model`` in layer order: per layer its qk forms (layer sum, then
    heads) then its ov forms; ``kinds`` ⊆ KINDS filters (kinds a variant lacks are skipped)."""
    if not hasattr(model, "attention_layers"):
        raise InputError(f"native_forms: {type(model).__name__} has no attention_layers(); "
                         "use probes.hf_forms for transformers models")
    wanted = set(KINDS if kinds is None else kinds)
    bad = sorted(wanted - set(KINDS))
    if bad:
        raise InputError(f"native_forms: unknown form kind(s) {bad}; known kinds are {list(KINDS)}")
    out: list[NamedForm] = []
    for attn in model.attention_layers():
        if wanted & set(_QK_KINDS):
            out += [f for f in attn.qk_chains(heads=heads) if f.kind in wanted]
        if "ov" in wanted:
            out += attn.ov_chains(heads=heads)
    return out


def open_native_run(path) -> object | None:
    """A rankscope run directory (``config.json`` + ``checkpoints/``) or one of its checkpoint files, as a
    ``rankscope.nn.GPT`` with the checkpoint's weights and latent-rms buffers; None if ``path`` is not one."""
    import json
    from pathlib import Path

    import torch

    from rankscope.errors import CheckpointError

    path = Path(path)
    if path.is_dir():
        run, ckpt = path, None
    elif path.suffix == ".safetensors" and path.parent.name == "checkpoints":
        run, ckpt = path.parent.parent, path
    else:
        return None
    try:
        cfg = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(cfg, dict) and "model" in cfg and "train" in cfg):
        return None
    if ckpt is None:
        steps = sorted((run / "checkpoints").glob("step_*.safetensors"))
        final = run / "checkpoints" / "final"
        if final.exists():
            ckpt = run / "checkpoints" / f"step_{int(final.read_text()):06d}.safetensors"
        elif steps:
            ckpt = steps[-1]
        else:
            raise CheckpointError(f"{run}: a rankscope run without checkpoints yet")
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from rankscope.nn import GPT, ModelConfig

    model = GPT(ModelConfig.from_dict(cfg["model"]))
    try:
        load_model(model, str(ckpt))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt}: not a readable checkpoint of this run's model "
                              f"({str(exc).splitlines()[0][:200]})") from None
    state_path = ckpt.with_name(ckpt.name.replace(".safetensors", ".state.pt"))
    if state_path.exists():  # measured latent rms (MLA), so the chains fold the norm as in training
        try:
            buffers = torch.load(state_path, map_location="cpu", weights_only=True).get("buffers", {})
        except Exception as exc:
            raise CheckpointError(f"{state_path}: unreadable ({str(exc).splitlines()[0][:200]})") from None
        restore_buffers(model, buffers)
    return model.eval()


def restore_buffers(model, buffers: dict) -> None:
    """Copy saved buffers (e.g. MLA's measured latent rms, not part of the state dict) into ``model`` by name;
    names or shapes the model does not have are ignored."""
    import torch

    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)
