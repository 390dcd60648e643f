"""llama.cpp GGUF files as a checkpoint: tensors dequantised one at a time, LLaMA-family names and q/k rows in
Hugging Face's layout, a transformers-style config from the GGUF metadata.

- Shapes: GGUF lists a tensor's dims fastest first (``ne``); they are given here reversed, the PyTorch/HF
  ``[out, in]`` order (an expert stack ``[E, out, in]``).
- Values: every floating or quantised type the ``gguf`` package can dequantise (F16, BF16, Q4_0 … Q8_0, the
  K- and IQ-quants) comes out as float32 (F64 as float64, integer types as they are), one tensor per call;
  the file stays a read-only memory map.
- Names: for the architectures in ``ARCHS`` the llama.cpp names (``blk.N.attn_q.weight``, ``token_embd.weight``,
  …) are mapped to the HF LLaMA names (``model.layers.N.self_attn.q_proj.weight``, ``model.embed_tokens.weight``,
  …) and ``config["model_type"]`` is set, so the HF layout gives per-head forms. Other architectures keep
  their GGUF names and no model_type: their weights are plain matrices.
- q/k rows: llama.cpp's converter reorders each head's rows of q (H heads) and k (H_kv heads) for its
  adjacent-pair RoPE: ``W.reshape(n, 2, dh/2, d).swapaxes(1, 2)`` (GGUF row h·dh + 2j + a holds HF row
  h·dh + a·dh/2 + j). For architectures whose GGUF rows are in that order (``ARCHS[arch].unpermute``) it is
  undone here, so RoPE's rotate-half pairs (j, j + dh/2) are HF's again. Per-head qk spectra at offset 0 do not
  see the reordering (it is the same orthogonal row permutation on both factors); forms at Δ ≠ 0 do.

A file that is not GGUF, or is truncated or corrupt, raises ``CheckpointError`` at open, naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rankscope.errors import CheckpointError, one_line


@dataclass(frozen=True)
class Arch:
    """How one GGUF architecture maps to Hugging Face: its ``model_type`` and whether q/k rows were reordered."""

    model_type: str
    unpermute: bool  # q/k rows in llama.cpp's adjacent-pair RoPE order (the converter's permute), to be undone


# general.architecture → HF. llama (LLaMA 1–3, Mistral, SmolLM/SmolLM2) and smollm3 go through llama.cpp's
# LlamaModel converter, which reorders q/k; qwen2 uses NeoX RoPE in llama.cpp and keeps HF's order.
ARCHS = {
    "llama": Arch("llama", unpermute=True),
    "smollm3": Arch("llama", unpermute=True),
    "qwen2": Arch("qwen2", unpermute=False),
}

_LAYER = "model.layers.{}."
_NAMES = [  # (GGUF name regex, HF name with the groups filled in), for the architectures in ARCHS
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", _LAYER + "self_attn.q_proj.{}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", _LAYER + "self_attn.k_proj.{}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", _LAYER + "self_attn.v_proj.{}"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", _LAYER + "self_attn.o_proj.{}"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", _LAYER + "self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", _LAYER + "self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", _LAYER + "input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", _LAYER + "post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", _LAYER + "mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", _LAYER + "mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", _LAYER + "mlp.down_proj.weight"),
    # mixture of experts: the router, 3-D expert stacks [E, out, in], shared experts, and old per-expert tensors
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", _LAYER + "mlp.gate.weight"),
    (r"blk\.(\d+)\.ffn_gate_exps\.weight", _LAYER + "mlp.experts.gate_proj"),
    (r"blk\.(\d+)\.ffn_up_exps\.weight", _LAYER + "mlp.experts.up_proj"),
    (r"blk\.(\d+)\.ffn_down_exps\.weight", _LAYER + "mlp.experts.down_proj"),
    (r"blk\.(\d+)\.ffn_gate_shexp\.weight", _LAYER + "mlp.shared_expert.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up_shexp\.weight", _LAYER + "mlp.shared_expert.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down_shexp\.weight", _LAYER + "mlp.shared_expert.down_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.(\d+)\.weight", _LAYER + "block_sparse_moe.experts.{}.w1.weight"),
    (r"blk\.(\d+)\.ffn_down\.(\d+)\.weight", _LAYER + "block_sparse_moe.experts.{}.w2.weight"),
    (r"blk\.(\d+)\.ffn_up\.(\d+)\.weight", _LAYER + "block_sparse_moe.experts.{}.w3.weight"),
]
_COMPILED = [(re.compile(pattern), template) for pattern, template in _NAMES]
_QK = re.compile(r"blk\.\d+\.attn_([qk])\.(weight|bias)")

# GGUF metadata key (after "{arch}.") → transformers config key
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.value_length": "v_head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "rope.dimension_count": "rope_dim",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
    "expert_count": "num_local_experts",
    "expert_used_count": "num_experts_per_tok",
}


def hf_name(gguf_name: str) -> str | None:
    """The HF LLaMA name of a llama.cpp tensor name, or None if it has none (it is then kept as it is)."""
    for pattern, template in _COMPILED:
        m = pattern.fullmatch(gguf_name)
        if m:
            return template.format(*m.groups())
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row reordering: (n·dh, …) in adjacent-pair order → HF's rotate-half order.

    The converter writes ``G = W.reshape(n, 2, dh/2, …).swapaxes(1, 2).reshape(W.shape)``; this returns W =
    ``G.reshape(n, dh/2, 2, …).swapaxes(1, 2).reshape(G.shape)``."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even head dim")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _scalar(value):
    """A metadata value as a Python scalar; a per-layer array whose entries are all equal as that one value."""
    if isinstance(value, list) and value and all(v == value[0] for v in value):
        return value[0]
    return value


class GGUFFile:
    """One GGUF file: names (HF names where known), HF-order shapes and dtypes at open, tensors dequantised on read.

    ``config``: the transformers-style config built from the metadata (``model_type`` only for ``ARCHS``);
    ``quant_type(name)``: the stored GGML type ("Q4_1", "F32", …); ``gguf_name(name)``: the name in the file.
    """

    def __init__(self, path: Path):
        import gguf

        self.path = path
        self._gguf = gguf
        size = path.stat().st_size
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # bad magic, unsupported version, a header or tensor running past the end, …
            raise CheckpointError(f"{path}: corrupt or truncated GGUF file of {size} bytes (the gguf reader: "
                                  f"{type(e).__name__}: {one_line(e)})") from None
        fields = {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("tokenizer.")}
        self.metadata = fields
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{path}: truncated GGUF file (tensor '{t.name}' ends at byte "
                                      f"{t.data_offset + t.n_bytes}, the file has {size})")
        if int(fields.get("split.count") or 1) > 1:
            raise CheckpointError(f"{path}: one shard of a split GGUF ({fields['split.count']} files); merge the "
                                  "shards first (llama-gguf-split --merge)")
        self.architecture = str(fields.get("general.architecture", ""))
        self.arch = ARCHS.get(self.architecture)
        self.config = self._config()
        self._tensors: dict[str, object] = {}  # name → gguf ReaderTensor, in file order
        self._heads: dict[str, int] = {}  # name → heads whose rows are to be un-permuted (q: H, k: H_kv)
        for t in self.reader.tensors:
            name = (hf_name(t.name) if self.arch else None) or t.name
            if name in self._tensors:
                raise CheckpointError(f"{path}: two tensors map to the name '{name}' (one is '{t.name}')")
            self._tensors[name] = t
            qk = _QK.fullmatch(t.name)
            if self.arch and self.arch.unpermute and qk:
                key = "num_attention_heads" if qk.group(1) == "q" else "num_key_value_heads"
                if not isinstance(self.config.get(key), int):
                    raise CheckpointError(f"{path}: '{t.name}' needs {self.architecture}.attention.head_count"
                                          f"{'' if key == 'num_attention_heads' else '_kv'} (a single integer) to "
                                          "undo llama.cpp's q/k row order; the metadata lacks it")
                self._heads[name] = self.config[key]

    def _config(self) -> dict:
        """Transformers-style config from the ``{arch}.*`` metadata, plus ``gguf_architecture``/``gguf_file_type``."""
        arch, fields = self.architecture, self.metadata
        cfg: dict = {"gguf_architecture": arch, "gguf_file_type": fields.get("general.file_type")}
        for key, name in _CONFIG_KEYS.items():
            if f"{arch}.{key}" in fields:
                cfg[name] = _scalar(fields[f"{arch}.{key}"])
        if "num_attention_heads" in cfg and "num_key_value_heads" not in cfg:
            cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        n_heads = cfg.get("num_attention_heads")  # a count of 0 is refused by name (``load.open_checkpoint``)
        if "head_dim" not in cfg and isinstance(n_heads, int) and n_heads > 0 and cfg.get("hidden_size"):
            cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        names = {t.name: t for t in self.reader.tensors}
        if "vocab_size" not in cfg and "token_embd.weight" in names:
            cfg["vocab_size"] = int(names["token_embd.weight"].shape[-1])  # ne = [d, vocab]
        cfg["tie_word_embeddings"] = "output.weight" not in names
        if self.arch:
            heads = [cfg.get(k) for k in ("num_attention_heads", "num_key_value_heads")]
            if all(isinstance(h, int) and h > 0 for h in heads):  # per-layer head counts: no single layout
                cfg["model_type"] = self.arch.model_type
        return cfg

    def names(self) -> list[str]:
        return list(self._tensors)

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'") from None

    def gguf_name(self, name: str) -> str:
        return self._tensor(name).name

    def quant_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(name).shape.tolist()))  # ne is fastest-first

    def dtype(self, name: str) -> torch.dtype:
        kind = self.quant_type(name)
        return {"F64": torch.float64, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                "I64": torch.int64}.get(kind, torch.float32)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in HF order and layout: dequantised to float32 (a fresh copy, not the memory map)."""
        t = self._tensor(name)
        types = self._gguf.GGMLQuantizationType
        try:
            if t.tensor_type in (types.F32, types.F64, types.I8, types.I16, types.I32, types.I64):
                data = np.array(t.data)  # (…, ne0), copied out of the read-only memory map
            else:
                data = self._gguf.quants.dequantize(t.data, t.tensor_type)  # (…, ne0) float32, a new array
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor '{t.name}' is {t.tensor_type.name}, which the installed "
                                  "gguf package cannot dequantise") from None
        except ValueError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{t.name}' ({one_line(e)})") from None
        w = torch.from_numpy(np.ascontiguousarray(data).reshape(self.shape(name)))
        if name in self._heads:
            try:
                w = unpermute_rows(w, self._heads[name])
            except ValueError as e:
                raise CheckpointError(f"{self.path}: tensor '{t.name}': {e}") from None
        return w
