"""Probes against the models' own attention: the extracted chains must reproduce the logits q_h·k_h.

For every supported architecture a tiny random float64 model is built with transformers, its attention
weights re-drawn (so norm gains are not ones and heads differ), biases zeroed (forms exclude biases), and
one forward pass is run with hooks on the projection modules. Per layer and head we check, for every
token pair (i, j) of the hidden states x entering the attention (after the input layernorm):

1. logits: the model's own pre-RoPE projections give q_h(x_i)·k_h(x_j) = x_iᵀ B_h x_j, with B_h the chain
   multiplied out densely in float64 (rtol 1e-8); the layer form is the sum over heads.
2. ov: the model's own output projection applied to head h's value (other heads zero) = (Wo_h Wv_h) x_j.
3. attention probabilities (eager attention, ``output_attentions``; RoPE models at position_ids = 0 so the
   rotation is the identity): log p_ij − log p_i0 = scale·(s_ij − s_i0) with s from the chain and
   scale = 1/√(query–key head dim): an end-to-end check of the head split, the GQA grouping and the
   documented (excluded) softmax scale, independent of how the test slices heads. HF's eager softmax and
   RMSNorm run in float32 even in a float64 model, hence atol 1e-5 there. What a model adds to the scores
   outside the form is applied as the model documents it: Gemma2/3's scale 1/√query_pre_attn_scalar, Gemma2's
   softcap c·tanh(·/c), BLOOM's ALiBi bias (from transformers' own ``build_alibi_tensor``).

Fused q/k/v weights (Phi-3, GPT-NeoX, Falcon's three layouts, BLOOM) are split in the test as the model's own
forward splits them (Falcon's ``_split_heads``, BLOOM's ``_reshape``, the slicing of Phi-3 and GPT-NeoX).

q/k RMSNorm (Qwen3, Gemma3 over each head's dh dims; OLMo2 over the whole projection): the chain folds the gains,
so the model's q̂_h·k̂_h (hooked on its own ``q_norm``/``k_norm`` outputs) = x_iᵀ B_h x_j / (r_q(x_i)·r_k(x_j))
with r = √(mean((W x)²) + eps) over the normed dims, taken from the model's own projections; per head for
Qwen3/Gemma3, so their layer form is checked against Σ_h r_q,h·r_k,h·q̂_h·k̂_h. float32 norms: rtol 1e-6.

MLA: the latent RMSNorm divides by the per-token rms of the latent, r(x) = √(mean((Wx)²) + eps), which
the chain replaces by one constant ρ (the isotropic-input value ‖W‖_F/√rows, DESIGN §4). The chain is
exact up to that per-token scalar, so the test multiplies the chain's scores by ρq·ρkv / (rq(x_i)·rkv(x_j))
(content) and ρq / rq(x_i) (rope; the rope key is not normalised), with r taken from the model's own
down-projection outputs. The model normalises in float32, hence rtol 1e-6 for MLA. ``test_rho_is_the_
isotropic_latent_rms`` checks that ρ is the rms for isotropic inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankscope
from formtools import multiplied_out
from rankscope.errors import CheckpointError, InputError
from rankscope.probes import (
    NamedForm,
    detect_architecture,
    hf_forms,
    latent_rms_isotropic,
    mha_forms,
    multihead_attention_forms,
    stack_heads,
)


def _transformers():
    """The transformers package (a test dependency; the probes themselves do not import it)."""
    import transformers

    return transformers

T = 6  # tokens
VOCAB = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _reinit(model: nn.Module, gen: torch.Generator) -> None:
    """Attention weights ~ N(0, 0.3²), norm gains ~ U(0.5, 1.5), every bias zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "attn" not in name and "attention" not in name:
                continue
            elif "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


class Capture:
    """Forward hooks storing (input, output) of named submodules."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.out: dict[str, torch.Tensor] = {}  # the outputs as the model shaped them
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            x, y = args[0].detach(), output.detach()
            self.out[name] = y
            self.io[name] = (x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))  # batch of one → (T, ·)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """(T, n·dh) → (n, T, dh)."""
    return t.reshape(t.shape[0], n, -1).transpose(0, 1)


def _slot(v: torch.Tensor, h: int, n_heads: int) -> torch.Tensor:
    """Head h's values (T, dv) placed in a (T, n_heads·dv) tensor of zeros."""
    out = torch.zeros(v.shape[0], n_heads * v.shape[1], dtype=v.dtype)
    out[:, h * v.shape[1]:(h + 1) * v.shape[1]] = v
    return out


