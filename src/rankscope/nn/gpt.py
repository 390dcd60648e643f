"""GPT: a small LLaMA-style decoder (pre-norm RMSNorm, SwiGLU MLP, RoPE, no biases) with switchable attention.

One readable model in the style of nanoGPT's ``model.py``. The attention variant comes from
``ModelConfig.attention`` (``nn.attention``); ``attention_layers()`` gives the attention modules in layer order,
each with ``qk_chains()`` / ``ov_chains()`` for the probes. Device-agnostic; runs under
``torch.autocast("cuda", dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import InputError
from rankscope.nn.attention import MHA, MLA, RMSNorm, make_attention
from rankscope.nn.config import ModelConfig


class SwiGLU(nn.Module):
    """y = W_down (SiLU(W_gate x) ⊙ W_up x) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d)


class Block(nn.Module):
    """x ← x + Attn(RMSNorm(x)); x ← x + MLP(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = make_attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # (B, T, d)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Token embedding → ``n_layer`` blocks → RMSNorm → LM head (tied to the embedding by default).

    Init: every linear and embedding weight ~ N(0, init_std²); the residual output projections (attention
    ``o_proj``, MLP ``down_proj``) ~ N(0, init_std²/(2·n_layer)) (GPT-2); RMSNorm gains 1.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise InputError(f"GPT: expected a ModelConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        std, resid_std = self.config.init_std, self.config.init_std / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                    p.fill_(1.0)
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.normal_(0.0, resid_std)
                else:
                    p.normal_(0.0, std)

    @classmethod
    def from_run(cls, path: str | Path) -> GPT | None:
        """A rankscope run directory (its final or newest checkpoint) or one of its ``step_*.safetensors`` files as
        a model with those weights and saved buffers, in eval mode; None when ``path`` is not a run."""
        from rankscope.rundir import RunDir

        path = Path(path)
        run = RunDir(path) if path.is_dir() else RunDir.of_checkpoint(path)
        config = run.read_config() if run is not None else None
        if config is None:
            return None
        weights = run.newest_checkpoint() if path.is_dir() else path
        return run.load_weights(cls(ModelConfig.from_dict(config["model"])), weights).eval()

    def attention_layers(self) -> list[MHA | MLA]:
        """The attention modules in layer order (each has ``layer_idx``, ``qk_chains()``, ``ov_chains()``)."""
        return [block.attn for block in self.blocks]

    def num_parameters(self) -> int:
        """Number of parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, with ``targets`` (B, T), the mean next-token cross-entropy (targets −1 ignored)."""
        if idx.ndim != 2:
            raise InputError(f"GPT.forward: idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.config.max_seq_len:
            raise InputError(f"GPT.forward: sequence length {idx.shape[1]} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        x = self.wte(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss
