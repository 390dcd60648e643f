"""rankscope.nn against independent computations.

Chains vs the module's own attention: every attention module is run in float64 on N random tokens, each its
own sequence of length 1 (position 0, so every RoPE — on x, on q/k or on the rope key — is the identity),
and the q, k, v actually handed to ``scaled_dot_product_attention`` are captured. The logits q_h(x_i)·k_h(x_j)
of every token pair must equal x_iᵀ B_h x_j with B_h the ``qk_chains`` form multiplied out densely, per head
and for the layer sum (rtol 1e-10). MLA's latent RMSNorm divides each token by its own rms
r(x) = √(mean((W x)²) + eps); the test sets the ρ buffers to 1, so the chain holds D·W, and divides the chain
scores by the per-token r computed here from the module's weights: content by r_q(x_i)·r_kv(x_j), rope by
r_q(x_i) (the rope key is not normalised). The OV chains are checked the same way against the module's own
output (T = 1: a token attends only to itself, so the output is Wo v).

Parameter counts are compared with ``sum(p.numel())`` of the instantiated model; KV-cache floats with the
DESIGN §4 formulas written out here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formtools import multiplied_out
from rankscope.errors import InputError
from rankscope.nn import GPT, ModelConfig, describe, make_attention, parameter_count_formula, summary_table
from rankscope.nn.attention import Rotary
from rankscope.probes import latent_rms_isotropic, native_forms
from rankscope.vocab import variant_of

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(vocab_size=32, n_layer=2, d_model=24, n_head=4, kv_lora_rank=8, qk_rope_dim=4, max_seq_len=16)
CASES = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa"),
    "mqa": dict(attention="mqa"),
    "mha_decoupled": dict(attention="mha_decoupled"),
    "mla_prerope_input": dict(attention="mla_prerope", rope_mode="input"),
    "mla_prerope_coupled": dict(attention="mla_prerope", rope_mode="coupled"),
    "mla_prerope_q_lora": dict(attention="mla_prerope", rope_mode="input", q_lora_rank=10),
    "mla_decoupled": dict(attention="mla_decoupled"),
    "mla_decoupled_q_lora": dict(attention="mla_decoupled", q_lora_rank=10),
}


def small(case: str, **kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **CASES[case], **kw})


def _reinit(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 0.3²), norm gains ~ U(0.5, 1.5): heads differ and the latent gains are not ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _run_captured(attn, x, monkeypatch):
    """The module's output and the (q, k, v) it passed to scaled_dot_product_attention."""
    seen = {}
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen["qkv"] = (q.detach(), k.detach(), v.detach())
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        y = attn(x)
    monkeypatch.undo()
    return y, seen["qkv"]