def _ov(o_module: nn.Module, v: torch.Tensor, H: int) -> torch.Tensor:
    """(H, T, d): the model's output projection of each head's values alone."""
    with torch.no_grad():
        return torch.stack([o_module(_slot(v[h], h, H)) for h in range(H)])


# ---- per-family extraction of the model's own q·k, OV outputs and chain corrections -----------------

def _mha_layer(x, q, k, v, o_module, H, H_kv):
    rep = H // H_kv
    q, k, v = _heads(q, H), _heads(k, H_kv), _heads(v, H_kv)
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # query head h uses KV group h // rep
    ones = torch.ones(T, T, dtype=torch.float64)
    return {
        "x": x,
        "logits": {"qk": q @ k.mT},  # (H, T, T)
        "corr": {"qk": ones},
        "ov": _ov(o_module, v, H),
        "ov_corr": torch.ones(T, dtype=torch.float64),
    }


def _layer_bert(model, cap, i, cfg):
    a = f"encoder.layer.{i}.attention."
    x, q = cap.io[a + "self.query"]
    H = cfg.num_attention_heads
    return _mha_layer(x, q, cap.io[a + "self.key"][1], cap.io[a + "self.value"][1],
                      model.get_submodule(a + "output.dense"), H, H)


def _layer_gpt2(model, cap, i, cfg):
    x, qkv = cap.io[f"h.{i}.attn.c_attn"]
    q, k, v = qkv.split(cfg.n_embd, dim=-1)
    return _mha_layer(x, q, k, v, model.get_submodule(f"h.{i}.attn.c_proj"), cfg.n_head, cfg.n_head)


def _layer_llama(model, cap, i, cfg):
    a = f"layers.{i}.self_attn."
    x, q = cap.io[a + "q_proj"]
    return _mha_layer(x, q, cap.io[a + "k_proj"][1], cap.io[a + "v_proj"][1], model.get_submodule(a + "o_proj"),
                      cfg.num_attention_heads, cfg.num_key_value_heads)


def _rms(c: torch.Tensor, eps: float) -> torch.Tensor:
    return (c.pow(2).mean(-1) + eps).sqrt()


def _layer_mla(model, cap, i, cfg):
    a = f"layers.{i}.self_attn."
    attn = model.get_submodule(a[:-1])
    H, dn, dc = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank is not None:
        x, cq = cap.io[a + "q_a_proj"]
        q = cap.io[a + "q_b_proj"][1]
        rq = _rms(cq, attn.q_a_layernorm.variance_epsilon)  # (T,)
        rho_q = latent_rms_isotropic(attn.q_a_proj.weight)
        q_corr = rho_q / rq
    else:
        x, q = cap.io[a + "q_proj"]
        q_corr = torch.ones(T, dtype=torch.float64)
    ckv_kr = cap.io[a + "kv_a_proj_with_mqa"][1]
    ckv, kr = ckv_kr[:, :dc], ckv_kr[:, dc:]  # (T, dc), (T, dr): pre-RoPE
    rkv = _rms(ckv, attn.kv_a_layernorm.variance_epsilon)
    kv_corr = latent_rms_isotropic(attn.kv_a_proj_with_mqa.weight[:dc]) / rkv
    kv = _heads(cap.io[a + "kv_b_proj"][1], H)  # (H, T, dn + dv)
    q = _heads(q, H)  # (H, T, dn + dr)
    content = q[..., :dn] @ kv[..., :dn].mT  # (H, T, T)
    rope = q[..., dn:] @ kr.mT  # (H, T, T): one rope key for all heads
    c_corr, r_corr = q_corr[:, None] * kv_corr[None, :], q_corr[:, None].expand(T, T)
    return {
        "x": x,
        "logits": {"qk_content": content, "qk_rope": rope, "qk": content + rope},
        "corr": {"qk_content": c_corr, "qk_rope": r_corr, "qk": None},  # qk: content and rope corrected apart
        "ov": _ov(attn.o_proj, kv[..., dn:], H),
        "ov_corr": kv_corr,
    }


def _chain_scores(x, form, kind, corr, forms_by_key, layer, head):
    """x_iᵀ B x_j times the per-token correction: (T, T) for every head, or (H, T, T) one per head (head ≥ 0)."""
    if kind == "qk" and corr["qk"] is None:  # MLA: the two blocks carry different per-token corrections
        return sum(_chain_scores(x, forms_by_key[(layer, head, k)].form, k, corr, forms_by_key, layer, head)
                   for k in ("qk_content", "qk_rope"))
    c = corr[kind]
    return (x @ multiplied_out(form) @ x.mT) * (c[head] if c.ndim == 3 else c)


def _normed(cap, name: str, heads_first: bool) -> torch.Tensor:
    """A q/k norm's output as (T, n·dh): from (1, T, n, dh) or (1, T, n·dh), or (1, n, T, dh) if ``heads_first``."""
    y = cap.out[name][0]
    return (y.transpose(0, 1) if heads_first else y).reshape(T, -1)


def _qk_norm_layer(model, cap, i, cfg, per_head: bool, heads_first: bool = False):
    """Qwen3 / Gemma3 (``per_head``: RMSNorm over each head's dh dims) and OLMo2 (over all heads jointly)."""
    a = f"layers.{i}.self_attn."
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    x, q = cap.io[a + "q_proj"]
    k, v = cap.io[a + "k_proj"][1], cap.io[a + "v_proj"][1]
    q_hat, k_hat = _normed(cap, a + "q_norm", heads_first), _normed(cap, a + "k_norm", heads_first)  # (T, n·dh)
    got = _mha_layer(x, q_hat, k_hat, v, model.get_submodule(a + "o_proj"), H, H_kv)
    eps = cfg.rms_norm_eps
    if per_head:
        rq = _rms(_heads(q, H), eps)  # (H, T)
        rk = _rms(_heads(k, H_kv), eps).repeat_interleave(H // H_kv, 0)  # (H, T): query head h's KV group
        got["corr"] = {"qk": 1 / (rq[:, :, None] * rk[:, None, :])}  # (H, T, T)
    else:
        got["corr"] = {"qk": 1 / (_rms(q, eps)[:, None] * _rms(k, eps)[None, :])}  # (T, T), shared by the heads
    return got


def _layer_qwen3(model, cap, i, cfg):
    return _qk_norm_layer(model, cap, i, cfg, per_head=True)


def _layer_olmo2(model, cap, i, cfg):
    return _qk_norm_layer(model, cap, i, cfg, per_head=False)


def _layer_gemma(model, cap, i, cfg):
    """Gemma2 (no q/k norm) and Gemma3 (per-head q/k norm, gains 1 + g): scale 1/√query_pre_attn_scalar, Gemma2's
    softcap c·tanh(scale·s/c)."""
    if cfg.model_type == "gemma3_text":  # Gemma3 norms q, k after moving the heads first: (1, H, T, dh)
        got = _qk_norm_layer(model, cap, i, cfg, per_head=True, heads_first=True)
    else:
        got = _layer_llama(model, cap, i, cfg)
    scale, cap_c = cfg.query_pre_attn_scalar ** -0.5, cfg.attn_logit_softcapping
    got["softmax_logits"] = ((lambda h, s: scale * s) if cap_c is None else
                             (lambda h, s: cap_c * torch.tanh(scale * s / cap_c)))
    return got


def _layer_phi3(model, cap, i, cfg):
    a = f"layers.{i}.self_attn."
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = cfg.hidden_size // H
    x, qkv = cap.io[a + "qkv_proj"]
    q, k, v = qkv[:, :H * dh], qkv[:, H * dh:(H + H_kv) * dh], qkv[:, (H + H_kv) * dh:]  # as Phi3Attention slices
    return _mha_layer(x, q, k, v, model.get_submodule(a + "o_proj"), H, H_kv)


def _layer_opt(model, cap, i, cfg):
    a = f"decoder.layers.{i}.self_attn."
    x, q = cap.io[a + "q_proj"]  # before OPT's q·dh^-½
    H = cfg.num_attention_heads
    return _mha_layer(x, q, cap.io[a + "k_proj"][1], cap.io[a + "v_proj"][1], model.get_submodule(a + "out_proj"),
                      H, H)


def _layer_gpt_neox(model, cap, i, cfg):
    a = f"layers.{i}.attention."
    H = cfg.num_attention_heads
    x, qkv = cap.io[a + "query_key_value"]
    q, k, v = (t.reshape(T, -1) for t in qkv.view(T, H, -1).chunk(3, dim=-1))  # as GPTNeoXAttention splits
    return _mha_layer(x, q, k, v, model.get_submodule(a + "dense"), H, H)


def _layer_gptj(model, cap, i, cfg):
    a = f"h.{i}.attn."
    x, q = cap.io[a + "q_proj"]
    H = cfg.num_attention_heads
    return _mha_layer(x, q, cap.io[a + "k_proj"][1], cap.io[a + "v_proj"][1], model.get_submodule(a + "out_proj"),
                      H, H)


def _layer_falcon(model, cap, i, cfg):
    a = f"h.{i}.self_attention"
    x, qkv = cap.io[a + ".query_key_value"]
    q, k, v = model.get_submodule(a)._split_heads(qkv[None])  # the model's own split: (1, T, n, dh) each
    q, k, v = (t[0].reshape(T, -1) for t in (q, k, v))
    H = cfg.num_attention_heads
    return _mha_layer(x, q, k, v, model.get_submodule(a + ".dense"), H, k.shape[1] // (cfg.hidden_size // H))


def _layer_bloom(model, cap, i, cfg):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    a = f"h.{i}.self_attention"
    x, qkv = cap.io[a + ".query_key_value"]
    attn = model.get_submodule(a)
    q, k, v = (t[0].transpose(0, 1).reshape(T, -1) for t in attn._reshape(qkv[None]))  # (1, H, T, dh) → (T, H·dh)
    H = cfg.num_attention_heads
    got = _mha_layer(x, q, k, v, attn.dense, H, H)
    alibi = build_alibi_tensor(torch.ones(1, T), H, torch.float64)  # (H, 1, T): slope_h · j, added to the scores
    got["softmax_logits"] = lambda h, s: attn.inv_norm_factor * s + alibi[h]
    return got


# ---- the models ---------------------------------------------------------------------------------------

COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=16, attn_implementation="eager")
MLA_COMMON = dict(COMMON, hidden_size=24, num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=8,
                  qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3, first_k_dense_replace=2,
                  moe_intermediate_size=8, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1)

NEOX_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
FALCON = dict(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=16, num_attention_heads=4, alibi=False,
              attn_implementation="eager")

CASES = {
    "bert": ("BertModel", "BertConfig", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
             _layer_bert, False),
    "roberta": ("RobertaModel", "RobertaConfig", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                _layer_bert, False),
    "gpt2": ("GPT2Model", "GPT2Config", dict(vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=4, n_positions=16,
                                             bos_token_id=0, eos_token_id=0, attn_implementation="eager",
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             _layer_gpt2, False),
    "llama_gqa": ("LlamaModel", "LlamaConfig", dict(COMMON, hidden_size=24, num_attention_heads=6,
                                                    num_key_value_heads=2, head_dim=6), _layer_llama, True),
    "mistral_mqa": ("MistralModel", "MistralConfig", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                                          num_key_value_heads=1), _layer_llama, True),
    "qwen2_bias": ("Qwen2Model", "Qwen2Config", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                                     num_key_value_heads=2), _layer_llama, True),
    "mixtral": ("MixtralModel", "MixtralConfig", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                                      num_key_value_heads=2, num_local_experts=2,
                                                      num_experts_per_tok=1, experts_implementation="eager"),
                _layer_llama, True),
    "qwen2_moe": ("Qwen2MoeModel", "Qwen2MoeConfig", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                                         num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                                                         moe_intermediate_size=8, shared_expert_intermediate_size=8,
                                                         experts_implementation="eager"),
                  _layer_llama, True),
    "qwen3": ("Qwen3Model", "Qwen3Config", dict(COMMON, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=6), _layer_qwen3, True),
    "gemma": ("GemmaModel", "GemmaConfig", dict(COMMON, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=6), _layer_llama, True),
    "gemma2_softcap": ("Gemma2Model", "Gemma2Config", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                                           num_key_value_heads=2, head_dim=6, query_pre_attn_scalar=5,
                                                           attn_logit_softcapping=2.0), _layer_gemma, True),
    "gemma3_text": ("Gemma3TextModel", "Gemma3TextConfig", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                                                num_key_value_heads=2, head_dim=6,
                                                                query_pre_attn_scalar=5), _layer_gemma, True),
    "phi3": ("Phi3Model", "Phi3Config", dict(COMMON, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                             pad_token_id=0), _layer_phi3, True),
    "olmo2": ("Olmo2Model", "Olmo2Config", dict(COMMON, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                                pad_token_id=0, eos_token_id=0), _layer_olmo2, True),
    "opt": ("OPTModel", "OPTConfig", dict(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=16, num_attention_heads=4,
                                          ffn_dim=16, word_embed_proj_dim=16, max_position_embeddings=16, dropout=0.0,
                                          attention_dropout=0.0, attn_implementation="eager"), _layer_opt, False),
    "gpt_neox": ("GPTNeoXModel", "GPTNeoXConfig", dict(COMMON, hidden_size=16, num_attention_heads=4,
                                                       rope_parameters=NEOX_ROPE, bos_token_id=0, eos_token_id=0),
                 _layer_gpt_neox, True),
    "gptj": ("GPTJModel", "GPTJConfig", dict(vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=4, rotary_dim=2,
                                             n_positions=16, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                             embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager"),
             _layer_gptj, True),
    "falcon_mqa": ("FalconModel", "FalconConfig", dict(FALCON, multi_query=True), _layer_falcon, True),
    "falcon_gqa": ("FalconModel", "FalconConfig", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2),
                   _layer_falcon, True),
    "falcon_mha": ("FalconModel", "FalconConfig", dict(FALCON, multi_query=False), _layer_falcon, True),
    "bloom": ("BloomModel", "BloomConfig", dict(vocab_size=VOCAB, n_layer=2, hidden_size=16, n_head=4,
                                                attn_implementation="eager", hidden_dropout=0.0, attention_dropout=0.0),
              _layer_bloom, False),
    "deepseek_v2": ("DeepseekV2Model", "DeepseekV2Config", dict(MLA_COMMON, q_lora_rank=10), _layer_mla, True),
    "deepseek_v2_no_q_lora": ("DeepseekV2Model", "DeepseekV2Config", dict(MLA_COMMON, q_lora_rank=None),
                              _layer_mla, True),
    "deepseek_v3": ("DeepseekV3Model", "DeepseekV3Config", dict(MLA_COMMON, q_lora_rank=10, n_group=1, topk_group=1),
                    _layer_mla, True),
}