def _rms_rows(w: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token rms √(mean((W x)²) + eps) of the latent W x, (N,)."""
    return ((x @ w.detach().double().mT).pow(2).mean(-1) + eps).sqrt()


def _setup(case: str, monkeypatch, n_tokens: int = 7):
    cfg = small(case)
    attn = make_attention(cfg, layer_idx=3).double().eval()
    _reinit(attn, seed=1)
    x = torch.randn(n_tokens, 1, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, (q, k, v) = _run_captured(attn, x, monkeypatch)  # q, k: (N, H, 1, ·), one token per sequence
    x = x[:, 0]  # (N, d)
    one = torch.ones(n_tokens, dtype=torch.float64)
    r_q, r_kv = one, one
    if cfg.is_mla:
        attn.rho_kv.fill_(1.0)
        r_kv = _rms_rows(attn.kv_a_proj.weight[: cfg.kv_lora_rank], x, cfg.norm_eps)
        if attn.compressed_q:
            attn.rho_q.fill_(1.0)
            r_q = _rms_rows(attn.q_a_proj.weight, x, cfg.norm_eps)
    return cfg, attn, x, y, q[:, :, 0], k[:, :, 0], v[:, :, 0], r_q, r_kv


@pytest.mark.parametrize("case", CASES)
def test_qk_chains_reproduce_the_modules_logits(case, monkeypatch):
    cfg, attn, x, _, q, k, _, r_q, r_kv = _setup(case, monkeypatch)
    logits = torch.einsum("ihe,jhe->hij", q, k)  # (H, N, N): the module's own q_h(x_i)·k_h(x_j)
    content_corr = 1 / (r_q[:, None] * r_kv[None, :])  # (N, N)
    rope_corr = (1 / r_q[:, None]).expand_as(content_corr)
    forms = {f.key: f for f in attn.qk_chains()}
    dr = cfg.rope_dim

    def scores(chain, corr):
        return (x @ multiplied_out(chain) @ x.mT) * corr

    def from_form(head: int) -> torch.Tensor:
        form = forms[(3, head, "qk")].form
        if dr:  # decoupled: a sum of two chains, content and rope, each with its own per-token correction
            content, rope = form.terms()  # each term's factors, the shared Wdq (if any) included
            assert torch.equal(multiplied_out(content), multiplied_out(forms[(3, head, "qk_content")].form))
            assert torch.equal(multiplied_out(rope), multiplied_out(forms[(3, head, "qk_rope")].form))
            return scores(content, content_corr) + scores(rope, rope_corr)
        return scores(form, content_corr)

    for h in range(cfg.n_head):
        torch.testing.assert_close(from_form(h), logits[h], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(from_form(-1), logits.sum(0), rtol=1e-10, atol=1e-10)
    if dr:  # the rope block alone: the module's rope dims of q and k
        rope_logits = torch.einsum("ihe,jhe->hij", q[..., -dr:], k[..., -dr:])
        for h in range(cfg.n_head):
            torch.testing.assert_close(scores(forms[(3, h, "qk_rope")].form, rope_corr), rope_logits[h],
                                       rtol=1e-10, atol=1e-10)
    expected_kinds = {"qk", "qk_content", "qk_rope"} if dr else {"qk"}
    assert {f.kind for f in forms.values()} == expected_kinds
    assert {f.head for f in forms.values()} == {-1, *range(cfg.n_head)}
    assert all(f.variant == variant_of(cfg.attention, cfg.rope_mode) and f.layer == 3 for f in forms.values())
    assert all(f.kv_cache_floats == cfg.kv_cache_floats_per_layer() for f in forms.values())


@pytest.mark.parametrize("case", CASES)
def test_offset_forms_reproduce_the_modules_logits_at_every_offset(case, monkeypatch):
    """One float64 sequence of T tokens: the module's own q_i·k_j (RoPE at positions i and j applied by the module)
    equals x_iᵀ B_h(Δ) x_j with Δ = j − i and B_h(Δ) = ``qk_chains(offset=Δ)`` multiplied out; for PreRoPE-input the
    rotation acts on the token, so the score is x_iᵀ R_iᵀ B(Δ) R_i x_j (R_i: RoPE over d at position i)."""
    from rankscope.attention_forms import rope_matrix

    cfg = small(case)
    T = 6
    attn = make_attention(cfg, layer_idx=1).double().eval()
    _reinit(attn, seed=4)
    x = torch.randn(1, T, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, (q, k, _) = _run_captured(attn, x, monkeypatch)  # (1, H, T, ·)
    q, k, x = q[0], k[0], x[0]  # (H, T, ·), (H, T, ·), (T, d)
    rope_input = cfg.attention == "mla_prerope" and cfg.rope_mode == "input"
    rot = [rope_matrix(cfg.d_model, t, cfg.rope_theta) if rope_input else torch.eye(cfg.d_model, dtype=torch.float64)
           for t in range(T)]
    seen = [r @ x[t] for t, r in enumerate(rot)]  # the token as the projections see it
    one = torch.ones(T, dtype=torch.float64)
    r_q = r_kv = one
    if cfg.is_mla:
        attn.rho_kv.fill_(1.0)
        xs = torch.stack(seen)
        r_kv = _rms_rows(attn.kv_a_proj.weight[: cfg.kv_lora_rank], xs, cfg.norm_eps)
        if attn.compressed_q:
            attn.rho_q.fill_(1.0)
            r_q = _rms_rows(attn.q_a_proj.weight, xs, cfg.norm_eps)
    dr = cfg.rope_dim
    for delta in (0, -1, -3, -5):
        forms = {f.key: f for f in attn.qk_chains(offset=delta)}
        assert all(f.offset == delta for f in forms.values())
        for i in range(-delta, T):
            j = i + delta
            for h in range(cfg.n_head):
                xi, xj = seen[i], rot[i] @ x[j]  # x_iᵀ R_iᵀ B(Δ) R_i x_j = (R_i x_i)ᵀ B(Δ) (R_i x_j)
                if dr:
                    content, rope = forms[(1, h, "qk")].form.terms()
                    score = (xi @ multiplied_out(content) @ xj) / (r_q[i] * r_kv[j]) \
                        + (xi @ multiplied_out(rope) @ xj) / r_q[i]
                else:
                    score = (xi @ multiplied_out(forms[(1, h, "qk")].form) @ xj) / (r_q[i] * r_kv[j])
                want = q[h, i] @ k[h, j]
                # the module's cos/sin tables are float32 (relative error ≤ 2⁻²⁴ per entry): |error| ≲ 4·2⁻²⁴·‖q‖‖k‖
                bound = 16 * 2.0**-24 * float(q[h, i].norm() * k[h, j].norm()) + 1e-12
                assert abs(float(score - want)) <= bound, (delta, i, h)


@pytest.mark.parametrize("case", CASES)
def test_ov_chains_reproduce_the_modules_output(case, monkeypatch):
    cfg, attn, x, y, _, _, v, _, r_kv = _setup(case, monkeypatch)
    H, dh = cfg.n_head, cfg.head_dim
    forms = {f.head: f.form for f in attn.ov_chains()}
    assert set(forms) == {-1, *range(H)}
    for h in range(H):  # the module's output projection of head h's own value, other heads zero
        slot = torch.zeros(x.shape[0], H * dh, dtype=torch.float64)
        slot[:, h * dh:(h + 1) * dh] = v[:, h]
        with torch.no_grad():
            own = attn.o_proj(slot)  # (N, d)
        torch.testing.assert_close((x @ multiplied_out(forms[h]).mT) / r_kv[:, None], own, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((x @ multiplied_out(forms[-1]).mT) / r_kv[:, None], y[:, 0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("mla")])
def test_rho_buffers_track_the_latent_rms_and_fold_into_the_chains(case):
    cfg = small(case)
    attn = make_attention(cfg).double()
    _reinit(attn, seed=3)
    chains = {f.key: f.form for f in attn.qk_chains()}  # not measured yet: the isotropic ρ
    dc = cfg.kv_lora_rank
    w_dkv = attn.kv_a_proj.weight[:dc].detach().double()
    iso = latent_rms_isotropic(w_dkv)
    torch.testing.assert_close(chains[(0, 0, "qk" if not cfg.rope_dim else "qk_content")].factors[-1], w_dkv / iso)
    x1, x2 = (torch.randn(3, 5, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
              for s in (4, 5))
    attn.eval()
    attn(x1)
    assert math.isnan(float(attn.rho_kv)), "eval forward must not update ρ"
    attn.train()

    def batch_rms(w, x):  # mean per-token rms of the latent; RoPE at positions 0..T−1 on x for "input" mode
        x = attn.rotary(x) if attn.mode == "input" else x
        return float(((x @ w.detach().double().mT).pow(2).mean(-1) + cfg.norm_eps).sqrt().mean())

    attn(x1)
    r1 = batch_rms(w_dkv, x1)
    assert float(attn.rho_kv) == pytest.approx(r1, rel=1e-12)
    attn(x2)
    assert float(attn.rho_kv) == pytest.approx(0.99 * r1 + 0.01 * batch_rms(w_dkv, x2), rel=1e-12)
    if attn.compressed_q:
        w_dq = attn.q_a_proj.weight
        assert float(attn.rho_q) == pytest.approx(0.99 * batch_rms(w_dq, x1) + 0.01 * batch_rms(w_dq, x2), rel=1e-12)
    forms = {f.key: f.form for f in attn.qk_chains()}
    key = (0, 1, "qk_content" if cfg.rope_dim else "qk")
    torch.testing.assert_close(forms[key].factors[-1], w_dkv / float(attn.rho_kv))
    if attn.compressed_q:
        torch.testing.assert_close(forms[key].factors[0], attn.q_a_proj.weight.detach().double().mT / float(attn.rho_q))


# ---- sizes ------------------------------------------------------------------------------------------------

def _design_kv_floats_per_layer(cfg: ModelConfig) -> int:
    """DESIGN §4: MHA 2·H·dh (GQA/MQA 2·H_kv·dh, MHA-decoupled 2·H·dh + dr); MLA dc + dr (dr = 0 for PreRoPE)."""
    if cfg.attention == "mha_decoupled":
        return 2 * cfg.n_head * cfg.head_dim + cfg.qk_rope_dim
    H_kv = {"mha": cfg.n_head, "gqa": cfg.n_head // 2, "mqa": 1}.get(cfg.attention)
    if H_kv is not None:
        return 2 * H_kv * cfg.head_dim
    if cfg.attention == "mla_decoupled":
        return cfg.kv_lora_rank + cfg.qk_rope_dim
    return cfg.kv_lora_rank


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_parameter_count_and_kv_cache(case, tie):
    cfg = small(case, tie_embeddings=tie)
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == parameter_count_formula(cfg)
    assert cfg.kv_cache_floats_per_layer() == _design_kv_floats_per_layer(cfg)
    assert cfg.kv_cache_floats_per_token() == cfg.n_layer * _design_kv_floats_per_layer(cfg)
    row = describe(cfg)
    assert row["params"] == model.num_parameters()
    assert row["kv_cache_floats_per_token"] == cfg.n_layer * _design_kv_floats_per_layer(cfg)


@settings(max_examples=25, deadline=None)
@given(attention=st.sampled_from(["mha", "gqa", "mqa", "mha_decoupled", "mla_prerope", "mla_decoupled"]),
       n_head=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4, 6]), d_model=st.sampled_from([8, 12]),
       dc=st.integers(1, 9), dq=st.one_of(st.none(), st.integers(1, 9)), dr=st.sampled_from([2, 4]),
       rope_mode=st.sampled_from(["input", "coupled"]), tie=st.booleans())
def test_parameter_count_formula_property(attention, n_head, head_dim, d_model, dc, dq, dr, rope_mode, tie):
    if attention == "gqa" and n_head == 1:
        n_head = 2
    cfg = ModelConfig(vocab_size=11, n_layer=2, d_model=d_model, n_head=n_head, head_dim=head_dim,
                      attention=attention, kv_lora_rank=dc, q_lora_rank=dq, qk_rope_dim=dr, rope_mode=rope_mode,
                      d_ff=20, tie_embeddings=tie)
    assert sum(p.numel() for p in GPT(cfg).parameters()) == parameter_count_formula(cfg)


def test_default_d_ff_and_resolved_fields():
    cfg = ModelConfig()
    assert cfg.head_dim == 32 and cfg.n_kv_head == 4 and cfg.d_ff % 32 == 0 and abs(cfg.d_ff - 8 * 128 / 3) <= 16
    assert ModelConfig(attention="gqa").n_kv_head == 2 and ModelConfig(attention="mqa").n_kv_head == 1


def test_describe_and_summary_table_agree_with_the_formula():
    cfg = ModelConfig()
    table = summary_table(cfg)
    for attention, mode in [("mha", "input"), ("gqa", "input"), ("mqa", "input"), ("mla_prerope", "input"),
                            ("mla_prerope", "coupled"), ("mla_decoupled", "input")]:
        c = ModelConfig(attention=attention, rope_mode=mode)
        row = describe(c)
        assert row["params"] == parameter_count_formula(c)
        line = next(ln for ln in table.splitlines() if ln.split()[0] == row["variant"])
        assert f"{row['params']:,}" in line and f"{row['kv_cache_floats_per_token']:,}" in line
    assert describe(ModelConfig(attention="mla_decoupled"))["kv_cache_floats_per_token"] == 4 * (64 + 16)
    assert describe(ModelConfig())["kv_cache_floats_per_token"] == 4 * 2 * 4 * 32


# ---- config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(attention="sparse"), "unknown attention"),
    (dict(d_model=100, n_head=3), "does not divide d_model"),
    (dict(attention="gqa", n_head=4, n_kv_head=3), "must divide n_head"),
    (dict(attention="mqa", n_kv_head=2), "n_kv_head must be 1"),
    (dict(attention="mha", n_kv_head=2), "n_kv_head must be 4"),
    (dict(attention="mla_prerope", kv_lora_rank=0), "kv_lora_rank"),
    (dict(attention="mla_decoupled", q_lora_rank=0), "q_lora_rank"),
    (dict(attention="mla_decoupled", qk_rope_dim=3), "qk_rope_dim"),
    (dict(rope_mode="sideways"), "unknown rope_mode"),
    (dict(head_dim=5), "even"),
    (dict(n_layer=0), "n_layer"),
    (dict(norm_eps=0.0), "positive"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("case", CASES)
def test_config_json_round_trip(case):
    cfg = small(case)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InputError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


# ---- the model --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_causality(case):
    torch.manual_seed(0)
    model = GPT(small(case, max_seq_len=12)).double().eval()
    _reinit(model, seed=6)  # larger weights than init so every path matters
    idx = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(7))
    changed = idx.clone()
    t = 7
    changed[:, t] = (idx[:, t] + 1) % 32
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-6  # every later position sees the change


def test_rope_depends_only_on_relative_offset():
    rot = Rotary(8, 16, 10000.0).double()
    q, k = torch.randn(2, 8, dtype=torch.float64).unbind(0)

    def score(m, n):
        qs = rot(q.expand(16, 8))[m]
        ks = rot(k.expand(16, 8))[n]
        return float(qs @ ks)

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-6)  # cos/sin tables are float32
    assert score(0, 0) == pytest.approx(float(q @ k), rel=1e-12)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


@pytest.mark.parametrize("case", CASES)
def test_training_lowers_the_loss(case):
    torch.manual_seed(0)
    model = GPT(small(case))
    idx = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(math.log(32), rel=0.1)  # near-uniform predictions at init
    assert losses[-1] < 0.8 * losses[0]


def test_init_follows_the_gpt2_recipe():
    cfg = ModelConfig(n_layer=8)
    model = GPT(cfg)
    attn = model.attention_layers()[0]
    assert attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(128)) and model.lm_head.weight is model.wte.weight
    assert [a.layer_idx for a in model.attention_layers()] == list(range(8))


@pytest.mark.parametrize("case", ["mha", "mla_prerope_input", "mla_decoupled_q_lora"])
def test_bf16_autocast_runs(case):
    model = GPT(small(case))
    idx = torch.randint(0, 32, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_forward_rejects_bad_input():
    model = GPT(small("mha"))
    with pytest.raises(InputError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(InputError, match="batch, time"):
        model(torch.zeros(17, dtype=torch.long))


def test_rope_cache_is_not_in_the_state_dict():
    names = GPT(small("mla_decoupled_q_lora")).state_dict().keys()
    assert not any(n.endswith((".cos", ".sin", "rho_kv", "rho_q")) for n in names)


# ---- native probe -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_native_forms(case):
    cfg = small(case)
    model = GPT(cfg)
    forms = native_forms(model)
    qk_kinds = ["qk", "qk_content", "qk_rope"] if cfg.rope_dim else ["qk"]
    per_layer = (cfg.n_head + 1) * (len(qk_kinds) + 1)
    assert len(forms) == cfg.n_layer * per_layer
    assert [f.layer for f in forms] == [i for i in range(cfg.n_layer) for _ in range(per_layer)]
    assert {f.variant for f in forms} == {variant_of(cfg.attention, cfg.rope_mode)}
    only = native_forms(model, heads=False, kinds=["qk", "ov"])
    assert [(f.layer, f.head, f.kind) for f in only] == [(i, -1, k) for i in range(cfg.n_layer) for k in ("qk", "ov")]
    with pytest.raises(InputError, match="unknown form kind"):
        native_forms(model, kinds=["kq"])
    with pytest.raises(InputError, match="attention_layers"):
        native_forms(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("case", CASES)
def test_positions_are_encoded(case):
    """One layer without position information is invariant to permuting the prefix seen by the last token
    (attention is a weighted set sum); RoPE — on x, on q/k, or on the decoupled rope dims — must break that."""
    model = GPT(small(case, n_layer=1)).double().eval()
    _reinit(model, seed=9)
    idx = torch.tensor([[3, 5, 7, 11, 2]])
    swapped = torch.tensor([[5, 3, 7, 11, 2]])
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(swapped)
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-6


@pytest.mark.parametrize("case", ["mha", "mla_prerope_coupled", "mla_prerope_input", "mla_decoupled"])
def test_the_offset_changes_the_spectrum_only_where_rope_sits_between_query_and_key(case):
    """B(Δ) = Wqᵀ R_Δ Wk has other singular values than B(0) when the rotation sits between the factors; for
    PreRoPE-input B(Δ) = B R_Δ with R_Δ orthogonal, so the singular values are those of B(0) (a closed form)."""
    attn = make_attention(small(case), layer_idx=0).double()
    _reinit(attn, seed=6)
    sv = {o: torch.linalg.svdvals(multiplied_out(next(f.form for f in attn.qk_chains(offset=o) if f.head == 1
                                                      and f.kind == "qk"))) for o in (0, -3)}
    gap = float((sv[0] - sv[-3]).abs().max() / sv[0][0])
    if case == "mla_prerope_input":
        assert gap < 1e-12
    else:
        assert gap > 1e-3