def _build(case: str):
    model_name, config_name, kwargs, layer_fn, rope = CASES[case]
    transformers = _transformers()
    cfg = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).double().eval()
    _reinit(model, torch.Generator().manual_seed(1))
    return model, cfg, layer_fn, rope


def _hooked_names(model) -> list[str]:
    leaves = ("query", "key", "value", "c_attn", "q_proj", "k_proj", "v_proj", "q_a_proj", "q_b_proj",
              "kv_a_proj_with_mqa", "kv_b_proj", "qkv_proj", "query_key_value", "q_norm", "k_norm")
    return [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves]


@pytest.mark.parametrize("case", list(CASES))
def test_chains_reproduce_attention_logits(case):
    model, cfg, layer_fn, rope = _build(case)
    mla = layer_fn is _layer_mla
    cap = Capture(model, _hooked_names(model))
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    extra = {"position_ids": torch.zeros(1, T, dtype=torch.long)} if rope else {}
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, **extra)
    cap.remove()

    forms = list(hf_forms(cfg, model.state_dict()))
    by_key = {f.key: f for f in forms}
    H = cfg.num_attention_heads
    kinds = ("qk", "qk_content", "qk_rope", "ov") if mla else ("qk", "ov")
    assert sorted(by_key) == sorted((i, h, k) for i in range(2) for h in range(-1, H) for k in kinds)
    normed = any(n.endswith(("q_norm", "k_norm")) for n in cap.io)  # float32 RMSNorm on q, k
    rtol = 1e-6 if mla or normed else 1e-8
    causal = case not in ("bert", "roberta")
    dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim if mla else (getattr(cfg, "head_dim", None) or
                                                                     cfg.hidden_size // H)
    scale = dqk ** -0.5
    for i in range(2):
        got = layer_fn(model, cap, i, cfg)
        x = got["x"]  # (T, d): the hidden state entering the attention
        for kind in kinds:
            for h in range(-1, H):
                nf = by_key[(i, h, kind)]
                if kind == "ov":
                    want = got["ov"].sum(0) if h < 0 else got["ov"][h]  # (T, d)
                    have = (x @ multiplied_out(nf.form).mT) * got["ov_corr"][:, None]
                elif h < 0 and got["corr"][kind] is not None and got["corr"][kind].ndim == 3:
                    want = (got["logits"][kind] / got["corr"][kind]).sum(0)  # per-head corrections undone, summed
                    have = x @ multiplied_out(nf.form) @ x.mT
                else:
                    want = got["logits"][kind].sum(0) if h < 0 else got["logits"][kind][h]  # (T, T)
                    have = _chain_scores(x, nf.form, kind, got["corr"], by_key, i, h)
                where = f"{case} layer {i} head {h} {kind}"
                torch.testing.assert_close(have, want, rtol=rtol, atol=rtol * want.abs().max().item(),
                                           msg=lambda m, where=where: f"{where}: {m}")
        # the model's own attention probabilities: log p_ij − log p_i0 = z_ij − z_i0, z = scale·s (+ what the model
        # adds outside the form: softcap, ALiBi)
        logp = out.attentions[i][0].log()  # (H, T, T)
        logits = got.get("softmax_logits", lambda h, s: scale * s)
        for h in range(H):
            z = logits(h, _chain_scores(x, by_key[(i, h, "qk")].form, "qk", got["corr"], by_key, i, h))
            want = logp[h] - logp[h][:, :1]
            have = z - z[:, :1]
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool)) if causal else torch.ones(T, T, dtype=torch.bool)
            where = f"{case} layer {i} head {h} attention probabilities"
            torch.testing.assert_close(have[mask], want[mask], rtol=0, atol=1e-5,
                                       msg=lambda m, where=where: f"{where}: {m}")


KV_HEADS = {  # H_kv as each model's attention module reads it from its config (default: num_key_value_heads, else H)
    "falcon_mqa": lambda cfg: 1,  # multi_query: one key and one value head
    "falcon_gqa": lambda cfg: cfg.num_kv_heads,  # new_decoder_architecture
    "falcon_mha": lambda cfg: cfg.num_attention_heads,
}


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_mqa", "deepseek_v2", "bert", "qwen3", "gemma3_text", "olmo2",
                                  "phi3", "gpt_neox", "falcon_mqa", "falcon_gqa", "falcon_mha", "bloom"])
def test_metadata_and_honest_shapes(case):
    model, cfg, _, _ = _build(case)
    forms = list(hf_forms(cfg, model.state_dict()))
    H = cfg.num_attention_heads
    if case.startswith("deepseek"):
        dc, dr, dn, dq = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.q_lora_rank
        assert {f.variant for f in forms} == {"mla_decoupled"}
        assert {f.kv_cache_floats for f in forms} == {dc + dr}
        head = next(f for f in forms if f.key == (0, 1, "qk_content"))
        assert [tuple(t.shape) for t in head.form.factors] == [(24, dq), (dq, dn), (dn, dc), (dc, 24)]
        rope = next(f for f in forms if f.key == (0, -1, "qk_rope"))
        assert [tuple(t.shape) for t in rope.form.factors] == [(24, dq), (dq, dr), (dr, 24)]  # rank ≤ dr, honestly
        full = next(f for f in forms if f.key == (0, 1, "qk"))  # Wdqᵀ · (content + rope): one shared Wdq
        assert tuple(full.form.left.factors[0].shape) == (24, dq) and full.form.rank_bound == min(dq, dn + dr)
    else:
        H_kv = KV_HEADS[case](cfg) if case in KV_HEADS else (getattr(cfg, "num_key_value_heads", None) or H)
        d, dh = cfg.hidden_size, getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        want = {H_kv: "mha"} if H_kv == H else {H_kv: "mqa" if H_kv == 1 else "gqa"}
        assert {f.variant for f in forms} == {want[H_kv]}
        assert {f.kv_cache_floats for f in forms} == {2 * H_kv * dh}
        layer = next(f for f in forms if f.key == (1, -1, "qk"))
        assert layer.form.factors[0].shape[1] == H_kv * dh  # the layer's inner width is its rank bound
        assert torch.linalg.matrix_rank(multiplied_out(layer.form)) == min(H_kv * dh, cfg.hidden_size)
        for kind in ("qk", "ov"):  # a head: (d, dh) @ (dh, d), its key/value factor shared by all heads under MQA
            head = next(f for f in forms if f.key == (1, H - 1, kind)).form
            assert [tuple(t.shape) for t in head.factors] == [(d, dh), (dh, d)]
            assert head.shared == ({1} if H_kv == 1 else set())
    # the per-head forms batch for diagnose_batch and agree with one-by-one diagnoses
    per_head = [f for f in forms if f.layer == 0 and f.kind == "qk" and f.head >= 0]
    batch = rankscope.diagnose_batch(stack_heads(per_head), fpr=0.1, draws=60)
    assert len(batch) == H
    for d, f in zip(batch, per_head, strict=True):
        want = torch.linalg.svdvals(multiplied_out(f.form))[: d.rank] ** 2
        torch.testing.assert_close(d.eigenvalues, want, rtol=1e-8, atol=1e-10 * d.lambda_max)


def test_multihead_attention_module():
    torch.manual_seed(3)
    for kdim in (None, 6):  # packed in_proj_weight, and separate q/k/v weights for a 6-dim key/value input
        mha = nn.MultiheadAttention(8, 2, bias=False, kdim=kdim, vdim=kdim).double().eval()
        x = torch.randn(T, 8, dtype=torch.float64)
        y = x if kdim is None else torch.randn(T, kdim, dtype=torch.float64)
        with torch.no_grad():
            _, p = mha(x, y, y, need_weights=True, average_attn_weights=False)  # (H, T, T)
        forms = {f.key: f for f in multihead_attention_forms(mha, layer=3)}
        assert sorted(forms) == sorted((3, h, k) for h in (-1, 0, 1) for k in ("qk", "ov"))
        if kdim is None:
            wq, wk, wv = mha.in_proj_weight.detach().split(8)
        else:
            wq, wk, wv = mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()
        q, k, v = _heads(x @ wq.T, 2), _heads(y @ wk.T, 2), _heads(y @ wv.T, 2)  # (H, T, 4)
        ov = _ov(mha.out_proj, v, 2)
        for h in range(2):
            s = x @ multiplied_out(forms[(3, h, "qk")].form) @ y.T
            torch.testing.assert_close(s, q[h] @ k[h].T, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(0.5 * (s - s[:, :1]), p[h].log() - p[h].log()[:, :1], rtol=0, atol=1e-10)
            torch.testing.assert_close(y @ multiplied_out(forms[(3, h, "ov")].form).T, ov[h], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(x @ multiplied_out(forms[(3, -1, "qk")].form) @ y.T, (q @ k.mT).sum(0), rtol=1e-8,
                                   atol=1e-12)
        assert {f.kv_cache_floats for f in forms.values()} == {16}


def test_rho_is_the_isotropic_latent_rms():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(8, 24, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    x = torch.randn(200_000, 24, generator=gen, dtype=torch.float64)
    mean_square = (x @ w.T).pow(2).mean()  # E[rms(Wx)²] over isotropic x
    assert latent_rms_isotropic(w) ** 2 == pytest.approx(mean_square.item(), rel=0.01)


def test_chain_algebra_mla():
    """The documented factorisation multiplies to (Wuq_h·Dq·Wdq/ρq)ᵀ (Wuk_h·Dkv·Wdkv/ρkv) + (Wqr_h·Dq·Wdq/ρq)ᵀ Wkr."""
    from rankscope.probes import MLAWeights, mla_forms

    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    H, dn, dr, dv, dc, dq, d = 2, 3, 2, 4, 5, 6, 7
    wdq, dqg, wqb, wkva = r(dq, d), r(dq), r(H * (dn + dr), dq), r(dc + dr, d)
    dkv, wkvb, wo = r(dc), r(H * (dn + dv), dc), r(d, H * dv)
    weights = MLAWeights(n_heads=H, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, kv_a=wkva,
                         kv_a_norm=dkv, kv_b=wkvb, wo=wo, q_a=wdq, q_a_norm=dqg, q_b=wqb, rho_q=2.0, rho_kv=3.0)
    forms = {f.key: f.form for f in mla_forms(0, weights)}
    wdkv, wkr = wkva[:dc], wkva[dc:]
    total = 0
    for h in range(H):
        qb, kb = wqb[h * (dn + dr):(h + 1) * (dn + dr)], wkvb[h * (dn + dv):(h + 1) * (dn + dv)]
        q_lat, k_lat = torch.diag(dqg) @ wdq / 2.0, torch.diag(dkv) @ wdkv / 3.0
        content = (qb[:dn] @ q_lat).T @ (kb[:dn] @ k_lat)
        rope = (qb[dn:] @ q_lat).T @ wkr
        torch.testing.assert_close(multiplied_out(forms[(0, h, "qk_content")]), content)
        torch.testing.assert_close(multiplied_out(forms[(0, h, "qk_rope")]), rope)
        torch.testing.assert_close(multiplied_out(forms[(0, h, "qk")]), content + rope)
        torch.testing.assert_close(multiplied_out(forms[(0, h, "ov")]), wo[:, h * dv:(h + 1) * dv] @ kb[dn:] @ k_lat)
        total = total + content + rope
    torch.testing.assert_close(multiplied_out(forms[(0, -1, "qk")]), total)


def test_layout_edge_cases():
    cfg = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1}
    g = torch.Generator().manual_seed(6)
    layer = {"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (8, 8)}
    sd = {f"model.layers.{i}.self_attn.{n}.weight": torch.randn(*s, generator=g)
          for i in (10, 2, 9) for n, s in layer.items()}
    sd["lm_head.weight"] = torch.randn(3, 8, generator=g)
    forms = list(hf_forms(cfg, sd, heads=False, kinds=["qk"]))
    assert [f.layer for f in forms] == [2, 9, 10]  # numeric, not lexical, order
    assert all(f.head == -1 and f.kind == "qk" and f.variant == "mqa" for f in forms)
    assert isinstance(forms[0], NamedForm)
    assert detect_architecture(cfg) == "llama"
    assert detect_architecture(_transformers().GPT2Config(n_layer=1, n_embd=8, n_head=2)) == "gpt2"
    assert detect_architecture({"model_type": "mamba"}) is None
    with pytest.raises(InputError, match="mamba"):
        list(hf_forms({"model_type": "mamba"}, sd))
    two_towers = {**sd, **{k.replace("model.", "vision.", 1): v for k, v in sd.items() if k.startswith("model.")}}
    with pytest.raises(InputError, match="prefix"):
        list(hf_forms(cfg, two_towers))
    assert len(list(hf_forms(cfg, two_towers, prefix="vision", heads=False))) == 6
    del sd["model.layers.9.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.self_attn\.k_proj\.weight"):
        list(hf_forms(cfg, sd))


def test_fp8_block_dequantisation():
    """DeepSeek-V3 checkpoints store FP8 weights with one inverse scale per 128×128 block."""
    from rankscope.probes.layouts import _weight

    g = torch.Generator().manual_seed(7)
    w8 = (torch.randn(200, 130, generator=g) * 10).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2, generator=g) + 0.5
    got = _weight({"a.weight": w8, "a.weight_scale_inv": scale}, "a.weight", {})
    assert got[127, 127] == w8[127, 127].double() * scale[0, 0].double()
    assert got[128, 5] == w8[128, 5].double() * scale[1, 0].double()
    assert got[199, 129] == w8[199, 129].double() * scale[1, 1].double()
    with pytest.raises(CheckpointError, match="weight_scale_inv"):
        _weight({"a.weight": w8}, "a.weight", {})


def test_mha_forms_rejects_bad_shapes():
    with pytest.raises(InputError, match="KV groups"):
        list(mha_forms(0, torch.zeros(12, 8), torch.zeros(8, 8), None, None, n_heads=3, n_kv_heads=2))
    with pytest.raises(InputError, match="query weight has 8 head rows"):
        list(mha_forms(0, torch.zeros(8, 8), torch.zeros(8, 8), None, None, n_heads=2, n_kv_heads=1))
    assert math.isfinite(latent_rms_isotropic(torch.ones(2, 3)))


def test_fused_and_normed_layout_errors():
    """Falcon's layout flags default as FalconConfig's do; wrong fused or norm shapes name the parameter."""
    from rankscope.probes import LAYOUTS

    falcon_defaults = _transformers().FalconConfig()
    for key, default, _ in LAYOUTS["falcon"].choices:
        assert getattr(falcon_defaults, key) is default
    g = torch.Generator().manual_seed(8)
    cfg = {"model_type": "falcon", "hidden_size": 8, "num_attention_heads": 2}  # config.json without the flags
    mqa = {f"transformer.h.{i}.self_attention.{n}.weight": torch.randn(*s, generator=g)
           for i in (0, 1) for n, s in (("query_key_value", (8 + 2 * 4, 8)), ("dense", (8, 8)))}
    assert {f.variant for f in hf_forms(cfg, mqa)} == {"mqa"}
    with pytest.raises(CheckpointError, match=r"h\.0\.self_attention\.query_key_value\.weight is \(16, 8\), "
                                              r"expected \(24, 8\)"):
        list(hf_forms({**cfg, "new_decoder_architecture": True, "num_kv_heads": None}, mqa))  # null: H KV heads
    qwen3 = {"model_type": "qwen3", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 4}
    sd = {f"model.layers.0.self_attn.{n}.weight": torch.randn(*s, generator=g)
          for n, s in (("q_proj", (8, 8)), ("k_proj", (4, 8)), ("v_proj", (4, 8)), ("o_proj", (8, 8)),
                       ("q_norm", (4,)), ("k_norm", (8,)))}
    with pytest.raises(CheckpointError, match=r"k_norm\.weight is \(8,\), expected \(4,\)"):
        list(hf_forms(qwen3, sd))
    phi3 = {"model_type": "phi3", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1}
    sd = {"layers.0.self_attn.qkv_proj.weight": torch.randn(24, 8, generator=g),
          "layers.0.self_attn.o_proj.weight": torch.randn(8, 8, generator=g)}
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight is \(24, 8\), expected \(16, 8\)"):
        list(hf_forms(phi3, sd))
